"""Multiply-adds of a model's convs and fully connected layers, the convention of MobileNetV3 and AnchorNet.

Papers count "FLOPs" as the multiply-adds of convolutions and FC layers only (Howard et al. 2019; AnchorNet's
"0.5G"). XLA's cost analysis counts every operation, a multiply and an add apart, so it reports about twice
as much plus the elementwise work. ``multiply_adds`` records every ``nn.Conv``, ``nn.Dense`` and
``DepthwiseConv`` call of one forward pass (by shapes only, nothing is compiled): a layer with kernel
``(..., fan_in, out)`` producing ``N`` outputs costs ``N * prod(kernel.shape[:-1])``, i.e. ``k*k*in/groups``
multiply-adds per output value.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from bagjax.models.layers import DepthwiseConv


def multiply_adds(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> int:
    """Multiply-adds of the conv and FC layers in ``model.apply(variables, *args, **kwargs)``."""
    total = 0

    def count(next_fun, call_args, call_kwargs, context):
        nonlocal total
        out = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense, DepthwiseConv)):
            kernel = module.variables["params"]["kernel"]
            total += out.size * math.prod(kernel.shape[:-1])
        return out

    def forward(variables, *args):
        with nn.intercept_methods(count):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(forward, variables, *args)
    return total


def anchornet_size_table(image_size: int = 224, num_classes: int = 1000) -> str:
    """Markdown table of AnchorNet's size per SE reading: parameters, multiply-adds, XLA FLOPs (eval, batch 1)."""
    import jax.numpy as jnp

    from bagjax.models.anchornet import SE_SIZE, anchornet
    from bagjax.models.layers import SE_SIZES

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    rows = ["| `se_size` | SE block | parameters | without auxiliary FCs | in SE blocks | multiply-adds (convs + FCs) "
            "| XLA FLOPs |", "|---|---|---|---|---|---|---|"]
    for se_size, where in SE_SIZES.items():
        model = anchornet(num_classes=num_classes, se_size=se_size)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        params = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        size = sum(leaf.size for _, leaf in params)
        aux = sum(leaf.size for path, leaf in params if "aux_classifier" in jax.tree_util.keystr(path))
        se = sum(leaf.size for path, leaf in params if "'se'" in jax.tree_util.keystr(path))
        flops = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
        flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
        default = " (default)" if se_size == SE_SIZE else ""
        rows.append(f"| `{se_size}`{default} | {where} | {size / 1e6:.2f}M | {(size - aux) / 1e6:.2f}M "
                    f"| {se / 1e6:.2f}M | {multiply_adds(model, variables, x) / 1e9:.3f}G | {flops / 1e9:.3f}G |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(anchornet_size_table())
