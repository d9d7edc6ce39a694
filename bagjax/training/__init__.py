"""Training: sharded optax steps over a device mesh (``loop``), orbax checkpoints, optimizers, shardings."""
