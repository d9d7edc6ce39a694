"""Initialisation against the references' formulas, by the statistics of freshly initialised kernels.

bethgelab BagNet and torchvision ResNet-50: convs normal(0, sqrt(2 / (k*k*out))), BatchNorm 1/0, fc PyTorch's
nn.Linear default U(+-1/sqrt(fan_in)). AnchorNet: torchvision MobileNetV3 (convs and SE He-normal fan_out,
BatchNorm 1/0, linear classifiers normal(0, 0.01), zero biases).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagjax.models import create_model
from bagjax.models.anchornet import LocalizationBranch

FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def leaves(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_normal(kernel, std, name):
    """Mean 0, the given std and a normal's kurtosis (3; a uniform has 1.8, a 2-sigma truncated normal 2.4)."""
    x = kernel.ravel().astype(np.float64)
    tol = 5 / math.sqrt(2 * x.size)  # 5 standard errors of the sample std
    assert abs(x.std() / std - 1) < tol, f"{name}: std {x.std():.4g}, formula {std:.4g}"
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size), f"{name}: mean {x.mean():.4g}"
    kurtosis = np.mean((x - x.mean()) ** 4) / x.var() ** 2
    assert abs(kurtosis - 3) < 0.45, f"{name}: kurtosis {kurtosis:.3f}, not a normal"


def assert_uniform(x, bound, name):
    x = np.asarray(x, np.float64).ravel()
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound, name
    if x.size > 1000:
        assert abs(x.std() / (bound / math.sqrt(3)) - 1) < 5 / math.sqrt(x.size), name


def init(model, x):
    return jax.jit(model.init).lower(jax.random.key(0), x).compile(compiler_options=FAST_CPU_COMPILE)(
        jax.random.key(0), x)


@pytest.mark.parametrize("name,size", [("bagnet33", 33), ("resnet50", 32)])
def test_torch_reference_initialisation(name, size):
    model = create_model(name, num_classes=50, width=16, stage_sizes=(1, 1, 1, 1))
    variables = init(model, jnp.zeros((1, size, size, 3)))
    checked = 0
    for path, value in leaves(variables["params"]).items():
        if path.startswith("head/"):
            assert_uniform(value, 1 / math.sqrt(512), path)  # n_c = 16 * 32 features
        elif path.endswith("/kernel"):
            k, _, _, out = value.shape
            if value.size >= 2000:
                assert_normal(value, math.sqrt(2 / (k * k * out)), path)
                checked += 1
        elif path.endswith("/scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            assert path.endswith("/bias"), path
            np.testing.assert_array_equal(value, 0.0)
    assert checked >= 12
    for path, value in leaves(variables["batch_stats"]).items():
        np.testing.assert_array_equal(value, 0.0 if path.endswith("mean") else 1.0)


def test_identity_expand_conv_keeps_pytorchs_default_init():
    """Appendix A rn18_l4_1a_nc_1k: the widened conv is a fresh nn.Conv2d, created after the network's init."""
    model = create_model("bagnet9", num_classes=2000, head="identity", width=16, stage_sizes=(1, 1, 1, 1),
                         identity_expand=True)
    conv3 = init(model, jnp.zeros((1, 9, 9, 3)))["params"]["layer4_0"]["conv3"]
    assert_uniform(conv3["kernel"], 1 / math.sqrt(128), "kernel")  # fan_in = planes = 16 * 8
    assert_uniform(conv3["bias"], 1 / math.sqrt(128), "bias")


def test_anchornet_mobilenetv3_initialisation():
    """A whole branch (bottlenecks with SE, class-map conv, attention, auxiliary FC) covers every kind of layer."""
    branch = LocalizationBranch(63, num_classes=300)
    h = jnp.zeros((1, 8, 8, 96))
    variables = jax.jit(lambda k: branch.init(k, h, True)).lower(jax.random.key(0)).compile(
        compiler_options=FAST_CPU_COMPILE)(jax.random.key(0))
    checked = 0
    for path, value in leaves(variables["params"]).items():
        if path.endswith("kernel"):
            if path.startswith(("classifier", "aux_classifier", "attention/")):
                std = 0.01  # torchvision: nn.Linear -> normal(0, 0.01)
            else:
                std = math.sqrt(2 / (value.shape[-1] * math.prod(value.shape[:-2])))  # depthwise: fan_out k*k*C
            if value.size >= 2000:
                assert_normal(value, std, path)
                checked += 1
        elif path.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            np.testing.assert_array_equal(value, 0.0)
    assert checked >= 10
