"""Classifier heads: learned, fixed orthogonal, fixed Hadamard and fixed identity.

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

HEADS = ("learned", "orthogonal", "hadamard", "identity")

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
        raise ValueError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if head == "identity" and num_classes > num_features:
        raise ValueError(
            f"the identity head needs num_classes <= feature channels, got {num_classes} > {num_features}: "
            "use head='learned', or identity_expand=True to widen the last block (thesis 4.3.2)")


class Head(nn.Module):
    """Maps features ``(..., n_c)`` to logits ``(..., num_classes)`` with one of the thesis's four heads.

    - ``learned``: Dense with bias (thesis Eq. 3.3).
    - ``orthogonal``: fixed semi-orthogonal W (thesis 3.2), L2-normalised features, learned scalar
      scale (init 10) and bias (Hoffer et al. 2018).
    - ``hadamard``: fixed truncated Hadamard W, L2-normalised features, ``y = alpha W h + b``
      (thesis Eq. 3.6), alpha init 1/sqrt(n_c).
    - ``identity``: no parameters, the first ``num_classes`` feature channels (thesis 3.4).
    """

    kind: str
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n_c = x.shape[-1]
        check_head(self.kind, self.num_classes, n_c)
        if self.kind == "identity":
            return x[..., : self.num_classes].astype(jnp.float32)
        if self.kind == "learned":
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (n_c, self.num_classes), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
            return y.astype(jnp.float32) + bias
        if self.kind == "orthogonal":
            w, init_scale = orthogonal_matrix(n_c, self.num_classes), 10.0
        else:
            w, init_scale = hadamard_matrix(n_c, self.num_classes), 1.0 / math.sqrt(n_c)
        scale = self.param("scale", nn.initializers.constant(init_scale), (), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        x = x.astype(jnp.float32)
        h = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return scale * jnp.dot(h, jnp.asarray(w).T) + bias
