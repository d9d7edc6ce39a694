"""TFDS-style split strings (NAME or NAME[a:b]), shared by all sources."""

from __future__ import annotations

import dataclasses
import hashlib
import re

from bagjax.errors import UserError

_SPLIT_RE = re.compile(r'^\s*([\w\-.]+)\s*(?:\[\s*([^:\]]*)\s*:\s*([^\]]*)\s*\])?\s*$')


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
        raise UserError(
            f"bad split slice '{text}' in '{spec}': use NAME[a:b] with ints or percents"
        ) from None
    if value < 0:
        value += n
    return min(max(value, 0), n)


def parse_split(text: str) -> Split:
    """Parses 'train', 'train[:70%]', 'validation[10:20]'."""
    match = _SPLIT_RE.match(text)
    if match is None:
        raise UserError(
            f"bad split '{text}': use NAME or NAME[a:b] (e.g. 'train[:70%]', 'val[10:]')"
        )
    name, start, end = match.group(1), match.group(2) or '', match.group(3) or ''
    return Split(name, start.strip(), end.strip())


def stable_position(key: str) -> float:
    """A position in [0, 100) fixed by ``key`` alone (SHA-256): the stable hash split of an image folder.

    A file is in ``NAME[a%:b%]`` when the position of its path lies in [a, b); adding or removing other files
    never moves it to another slice, unlike slicing a sorted list by position.
    """
    digest = hashlib.sha256(key.encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'big') / 2.0**64 * 100.0


def percent_bounds(spec: Split) -> tuple[float, float] | None:
    """[a, b) in percent of a slice given in percents (or without bounds); None when a bound is a count."""
    if not all(not text or text.endswith('%') for text in (spec.start, spec.end)):
        return None
    try:
        lo, hi = (float(text[:-1]) if text else default for text, default in ((spec.start, 0.0), (spec.end, 100.0)))
    except ValueError:
        raise ValueError(f"bad split slice in '{spec}': use NAME[a:b] with ints or percents") from None
    lo, hi = (min(max(v + 100.0 if v < 0 else v, 0.0), 100.0) for v in (lo, hi))
    return lo, max(lo, hi)
