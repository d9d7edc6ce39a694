"""Straightforward per-image, per-window NumPy loops for the certificates of ``bagjax.robust``.

They follow the shape of PatchGuard's ``utils/defense_utils.py`` (``provable_masking``, ``provable_clipping``):
one window position at a time, slicing the grid, returning at the first window an attacker could use, with
PatchGuard's definitions for masking (ties to the largest class index, no certificate when the undefended
clipped sum is wrong, the 12/2021 lower bound that masks only an overlapping window when nothing is detected)
and bagjax's two deliberate differences (every wrong class checked for clipping, a float32 rounding margin), so
both must certify the same images. Used by tests/test_robust.py and as the baseline of bench/robust.py.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def masked_logits(patch_logits: np.ndarray, window: tuple[int, int], clip_max: float = np.inf,
                  threshold: float = 0.0) -> np.ndarray:
    """PatchGuard Algorithm 1, window by window: ``(H', W', C) -> (C,)``."""
    evidence = np.clip(patch_logits.astype(np.float64), 0.0, clip_max)
    (gh, gw, num_classes), (wy, wx) = evidence.shape, window
    out = evidence.sum(axis=(0, 1))
    for c in range(num_classes):
        best, where = -1.0, (0, 0)
        for a in range(gh - wy + 1):
            for b in range(gw - wx + 1):
                s = evidence[a:a + wy, b:b + wx, c].sum()
                if s > best:
                    best, where = s, (a, b)
        if best > threshold * out[c]:
            kept = evidence[..., c].copy()
            kept[where[0]:where[0] + wy, where[1]:where[1] + wx] = 0.0
            out[c] = kept.sum()
    return out


def masking_prediction(logits: np.ndarray) -> int:
    """PatchGuard's ``masking_defense`` prediction: the last of a stable argsort (ties: the largest index)."""
    return int(np.argsort(logits, kind="stable")[-1])


def masking_certified(patch_logits: np.ndarray, label: int, window: tuple[int, int], clip_max: float = np.inf,
                      threshold: float = 0.0) -> bool:
    """Robust masking's provable analysis (PatchGuard Algorithm 2), one window position at a time."""
    evidence = np.clip(patch_logits.astype(np.float64), 0.0, clip_max)
    (gh, gw, num_classes), (wy, wx) = evidence.shape, window
    total = evidence.sum(axis=(0, 1))
    if masking_prediction(total) != label:  # the undefended clipped sum is wrong: provable_masking returns 0
        return False
    tolerance = 4.0 * gh * gw * EPS32 * total.max() / (1.0 - threshold)
    for a in range(gh - wy + 1):
        for b in range(gw - wx + 1):
            upper = (total - evidence[a:a + wy, b:b + wx].sum(axis=(0, 1))) / (1.0 - threshold)
            zeroed = evidence[..., label].copy()
            zeroed[a:a + wy, b:b + wx] = 0.0
            sums = {(i, j): zeroed[i:i + wy, j:j + wx].sum() for i in range(gh - wy + 1) for j in range(gw - wx + 1)}
            largest = max(sums.values())
            if not largest > threshold * zeroed.sum():  # nothing detected: only a window overlapping (a, b)
                largest = max(s for (i, j), s in sums.items() if abs(i - a) < wy and abs(j - b) < wx)
            lower = zeroed.sum() - largest
            if not lower - max(upper[c] for c in range(num_classes) if c != label) > tolerance:
                return False
    return True


def clipping_certified(phi: np.ndarray, label: int, window: tuple[int, int], low: float, high: float) -> bool:
    """Clipped BagNet's bound for already clipped logits ``phi``, one window position and class at a time."""
    phi = phi.astype(np.float64)
    (gh, gw, num_classes), (wy, wx) = phi.shape, window
    tolerance = 4.0 * gh * gw * EPS32 * gh * gw * max(abs(low), abs(high))
    for a in range(gh - wy + 1):
        for b in range(gw - wx + 1):
            for c in range(num_classes):
                if c == label:
                    continue
                diff = phi[..., label] - phi[..., c]
                outside = diff.sum() - diff[a:a + wy, b:b + wx].sum()
                if not outside - wy * wx * (high - low) > tolerance:
                    return False
    return True
