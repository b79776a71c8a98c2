"""The train state: one pytree holding everything a step reads and writes.

`TrainState(step, params, opt_state, rng)` is a `flax.struct.dataclass`, so it can be
jitted, sharded (`jax.tree.map` over it with shardings), and saved by Orbax as is.
`rng` is raw key data (uint32[2]) so that checkpoints hold plain arrays.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  # Number of optimizer updates applied so far (int32 scalar).
  step: jax.Array
  # Model parameters, float32.
  params: Any
  # Optimizer state of the trainable parameters (frozen ones hold optax.MaskedNode).
  opt_state: Any
  # uint32[2] key data; the step folds `step` into it, so it never changes.
  rng: jax.Array


def create(params, tx, seed: int, step: int = 0) -> TrainState:
  """A fresh state at `step` (non-zero at a stage boundary: new optimizer, same step)."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))
