"""LSP (AnchorNet Algorithm 1): batched on-device ``bagjax.localize.lsp`` vs a plain-Python loop.

For each branch (63/95/111 px patches on 21/17/15 grids) and both settings of section 4.1, 256 heatmaps with
ties are localized by ``jit(vmap(lsp))`` (best of 20 timed runs after a warm-up) and by a Python loop over the
same heatmaps (best of 3); both results are checked equal. The last line is the total-time ratio.

    python bench/lsp.py
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bagjax import cli  # noqa: E402
from bagjax.localize import LSP_SLACK, LSP_VISUALIZATION, lsp  # noqa: E402
from bagjax.models.anchornet import RECEPTIVE_FIELDS, STRIDE, grid_size  # noqa: E402

BATCH = 256


def python_lsp(heatmap: np.ndarray, patch_size: int, stride: int, max_patches: int, iou_threshold: float,
               coverage: float) -> list[tuple[int, int, int, int]]:
    """Algorithm 1 in plain Python (stable descending sort, IoU of Eq. 9 in pixels)."""
    h, w = heatmap.shape
    order = np.argsort(-heatmap.reshape(-1), kind="stable").tolist()
    boxes = [(stride * (f // w), stride * (f % w), stride * (f // w) + patch_size, stride * (f % w) + patch_size)
             for f in order]
    area = patch_size * patch_size
    picked = [boxes[0]]
    for rank in range(2, math.floor(h * w * coverage + 1e-9) + 1):
        if len(picked) == max_patches:
            break
        y0, x0, y1, x1 = boxes[rank - 1]
        ok = True
        for s in picked:
            inter = max(0, min(y1, s[2]) - max(y0, s[0])) * max(0, min(x1, s[3]) - max(x0, s[1]))
            if inter / (2 * area - inter) >= iou_threshold:
                ok = False
                break
        if ok:
            picked.append(boxes[rank - 1])
    return picked


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    cli.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options: --help, or a one-line error
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}, {BATCH} heatmaps per setting")
    total_jax = total_python = 0.0
    for name, settings in (("visualization", LSP_VISUALIZATION), ("slack", LSP_SLACK)):
        for rf in RECEPTIVE_FIELDS:
            g = grid_size(224, rf)
            maps = (np.round(rng.random((BATCH, g, g)) * 7) - 3).astype(np.float32)  # 8 levels: many ties
            s = settings[rf]
            kw = dict(patch_size=rf, stride=STRIDE, max_patches=s.max_patches, iou_threshold=s.iou_threshold,
                      coverage=s.coverage)
            batched = jax.jit(jax.vmap(functools.partial(lsp, **kw)))
            device_maps = jnp.asarray(maps)
            boxes, valid = jax.block_until_ready(batched(device_maps))
            t_jax = best_of(lambda: jax.block_until_ready(batched(device_maps)), 20)
            results = []
            t_py = best_of(lambda: results.append([python_lsp(m, **kw) for m in maps]), 3)
            for b, v, want in zip(np.asarray(boxes), np.asarray(valid), results[-1]):
                if int(v.sum()) != len(want) or not (b[:len(want)] == np.asarray(want).reshape(-1, 4)).all():
                    raise RuntimeError(f"bagjax LSP disagrees with the Python loop ({name}, rf={rf})")
            total_jax += t_jax
            total_python += t_py
            print(f"{name:13s} rf={rf:3d} grid={g}x{g} K={s.max_patches:2d}: bagjax {t_jax * 1e3:8.3f} ms, "
                  f"python loop {t_py * 1e3:8.2f} ms")
    print(f"lsp: {total_python / total_jax:.2f}x (bagjax over python loop)")


if __name__ == "__main__":
    main()
