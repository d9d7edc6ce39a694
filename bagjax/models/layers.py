"""MobileNetV3 building blocks (Howard et al. 2019) with unpadded convolutions, for AnchorNet (Tables 1 and 2).

Every conv is VALID (AnchorNet section 3.1, "padding 0 across all the convolutional layers"), so an output
location maps to one input box exactly. A bottleneck (``bneck``) is: 1x1 expansion (skipped when the expansion
equals the input width, as in MobileNetV3) -> k x k depthwise -> optional squeeze-and-excitation -> linear 1x1
projection, with a residual when the stride is 1 and the widths match. Because the depthwise conv is unpadded,
the residual is centre-cropped by ``(k - 1) / 2`` pixels per side: the kept input pixel is the centre of the
depthwise window, so the receptive field stays the one the tables give. The authors' public code
(winycg/AnchorNet, ``Block``) crops the bottom and right ``k - 1`` pixels instead; the paper is silent, both
keep the 63/95/111 px receptive fields, and the centred crop adds each output to its own window's centre.

BatchNorm follows torchvision's MobileNetV3 (PyTorch ``momentum=0.01, eps=1e-3``), i.e. Flax ``momentum=0.99``,
``epsilon=1e-3``; statistics live in the ``batch_stats`` collection. ``bn_momentum`` overrides the momentum: short
runs need a faster average (0.9), since the feature scales still change a lot from step to step and running
averages over ~100 steps then lag behind them, so eval mode (running statistics) collapses while train mode works.

Squeeze-and-excitation pools over the whole map, so with SE the exact receptive field of a location is the
whole image; only the conv path is local. For receptive-field checks (and interpretation), the SE gates can
be held fixed: ``apply(..., mutable=['se_gates'])`` records every gate of that batch, and passing that
collection back in ``variables`` (``{'params', 'batch_stats', 'se_gates'}``) makes each SE use the stored gate
instead of pooling, so gradients then see only the conv path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagjax.models.initializers import he_normal_fan_out
from bagjax.errors import UserError

BN_MOMENTUM = 0.99  # PyTorch momentum 0.01 (torchvision MobileNetV3); Flax momentum is 1 - PyTorch momentum.
BN_EPSILON = 1e-3
SE_GATES = "se_gates"  # collection that holds recorded/fixed squeeze-and-excitation gates


def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Unpadded depthwise conv of NHWC ``x`` with a (k, k, 1, C) kernel, as k*k shifted multiply-adds.

    The same function as ``grouped_depthwise_conv``, written so that XLA fuses it into elementwise loops. The
    sum runs in float32 (as a convolution accumulates) and is cast back to ``x``'s dtype.
    """
    k = kernel.shape[0]
    rows = (x.shape[1] - k) // stride + 1
    cols = (x.shape[2] - k) // stride + 1
    out = jnp.zeros((x.shape[0], rows, cols, x.shape[3]), jnp.float32)
    for i in range(k):
        for j in range(k):
            window = x[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride]
            out = out + (window * kernel[i, j, 0]).astype(jnp.float32)
    return out.astype(x.dtype)


def grouped_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Unpadded depthwise conv as XLA's grouped convolution, one group per channel (what ``nn.Conv`` does)."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


DEPTHWISE_FORMS = {"shifted": shifted_depthwise_conv, "grouped": grouped_depthwise_conv}
_depthwise_form: contextvars.ContextVar[str | None] = contextvars.ContextVar("depthwise_form", default=None)


@contextlib.contextmanager
def depthwise_form(form: str) -> Iterator[None]:
    """Trace every ``depthwise_conv`` in this block as one fixed form ('grouped' or 'shifted').

    Exporters want one plain graph: ``bagjax.export`` traces AnchorNet under ``depthwise_form('grouped')``, a
    single grouped Conv in ONNX, instead of the ``lax.platform_dependent`` choice between the two equal forms.
    """
    if form not in DEPTHWISE_FORMS:
        raise ValueError(f"unknown depthwise form {form!r}: choose one of {', '.join(DEPTHWISE_FORMS)}")
    token = _depthwise_form.set(form)
    try:
        yield
    finally:
        _depthwise_form.reset(token)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """The faster of the two equal implementations for the dtype and the platform the computation is lowered for.

    On the CPU, XLA's grouped convolution, and above all its gradient, is slow: the shifted multiply-adds
    make AnchorNet's training step 3-4x faster there (``bench/depthwise.py``). On an H100 cuDNN's grouped
    convolution wins in float32 (the shifted form is 0.88x), so every other platform uses it there (only the
    H100 was measured). In bfloat16 the grouped form's AnchorNet training step did not finish compiling in 128 s
    on the H100 (224 px, batch 256), while the shifted one compiled and ran in 72 s, so half-precision inputs
    take the shifted form on every platform. Inside ``depthwise_form(form)`` that form is used everywhere.
    """
    if _depthwise_form.get() is not None:
        return DEPTHWISE_FORMS[_depthwise_form.get()](x, kernel, stride)
    if jnp.dtype(x.dtype).itemsize < 4:
        return shifted_depthwise_conv(x, kernel, stride)
    return jax.lax.platform_dependent(x, kernel, cpu=functools.partial(shifted_depthwise_conv, stride=stride),
                                      default=functools.partial(grouped_depthwise_conv, stride=stride))


class DepthwiseConv(nn.Module):
    """k x k unpadded depthwise conv without bias; parameters as ``nn.Conv(..., feature_group_count=C)``."""

    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", he_normal_fan_out, (self.kernel_size, self.kernel_size, 1, x.shape[-1]))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv(x, kernel, self.stride)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """relu6(x + 3) / 6 (MobileNetV3 eq. for h-sigmoid)."""
    return jax.nn.relu6(x + 3.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
    """x * h-sigmoid(x), the 'HS' non-linearity of AnchorNet Tables 1 and 2."""
    return x * hard_sigmoid(x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"HS": hard_swish, "RE": nn.relu}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10% (MobileNetV3)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBN(nn.Module):
    """Unpadded conv (no bias; depthwise, keeping the width, when ``depthwise``) -> BatchNorm -> optional
    non-linearity ('HS' or 'RE')."""

    features: int
    kernel: int
    stride: int = 1
    depthwise: bool = False
    activation: str | None = None
    bn_momentum: float = BN_MOMENTUM
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.depthwise:
            if self.features != x.shape[-1]:
                raise ValueError(f"a depthwise ConvBN keeps the width: features={self.features} but the input has "
                                 f"{x.shape[-1]} channels")
            x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="conv")(x)
        else:
            x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding="VALID",
                        use_bias=False, kernel_init=he_normal_fan_out, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=BN_EPSILON,
                         dtype=self.dtype, name="bn")(x)
        return x if self.activation is None else ACTIVATIONS[self.activation](x)


class SqueezeExcite(nn.Module):
    """SE block of MobileNetV3: global mean -> FC(squeeze) -> ReLU -> FC -> h-sigmoid gate, per channel.

    The gate can be recorded into / read from the ``se_gates`` collection (see the module docstring).
    """

    squeeze: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Dense(self.squeeze, kernel_init=he_normal_fan_out, dtype=self.dtype, name="fc1")(pooled))
        gate = hard_sigmoid(nn.Dense(x.shape[-1], kernel_init=he_normal_fan_out, dtype=self.dtype, name="fc2")(s))
        if self.has_variable(SE_GATES, "gate"):
            gate = self.get_variable(SE_GATES, "gate")
        elif self.is_mutable_collection(SE_GATES) and not self.is_initializing():
            self.put_variable(SE_GATES, "gate", gate)
        return x * gate.astype(x.dtype)


# Where a bottleneck's SE block sits and how wide its squeeze is; AnchorNet's tables do not say (see anchornet.py).
SE_SIZES = {
    "expansion": "on the expanded features, squeeze expansion/4 rounded to 8 (MobileNetV3, torchvision)",
    "input": "on the expanded features, squeeze = block input channels // 4 (the authors' later public Block)",
    "output": "on the projected output (before the residual), squeeze = output channels // 4",
}


def se_squeeze(se_size: str, cin: int, expansion: int, out: int) -> int:
    """Width of the SE squeeze (its first FC) for one bottleneck under the ``se_size`` reading."""
    if se_size == "expansion":
        return make_divisible(expansion / 4)
    if se_size == "input":
        return cin // 4
    if se_size == "output":
        return out // 4
    raise UserError(f"unknown se_size {se_size!r}: choose one of {', '.join(SE_SIZES)}")


class Bneck(nn.Module):
    """MobileNetV3 bottleneck with a VALID depthwise conv (one row of AnchorNet Table 1 or 2).

    ``se_size`` places and sizes the SE block (``SE_SIZES``); it is named ``se`` in every reading.
    """

    kernel: int
    expansion: int
    out: int
    se: bool
    nl: str
    stride: int = 1
    bn_momentum: float = BN_MOMENTUM
    se_size: str = "expansion"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cin = x.shape[-1]
        y = x
        if self.expansion != cin:
            y = ConvBN(self.expansion, 1, activation=self.nl, bn_momentum=self.bn_momentum, dtype=self.dtype,
                       name="expand")(y, train)
        y = ConvBN(self.expansion, self.kernel, self.stride, depthwise=True, activation=self.nl,
                   bn_momentum=self.bn_momentum, dtype=self.dtype, name="depthwise")(y, train)
        squeeze = se_squeeze(self.se_size, cin, self.expansion, self.out)
        if self.se and self.se_size != "output":
            y = SqueezeExcite(squeeze, dtype=self.dtype, name="se")(y)
        y = ConvBN(self.out, 1, bn_momentum=self.bn_momentum, dtype=self.dtype, name="project")(y, train)
        if self.se and self.se_size == "output":
            y = SqueezeExcite(squeeze, dtype=self.dtype, name="se")(y)
        if self.stride == 1 and cin == self.out:
            c = (self.kernel - 1) // 2
            y = y + x[:, c:x.shape[1] - c, c:x.shape[2] - c]
        return y
