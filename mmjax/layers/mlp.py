"""Feed-forward blocks: the two-layer MLP of ViTs and Flamingo, and LLaMA's SwiGLU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.linear import dense


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    # Squared ReLU (Primer; Persimmon's "relu2").
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _hidden_axes(ndim: int) -> tuple[str | None, ...]:
  """Logical names of a hidden activation [B, ..., mlp]: batch first, mlp last."""
  return ("batch",) + (None,) * (ndim - 2) + ("mlp",)


class Mlp(nn.Module):
  """D -> mlp_dim -> D with an activation between: ``fc1``, ``fc2``."""

  mlp_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = dense(self.mlp_dim, ("embed", "mlp"), use_bias=self.use_bias, dtype=self.dtype, name="fc1")(x)
    h = activation(self.activation)(h)
    h = nn.with_logical_constraint(h, _hidden_axes(h.ndim))
    return dense(d, ("mlp", "embed"), use_bias=self.use_bias, dtype=self.dtype, name="fc2")(h)


class SwiGLU(nn.Module):
  """LLaMA's feed-forward: down(silu(gate(x)) * up(x)): ``gate_proj``, ``up_proj``, ``down_proj``."""

  mlp_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    gate = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="gate_proj")(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="up_proj")(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, _hidden_axes(gate.ndim))
    return dense(d, ("mlp", "embed"), dtype=self.dtype, name="down_proj")(h)
