"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Dimension letters: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ("greedy", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick each token (hashable: it is a static argument of the jitted steps)."""

  # 'greedy' (argmax), 'temperature' (softmax(logits / temperature)), 'top_k' (the k most
  # likely tokens, at temperature) or 'top_p' (the smallest set whose probability reaches p).
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 0.9

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"sampling method {self.method!r} is not one of {METHODS}")
    if self.temperature <= 0:
      raise ValueError(f"temperature={self.temperature}; expected > 0 (use 'greedy' for argmax)")
    if self.top_k < 1:
      raise ValueError(f"top_k={self.top_k}; expected >= 1")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}; expected in (0, 1]")


def as_sampling(sampling: "Sampling | str") -> Sampling:
  return Sampling(method=sampling) if isinstance(sampling, str) else sampling


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Int32[B] token ids from float logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if sampling.method == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.float32(sampling.temperature)
  if sampling.method == "top_k":
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  elif sampling.method == "top_p":
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted token: keep it while that is < p, so
    # the most likely token is always kept and the set just reaches p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < jnp.float32(sampling.top_p)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
