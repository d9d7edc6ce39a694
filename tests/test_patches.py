"""Per-patch evaluation by jax.vmap equals the dense patch logits (Brendel & Bethge 2019, section 3)."""

import jax
import numpy as np
import pytest

from bagjax import patches
from bagjax.errors import UserError
from bagjax.models import create_model


@pytest.mark.parametrize("name", ["bagnet9", "bagnet17", "bagnet33"])
def test_per_patch_logits_equal_dense_patch_logits(name):
    model = create_model(name, num_classes=7, width=8, stage_sizes=(2, 1, 2, 1))
    x = jax.random.normal(jax.random.key(1), (2, 64, 57, 3))
    variables = model.init(jax.random.key(0), x)
    dense = jax.jit(lambda v, x: model.apply(v, x, method="patch_logits"))(variables, x)
    per_patch = jax.jit(lambda v, x, locs: patches.per_patch_logits(model, v, x, locs))
    np.testing.assert_allclose(jax.jit(lambda v, x: patches.per_patch_logits(model, v, x))(variables, x),
                               dense, atol=1e-4)

    rng = np.random.default_rng(0)
    grid = patches.all_locations(model, 64, 57)
    subset = grid[rng.choice(len(grid), size=5, replace=False)]
    sparse = per_patch(variables, x, subset)
    assert sparse.shape == (2, 5, 7)
    np.testing.assert_allclose(sparse, dense[:, subset[:, 0], subset[:, 1]], atol=1e-4)


def test_patch_boxes_and_extracted_patches_agree():
    model = create_model("bagnet17", num_classes=2, width=4)
    x = jax.random.normal(jax.random.key(1), (1, 40, 48, 3))
    boxes = patches.patch_boxes(model, 40, 48)
    assert boxes.shape == (3, 4, 4)
    locations = np.array([[2, 3], [0, 1]])
    crops = patches.extract_patches(x, locations, rf=17, stride=8)
    for n, (i, j) in enumerate(locations):
        y0, x0, y1, x1 = boxes[i, j]
        np.testing.assert_array_equal(crops[0, n], x[0, y0:y1, x0:x1])


def test_geometry_refuses_models_without_a_bounded_receptive_field():
    with pytest.raises(UserError, match="not a BagNet"):
        patches.receptive_field(create_model("resnet50", num_classes=3))
