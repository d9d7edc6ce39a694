"""Model registry, BagNet geometry and the four heads (Brendel & Bethge 2019; Qian 2020 ch. 3)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagjax import patches
from bagjax.models import HEADS, create_model, receptive_field

BAGNETS = {"bagnet9": (9, 27), "bagnet17": (17, 26), "bagnet33": (33, 24)}


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def init_shapes(model, size=224):
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


@pytest.mark.parametrize("name,expected", [("bagnet9", 15_688_744), ("bagnet17", 16_213_032),
                                           ("bagnet33", 18_310_184), ("resnet50", 25_557_032)])
def test_parameter_counts_at_1000_classes(name, expected):
    assert n_params(init_shapes(create_model(name, num_classes=1000))["params"]) == expected


@pytest.mark.parametrize("name", BAGNETS)
def test_grid_and_receptive_field_at_224(name):
    rf, grid = BAGNETS[name]
    model = create_model(name, num_classes=10)
    assert receptive_field(name) == (rf, 8)
    variables = init_shapes(model)
    x = jnp.zeros((2, 224, 224, 3))
    out = jax.eval_shape(lambda v: model.apply(v, x, method="patch_logits"), variables)
    assert out.shape == (2, grid, grid, 10)
    assert patches.grid_shape(model, 224, 224) == (grid, grid)


@pytest.mark.parametrize("name", BAGNETS)
def test_grid_formula_matches_the_network_for_many_sizes(name):
    model = create_model(name, num_classes=3, width=4, stage_sizes=(1, 1, 1, 1))
    rf, _ = BAGNETS[name]
    variables = init_shapes(model, 64)
    for h, w in [(rf, rf), (rf + 1, rf + 7), (rf + 8, rf + 15), (61, 100)]:
        x = jnp.zeros((1, h, w, 3))
        out = jax.eval_shape(lambda v: model.apply(v, x, method="patch_logits"), variables)
        assert out.shape[1:3] == patches.grid_shape(model, h, w) == ((h - rf) // 8 + 1, (w - rf) // 8 + 1)


@pytest.mark.parametrize("name", BAGNETS)
def test_gradient_support_is_exactly_the_receptive_field_box(name):
    """d patch_logit(i, j) / d input is non-zero only inside the rf box at (8i, 8j), and reaches its edges."""
    rf, _ = BAGNETS[name]
    model = create_model(name, num_classes=4, width=8, stage_sizes=(1, 2, 1, 1))  # extra blocks are 1x1
    x = jax.random.normal(jax.random.key(1), (1, 96, 88, 3))
    variables = model.init(jax.random.key(0), x)
    boxes = patches.patch_boxes(model, 96, 88)
    gh, gw = boxes.shape[:2]
    grad_fn = jax.jit(jax.grad(lambda im, i, j: model.apply(variables, im, method="patch_logits")[0, i, j].sum()))
    for i, j in [(0, 0), (gh // 2, gw - 1), (gh - 1, 1)]:
        grad = grad_fn(x, i, j)
        support = np.abs(np.asarray(grad[0])).sum(-1) > 0
        ys, xs = np.nonzero(support)
        y0, x0, y1, x1 = boxes[i, j]
        assert (y0, x0, y1, x1) == (8 * i, 8 * j, 8 * i + rf, 8 * j + rf)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)


def test_image_smaller_than_receptive_field_is_a_clear_error():
    model = create_model("bagnet33", num_classes=3, width=4)
    with pytest.raises(ValueError, match="at least 33x33"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 40, 3)))
    with pytest.raises(ValueError, match="smaller than the 33x33"):
        patches.grid_shape(model, 40, 20)


def test_unknown_model_and_head_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'bagnet34'"):
        create_model("bagnet34", num_classes=3)
    with pytest.raises(ValueError, match="unknown head 'cosine'"):
        create_model("bagnet9", num_classes=3, head="cosine")


@pytest.mark.parametrize("name,head", [("bagnet9", "learned"), ("bagnet17", "learned"),
                                       *[("bagnet33", head) for head in HEADS]])
def test_image_logits_are_the_mean_of_independently_evaluated_patches_for_every_head(name, head):
    """BagNet paper Sec. 3: the image logits are the mean over patches of the logits of each patch on its own.

    The reference crops every receptive-field box and runs the network on it alone (``patches.per_patch_logits``),
    so it shares no convolution with the dense pass over the whole image.
    """
    model = create_model(name, num_classes=6, head=head, width=4, stage_sizes=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(2), (2, 57, 49, 3))
    variables = model.init(jax.random.key(0), x)
    logits, single = jax.jit(lambda v: (model.apply(v, x), patches.per_patch_logits(model, v, x)))(variables)
    chex.assert_shape(logits, (2, 6))
    assert single.shape[1:3] == patches.grid_shape(model, 57, 49) and single.shape[1] * single.shape[2] > 1
    assert float(jnp.std(single.mean(axis=(1, 2)))) > 1e-3  # logits that differ, or the check means nothing
    chex.assert_trees_all_close(logits, single.mean(axis=(1, 2)), atol=1e-4)


def test_identity_head_with_more_classes_than_channels():
    with pytest.raises(ValueError, match="200 > 128"):
        create_model("bagnet9", num_classes=200, head="identity", width=4).init(
            jax.random.key(0), jnp.zeros((1, 9, 9, 3)))
    # thesis 4.3.2: the last block's final conv outputs n_k channels and the skip is zero-padded.
    model = create_model("bagnet9", num_classes=200, head="identity", width=4, stage_sizes=(1, 1, 1, 2),
                         identity_expand=True)
    x = jax.random.normal(jax.random.key(3), (1, 25, 25, 3))
    variables = model.init(jax.random.key(0), x)
    last = variables["params"]["layer4_1"]
    assert last["conv3"]["kernel"].shape == (1, 1, 32, 200) and last["conv3"]["bias"].shape == (200,)
    assert "bn3" not in last
    assert model.apply(variables, x, method="patch_logits").shape == (1, 3, 3, 200)


@pytest.mark.parametrize("name", ["bagnet17", "resnet50"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    f32 = create_model(name, num_classes=5, width=8, stage_sizes=(1, 1, 1, 1))
    bf16 = create_model(name, num_classes=5, width=8, stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    variables = f32.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16.init(jax.random.key(0), x)))
    low, high = jax.jit(bf16.apply)(variables, x), jax.jit(f32.apply)(variables, x)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.05 * float(jnp.abs(high).max()) + 1e-2)
