"""Heatmaps (Brendel & Bethge 2019, Fig. 2): stride-1 maps equal per-pixel patch evaluation, CAMs, plots."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import figutil
from bagjax import interpret
from bagjax.errors import UserError
from bagjax.data import synthetic
from bagjax.data.preprocess import normalize
from bagjax.models import create_model
from trainutil import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_variables(model, seed=0):
    """Random weights and BatchNorm running statistics, drawn with numpy from the shapes of ``model.init``.

    Cheaper than compiling ``init``; non-trivial statistics make the zero padding non-zero after the first
    BatchNorm, as with trained weights.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda shape: rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])),
        "scale": lambda shape: rng.uniform(0.5, 1.5, shape),
        "bias": lambda shape: 0.1 * rng.standard_normal(shape),
        "mean": lambda shape: 0.2 * rng.standard_normal(shape),
        "var": lambda shape: rng.uniform(0.5, 2.0, shape),
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(draw[path[-1].key](leaf.shape), jnp.float32), shapes)


@functools.cache
def _bagnet(name, head):
    """A small random BagNet shared by the tests."""
    model = create_model(name, num_classes=5, head=head, width=8, stage_sizes=(2, 1, 1, 1))
    return model, _random_variables(model)


def _brute_force_heatmaps(model, variables, images, targets):
    """bethgelab generate_heatmap_pytorch: zero-pad by (rf-1)//2, run the model on every pixel's rf x rf patch."""
    rf = model.receptive_field
    lo = (rf - 1) // 2
    batch, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (lo, rf - 1 - lo), (lo, rf - 1 - lo), (0, 0)))
    b, y, x = (a.ravel() for a in np.meshgrid(np.arange(batch), np.arange(height), np.arange(width), indexing="ij"))

    def patch_logit(b, y, x):
        patch = jax.lax.dynamic_slice(padded, (b, y, x, 0), (1, rf, rf, 3))
        return model.apply(variables, patch, train=False)[0, jnp.asarray(targets)[b]]

    return jax.jit(jax.vmap(patch_logit))(b, y, x).reshape(batch, height, width)


@pytest.mark.parametrize("name, size, head, chunk_pixels", [
    ("bagnet9", (24, 20), "learned", 2**15),
    ("bagnet17", (32, 28), "hadamard", 8 * 32),  # bands of 8 rows: several lax.map steps
    ("bagnet33", (41, 36), "learned", 2**15),
])
def test_stride1_heatmap_equals_per_pixel_patch_evaluation(name, size, head, chunk_pixels):
    model, variables = _bagnet(name, head)
    images = jax.random.normal(jax.random.key(1), (2, *size, 3))
    targets = [3, 1]
    heatmaps = interpret.stride1_heatmap(model, variables, images, targets, chunk_pixels=chunk_pixels)
    assert heatmaps.shape == (2, *size)
    np.testing.assert_allclose(heatmaps, _brute_force_heatmaps(model, variables, images, targets), atol=1e-4)
    single = interpret.stride1_heatmap(model, variables, images[1], targets[1], chunk_pixels=chunk_pixels)
    assert single.shape == size
    np.testing.assert_allclose(single, heatmaps[1], atol=1e-5)


def test_stride1_heatmaps_of_a_batch_share_passes_and_equal_one_image_at_a_time():
    """Three images, two per pass (the last pass padded), give each image's own map with its own class."""
    model, variables = _bagnet("bagnet9", "learned")
    images = jax.random.normal(jax.random.key(2), (3, 24, 20, 3))
    targets = [4, 0, 2]
    image_pixels = 24 * 24  # whole output grids: 3 x 3 cells of 8 px
    batched = interpret.stride1_heatmap(model, variables, images, targets, chunk_pixels=2 * image_pixels)
    for image, target, heatmap in zip(images, targets, batched):
        alone = interpret.stride1_heatmap(model, variables, image, target, chunk_pixels=image_pixels)
        np.testing.assert_allclose(heatmap, alone, atol=1e-5)


def test_class_evidence_is_the_class_channel_of_patch_logits():
    model, variables = _bagnet("bagnet17", "hadamard")
    images = jax.random.normal(jax.random.key(3), (3, 48, 40, 3))
    logits = jax.jit(lambda v, x: model.apply(v, x, method="patch_logits"))(variables, images)
    evidence = interpret.class_evidence(model, variables, images, [0, 4, 2])
    assert evidence.shape == logits.shape[:3]
    np.testing.assert_allclose(evidence, np.stack([logits[0, ..., 0], logits[1, ..., 4], logits[2, ..., 2]]),
                               atol=1e-6)
    np.testing.assert_allclose(interpret.class_evidence(model, variables, images, 3), logits[..., 3], atol=1e-6)


@pytest.mark.parametrize("name", ["bagnet9", "resnet50"])
def test_identity_head_cam_is_the_feature_channel_and_averages_to_the_logit(name):
    model = create_model(name, num_classes=4, head="identity", width=8, stage_sizes=(1, 1, 1, 1))
    images = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
    variables = _random_variables(model)
    features, logits = jax.jit(lambda v, x: (model.apply(v, x, method="features"), model.apply(v, x)))(
        variables, images)
    cams = interpret.class_activation_map(model, variables, images, [3, 1])
    np.testing.assert_allclose(cams, np.stack([features[0, ..., 3], features[1, ..., 1]]), atol=1e-6)
    np.testing.assert_allclose(cams.mean(axis=(1, 2)), [logits[0, 3], logits[1, 1]], rtol=1e-5, atol=1e-6)


def test_maps_refuse_wrong_models_and_classes():
    images = jnp.zeros((2, 64, 64, 3))
    learned = create_model("resnet50", num_classes=4, width=8, stage_sizes=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="head='identity'"):
        interpret.class_activation_map(learned, {}, images, 0)
    with pytest.raises(UserError, match="not a BagNet"):
        interpret.stride1_heatmap(learned, {}, images, 0)
    bagnet, variables = _bagnet("bagnet9", "learned")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        interpret.class_evidence(bagnet, variables, images, [0, 5])
    with pytest.raises(ValueError, match="one per image"):
        interpret.stride1_heatmap(bagnet, variables, images, [0, 1, 2])
    with pytest.raises(UserError, match="integers"):
        interpret.stride1_heatmap(bagnet, variables, images, 1.5)


def test_denormalize_inverts_the_torchvision_normalization():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(interpret.denormalize(normalize(pixels)), pixels)


def test_edge_map_finds_the_outline_of_a_square():
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[10:30, 10:30] = 255
    edges = interpret.edge_map(normalize(pixels))
    ring = np.zeros((40, 40), bool)
    ring[8:32, 8:32] = True
    ring[12:28, 12:28] = False
    assert edges.any() and not edges[~ring].any()
    assert edges[8:32, 8:12].any() and edges[8:32, 28:32].any() and edges[8:12].any() and edges[28:32].any()


def test_plot_heatmap_clips_symmetrically_at_the_percentile():
    heatmap = np.random.default_rng(1).standard_normal((20, 30)) + 0.5
    shown = interpret.plot_heatmap(heatmap)
    limit = np.percentile(np.abs(heatmap), 99)
    assert shown.norm.vmax == pytest.approx(limit) and shown.norm.vmin == pytest.approx(-limit)
    shown = interpret.plot_heatmap(heatmap, percentile=50, cmap="bwr")
    assert shown.norm.vmin == pytest.approx(-np.median(np.abs(heatmap))) == pytest.approx(-shown.norm.vmax)
    assert shown.get_cmap().name == "bwr"


def test_train_py_heatmap_figure_shows_the_per_pixel_evidence_of_the_predicted_class(tmp_path):
    """heatmaps.png as train.py writes it (``loop._write_heatmaps``, the code behind the README's demo figure), for
    the demo model at its smoke size with random weights: each row's heatmap panel is red where the brute-force
    per-pixel evidence (the reference's generate_heatmap_pytorch) of the model's predicted class is strongly
    positive and blue where it is strongly negative."""
    from bagjax import data
    from bagjax.models import build_model
    from bagjax.training import loop
    from configs import demo

    config = demo.get_config("smoke")
    info = data.dataset_info(config)
    model = build_model(config, info.num_classes)
    variables = _random_variables(model, seed=1)
    loop._write_heatmaps(config, model, variables, tmp_path, info.class_names)  # pylint: disable=protected-access
    pixels = data.eval_batches(config, process_index=0, process_count=1).__iter__().__next__()["image"]
    images = jnp.asarray(np.stack([normalize(p) for p in pixels[:config.heatmap_images]]))
    predicted = np.asarray(jnp.argmax(model.apply(variables, images, train=False), -1))
    expected = np.asarray(_brute_force_heatmaps(model, variables, images, predicted))
    figure = figutil.read_figure(tmp_path / "heatmaps.png", (600, 300 * config.heatmap_images))
    for row, heatmap in enumerate(expected):
        panels = figure[300 * row:300 * (row + 1)]
        top, left, bottom, right = figutil.bounding_box(np.any(panels[:, :300] < 250, axis=-1))  # the image
        size = heatmap.shape[0]
        ys = (top + (np.arange(size) + 0.5) * (bottom - top) / size).astype(int)
        xs = (600 - right + (np.arange(size) + 0.5) * (right - left) / size).astype(int)  # mirrored columns
        shown = panels[ys[:, None], xs[None, :]]
        limit = np.percentile(np.abs(heatmap), 99)
        strong_pos, strong_neg = heatmap > 0.7 * limit, heatmap < -0.7 * limit
        assert strong_pos.sum() + strong_neg.sum() > 50, row
        assert figutil.red(shown)[strong_pos].mean() > 0.9 if strong_pos.any() else True, row
        assert figutil.blue(shown)[strong_neg].mean() > 0.9 if strong_neg.any() else True, row
        assert not figutil.red(shown)[heatmap < 0].any() and not figutil.blue(shown)[heatmap > 0].any(), row


def test_the_committed_readme_demo_figure_shows_evidence_on_the_planted_motifs():
    """The committed docs/demo_heatmaps.png (the demo command's heatmaps.png: a trained BagNet-17, the first 8
    validation images of the synthetic set at 48 px): its strong evidence, red or blue, is on every image at least 3
    times denser on the planted motif boxes (grown by 4 px, a quarter of the receptive field) than elsewhere, and
    80 % of it lies there on average."""
    pixels = figutil.read_figure(ROOT / "docs" / "demo_heatmaps.png", (600, 2400))
    variant, inside = synthetic.get_variant("default"), []
    for row in range(8):
        _, _, boxes = synthetic.make_example(variant, 48, 1, row)
        panels = pixels[300 * row:300 * (row + 1)]
        y0, x0, y1, x1 = figutil.bounding_box(np.any(panels[:, :300] < 250, axis=-1))  # the image panel
        heatmap = panels[y0:y1, 600 - x1:600 - x0]  # two columns laid out symmetrically
        ys, xs = np.nonzero(figutil.red(heatmap) | figutil.blue(heatmap))
        near = np.zeros((48, 48), bool)
        for top, left, bottom, right in boxes:
            near[max(top - 4, 0):bottom + 4, max(left - 4, 0):right + 4] = True
        share = near[(ys * 48 // (y1 - y0)), (xs * 48 // (x1 - x0))].mean()
        area = near.mean()  # the share that evidence spread evenly would have
        density = (share / area) / max((1 - share) / (1 - area), 1e-9)  # near the motifs vs elsewhere
        assert len(ys) > 1000 and density > 3, (row, share, area)
        inside.append(share)
    assert np.mean(inside) > 0.8, inside

def test_save_heatmap_figure_shows_each_image_and_its_evidence_where_the_motif_is(tmp_path):
    """Synthetic examples with planted motifs, and maps that are positive exactly on the motif boxes: in the
    written figure the red (positive) part of each heatmap panel covers the motif's place in the image panel."""
    variant = synthetic.get_variant("default")
    examples = [synthetic.make_example(variant, 64, 1, i) for i in (0, 4)]  # one motif each
    images = np.stack([normalize(image) for image, _, _ in examples])
    stride1 = np.full((2, 64, 64), -1.0)
    for heatmap, (_, _, boxes) in zip(stride1, examples):
        (y0, x0, y1, x1), = boxes
        heatmap[y0:y1, x0:x1] = 1.0
    coarse = stride1[:, 4::8, 4::8]  # a native-stride (8 px) map, stretched over the image
    for name, heatmaps in [("stride1.png", stride1), ("sub/coarse.png", coarse)]:
        path = tmp_path / name
        interpret.save_heatmap_figure(path, images, heatmaps, titles=["cat", "dog"])
        pixels = figutil.read_figure(path, (600, 600))  # figsize (6, 3 per image) at 100 dpi
        for row, (image, _, _) in enumerate(examples):
            panels = pixels[300 * row:300 * (row + 1)]
            left, right = panels[:, :300], panels[:, 300:]
            # The heatmap panel: its extent is the red and blue area, the image's 64 px stretched over it.
            top, lft, bottom, rgt = figutil.bounding_box(figutil.red(right) | figutil.blue(right))
            scale = ((bottom - top) / 64, (rgt - lft) / 64)
            assert abs(scale[0] - scale[1]) < 0.05 and scale[0] > 2, scale
            cell = 64 // heatmaps.shape[1]  # the image pixels of one heatmap value
            y0, x0, y1, x1 = (cell * v for v in figutil.bounding_box(heatmaps[row] > 0))  # the motif box
            expected = (top + y0 * scale[0], lft + x0 * scale[1], top + y1 * scale[0], lft + x1 * scale[1])
            got = figutil.bounding_box(figutil.red(right))
            np.testing.assert_allclose(got, expected, atol=2.5, err_msg=f"{name} row {row}")
            assert figutil.red(right)[got[0]:got[2], got[1]:got[3]].mean() > 0.9  # the motif box is filled
            # The image panel shows the image: same extent, and its pixels resampled back to 64 px match.
            inside = np.any(left < 250, axis=-1)
            y, x, y2, x2 = figutil.bounding_box(inside)
            shown = np.asarray(Image.fromarray(left[y:y2, x:x2]).resize((64, 64), Image.BILINEAR), np.float32)
            assert abs((y2 - y) - (bottom - top)) <= 2 and abs((x2 - x) - (rgt - lft)) <= 2
            assert np.corrcoef(shown.ravel(), image.astype(np.float32).ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="one title per image"):
        interpret.save_heatmap_figure(tmp_path / "x.png", images, stride1, titles=["cat"])
