"""Per-process train/eval batches for every source (the API of bagjax.data).

Batches are assembled by a thread pool that decodes and augments the examples
of the next few steps ahead of time (PIL releases the GIL while decoding and
resizing). The order and augmentation contract is in order.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bagjax.data import order
from bagjax.data import preprocess
from bagjax.data import sources

_PREFETCH_STEPS = 2

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset."""

    num_classes: int
    class_names: tuple[str, ...]
    num_train: int  # Examples in the train split (after skipping unreadable files).
    num_eval: int  # Examples in the eval split.
    num_skipped: int = 0  # Unreadable files skipped (imagefolder), summed over splits.


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
    )


def _batches(
        steps: Iterator[Sequence[Any]],
        fn: Callable[[Any], tuple[np.ndarray, int]],
        image_shape: tuple[int, int, int],
        with_mask: bool,
) -> Iterator[Batch]:
    """Maps fn over the items of each step in a thread pool, keeping order.

    An item None is padding: a zero image, label 0 and mask False, never decoded.
    """
    def run(item):
        if item is None:
            return np.zeros(image_shape, np.float32), 0
        return fn(item)

    pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    pending: collections.deque = collections.deque()
    done = object()

    def fill():
        while len(pending) <= _PREFETCH_STEPS:
            items = next(steps, done)
            if items is done:
                return
            pending.append((items, [pool.submit(run, item) for item in items]))

    try:
        fill()
        while pending:
            items, futures = pending.popleft()
            fill()
            results = [f.result() for f in futures]
            batch = {
                'image': np.stack([image for image, _ in results]).astype(np.float32, copy=False),
                'label': np.asarray([label for _, label in results], np.int32),
            }
            if with_mask:
                batch['mask'] = np.asarray([item is not None for item in items], bool)
            yield batch
    finally:  # Cancel look-ahead work; no join (this may run at interpreter exit).
        for _, futures in pending:
            for future in futures:
                future.cancel()
        pool.shutdown(wait=False)


def _train_scale(source, config) -> tuple[float, float]:
    if source.train_crop_scale is not None:
        return source.train_crop_scale
    return (float(config.data.crop_min_area), 1.0)


def train_batches(
        config,
        *,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
) -> Iterator[Batch]:
    """Endless per-process training batches for steps start_step, start_step + 1, ...

    Yields {'image': float32 (b, S, S, 3) normalized, 'label': int32 (b,)} with
    b = config.batch_size // process_count: this process's contiguous slice of
    the global batch, which depends only on (config.seed, step) (order.py).
    """
    source = _source(config)
    p, num_p = order.resolve_processes(process_index, process_count)
    global_batch = int(config.batch_size)
    b = order.per_process(global_batch, num_p, 'batch_size')
    seed, size = int(config.seed), int(config.image_size)
    split = config.data.train_split
    n = source.num_examples(split)
    if n == 0:
        raise ValueError(f'dataset {config.dataset!r}: train split {split!r} has no examples')
    scale = _train_scale(source, config)
    ratio = tuple(config.data.get('crop_aspect_ratio', preprocess.CROP_ASPECT_RATIO))
    flip = bool(config.data.flip)
    mine = slice(p * b, (p + 1) * b)

    def augment(image, step: int, position: int) -> np.ndarray:
        rng = order.augment_rng(seed, step, position)
        return preprocess.preprocess_for_train(image, rng, size, scale=scale, ratio=ratio, flip=flip)

    if source.indexed:
        def steps():
            for step in itertools.count(start_step):
                indices = order.train_indices(seed, n, global_batch, step)[mine]
                yield [(int(i), step, p * b + j) for j, i in enumerate(indices)]

        def load(item):
            index, step, position = item
            image, label = source.load(split, index)
            return augment(image, step, position), label
    else:
        def steps():
            stream = source.train_stream(split, seed, start_step * global_batch)
            for step in itertools.count(start_step):
                records = list(itertools.islice(stream, global_batch))[mine]
                yield [(rec, step, p * b + j) for j, rec in enumerate(records)]

        def load(item):
            (encoded, label), step, position = item
            return augment(source.decode(encoded), step, position), label

    yield from _batches(steps(), load, (size, size, 3), with_mask=False)


def eval_batches(
        config,
        *,
        split: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
) -> Iterator[Batch]:
    """One pass over the eval split: every example exactly once over all processes.

    Global eval batch k holds examples [k*B, (k+1)*B) in the split's order; this
    process gets the slice [p*b, (p+1)*b). The last batch is padded (mask False),
    and every process yields ceil(N / B) batches, so SPMD eval never hangs.
    """
    source = _source(config)
    p, num_p = order.resolve_processes(process_index, process_count)
    global_batch = int(config.eval_batch_size)
    b = order.per_process(global_batch, num_p, 'eval_batch_size')
    size = int(config.image_size)
    split = config.data.eval_split if split is None else split
    n = source.num_examples(split)
    crop_fraction = float(config.data.crop_fraction)

    def transform(image) -> np.ndarray:
        if source.eval_center_crop:
            return preprocess.preprocess_for_eval(image, size, crop_fraction)
        return preprocess.resize_full(image, size)

    plan = order.eval_positions(n, global_batch, b, p)
    if source.indexed:
        def steps():
            for indices, mask in plan:
                yield [int(i) if m else None for i, m in zip(indices, mask)]

        def load(index):
            image, label = source.load(split, index)
            return transform(image), label
    else:
        def steps():
            stream = source.records(split)
            for _, mask in plan:
                records = list(itertools.islice(stream, global_batch))
                records += [None] * (global_batch - len(records))
                yield [rec if m else None for rec, m in zip(records[p * b:(p + 1) * b], mask)]

        def load(record):
            encoded, label = record
            return transform(source.decode(encoded)), label

    yield from _batches(steps(), load, (size, size, 3), with_mask=True)
