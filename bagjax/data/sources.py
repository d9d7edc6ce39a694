"""Dataset sources behind the specs `synthetic[:VARIANT]`, `imagefolder:PATH`, `tfds:NAME[/CONFIG]`.

Every source gives random access: `records(split)` is a Grain data source (len
and __getitem__) of small picklable records (image, label), where image is a
uint8 array (synthetic), a file path (imagefolder) or encoded bytes (tfds,
read from ArrayRecord through tfds.data_source). Reading record i touches only
example i, so every process reads only its own examples and a resume reads
nothing before its step. `decode` turns a record's image into an array or an
opened, not yet decoded, PIL image; preprocess.py decodes and transforms it
(in Grain worker processes), the same for all sources.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import random
import re
import socket
import textwrap
from typing import Any

import numpy as np
from PIL import Image

from bagjax.data import fingerprint
from bagjax.data import folder_index
from bagjax.data import preprocess
from bagjax.data import splits
from bagjax.data import synthetic
from bagjax.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = folder_index.IMAGE_EXTENSIONS

_NAMES_IN_WARNING = 5
_DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
# TFDS retries each URL 10 times with exponential backoff (0.2 s doubling: ~205 s before an offline machine
# hears that it is offline). 4 retries wait 3 s in all; a network outage longer than that fails the download,
# and a rerun reuses the files that finished downloading.
_DOWNLOAD_RETRIES = 4


class DatasetUnavailableError(UserError, RuntimeError):
    """A tfds dataset cannot be found or prepared (typically: offline), or is not in ArrayRecord."""


Record = tuple[Any, int]  # (uint8 HWC array | file path | encoded bytes, label)


def decode(image: Any) -> np.ndarray | Image.Image:
    """A record's image as an array, or a PIL image opened but not decoded (see preprocess)."""
    if isinstance(image, (str, bytes)):
        return preprocess.open_image(image)
    return image


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayRecords:
    """Examples held in memory (synthetic): images (N, H, W, 3) uint8 and labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Record:
        return self.images[index], int(self.labels[index])


@dataclasses.dataclass(frozen=True, eq=False)
class FileRecords:
    """Image files (imagefolder): (path, label) pairs."""

    files: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        return self.files[index]


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsRecords:
    """A tfds.data_source split (ArrayRecord) whose images are left encoded."""

    source: Any
    image_key: str
    label_key: str

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        example = self.source[index]
        return example[self.image_key], int(example[self.label_key])


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """The config fields a source depends on (hashable, so sources are cached)."""

    spec: str
    data_dir: str
    manual_dir: str
    train_split: str
    eval_split: str
    synthetic_train_size: int
    synthetic_eval_size: int
    synthetic_image_size: int
    cache_dir: str = ''  # Where image-folder indexes are cached ('' = folder_index.default_cache_dir()).
    scan_workers: int = 1  # Processes of an image-folder scan.

    @classmethod
    def from_config(cls, config) -> SourceOptions:
        data = config.data
        return cls(
            spec=str(config.dataset),
            data_dir=str(data.data_dir),
            manual_dir=str(data.manual_dir),
            train_split=str(data.train_split),
            eval_split=str(data.eval_split),
            synthetic_train_size=int(data.synthetic_train_size),
            synthetic_eval_size=int(data.synthetic_eval_size),
            synthetic_image_size=int(data.synthetic_image_size),
            cache_dir=str(data.get('cache_dir', '')),
            scan_workers=capped_workers(int(data.get('workers', -1)), quiet=True) or available_cores(),
        )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


_capped_warned: set[tuple[int, int]] = set()


def capped_workers(workers: int, *, quiet: bool = False) -> int:
    """config.data.workers as a process count: -1 is one per available core, and more than the available
    cores is capped to them (one line, once): extra decoding processes only compete for the same cores."""
    if workers < -1:
        raise UserError(f'data.workers={workers}: use -1 (one per core), 0 (in-process) or a count')
    cores = available_cores()
    if workers == -1:
        return cores
    if workers > cores:
        if not quiet and (workers, cores) not in _capped_warned:
            _capped_warned.add((workers, cores))
            print(f'data: workers={workers} capped to the {cores} available cores (more processes than cores '
                  f'only compete for them); set config.data.workers={cores} or -1 to silence this', flush=True)
        return cores
    return workers


def get_source(options: SourceOptions):
    """The source for a dataset spec (cached per process: scans run once)."""
    return _get_source(options)


@functools.lru_cache(maxsize=8)
def _get_source(options: SourceOptions):
    kind, _, rest = options.spec.partition(':')
    if kind == 'synthetic':
        return SyntheticSource(rest or 'default', options)
    if kind == 'imagefolder' and rest:
        return ImageFolderSource(rest, options)
    if kind == 'tfds' and rest:
        return TfdsSource(rest, options)
    raise UserError(
        f"unknown dataset spec '{options.spec}': use 'tfds:NAME[/CONFIG]', "
        "'imagefolder:PATH' (PATH/<split>/<label>/*.jpg|png) or 'synthetic[:VARIANT]'"
    )


class SyntheticSource:
    """The embedded motif dataset (synthetic.py), held in memory."""

    eval_center_crop = False  # Motifs may sit at the border: eval resizes the whole image.
    # Random crops keep >= 70% of the image: motifs stay in view and near their eval scale.
    train_crop_scale = (0.7, 1.0)

    def __init__(self, variant: str, options: SourceOptions):
        self._variant_name = variant
        self._variant = synthetic.get_variant(variant)
        self._options = options
        self.class_names = self._variant.class_names
        self.num_skipped = 0
        self.image_size = self._variant.image_size or options.synthetic_image_size
        self.location = ''

    def _split(self, split: str) -> tuple[synthetic.SyntheticSplit, int, int]:
        spec = splits.parse_split(split)
        n = synthetic.split_size(
            self._variant,
            spec.name,
            self._options.synthetic_train_size,
            self._options.synthetic_eval_size,
        )
        lo, hi = spec.bounds(n)
        return synthetic.load_split(self._variant_name, spec.name, n, self.image_size), lo, hi

    def num_examples(self, split: str) -> int:
        _, lo, hi = self._split(split)
        return hi - lo

    def records(self, split: str) -> ArrayRecords:
        data, lo, hi = self._split(split)
        return ArrayRecords(data.images[lo:hi], data.labels[lo:hi])

    def membership(self, split: str) -> dict[str, Any]:
        """The split's fingerprint (fingerprint.py): the examples are a function of the variant and the sizes."""
        _, lo, hi = self._split(split)
        n = self.num_examples(split)
        return fingerprint.membership(n, [fingerprint.digest([self._variant_name, split, str(lo), str(hi),
                                                              str(self.image_size)])])

    def boxes(self, split: str, index: int) -> np.ndarray:
        """Motif boxes (M, 4) as (y0, x0, y1, x1) in native synthetic pixels."""
        data, lo, _ = self._split(split)
        return data.boxes[lo + index]


def _list_dirs(path: str, root: str) -> list[str]:
    """Sorted sub-directory names; a symlink loop or unreadable entry is a one-line error."""
    names = []
    for entry in os.scandir(path):
        try:
            if entry.is_dir():
                names.append(entry.name)
        except OSError as e:
            raise UserError(
                f"imagefolder '{root}': cannot read '{os.path.relpath(entry.path, root)}' "
                f'({e.strerror}, e.g. a symlink loop): remove or fix it'
            ) from None
    return sorted(names)


class ImageFolderSource:
    """PATH/<split>/<label>/*.{jpg,jpeg,png}, one record per readable file.

    Mirrors tfds.folder_dataset.ImageFolder: splits are the sub-directories,
    files are matched by extension (case-insensitive), listed in sorted
    (label, file) order, then shuffled with random.Random(split_name).
    ImageFolder itself is not used because it decodes with TF (one bad file
    aborts the pipeline) and merges the labels of all splits; here the class
    mapping is the sorted label dirs of the train split and every other split
    must have the same label dirs. Files are indexed once (folder_index.py:
    decoded by a parallel scan, cached, revalidated by stat on later runs);
    unreadable ones are skipped, counted and reported. The train split needs
    at least 2 classes, and a label dir without images is an error there (a
    warning in other splits): it would be a class nothing can teach.

    A slice in percents, 'train[:80%]' / 'train[80%:]', is a stable hash split
    (splits.stable_position of a file's path inside its label dir): adding or
    removing files never moves another file across it, and neither does
    renaming a label dir. A slice in counts ('train[:100]') takes positions of
    the shuffled list, as TFDS does.
    """

    eval_center_crop = True
    train_crop_scale = None  # From config.data.crop_min_area.

    def __init__(self, root: str, options: SourceOptions):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise UserError(
                f"imagefolder path '{self.root}' is not a directory: expected PATH/<split>/<label>/*.jpg"
            )
        self.location = self.root
        self._options = options
        self._splits = _list_dirs(self.root, self.root)
        self._train_name = splits.parse_split(options.train_split).name
        self.class_names = tuple(self._labels_of(self._train_name))
        if len(self.class_names) < 2:
            raise UserError(
                f"imagefolder '{self.root}': train split '{self._train_name}' has "
                f'{len(self.class_names)} label directory(ies) {list(self.class_names)}; a classifier '
                'needs at least 2 classes: add PATH/<split>/<label>/ folders'
            )
        self._files: dict[str, tuple[folder_index.Entry, ...]] = {}
        self._skipped: dict[str, int] = {}
        for split in (options.train_split, options.eval_split):
            self._readable(splits.parse_split(split).name)

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped, summed over the split directories scanned."""
        return sum(self._skipped.values())

    def _labels_of(self, split_name: str) -> list[str]:
        if split_name not in self._splits:
            raise UserError(
                f"imagefolder '{self.root}' has no split directory '{split_name}': found {self._splits}"
            )
        return _list_dirs(os.path.join(self.root, split_name), self.root)

    def _readable(self, split_name: str) -> tuple[folder_index.Entry, ...]:
        if split_name in self._files:
            return self._files[split_name]
        labels = self._labels_of(split_name)
        if tuple(labels) != self.class_names:
            missing = sorted(set(self.class_names) - set(labels))
            extra = sorted(set(labels) - set(self.class_names))
            raise UserError(
                f"imagefolder '{self.root}': split '{split_name}' label dirs differ from train split "
                f"'{self._train_name}' (missing {missing}, extra {extra}); the class mapping is the "
                'sorted label dirs of the train split, so give every split the same label dirs'
            )
        index = folder_index.index_split(os.path.join(self.root, split_name), labels,
                                         cache_dir=self._options.cache_dir, workers=self._options.scan_workers)
        present = {e.label for e in index.entries}
        empty = [label for i, label in enumerate(labels) if i not in present]
        if empty:
            message = (
                f"imagefolder '{self.root}': label dir(s) {empty} of split '{split_name}' hold no "
                f'{"/".join(IMAGE_EXTENSIONS)} files'
            )
            if split_name == self._train_name:
                raise UserError(f'{message}: add images or remove the empty dirs')
            logger.warning('%s: those classes are not evaluated', message)
        bad = index.unreadable
        if bad:
            names = ', '.join(os.path.join(split_name, e.path) for e in bad[:_NAMES_IN_WARNING])
            more = ', ...' if len(bad) > _NAMES_IN_WARNING else ''
            logger.warning(
                "imagefolder '%s': skipped %d unreadable image file(s) in split '%s': %s%s",
                self.root, len(bad), split_name, names, more,
            )
        readable = list(index.readable)
        random.Random(split_name).shuffle(readable)
        self._files[split_name] = tuple(readable)
        self._skipped[split_name] = len(bad)
        return self._files[split_name]

    @functools.lru_cache(maxsize=8)
    def _entries(self, split: str) -> tuple[folder_index.Entry, ...]:
        spec = splits.parse_split(split)
        files = self._readable(spec.name)
        percents = splits.percent_bounds(spec)
        if percents is not None:
            lo, hi = percents
            return tuple(e for e in files if lo <= splits.stable_position(e.path.partition('/')[2]) < hi)
        lo, hi = spec.bounds(len(files))
        return files[lo:hi]

    def num_examples(self, split: str) -> int:
        return len(self._entries(split))

    @functools.lru_cache(maxsize=8)
    def records(self, split: str) -> FileRecords:
        directory = os.path.join(self.root, splits.parse_split(split).name)
        return FileRecords(tuple((os.path.join(directory, e.path), e.label) for e in self._entries(split)))

    def membership(self, split: str) -> dict[str, Any]:
        """The split's fingerprint (fingerprint.py): per class, a digest of its files' names and sizes; and a
        stamp of their mtimes (a copy changes the stamp, not the digests)."""
        entries = sorted(self._entries(split), key=lambda e: e.path)
        by_class: list[list[str]] = [[] for _ in self.class_names]
        for e in entries:
            by_class[e.label].append(f'{e.path.partition("/")[2]}\t{e.size}')
        return fingerprint.membership(len(entries), [fingerprint.digest(files) for files in by_class],
                                      stamp=fingerprint.digest(f'{e.path}\t{e.mtime_ns}' for e in entries))


@contextlib.contextmanager
def _failing_fast(seconds: float, retries: int):
    """Bounds every blocking socket call and TFDS's per-URL retries, so an offline download fails in seconds.

    urllib3's warning for each retry is silenced meanwhile (the failure itself is reported in one line). All
    are process-wide settings, restored on exit: do not prepare two TFDS datasets from different threads.
    """
    from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top

    retry_log = logging.getLogger('urllib3.connectionpool')
    previous = socket.getdefaulttimeout(), getattr(downloader, 'MAX_RETRIES', None), retry_log.level
    socket.setdefaulttimeout(seconds)
    retry_log.setLevel(logging.ERROR)
    if previous[1] is not None:  # A module constant read at each request (tfds 4.9).
        downloader.MAX_RETRIES = min(retries, previous[1])
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous[0])
        retry_log.setLevel(previous[2])
        if previous[1] is not None:
            downloader.MAX_RETRIES = previous[1]


@dataclasses.dataclass(frozen=True)
class Flags:
    """How a command's user sets TFDS's directories and the image-folder alternative (error messages name them)."""

    data_dir: str
    manual_dir: str
    imagefolder: str


CONFIG_FLAGS = Flags('config.data.data_dir', 'config.data.manual_dir',
                     "dataset='imagefolder:PATH' with PATH/<split>/<label>/*.jpg")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ''


def _reason(error: BaseException) -> str:
    """An exception as 'Type: its first line', with a failed connection shortened to the host it could not reach."""
    text = ' '.join(str(error).split('\n', 1)[0].split())
    host = re.search(r"host='([^']+)'", text)
    if host:  # requests: "HTTPConnectionPool(host='H', port=P): Max retries exceeded ... (Caused by X(...))"
        cause = re.search(r'Caused by (\w+)', text)
        text = f'cannot reach {host[1]}' + (f': {cause[1]}' if cause and cause[1] != type(error).__name__ else '')
    # TFDS's manual-dir assertion: keep the folder and the verdict (download_and_prepare adds the instructions).
    text = text.removeprefix('Manual directory ').partition('. Create it and download')[0]
    text = textwrap.shorten(text, 200, placeholder=' ...')  # Cut at a word, never inside one.
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def tfds_builder(name: str, data_dir: str):
    """tfds.builder for NAME[/CONFIG][:VERSION]; an unknown name or config is one line that suggests close ones."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        return tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
    except Exception as e:  # DatasetNotFoundError, bad config or version, registry errors.
        base, _, config = name.partition(':')[0].partition('/')
        if isinstance(e, tfds.core.registered.DatasetNotFoundError):
            known = tfds.list_builders(with_community_datasets=False)
            message = (f'unknown tfds dataset {base!r}{_did_you_mean(base, known)}: the names are listed at '
                       'https://www.tensorflow.org/datasets/catalog')
        elif config and 'BuilderConfig' in str(e):  # TFDS's own message ends in an empty list of close names.
            configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
            message = f'tfds dataset {base!r} has no config {config!r}' + (
                f"{_did_you_mean(config, configs)}: its configs are {', '.join(configs)}" if configs
                else f': it has none, use tfds:{base}')
        else:
            message = f'tfds dataset {name!r}: {_reason(e)}'
        raise DatasetUnavailableError(message) from None


def _is_missing_manual_file(error: BaseException) -> bool:
    return ('Manual directory' in str(error) or isinstance(error, FileNotFoundError)
            or type(error).__name__ == 'NotFoundError')  # tf.errors.NotFoundError from tf.io.gfile


def download_and_prepare(builder, name: str, manual_dir: str, flags: Flags = CONFIG_FLAGS) -> None:
    """Downloads and prepares a builder in ArrayRecord, failing within seconds offline, in one line."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        with _failing_fast(_DOWNLOAD_SOCKET_TIMEOUT_S, _DOWNLOAD_RETRIES):
            builder.download_and_prepare(download_config=config, file_format='array_record')
    except Exception as e:  # Network, checksum, manual-dir and import errors alike.
        instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
        if instructions and _is_missing_manual_file(e):
            raise DatasetUnavailableError(
                f'tfds dataset {name!r} needs files downloaded by hand, in the folder given as {flags.manual_dir} '
                f"({_reason(e)}): {' '.join(instructions.split())}"
            ) from None
        if not _is_network_error(e):  # a full disk, a missing optional package, a bad checksum, ...
            raise DatasetUnavailableError(
                f'tfds dataset {name!r} could not be prepared in {builder.data_dir} ({_reason(e)}): fix that and '
                f"rerun (`{prepare_command(name, 'DIR')}`); finished downloads are kept"
            ) from None
        raise DatasetUnavailableError(
            f'tfds dataset {name!r} is not prepared and cannot be downloaded here ({_reason(e)}): prepare it '
            f"where there is a network (`{prepare_command(name, 'DIR')}`, which gives up after "
            f'{_DOWNLOAD_RETRIES} retries per file: rerun it after a network failure, finished downloads are kept) '
            f'and point {flags.data_dir} at a copy of DIR, put the files it downloads in {flags.manual_dir}, or use '
            f'{flags.imagefolder}'
        ) from None


def _is_network_error(error: BaseException | None) -> bool:
    """Whether an exception or one it was raised from is a failed connection (requests, urllib3 or socket)."""
    while error is not None:
        if (isinstance(error, (ConnectionError, TimeoutError, socket.gaierror))
                or type(error).__module__.split('.')[0] in ('requests', 'urllib3')):
            return True
        error = error.__cause__ or error.__context__
    return False


def has_array_record(builder) -> bool:
    """Whether a prepared builder's files include ArrayRecord (Grain needs random access)."""
    from tensorflow_datasets.core import dataset_info  # pylint: disable=g-import-not-at-top

    info = dataset_info.read_proto_from_builder_dir(builder.data_dir)  # On disk: a conversion adds a format.
    return 'array_record' in {info.file_format, *info.alternative_file_formats}


def prepare_command(name: str, data_dir: str) -> str:
    """The command that converts a prepared TFDS dataset to ArrayRecord (bagjax/data/prepare.py)."""
    return f'python -m bagjax.data.prepare tfds:{name}' + (f' --data_dir {data_dir}' if data_dir else '')


class TfdsSource:
    """tfds:NAME[/CONFIG] through tfds.data_source (ArrayRecord): random access by index.

    A dataset that is not prepared is downloaded and prepared in ArrayRecord;
    one prepared in TFRecord only must be converted once with `prepare_command`.
    """

    eval_center_crop = True
    train_crop_scale = None

    def __init__(self, name: str, options: SourceOptions):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self.name = name
        builder = tfds_builder(name, options.data_dir)
        if not builder.is_prepared():
            download_and_prepare(builder, name, options.manual_dir)
        if not has_array_record(builder):
            raise DatasetUnavailableError(
                f'tfds dataset {name!r} in {builder.data_dir} is stored as '
                f'{builder.info.file_format.value}, but the input pipeline reads ArrayRecord: run '
                f'`{prepare_command(name, options.data_dir)}` once to convert it'
            )
        builder = tfds.builder_from_directory(builder.data_dir)  # Its files' formats, as written on disk.
        self._builder = builder
        keys = builder.info.supervised_keys
        self._image_key, self._label_key = keys if keys else ('image', 'label')
        features = builder.info.features
        if self._image_key not in features or self._label_key not in features:
            raise UserError(
                f"tfds dataset {name!r} has no ('image', 'label') features: found {list(features)}"
            )
        self.class_names = tuple(features[self._label_key].names)
        self.num_skipped = 0
        self.location = str(builder.data_dir)

    def membership(self, split: str) -> dict[str, Any]:
        """The split's fingerprint (fingerprint.py): TFDS name, version, split string and size."""
        n = self.num_examples(split)
        info = self._builder.info
        return fingerprint.membership(n, [fingerprint.digest([info.full_name, str(info.version), split, str(n)])])

    def num_examples(self, split: str) -> int:
        return len(self.records(split))

    @functools.lru_cache(maxsize=4)
    def records(self, split: str) -> TfdsRecords:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        try:
            source = self._builder.as_data_source(
                split=split,
                decoders={self._image_key: tfds.decode.SkipDecoding()},
                file_format='array_record',
            )
        except (KeyError, ValueError):
            raise UserError(
                f'tfds dataset {self.name!r} has no split {split!r}: '
                f'available {list(self._builder.info.splits)}'
            ) from None
        return TfdsRecords(source, self._image_key, self._label_key)
