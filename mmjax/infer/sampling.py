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


def knobs(sampling: Sampling) -> dict:
  """The sampling settings as arrays, so the jitted steps take them as traced inputs: one
  compilation serves every method and value."""
  m = sampling.method
  return {
      "greedy": jnp.asarray(m == "greedy"),
      "temperature": jnp.asarray(sampling.temperature, jnp.float32),
      # 0 means no top-k cut, 1.0 no top-p cut.
      "top_k": jnp.asarray(sampling.top_k if m == "top_k" else 0, jnp.int32),
      "top_p": jnp.asarray(sampling.top_p if m == "top_p" else 1.0, jnp.float32),
  }


def sample_with(logits: jax.Array, rng: jax.Array, knob: dict) -> jax.Array:
  """Int32[B] token ids from float logits [B, V] and ``knobs(...)`` (traced values)."""
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / knob["temperature"]
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
  rank = jnp.arange(v, dtype=jnp.int32)[None, :]
  k = jnp.where(knob["top_k"] > 0, jnp.minimum(knob["top_k"], v), v)
  in_top_k = rank < k
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
  # Probability mass strictly before each sorted token: keep it while that is < p, so the
  # most likely token is always kept and the kept set just reaches p.
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = in_top_k & (before < knob["top_p"])
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  drawn = jax.random.categorical(rng, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  return jnp.where(knob["greedy"], greedy, drawn.astype(jnp.int32))


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Int32[B] token ids from float logits [B, V]."""
  return sample_with(logits, rng, knobs(sampling))
