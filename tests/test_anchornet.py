"""AnchorNet (Tables 1 and 2, Eq. 1-5): shapes, receptive fields, attention, auxiliary head, loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bagjax.models.anchornet import (RECEPTIVE_FIELDS, STRIDE, anchornet, grid_size, image_logits, pool_logits,
                                     training_loss)
from bagjax.models import layers
from bagjax.models.layers import SE_GATES, grouped_depthwise_conv, shifted_depthwise_conv
from bagjax.models.macs import multiply_adds

NUM_CLASSES = 4
# Tiny inputs: compile time dominates, so skip XLA's costly CPU backend optimizations.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_CPU_COMPILE)


def numpy_variables(model, x, seed=0):
    """He-normal kernels, zero biases, unit BN: the structure of ``model.init`` without compiling its RNG.

    (XLA's CPU compile of the ~350 random initializers alone takes far longer than these tests may.)
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_out = leaf.shape[-1] * math.prod(leaf.shape[:-2])
        return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_out), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model():
    return anchornet(num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def variables(model):
    return numpy_variables(model, jnp.zeros((1, 128, 128, 3)))


@pytest.fixture(scope="module")
def eval_run(model, variables):
    """Eval-mode outputs on two 160 px images, recording every SE gate."""
    x = jax.random.normal(jax.random.key(1), (2, 160, 160, 3))
    outputs, state = compiled(lambda v, x: model.apply(v, x, mutable=[SE_GATES]), variables, x)(variables, x)
    return x, outputs, state[SE_GATES]


def test_shapes_at_224_eval_and_train():
    model = anchornet(num_classes=1000)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    out = jax.eval_shape(model.apply, variables, x)
    assert set(out) == {"logits", "class_maps", "attention"}
    for rf, g in zip(RECEPTIVE_FIELDS, (21, 17, 15)):
        assert out["logits"][rf].shape == (2, 1000)
        assert out["class_maps"][rf].shape == (2, g, g, 1000)
        assert out["attention"][rf].shape == (2, g, g)
    train_out, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                                      variables, x)
    assert set(train_out) == {"logits", "class_maps", "attention", "aux_logits"}
    assert all(train_out["aux_logits"][rf].shape == (2, 1000) for rf in RECEPTIVE_FIELDS)
    assert set(state) == {"batch_stats"}


@pytest.mark.parametrize("height,width", [(111, 111), (160, 200), (233, 119)])
def test_grid_sizes_follow_section_3_1(model, height, width):
    x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
    for rf in RECEPTIVE_FIELDS:
        assert out["class_maps"][rf].shape[1:3] == (grid_size(height, rf), grid_size(width, rf))


def test_rejects_bad_inputs_and_options(model, variables):
    with pytest.raises(ValueError, match="at least 111x111"):
        model.apply(variables, jnp.zeros((1, 110, 224, 3)))
    with pytest.raises(ValueError, match="head='learned'"):
        anchornet(num_classes=3, head="orthogonal")
    with pytest.raises(ValueError, match="pooling"):
        anchornet(num_classes=3, pooling="max")
    with pytest.raises(ValueError, match="bn_momentum"):
        anchornet(num_classes=3, bn_momentum=1.5)
    with pytest.raises(ValueError, match=r"se_size 'half'.*expansion"):
        anchornet(num_classes=3, se_size="half")


# Parameters and multiply-adds (convs + FCs, eval mode) at 224 px and 1000 classes, and the SE FCs of head3
# (Table 1 row "1x1, Exp 96, Out 40, SE", input 24 channels): squeeze 96/4 = 24, 24 // 4 = 6 or 40 // 4 = 10.
SE_READINGS = {"expansion": (2_529_440, 486_307_336, (96, 24)), "input": (1_706_436, 485_485_288, (96, 6)),
               "output": (1_550_310, 485_332_840, (40, 10))}


@pytest.mark.parametrize("se_size", SE_READINGS)
def test_se_size_readings_parameters_and_multiply_adds(se_size):
    """The paper gives 1.6M parameters and 0.5G multiply-adds; 'output' (the default) is the closest reading."""
    params, macs, fc1 = SE_READINGS[se_size]
    model = anchornet(num_classes=1000, se_size=se_size)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == params
    assert multiply_adds(model, variables, x) == macs
    se = variables["params"]["head3"]["se"]
    assert se["fc1"]["kernel"].shape == fc1 and se["fc2"]["kernel"].shape == fc1[::-1]
    assert (model.se_size == "output") == (se_size == "output")  # the default


def test_receptive_fields_with_fixed_se_gates(model, variables, eval_run):
    """d F^rf[0, i, j, c] / d input is nonzero only inside [8i, 8i + rf) x [8j, 8j + rf) and reaches its edges."""
    x, outputs, gates = eval_run
    fixed = {**variables, SE_GATES: gates}
    i, j, c = 1, 2, 3

    def picked(x):
        out = model.apply(fixed, x)
        return jnp.stack([out["class_maps"][rf][0, i, j, c] for rf in RECEPTIVE_FIELDS]), out["logits"]

    jac, logits = compiled(jax.jacrev(picked, has_aux=True), x)(x)
    for rf in RECEPTIVE_FIELDS:  # the recorded gates reproduce the forward pass
        np.testing.assert_allclose(logits[rf], outputs["logits"][rf], rtol=1e-5, atol=1e-5)
    for n, rf in enumerate(RECEPTIVE_FIELDS):
        touched = np.abs(np.asarray(jac[n])).sum(axis=-1)  # (2, 160, 160)
        assert not touched[1].any()  # the other image
        rows, cols = np.nonzero(touched[0])
        assert (rows.min(), rows.max() + 1) == (STRIDE * i, STRIDE * i + rf)
        assert (cols.min(), cols.max() + 1) == (STRIDE * j, STRIDE * j + rf)


def test_attention_is_a_distribution_and_pools_the_class_maps(eval_run):
    _, outputs, _ = eval_run
    for rf in RECEPTIVE_FIELDS:
        s, f = outputs["attention"][rf], outputs["class_maps"][rf]
        assert (s >= 0).all()
        np.testing.assert_allclose(s.sum(axis=(1, 2)), 1.0, rtol=1e-5)
        want = (f * s[..., None]).sum(axis=(1, 2))
        np.testing.assert_allclose(outputs["logits"][rf], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pool_logits(f, s, "mean"), want / (f.shape[1] * f.shape[2]), rtol=1e-4,
                                   atol=1e-6)
    assert "aux_logits" not in outputs


def test_training_step_lowers_the_loss(model, variables):
    x = jax.random.normal(jax.random.key(2), (4, 120, 128, 3))
    labels = jnp.asarray([0, 1, 2, 3])

    def loss(params):
        out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
        return training_loss(out, labels, label_smoothing=0.1), (out, state)

    loss_and_grad = compiled(jax.value_and_grad(loss, has_aux=True), variables["params"])

    (loss0, (out, state)), grads = loss_and_grad(variables["params"])
    assert all(out["aux_logits"][rf].shape == (4, NUM_CLASSES) for rf in RECEPTIVE_FIELDS)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(state["batch_stats"]),
                                                    jax.tree.leaves(variables["batch_stats"])))
    params = optax.apply_updates(variables["params"], jax.tree.map(lambda g: -1e-3 * g, grads))
    (loss1, _), _ = loss_and_grad(params)
    assert np.isfinite(float(loss0)) and float(loss1) < float(loss0)


def synthetic_outputs(rng, batch=3, aux=True):
    out = {"logits": {rf: jnp.asarray(rng.standard_normal((batch, NUM_CLASSES)), jnp.float32)
                      for rf in RECEPTIVE_FIELDS}}
    if aux:
        out["aux_logits"] = {rf: jnp.asarray(rng.standard_normal((batch, NUM_CLASSES)), jnp.float32)
                             for rf in RECEPTIVE_FIELDS}
    return out


def test_training_loss_sums_branch_and_aux_cross_entropies():
    rng = np.random.default_rng(0)
    out = synthetic_outputs(rng)
    labels = jnp.asarray([0, 3, 1])

    def ce(logits):
        return -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[:, None], 1)[:, 0]

    branch = sum(ce(out["logits"][rf]) for rf in RECEPTIVE_FIELDS)
    aux = sum(ce(out["aux_logits"][rf]) for rf in RECEPTIVE_FIELDS)
    np.testing.assert_allclose(training_loss(out, labels), np.mean(branch + aux), rtol=1e-6)
    np.testing.assert_allclose(training_loss(out, labels, aux_weight=0.4), np.mean(branch + 0.4 * aux), rtol=1e-6)
    eval_out = {"logits": out["logits"]}
    np.testing.assert_allclose(training_loss(eval_out, labels), np.mean(branch), rtol=1e-6)
    assert float(training_loss(eval_out, labels, label_smoothing=0.2)) != pytest.approx(float(np.mean(branch)))


def test_image_logits_is_the_mean_branch_log_softmax():
    out = synthetic_outputs(np.random.default_rng(1), aux=False)
    got = image_logits(out)
    want = np.mean([jax.nn.log_softmax(out["logits"][rf]) for rf in RECEPTIVE_FIELDS], axis=0)
    assert got.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bn_momentum_reaches_every_batchnorm(variables):
    """With bn_momentum=0 one train step stores the batch statistics in every BatchNorm, so eval mode on that
    batch reproduces train mode; a single layer left at the default momentum would break the equality."""
    model = anchornet(num_classes=NUM_CLASSES, bn_momentum=0.0)
    x = jax.random.normal(jax.random.key(2), (2, 112, 112, 3))
    train_out, state = compiled(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                                variables, x)(variables, x)
    updated = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    eval_out = compiled(lambda v, x: model.apply(v, x), updated, x)(updated, x)
    for rf in RECEPTIVE_FIELDS:
        np.testing.assert_allclose(eval_out["logits"][rf], train_out["logits"][rf], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 1), (3, 2)])
def test_depthwise_conv_equals_grouped_convolution(kernel, stride):
    """The shifted multiply-adds compute XLA's VALID grouped conv, forward and backward (odd sizes included)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 12, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, 6))
    ours, theirs = shifted_depthwise_conv(x, w, stride), grouped_depthwise_conv(x, w, stride)
    assert ours.shape == theirs.shape == (2, (13 - kernel) // stride + 1, (12 - kernel) // stride + 1, 6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w, stride))), argnums=(0, 1))(x, w)
             for f in (shifted_depthwise_conv, grouped_depthwise_conv)]
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_takes_the_shifted_form_in_bfloat16_on_every_platform():
    """bf16 depthwise convs never lower to a grouped convolution (on an H100 its bf16 step compiles for minutes);
    float32 keeps the per-platform choice, whose GPU branch is the grouped convolution."""
    w = jnp.ones((3, 3, 1, 6))
    for dtype, grouped in ((jnp.bfloat16, False), (jnp.float32, True)):
        x = jnp.ones((1, 7, 7, 6), dtype)
        exported = jax.export.export(jax.jit(layers.depthwise_conv), platforms=["cpu", "cuda"])(x, w.astype(dtype))
        assert ("stablehlo.convolution" in exported.mlir_module()) == grouped, dtype
