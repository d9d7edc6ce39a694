"""Per-process train/eval batches on Grain (the API of bagjax.data).

The contract (DESIGN.md, data): the GLOBAL batch of step s is a pure function
of (seed, s) and the dataset, whatever the process count. In Grain terms:

    stream = MapDataset.source(records).shuffle(seed).repeat()   # epoch e: a permutation keyed by (seed, e)
    stream = stream.map(decode).random_map(augment, seed=seed)   # rng keyed by (seed, stream position)
    mine = stream.batch(b)[p::P][start_step:]                    # b = B / P

so global batch s is stream[s*B:(s+1)*B], process p decodes only its
contiguous slice [s*B + p*b, s*B + (p+1)*b), and starting at a step is a
slice: nothing before it is read. Batches are uint8 (normalization runs on
the device, inside the jitted step: preprocess.normalize). Decoding and
augmentation run in `config.data.workers` Grain worker processes (-1: one per
core, 0: in this process); each worker builds whole batches, in order.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from bagjax.data import fingerprint
from bagjax.data import preprocess
from bagjax.data import sources
from bagjax.errors import UserError

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

_PREFETCH_BATCHES = 2  # Per worker (or in-process): batches decoded ahead of the train step.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset."""

    num_classes: int
    class_names: tuple[str, ...]
    num_train: int  # Examples in the train split (after skipping unreadable files).
    num_eval: int  # Examples in the eval split.
    num_skipped: int = 0  # Unreadable files skipped (imagefolder), summed over splits.
    fingerprint: dict[str, Any] | None = None  # What the data is (bagjax.data.fingerprint), kept in the workdir.


def _source(config):
    return sources.get_source(sources.SourceOptions.from_config(config))


def dataset_info(config) -> DatasetInfo:
    """Classes and split sizes of config.dataset (scans an imagefolder once per process)."""
    source = _source(config)
    return DatasetInfo(
        num_classes=len(source.class_names),
        class_names=tuple(source.class_names),
        num_train=source.num_examples(config.data.train_split),
        num_eval=source.num_examples(config.data.eval_split),
        num_skipped=source.num_skipped,
        fingerprint=fingerprint.of_source(source, str(config.dataset),
                                          {'train': config.data.train_split, 'eval': config.data.eval_split}),
    )


def resolve_processes(
        process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """Defaults to jax.process_index() / jax.process_count() and checks the pair."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f'process_index {process_index} is out of range for process_count {process_count}'
        )
    return process_index, process_count


def per_process(global_batch: int, process_count: int, what: str) -> int:
    """The per-process share of a global batch; it must divide evenly."""
    if global_batch <= 0 or global_batch % process_count:
        raise UserError(
            f'{what}={global_batch} must be a positive multiple of the process count '
            f'{process_count}'
        )
    return global_batch // process_count


def num_workers(config) -> int:
    """config.data.workers, with -1 meaning one worker process per core, capped to the available cores."""
    return sources.capped_workers(int(config.data.get('workers', -1)))


# Transforms: module-level callables, so the pipeline pickles into spawned worker processes.
@dataclasses.dataclass(frozen=True)
class _Augment:
    """Decode + RandomResizedCrop + flip; a file that fails to decode becomes a black image (logged)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool

    def __call__(self, record: sources.Record, rng: np.random.Generator) -> Batch:
        image, label = record
        try:
            out = preprocess.preprocess_for_train(
                sources.decode(image), rng, self.size, scale=self.scale, ratio=self.ratio, flip=self.flip
            )
        except ValueError as e:  # Changed on disk after the scan: never kill the pipeline.
            logger.warning('%s; a black image takes its place', e)
            out = np.zeros((self.size, self.size, 3), np.uint8)
        return {'image': out, 'label': np.int32(label)}


@dataclasses.dataclass(frozen=True)
class _Evaluate:
    """Decode + the eval transform of one position; padding and unreadable files get mask False."""

    records: Any
    size: int
    center_crop: bool
    crop_fraction: float

    def __call__(self, position: int) -> Batch:
        out = {'image': np.zeros((self.size, self.size, 3), np.uint8), 'label': np.int32(0), 'mask': False}
        if position >= len(self.records):
            return out
        image, label = self.records[position]
        try:
            image = sources.decode(image)
            if self.center_crop:
                out['image'] = preprocess.preprocess_for_eval(image, self.size, self.crop_fraction)
            else:
                out['image'] = preprocess.resize_full(image, self.size)
        except ValueError as e:  # Changed on disk after the scan: masked out, never fatal.
            logger.warning('%s; left out of the evaluation', e)
            return out
        return {**out, 'label': np.int32(label), 'mask': True}


def _train_scale(source, config) -> tuple[float, float]:
    if source.train_crop_scale is not None:
        return source.train_crop_scale
    return (float(config.data.crop_min_area), 1.0)


def train_dataset(
        config,
        *,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
) -> grain.MapDataset:
    """This process's training batches of steps start_step, start_step + 1, ... (endless)."""
    source = _source(config)
    p, num_p = resolve_processes(process_index, process_count)
    b = per_process(int(config.batch_size), num_p, 'batch_size')
    seed, split = int(config.seed), config.data.train_split
    records = source.records(split)
    if len(records) == 0:
        raise UserError(f'dataset {config.dataset!r}: train split {split!r} has no examples')
    augment = _Augment(
        size=int(config.image_size),
        scale=_train_scale(source, config),
        ratio=tuple(config.data.get('crop_aspect_ratio', preprocess.CROP_ASPECT_RATIO)),
        flip=bool(config.data.flip),
    )
    stream = grain.MapDataset.source(records).shuffle(seed=seed).repeat()
    stream = stream.random_map(augment, seed=seed)
    return stream.batch(b)[p::num_p][start_step:]


def eval_dataset(
        config,
        *,
        split: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
) -> grain.MapDataset:
    """This process's eval batches: global batch k holds positions [k*B, (k+1)*B), padded past the end.

    Every process gets ceil(N / B) batches (so SPMD eval never hangs) and the
    slice [p*b, (p+1)*b) of each; positions >= N are padding (mask False).
    """
    source = _source(config)
    p, num_p = resolve_processes(process_index, process_count)
    global_batch = int(config.eval_batch_size)
    b = per_process(global_batch, num_p, 'eval_batch_size')
    records = source.records(config.data.eval_split if split is None else split)
    num_batches = -(-len(records) // global_batch)
    evaluate = _Evaluate(records, int(config.image_size), source.eval_center_crop,
                         float(config.data.crop_fraction))
    return grain.MapDataset.range(num_batches * global_batch).map(evaluate).batch(b)[p::num_p]


_GUARD_NAMES = ('__name__', 'current_process', 'parent_process')  # what a main-process test looks at


def _is_guard(test: ast.expr) -> bool:
    """Whether an `if` test asks whether this is the main process: `__name__ == '__main__'`, in any form or
    combination, or multiprocessing's `current_process()` / `parent_process()` (generous on purpose: a false
    alarm would stop a correct script, a missed one only keeps the old hang)."""
    return any((isinstance(n, ast.Name) and n.id in _GUARD_NAMES) or
               (isinstance(n, ast.Attribute) and n.attr in _GUARD_NAMES) for n in ast.walk(test))


def unguarded_main_line() -> int | None:
    """The line of the main script that asks for worker batches outside `if __name__ == '__main__':`.

    Grain starts its workers with the 'spawn' method, which reruns the main
    script's top level in every worker (Python's multiprocessing docs, "Safe
    importing of main module"). A script that builds its batches at top level
    makes each worker start workers of its own; they fail, and the parent then
    waits forever for them (it holds its end of their start-up pipe). None when
    the call is guarded, or when spawn reruns nothing: an interactive session,
    `python -c`, a notebook or a package's __main__; and None when the script on
    disk no longer compiles to the running code, as after an edit (a run must
    survive its script being edited under it).
    """
    main = sys.modules.get('__main__')
    path = getattr(main, '__file__', None)
    spec_name = getattr(getattr(main, '__spec__', None), 'name', None) or ''
    if main is None or path is None or spec_name == '__main__' or spec_name.endswith('.__main__'):
        return None
    frame = sys._getframe(1)  # pylint: disable=protected-access
    while frame is not None and not (frame.f_code.co_name == '<module>' and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return None
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        running = compile(text, path, 'exec', dont_inherit=True)  # not this module's __future__ imports
    except (OSError, SyntaxError, ValueError):
        return None
    if (running.co_code, running.co_linetable) != (frame.f_code.co_code, frame.f_code.co_linetable):
        return None
    tree = ast.parse(text)
    line = frame.f_lineno
    guarded = any(isinstance(node, ast.If) and _is_guard(node.test) and node.lineno <= line <= node.end_lineno
                  for node in ast.walk(tree))
    return None if guarded else line


def iterate(dataset: grain.MapDataset, workers: int) -> Iterator[Batch]:
    """Batches of a MapDataset in order, built by `workers` processes (0: a thread of this process)."""
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES)
    it = dataset.to_iter_dataset(read)
    if workers > 0:
        line = unguarded_main_line()
        if line is not None:
            raise UserError(
                f'{sys.modules["__main__"].__file__}:{line} asks for batches from {workers} worker processes '
                "at the script's top level, which every worker would rerun: put that code under "
                "`if __name__ == '__main__':`, or set config.data.workers = 0"
            )
        if not flags.FLAGS.is_parsed():  # Grain reads absl flags when it starts workers (google/grain#1355).
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=_PREFETCH_BATCHES)
        )
    iterator = iter(it)
    try:
        yield from iterator
    finally:  # Stops the worker processes now rather than at garbage collection.
        close = getattr(iterator, 'close', None)
        if close is not None:
            close()


def train_batches(
        config,
        *,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
) -> Iterator[Batch]:
    """Endless per-process training batches for steps start_step, start_step + 1, ...

    Yields {'image': uint8 (b, S, S, 3), 'label': int32 (b,)} with
    b = config.batch_size // process_count: this process's contiguous slice of
    the global batch, which depends only on (config.seed, step) (module docstring).
    """
    dataset = train_dataset(config, start_step=start_step, process_index=process_index,
                            process_count=process_count)
    return iterate(dataset, num_workers(config))


def eval_batches(
        config,
        *,
        split: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
) -> Iterator[Batch]:
    """One pass over the eval split: every example exactly once over all processes.

    Yields {'image': uint8, 'label': int32, 'mask': bool}; see eval_dataset.
    """
    dataset = eval_dataset(config, split=split, process_index=process_index, process_count=process_count)
    return iterate(dataset, min(num_workers(config), len(dataset)))
