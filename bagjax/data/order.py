"""Example order, per-process slicing and split strings, shared by all sources.

The contract (DESIGN.md, data): the GLOBAL batch of step s is a pure function
of (seed, s) and the dataset. The stream is the concatenation of per-epoch
permutations keyed by (seed, epoch); global batch s is stream[s*B:(s+1)*B];
process p takes the contiguous slice [p*b, (p+1)*b) with b = B / P; the
augmentation of an example is keyed by (seed, s, position in the global batch).
The process count therefore never changes what the model sees.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

_SPLIT_RE = re.compile(r'^\s*([\w\-.]+)\s*(?:\[\s*([^:\]]*)\s*:\s*([^\]]*)\s*\])?\s*$')

# Distinct first words of the SeedSequence entropy keep the streams independent.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Split:
    """A TFDS-style split string: NAME or NAME[start:end] (ints or percents)."""

    name: str
    start: str = ''
    end: str = ''

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the slice for a split of n examples (TFDS 'closest' rounding)."""
        lo = _boundary(self.start, n, default=0, spec=self)
        hi = _boundary(self.end, n, default=n, spec=self)
        return lo, max(lo, hi)

    def __str__(self) -> str:
        if not self.start and not self.end:
            return self.name
        return f'{self.name}[{self.start}:{self.end}]'


def _boundary(text: str, n: int, *, default: int, spec: Split) -> int:
    if not text:
        return default
    try:
        if text.endswith('%'):
            value = int(round(float(text[:-1]) * n / 100.0))
        else:
            value = int(text)
    except ValueError:
        raise ValueError(
            f"bad split slice '{text}' in '{spec}': use NAME[a:b] with ints or percents"
        ) from None
    if value < 0:
        value += n
    return min(max(value, 0), n)


def parse_split(text: str) -> Split:
    """Parses 'train', 'train[:70%]', 'validation[10:20]'."""
    match = _SPLIT_RE.match(text)
    if match is None:
        raise ValueError(
            f"bad split '{text}': use NAME or NAME[a:b] (e.g. 'train[:70%]', 'val[10:]')"
        )
    name, start, end = match.group(1), match.group(2) or '', match.group(3) or ''
    return Split(name, start.strip(), end.strip())


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
        raise ValueError(
            f'{what}={global_batch} must be a positive multiple of the process count '
            f'{process_count}'
        )
    return global_batch // process_count


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one epoch, keyed by (seed, epoch)."""
    rng = np.random.default_rng([_ORDER_STREAM, seed, epoch])
    perm = rng.permutation(n)
    perm.setflags(write=False)
    return perm


def train_indices(seed: int, n: int, global_batch: int, step: int) -> np.ndarray:
    """Example indices of global batch `step` of the endless shuffled stream."""
    positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(global_batch, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, int(epoch), n)[offsets[sel]]
    return out


def augment_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """Stateless augmentation randomness for one example of one global batch."""
    return np.random.default_rng([_AUGMENT_STREAM, seed, step, position])


def num_eval_batches(n: int, global_batch: int) -> int:
    """Every process runs this many eval batches (the same number everywhere)."""
    return -(-n // global_batch)


def eval_positions(
        n: int, global_batch: int, batch: int, process_index: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per eval batch of this process: (example indices, mask).

    Global eval batch k holds examples [k*B, (k+1)*B); this process takes the
    slice [p*b, (p+1)*b); positions >= n are padding (mask False, index 0).
    """
    out = []
    for k in range(num_eval_batches(n, global_batch)):
        positions = k * global_batch + process_index * batch + np.arange(batch)
        mask = positions < n
        out.append((np.where(mask, positions, 0), mask))
    return out
