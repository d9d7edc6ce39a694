"""The image-folder index: the files of a split directory, their labels and image sizes, and which cannot be read.

The first scan decodes every image once (JPEG in draft mode: only "does it decode completely" matters) in
``workers`` processes, with a progress bar. They are forked: they start in milliseconds, and threads scale
less, as a third of the time per file is Python holding the GIL. Once JAX's runtime threads run in this process
(an experiment command that loaded its model first), a fork could deadlock, so the scan uses threads instead.
The result is written to ``cache_dir`` (default ``$XDG_CACHE_HOME/bagjax/folder-index``, never inside the
image folder unless ``cache_dir`` points there), one JSON file per split directory, named by a hash of its
absolute path, so later runs, resumes and other hosts that share the cache reuse it. Each run still lists the
directory and stats every file (no decode): a file whose size and mtime match its entry keeps it, any other is
decoded again, so the index is never stale. A file that breaks after the scan is handled by the input
pipeline's workers (skipped and counted), as before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from typing import Sequence

import tqdm

from bagjax import atomic
from bagjax.data import preprocess

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # tfds.folder_dataset.ImageFolder's, case-insensitive.
_DRAFT_SIZE = 64
_FORMAT = 1  # Bumped when the index file's layout changes: an old file is then rebuilt.
_BAR_MIN_FILES = 100  # Fewer files to decode than this: no progress bar.
_PARALLEL_MIN_FILES = 256  # Fewer than this: decoded in this process (starting workers would cost more).


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image file of a split directory."""

    path: str  # Relative to the split directory: LABEL/FILE.
    label: int  # Index of LABEL in the class list.
    size: int  # Bytes.
    mtime_ns: int
    width: int  # Pixels; 0 when unreadable.
    height: int
    problem: str = ''  # Why it cannot be read ('' when it can).


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """Every image file of a split directory in (label, name) order, and how many this scan decoded."""

    entries: tuple[Entry, ...]
    decoded: int  # 0: everything came from the cached index.

    @property
    def readable(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if not e.problem)

    @property
    def unreadable(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.problem)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/bagjax/folder-index`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(home, 'bagjax', 'folder-index')


def index_file(split_dir: str, cache_dir: str = '') -> str:
    """Where the index of a split directory is cached."""
    key = hashlib.sha256(os.path.abspath(split_dir).encode()).hexdigest()[:24]
    return os.path.join(cache_dir or default_cache_dir(), f'{key}.json')


def _inspect(path: str) -> tuple[int, int, str]:
    """(width, height, '') of an image that decodes completely, else (0, 0, the one-line reason)."""
    try:
        with preprocess.open_image(path) as image:
            width, height = image.size
        preprocess.open_rgb(path, draft_size=_DRAFT_SIZE)
    except ValueError as e:
        return 0, 0, str(e)
    return width, height, ''


def _worker_signals() -> None:
    """A scan worker leaves Ctrl-C to its parent (which ends it) and ends on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _inspect_all(paths: Sequence[str], workers: int, desc: str) -> list[tuple[int, int, str]]:
    """``_inspect`` of every path, in order, on ``workers`` forked processes, with a progress bar."""
    bar = tqdm.tqdm(total=len(paths), unit='file', desc=desc, mininterval=1.0, leave=False,
                    disable=len(paths) < _BAR_MIN_FILES)
    results = []
    with bar:
        if workers <= 1 or len(paths) < _PARALLEL_MIN_FILES:
            for path in paths:
                results.append(_inspect(path))
                bar.update()
            return results
        if _fork_is_safe():
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('fork'),
                                                          initializer=_worker_signals)
        else:
            pool = concurrent.futures.ThreadPoolExecutor(workers)
        with pool:
            for result in pool.map(_inspect, paths, chunksize=max(1, min(256, len(paths) // (8 * workers)))):
                results.append(result)
                bar.update()
    return results


def _fork_is_safe() -> bool:
    """Whether worker processes can be forked: on a platform with fork, before JAX started its runtime threads
    (JAX itself warns that a fork after that may deadlock)."""
    if 'fork' not in multiprocessing.get_all_start_methods():
        return False
    if 'jax' not in sys.modules:
        return True
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return not xla_bridge.backends_are_initialized()


def _list(split_dir: str, labels: Sequence[str]) -> list[tuple[str, int, int, int, str]]:
    """(LABEL/FILE, label id, size, mtime_ns, problem) of every image file, by stat only."""
    listed = []
    for label_id, label in enumerate(labels):
        with os.scandir(os.path.join(split_dir, label)) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS))
        for name in names:
            rel = f'{label}/{name}'
            try:
                stat = os.stat(os.path.join(split_dir, rel))
            except OSError as e:  # A dangling link, a file removed meanwhile.
                listed.append((rel, label_id, -1, -1, f'unreadable image {os.path.join(split_dir, rel)}: '
                                                      f'{e.strerror}'))
                continue
            listed.append((rel, label_id, stat.st_size, stat.st_mtime_ns, ''))
    return listed


def _read_cache(path: str, split_dir: str) -> dict[str, list]:
    """``{LABEL/FILE: [size, mtime_ns, width, height, problem]}`` from a cached index (empty if none or unusable)."""
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
        if saved.get('format') != _FORMAT or saved.get('split_dir') != split_dir:
            return {}
        return {row[0]: row[1:] for row in saved['files']}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _write_cache(path: str, split_dir: str, entries: Sequence[Entry]) -> None:
    rows = [[e.path, e.size, e.mtime_ns, e.width, e.height, e.problem] for e in entries]
    text = json.dumps({'format': _FORMAT, 'split_dir': split_dir, 'files': rows}, separators=(',', ':'))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic.write_text(path, text)
    except OSError as e:  # A read-only cache: the next run scans again, nothing else is lost.
        logger.warning('cannot write the image-folder index %s (%s): the next run decodes every file again; '
                       'set config.data.cache_dir to a writable directory', path, e.strerror)


def index_split(split_dir: str, labels: Sequence[str], *, cache_dir: str = '', workers: int = 1) -> SplitIndex:
    """The index of ``split_dir``/<label>/*.jpg|jpeg|png (labels in class order), reusing the cached one."""
    split_dir = os.path.abspath(split_dir)
    path = index_file(split_dir, cache_dir)
    cached = _read_cache(path, split_dir)
    listed = _list(split_dir, labels)
    known: dict[str, tuple[int, int, str]] = {}
    todo = []
    for rel, _, size, mtime_ns, problem in listed:
        row = cached.get(rel)
        if problem:
            known[rel] = (0, 0, problem)
        elif row is not None and row[0] == size and row[1] == mtime_ns:
            known[rel] = (row[2], row[3], row[4])
        else:
            todo.append(rel)
    if todo:
        known.update(zip(todo, _inspect_all([os.path.join(split_dir, rel) for rel in todo], workers,
                                            f'indexing {os.path.basename(split_dir)}')))
    entries = tuple(Entry(rel, label_id, size, mtime_ns, *known[rel])
                    for rel, label_id, size, mtime_ns, _ in listed)
    if todo or len(cached) != len(entries):
        _write_cache(path, split_dir, entries)
    return SplitIndex(entries, len(todo))
