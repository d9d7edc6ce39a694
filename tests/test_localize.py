"""AnchorNet decision rule (Eq. 6-8) and LSP (Algorithm 1) against hand cases and a plain-Python reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagjax.localize import (LSP_SLACK, LSP_VISUALIZATION, branch_decision, crop_patches, localize_patches, lsp,
                             max_intersection)
from bagjax.models.anchornet import RECEPTIVE_FIELDS, STRIDE, grid_size

GRIDS = {63: 21, 95: 17, 111: 15}  # AnchorNet grids on a 224 px input


def reference_lsp(heatmap, patch_size, stride, max_patches, iou_threshold, coverage):
    """Algorithm 1 as plain Python: list of picked (y0, x0, y1, x1) boxes."""
    h, w = heatmap.shape
    values = [float(v) for v in heatmap.reshape(-1)]
    order = sorted(range(h * w), key=lambda f: (-values[f], f))

    def box(flat):
        i, j = divmod(flat, w)
        return (stride * i, stride * j, stride * i + patch_size, stride * j + patch_size)

    def iou(a, b):
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
        return inter / (area(a) + area(b) - inter)

    picked = [box(order[0])]
    for rank in range(2, math.floor(h * w * coverage + 1e-9) + 1):  # 1-based ranks, line 3
        if len(picked) == max_patches:
            break
        candidate = box(order[rank - 1])
        if all(iou(candidate, s) < iou_threshold for s in picked):
            picked.append(candidate)
    return picked


def random_heatmaps(rng, n, shape):
    """Heatmaps with many ties: quantized to a few levels (some coarse, some fine), a few continuous."""
    maps = []
    for k in range(n):
        levels = (2, 3, 5, 20, 0)[k % 5]
        m = rng.standard_normal(shape).astype(np.float32)
        if levels:
            m = np.round(rng.random(shape) * (levels - 1)).astype(np.float32) - 1.0
        maps.append(m)
    return np.stack(maps)


def check_against_reference(maps, boxes, valid, **kw):
    for m, b, v in zip(maps, np.asarray(boxes), np.asarray(valid)):
        want = reference_lsp(m, **kw)
        assert v.sum() == len(want) and v[:len(want)].all()
        np.testing.assert_array_equal(b[:len(want)], np.asarray(want, np.int32).reshape(-1, 4))
        assert not b[len(want):].any()


@pytest.mark.parametrize("name,settings", [("visualization", LSP_VISUALIZATION), ("slack", LSP_SLACK)])
@pytest.mark.parametrize("rf", RECEPTIVE_FIELDS)
def test_lsp_matches_reference(name, settings, rf):
    rng = np.random.default_rng(rf + len(name))
    maps = random_heatmaps(rng, 40, (GRIDS[rf], GRIDS[rf]))
    s = settings[rf]
    kw = dict(patch_size=rf, stride=STRIDE, max_patches=s.max_patches, iou_threshold=s.iou_threshold,
              coverage=s.coverage)
    boxes, valid = jax.jit(jax.vmap(functools.partial(lsp, **kw)))(jnp.asarray(maps))
    assert boxes.shape == (40, s.max_patches, 4) and boxes.dtype == jnp.int32 and valid.dtype == jnp.bool_
    check_against_reference(maps, boxes, valid, **kw)


def test_lsp_other_shapes_and_thresholds():
    rng = np.random.default_rng(7)
    single = jax.jit(lsp, static_argnames=("patch_size", "stride", "max_patches", "iou_threshold", "coverage"))
    for shape, kw in [((9, 13), dict(patch_size=31, stride=8, max_patches=6, iou_threshold=0.5, coverage=0.7)),
                      ((6, 4), dict(patch_size=16, stride=4, max_patches=3, iou_threshold=0.1, coverage=1.0)),
                      ((5, 5), dict(patch_size=7, stride=8, max_patches=25, iou_threshold=0.01, coverage=1.0)),
                      # IoU of boxes 8 px apart is exactly 1/3 = T here: they must be rejected (strict <).
                      ((6, 6), dict(patch_size=16, stride=8, max_patches=36, iou_threshold=1 / 3, coverage=1.0))]:
        maps = random_heatmaps(rng, 10, shape)
        for m in maps:
            boxes, valid = single(jnp.asarray(m), **kw)
            check_against_reference(m[None], boxes[None], valid[None], **kw)


def test_lsp_first_location_is_not_exempt_from_iou():
    # Top value at (0, 1), runner-up at flat index 0: IoU = 3465 / 4473 >= T, so (0, 0) must be rejected
    # (the authors' public code would accept it).
    m = np.zeros((21, 21), np.float32)
    m[0, 1], m[0, 0], m[10, 10] = 3.0, 2.0, 1.0
    boxes, valid = lsp(jnp.asarray(m), patch_size=63, stride=8, max_patches=5, iou_threshold=0.3, coverage=1.0)
    assert valid.sum() >= 2
    np.testing.assert_array_equal(boxes[:2], [[0, 8, 63, 71], [80, 80, 143, 143]])


def test_lsp_negative_zero_ties_with_zero():
    m = jnp.asarray([[0.0, -0.0], [-0.0, 0.0]])
    boxes, valid = lsp(m, patch_size=2, stride=2, max_patches=4, iou_threshold=0.5, coverage=1.0)
    assert valid.all()
    np.testing.assert_array_equal(boxes[:, :2], [[0, 0], [0, 2], [2, 0], [2, 2]])


def test_max_intersection_is_the_iou_boundary():
    for patch, t in [(63, 0.3), (95, 0.8), (111, 0.3), (10, 0.5), (4, 0.0), (4, 1.5)]:
        area = patch * patch
        passing = [i for i in range(area + 1) if i / (2 * area - i) < t]
        assert max_intersection(patch, t) == (max(passing) if passing else -1)


def test_lsp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one \\(H, W\\) heatmap"):
        lsp(jnp.zeros((2, 3, 3)), patch_size=3, stride=1, max_patches=1, iou_threshold=0.5, coverage=1.0)
    with pytest.raises(ValueError, match="coverage"):
        lsp(jnp.zeros((3, 3)), patch_size=3, stride=1, max_patches=1, iou_threshold=0.5, coverage=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        lsp(jnp.zeros((3, 3)), patch_size=3, stride=1, max_patches=0, iou_threshold=0.5, coverage=1.0)


def decision_inputs(probs_by_branch, num_classes=5):
    """Logits whose softmax is the given per-branch probability vectors; class maps encode (rf, class, i, j)."""
    logits = {rf: jnp.log(jnp.asarray(p, jnp.float32)) for rf, p in zip(RECEPTIVE_FIELDS, probs_by_branch)}
    maps = {}
    for rf in RECEPTIVE_FIELDS:
        g = GRIDS[rf]
        i, j, c = np.meshgrid(np.arange(g), np.arange(g), np.arange(num_classes), indexing="ij")
        maps[rf] = jnp.asarray(rf * 1e4 + c * 1e3 + i * 30 + j, jnp.float32)
    return logits, maps


def one_hot_probs(cls, conf, num_classes=5):
    p = np.full(num_classes, (1.0 - conf) / (num_classes - 1))
    p[cls] = conf
    return p


CASES = [  # (per-branch (class, confidence), expected class, expected branch index)
    (((2, 0.5), (2, 0.6), (4, 0.9)), 2, 1),  # Eq. 7 majority beats the most confident branch
    (((3, 0.7), (1, 0.95), (3, 0.4)), 3, 0),  # Eq. 8 ignores the confident branch that disagrees
    (((1, 0.5), (2, 0.8), (3, 0.6)), 2, 1),  # no majority: most confident branch's class
    (((1, 0.9), (2, 0.3), (3, 0.6)), 1, 0),
    (((0, 0.4), (0, 0.5), (0, 0.7)), 0, 2),  # unanimous: the most confident branch
    (((4, 0.6), (0, 0.3), (4, 0.6)), 4, 0),  # tie in P among agreeing branches: smaller receptive field
]


@pytest.mark.parametrize("branches,want_cls,want_branch", CASES)
def test_branch_decision_rules(branches, want_cls, want_branch):
    logits, maps = decision_inputs([one_hot_probs(c, p) for c, p in branches])
    cls, branch, heatmaps = branch_decision(logits, maps)
    assert int(cls) == want_cls and int(branch) == want_branch
    for rf in RECEPTIVE_FIELDS:
        np.testing.assert_array_equal(heatmaps[rf], maps[rf][..., want_cls])


def test_branch_decision_batched_jit_and_vmap():
    per_case = [decision_inputs([one_hot_probs(c, p) for c, p in b]) for b, _, _ in CASES]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *per_case)
    want_cls = [c for _, c, _ in CASES]
    want_branch = [b for _, _, b in CASES]
    for fn in (jax.jit(branch_decision), jax.vmap(branch_decision)):
        cls, branch, heatmaps = fn(*batch)
        np.testing.assert_array_equal(cls, want_cls)
        np.testing.assert_array_equal(branch, want_branch)
        for rf in RECEPTIVE_FIELDS:
            want = np.take_along_axis(np.asarray(batch[1][rf]), np.asarray(want_cls)[:, None, None, None], -1)
            np.testing.assert_array_equal(heatmaps[rf], want[..., 0])


def test_localize_patches_uses_the_chosen_branch():
    rng = np.random.default_rng(3)
    b, c = 6, 5
    outputs = {"logits": {rf: jnp.asarray(rng.standard_normal((b, c)) * 3, jnp.float32) for rf in RECEPTIVE_FIELDS},
               "class_maps": {rf: jnp.asarray(np.round(rng.random((b, GRIDS[rf], GRIDS[rf], c)) * 4), jnp.float32)
                              for rf in RECEPTIVE_FIELDS}}
    out = jax.jit(functools.partial(localize_patches, settings=LSP_VISUALIZATION))(outputs)
    cls, branch, heatmaps = branch_decision(outputs["logits"], outputs["class_maps"])
    assert out["boxes"].shape == (b, 5, 4) and out["valid"].shape == (b, 5)
    for n in range(b):
        rf = RECEPTIVE_FIELDS[int(branch[n])]
        s = LSP_VISUALIZATION[rf]
        want = reference_lsp(np.asarray(heatmaps[rf][n]), rf, STRIDE, s.max_patches, s.iou_threshold, s.coverage)
        assert int(out["cls"][n]) == int(cls[n]) and int(out["patch_size"][n]) == rf
        assert int(out["valid"][n].sum()) == len(want)
        np.testing.assert_array_equal(out["boxes"][n, :len(want)], np.asarray(want).reshape(-1, 4))


@pytest.mark.parametrize("size", [111, 160, 223, 224, 300])
def test_boxes_stay_inside_the_image(size):
    for rf in RECEPTIVE_FIELDS:
        last = grid_size(size, rf) - 1
        assert last >= 0 and STRIDE * last + rf <= size


def test_crop_patches():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((2, 40, 48, 3)), jnp.float32)
    boxes = jnp.asarray([[[0, 0, 16, 16], [24, 32, 40, 48]], [[8, 16, 24, 32], [0, 0, 0, 0]]], jnp.int32)
    valid = jnp.asarray([[True, True], [True, False]])
    patches = crop_patches(images, boxes, valid, patch_size=16)
    assert patches.shape == (2, 2, 16, 16, 3)
    np.testing.assert_array_equal(patches[0, 1], images[0, 24:40, 32:48])
    np.testing.assert_array_equal(patches[1, 0], images[1, 8:24, 16:32])
    assert not patches[1, 1].any()
    resized = crop_patches(images, boxes, valid, patch_size=16, out_size=8)
    assert resized.shape == (2, 2, 8, 8, 3)
    with pytest.raises(ValueError, match="exceeds"):
        crop_patches(images, boxes, valid, patch_size=41)
