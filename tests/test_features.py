"""Head-only training on cached features (bagjax.training.features): the same head as training through the
frozen network without augmentation (a normalising BagNet head, end to end through train.py's loop), and the same
image logits from the cached vector alone for every BagNet head and for ResNet-50."""

import numpy as np
import pytest

from digits import write_split_folder
from trainutil import restore_params

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """About 40 train and 20 eval digits 0-4, 40 px PNGs (square, so the unaugmented train crop is the whole image)."""
    return write_split_folder(tmp_path_factory.mktemp("digits"), range(0, 80), range(80, 120), upscale=5,
                              classes=range(5))


def _config(folder, cached):
    from configs import demo

    config = demo.get_config("smoke")
    config.model, config.head, config.image_size = "bagnet17", "hadamard", 40
    config.dataset, config.num_classes = f"imagefolder:{folder}", -1
    config.batch_size, config.eval_batch_size, config.total_steps = 8, 8, STEPS
    config.eval_every_steps = STEPS
    config.heatmap_images = 0
    config.freeze_backbone, config.cache_features = True, cached
    # No augmentation: the whole image, unflipped, is what the cache holds.
    config.data.crop_min_area, config.data.crop_aspect_ratio, config.data.flip = 1.0, (1.0, 1.0), False
    config.data.crop_fraction = 1.0
    config.optimizer.name, config.optimizer.learning_rate = "adamw", 0.05
    return config


def test_cached_features_train_the_same_head_as_the_whole_network(folder, tmp_path):
    """Hadamard normalises each location's feature (thesis Eq. 3.6), the hardest case for a cache of one vector.
    Any head whose image logits equal the head of the cached vector (the test below, ResNet-50 included) gets the
    same gradients, so one end-to-end run pair stands for all."""
    from bagjax.training.loop import train_and_evaluate

    runs = {}
    for cached in (False, True):
        metrics = train_and_evaluate(_config(folder, cached), str(tmp_path / str(cached)))
        runs[cached] = (metrics, restore_params(tmp_path / str(cached), STEPS))
    assert (tmp_path / "True" / "features.npz").exists() and not (tmp_path / "False" / "features.npz").exists()
    (plain, plain_vars), (cached, cached_vars) = runs[False], runs[True]
    head_before = restore_params(tmp_path / "True", STEPS - 1)["params"]["head"]
    for name, value in plain_vars["params"]["head"].items():
        np.testing.assert_allclose(cached_vars["params"]["head"][name], value, rtol=2e-4, atol=2e-5, err_msg=name)
        assert not np.array_equal(head_before[name], cached_vars["params"]["head"][name]) or name == "scale"
    assert cached["eval_count"] == plain["eval_count"] > 15
    np.testing.assert_allclose(cached["eval_loss"], plain["eval_loss"], rtol=1e-4)
    assert cached["eval_accuracy"] == plain["eval_accuracy"]


BAGNET_HEADS = ("learned", "orthogonal", "orthogonal_hoffer", "hadamard", "identity")


@pytest.mark.parametrize("model,head", [("bagnet17", h) for h in BAGNET_HEADS] + [("resnet50", "learned")])
def test_the_image_logits_follow_from_the_cached_vector_through_the_head_alone(model, head):
    """The BagNet heads that normalise do so per location (thesis Eq. 3.6), so their cache is the mean normalised
    feature; ResNet-50's head acts on the pooled feature."""
    import jax
    import jax.numpy as jnp

    from bagjax.models import create_model
    from bagjax.training import features

    net = create_model(model, num_classes=5, head=head, width=8, stage_sizes=(1, 1, 1, 1))
    images = jax.random.normal(jax.random.key(0), (2, 48, 48, 3))
    variables = net.init(jax.random.key(1), images)
    pooled = net.apply(variables, images, method="pooled_features")
    assert pooled.shape == (2, 256)
    if head != "identity":  # no parameters: nothing to train, freeze_backbone refuses it
        np.testing.assert_allclose(features.head_logits(net, variables["params"], pooled),
                                   net.apply(variables, images)[0], rtol=1e-5, atol=1e-5)
    if model != "resnet50":
        np.testing.assert_allclose(jnp.mean(net.apply(variables, images, method="patch_logits"), (1, 2)),
                                   net.apply(variables, images)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_backbone_is_never_differentiated(frozen):
    """The uncached head-only step differentiates the head alone: it holds the forward pass's convolutions and no
    backward ones, and only the head moves; training every layer holds them all and moves the backbone too."""
    import functools

    import jax
    import jax.numpy as jnp

    from bagjax.models import build_model
    from bagjax.training import loop, optim

    config = _config("unused", cached=False)
    config.freeze_backbone = frozen
    model = build_model(config, 5)
    variables = loop.init_variables(jax.random.key(0), model=model, image_size=config.image_size)
    tx = optim.make_optimizer(config, variables["params"], steps_per_epoch=1, total_steps=STEPS)
    state = loop.init_state(variables, tx=tx)
    batch = {"image": jnp.zeros((2, 40, 40, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}

    def convolutions(fn, *args) -> int:
        return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")

    forward = convolutions(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((2, 40, 40, 3)))
    step = convolutions(functools.partial(loop.train_step, model=model, tx=tx, config=config), state, batch)
    assert forward > 10
    assert (step == forward) if frozen else (step > 2 * forward), (step, forward)
    new_state, _ = jax.jit(functools.partial(loop.train_step, model=model, tx=tx, config=config))(state, batch)
    moved = {k: not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params[k]),
                                                             jax.tree.leaves(state.params[k])))
             for k in state.params}
    assert moved[optim.HEAD_KEY] and any(moved[k] for k in moved if k != optim.HEAD_KEY) != frozen, moved
