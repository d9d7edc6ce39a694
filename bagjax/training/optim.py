"""Optimizers and learning-rate schedules built from the config with optax.

SGD with (Nesterov) momentum or AdamW; warmup then cosine, step (divide by 10 at given epochs, as in the
BagNet, thesis Table 4.3 and AnchorNet setups) or constant; weight decay masked off BatchNorm parameters and
biases (every parameter with fewer than two axes); optional gradient clipping; and a frozen backbone, where
only the parameters under ``head`` are updated (the blackout paper fine-tunes only the classifier).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from bagjax.errors import UserError

HEAD_KEY = "head"


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """The learning rate per step: linear warmup, then the config's schedule."""
    lr = config.optimizer.learning_rate
    warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
    name = config.schedule.name
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif name == "step":
        boundaries = {int(e * steps_per_epoch) - warmup: config.schedule.decay_factor
                      for e in config.schedule.decay_epochs}
        main = optax.piecewise_constant_schedule(lr, {b: f for b, f in boundaries.items() if b > 0})
    elif name == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise UserError(f"unknown schedule.name {name!r}: choose cosine, step or constant")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: conv and dense kernels, not BN scales/offsets or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def trainable_labels(params: Any, freeze_backbone: bool) -> Any:
    """'train' or 'frozen' for every parameter: with a frozen backbone only the head trains."""
    return {k: jax.tree.map(lambda _: "train" if (not freeze_backbone or k == HEAD_KEY) else "frozen", v)
            for k, v in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, params: Any, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
    """The optax transformation described by ``config.optimizer``, ``config.schedule`` and ``freeze_backbone``."""
    opt = config.optimizer
    lr = learning_rate_schedule(config, steps_per_epoch, total_steps)
    if opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                         optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov))
    elif opt.name == "adamw":
        tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    else:
        raise UserError(f"unknown optimizer.name {opt.name!r}: choose sgd or adamw")
    if opt.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    if config.freeze_backbone:
        if HEAD_KEY not in params:
            raise UserError(f"freeze_backbone=True but the {config.head!r} head has no parameters to train: "
                            "use head='learned', 'orthogonal', 'orthogonal_hoffer' or 'hadamard'")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   trainable_labels(params, True))
    return tx
