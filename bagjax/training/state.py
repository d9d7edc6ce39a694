"""The train state: a plain pytree of step, parameters, BatchNorm statistics and optimizer state.

The optax transformation is kept outside, so the state is all arrays and checkpoints hold only data.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables, as ``model.apply`` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}
