"""Classifier heads: learned, fixed orthogonal (the thesis's and Hoffer et al.'s), fixed Hadamard, fixed identity.

Qian, "Deep Convolutional Networks without Learning the Classifier Layer" (RIT thesis 2020), chapter 3,
after Hoffer et al., "Fix your classifier" (ICLR 2018). A head maps features ``(..., n_c)`` to logits
``(..., n_k)`` and acts on the last axis only, so on a BagNet it is applied per location and the image
logits stay the plain mean of the patch logits for every head.

The fixed matrices are constants built at trace time from ``(n_c, n_k)``: they are not parameters, so they
receive no gradient, optax never sees them and checkpoints do not store them.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from bagjax.models.initializers import torch_default_bias, torch_default_kernel, uniform_symmetric
from bagjax.errors import UserError

HEADS = ("learned", "orthogonal", "orthogonal_hoffer", "hadamard", "identity")

# The fixed orthogonal matrix is drawn from this seed, so it is the same in every run and never stored.
_ORTHOGONAL_SEED = 0


@functools.lru_cache(maxsize=None)
def orthogonal_matrix(n_c: int, n_k: int) -> np.ndarray:
    """A fixed semi-orthogonal ``(n_k, n_c)`` matrix (thesis 3.2): rows orthonormal if n_k <= n_c, else columns."""
    rng = np.random.default_rng(_ORTHOGONAL_SEED)
    a = rng.standard_normal((max(n_c, n_k), min(n_c, n_k)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # unique QR: the same matrix on every platform
    w = q.T if n_k <= n_c else q  # (n_k, n_c)
    return w.astype(np.float32)


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n_c: int, n_k: int) -> np.ndarray:
    """Sylvester Hadamard of order 2^ceil(log2(max(n_c, n_k))) truncated to ``(n_k, n_c)`` (thesis Eq. 3.4-3.5)."""
    order = 2 ** math.ceil(math.log2(max(n_c, n_k)))
    return scipy.linalg.hadamard(order)[:n_k, :n_c].astype(np.float32)


def check_head(head: str, num_classes: int, num_features: int) -> None:
    """Raise a one-line error for an unknown head or an impossible head size."""
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if head == "identity" and num_classes > num_features:
        raise UserError(
            f"the identity head needs num_classes <= feature channels, got {num_classes} > {num_features}: "
            "use head='learned', or identity_expand=True to widen the last block (thesis 4.3.2)")


class Head(nn.Module):
    """Maps features ``(..., n_c)`` to logits ``(..., num_classes)`` with one of the thesis's heads.

    - ``learned``: Dense with bias, ``y = Wh + b`` (thesis Eq. 3.3), PyTorch's ``nn.Linear`` initialisation
      as in the torchvision/bethgelab references (``bagjax.models.initializers``).
    - ``orthogonal``: the thesis's fixed orthogonal classifier (section 3.2, appendix A ``rn18_orthogonal_fc``):
      ``nn.Linear`` with a fixed semi-orthogonal W, ``y = Wh + b``; only the bias is learned (PyTorch init).
    - ``orthogonal_hoffer``: Hoffer et al.'s ``Proj`` (fix_your_classifier/fixed_proj.py): the same fixed W
      on L2-normalised features, ``y = s W h/|h| + b``, learned scale s (init 10) and bias (init 0).
    - ``hadamard``: fixed truncated Hadamard W on L2-normalised features (thesis Eq. 3.6,
      ``y = alpha W h + b``) as the thesis ran it, Hoffer et al.'s ``HadamardProj``: alpha init
      1/sqrt(n_k) (n_k classes; also the thesis's appendix A option C), bias init U(-1/sqrt(n_k), 1/sqrt(n_k)),
      and the reference's sign, ``-alpha W h/|h| + b`` (the same as Eq. 3.6 with the Hadamard matrix -W).
    - ``identity``: no parameters, the first ``num_classes`` feature channels (thesis 3.4).
    """

    kind: str
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, normalized: bool = False) -> jnp.ndarray:
        """Logits of features ``x``; ``normalized``: ``x`` is already a mean of L2-normalised features
        (``pool_for_head``), which the normalising heads then take as it is."""
        n_c, n_k = x.shape[-1], self.num_classes
        check_head(self.kind, n_k, n_c)
        if self.kind == "identity":
            return x[..., :n_k].astype(jnp.float32)
        if self.kind in ("learned", "orthogonal"):
            if self.kind == "learned":
                kernel = self.param("kernel", torch_default_kernel, (n_c, n_k), jnp.float32)
            else:
                kernel = jnp.asarray(orthogonal_matrix(n_c, n_k).T)
            bias = self.param("bias", torch_default_bias(n_c), (n_k,), jnp.float32)
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
            return y.astype(jnp.float32) + bias
        if self.kind == "orthogonal_hoffer":
            w, sign = orthogonal_matrix(n_c, n_k), 1.0
            scale = self.param("scale", nn.initializers.constant(10.0), (), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (n_k,), jnp.float32)
        else:
            w, sign, alpha = hadamard_matrix(n_c, n_k), -1.0, 1.0 / math.sqrt(n_k)
            scale = self.param("scale", nn.initializers.constant(alpha), (), jnp.float32)
            bias = self.param("bias", uniform_symmetric(alpha), (n_k,), jnp.float32)
        x = x.astype(jnp.float32) if normalized else l2_normalize(x.astype(jnp.float32))
        return sign * scale * jnp.dot(x, jnp.asarray(w).T) + bias


NORMALISING = ("orthogonal_hoffer", "hadamard")


def pool_for_head(kind: str, features: jnp.ndarray) -> jnp.ndarray:
    """The per-image vector ``(B, n_c)`` from which a per-location head gives the image logits (the mean of the
    patch logits) in one application: every head is affine in what it multiplies by W, so the mean commutes
    with it. That is the mean feature for ``learned``, ``orthogonal`` and ``identity`` (thesis Eq. 3.3, 3.4), and
    the mean of the L2-normalised features for the heads that normalise per location (thesis Eq. 3.6; Hoffer et
    al.'s ``Proj``), applied with ``Head(..., normalized=True)``."""
    features = features.astype(jnp.float32)
    if kind in NORMALISING:
        features = l2_normalize(features)
    return jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """``x / (|x| + 1e-8)`` over the last axis, as Hoffer et al.'s fixed projections normalise features.

    Their ``HadamardProj`` adds the 1e-8; their ``Proj`` (our ``orthogonal_hoffer``) divides by the norm alone.
    The two differ only for an all-zero feature, which the 1e-8 keeps finite.
    """
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
