"""Cached generation for every family: whatever the family computes once per prompt (media
keys/values, image counts), a self-attention KV cache, and fixed shape buckets so that each
step compiles once per bucket.

Dimension letters: B batch, T prompt length, S cache length, V vocabulary.

The family says what differs in a :class:`Decoding` (``Family``'s task gives one): its cache,
its prefill (which also returns the family's *context*, e.g. Flamingo's media keys/values,
kept for the whole generation) and its one-token step. How a call runs
(``Generator.generate``):

1. The prompt is right-padded to a *prompt bucket* Tb (the smallest of
   ``prompt_buckets`` >= the longest prompt) and the cache gets a *length bucket* S (the
   smallest of ``length_buckets`` >= max(Tb, longest prompt + max_new_tokens)).
2. Prefill (compiled once per input shapes, Tb and S): the family's prefill over the
   prompt writes the cache, and the first new token is sampled from the logits at each
   example's last prompt token.
3. Decode (compiled once per (B, S) and input shapes, however many tokens): one token per
   example at position ``prompt_length + step``, attending to the cache causally by
   position, so the padding the prefill wrote beyond a prompt is never seen (it is
   overwritten first).

The sampling method and its settings are traced inputs, so they cause no recompilation;
``eos_token_id`` is checked on the host between steps. Tokens in ``Decoding.banned_ids``
are never sampled (Flamingo's ``<image>``: no image could follow it).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.infer.sampling import Sampling, as_sampling, knobs, sample_with


@dataclasses.dataclass(frozen=True, eq=False)
class Decoding:
  """What the generator asks of a family's model (the rest is the same for all)."""
  # Longest prompt + generation the model takes.
  max_length: int
  # (batch, cache length) -> an empty KV cache.
  init_cache: Callable[[int, int], Any]
  # (params, inputs, prompt_ids Int[B, T], positions Int[B, T], prompt_lengths Int[B], cache)
  #   -> (logits [B, T, V], cache, context): context is what the steps need besides the
  #   cache (computed once; e.g. media keys/values). Traced under jit.
  prefill: Callable[..., tuple[jax.Array, Any, Any]]
  # (params, token Int[B, 1], position Int[B, 1], context, cache) -> (logits [B, 1, V], cache)
  step: Callable[..., tuple[jax.Array, Any]]
  # Token ids never sampled, and never usable as padding.
  banned_ids: tuple[int, ...] = ()
  # (inputs, prompt_ids numpy Int[B, T]) -> None; raises ValueError naming a bad input.
  validate: Callable[[Mapping[str, Any], np.ndarray], None] | None = None


DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
  """The smallest bucket >= length."""
  for b in sorted(buckets):
    if b >= length:
      return b
  raise ValueError(f"{what} {length} exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass
class GenerateOutput:
  # Int32[B, max_new_tokens]: the new tokens; after an example's eos, pad_id.
  tokens: np.ndarray
  # Int32[B]: how many tokens each example generated (eos included).
  lengths: np.ndarray


def prepare_prompts(decoding: Decoding, prompt_buckets: Sequence[int], length_buckets: Sequence[int],
                    inputs: Mapping[str, Any] | None, prompt_ids: Any, prompt_lengths: Any,
                    max_new_tokens: int, pad_id: int):
  """The checks every decoding method makes of its prompts, and their buckets: (inputs as
  arrays, prompts padded to their bucket Int32[B, Tb], prompt lengths Int32[B], cache
  length). Raises ValueError naming what does not fit."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
  if pad_id in decoding.banned_ids:
    raise ValueError(f"pad_id={pad_id} is one of the model's special ids {decoding.banned_ids} "
                     "(e.g. <image>); expected another id")
  inputs = {name: v for name, v in (inputs or {}).items() if v is not None}
  prompt_ids = np.asarray(prompt_ids)
  if prompt_ids.ndim != 2:
    raise ValueError(f"prompt_ids has shape {prompt_ids.shape}; expected [batch, length]")
  b, t = prompt_ids.shape
  lengths = (np.full((b,), t, np.int32) if prompt_lengths is None
             else np.asarray(prompt_lengths, np.int32))
  if lengths.shape != (b,) or (lengths < 1).any() or (lengths > t).any():
    raise ValueError(f"prompt_lengths {lengths.tolist()}; expected {b} values in [1, {t}]")
  for path, x in jax.tree_util.tree_leaves_with_path(inputs):
    if np.ndim(x) < 1 or np.shape(x)[0] != b:
      raise ValueError(f"inputs{jax.tree_util.keystr(path)} has shape {np.shape(x)}; expected the batch "
                       f"({b} prompts) first")
  # Padding beyond each prompt must not count as a special token (an <image>).
  beyond = np.arange(t)[None, :] >= lengths[:, None]
  prompt_ids = np.where(beyond, np.int32(pad_id), prompt_ids).astype(np.int32)
  max_length = decoding.max_length
  total = int(lengths.max()) + max_new_tokens
  if total > max_length:
    raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
                     f" exceeds the configured maximum {max_length}")
  if decoding.validate is not None:
    decoding.validate(inputs, prompt_ids)
  # max_length is an extra bucket: t <= total <= max_length, so both fit under it.
  prompt_bucket = min(bucket(t, prompt_buckets, "prompt length"), max_length)
  cache_len = min(bucket(max(prompt_bucket, total), length_buckets, "total length"), max_length)
  padded = np.full((b, prompt_bucket), pad_id, np.int32)
  padded[:, :t] = prompt_ids
  return jax.tree.map(jnp.asarray, inputs), padded, lengths, cache_len


class Generator:
  """Holds a family's jitted prefill and decode steps (compiled once per bucket).

  ``trace_counts`` counts how often each step was traced (= compiled) — a test reads it.
  """

  def __init__(
      self,
      decoding: Decoding,
      *,
      prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
      length_buckets: Sequence[int] = DEFAULT_BUCKETS,
  ):
    if not isinstance(decoding, Decoding):
      raise TypeError(f"Generator takes a mmjax.infer.Decoding (a family's task gives one); got "
                      f"{type(decoding).__name__}")
    self.decoding = decoding
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self.length_buckets = tuple(sorted(length_buckets))
    self.trace_counts: collections.Counter[str] = collections.Counter()
    # Sampling settings are traced inputs: one compilation serves every method.
    self.prefill_step = jax.jit(self._prefill)
    self.decode_step = jax.jit(self._decode, donate_argnames=("cache",))

  def _ban(self, logits: jax.Array) -> jax.Array:
    """Logits [B, V] with the banned ids impossible."""
    if not self.decoding.banned_ids:
      return logits
    v = logits.shape[-1]
    banned = jnp.isin(jnp.arange(v, dtype=jnp.int32), jnp.asarray(self.decoding.banned_ids, jnp.int32))
    return jnp.where(banned[None, :], -jnp.inf, logits)

  def _prefill(self, params, inputs, prompt_ids, prompt_lengths, cache, rng, knob):
    self.trace_counts["prefill"] += 1  # runs only while tracing
    b, t = prompt_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache, context = self.decoding.prefill(params, inputs, prompt_ids, positions, prompt_lengths, cache)
    last = (prompt_lengths - 1).astype(jnp.int32)
    token = sample_with(self._ban(logits[jnp.arange(b), last]), rng, knob)
    return token, cache, context

  def _decode(self, params, token, position, context, cache, rng, knob):
    self.trace_counts["decode"] += 1  # runs only while tracing
    logits, cache = self.decoding.step(params, token[:, None], position[:, None], context, cache)
    return sample_with(self._ban(logits[:, 0]), rng, knob), cache

  def generate(
      self,
      params: Any,
      inputs: Mapping[str, Any] | None,
      prompt_ids: Any,
      max_new_tokens: int,
      *,
      sampling: Sampling | str = "greedy",
      rng: jax.Array | None = None,
      prompt_lengths: Any = None,
      eos_token_id: int | None = None,
      pad_id: int = 0,
  ) -> GenerateOutput:
    """New tokens after each prompt.

    Args:
      params: the model's params ({"params": ...} or the bare tree; boxes are removed).
      inputs: the family's other inputs (Flamingo: {"images": [B, N, H, W, 3],
        "image_mask": Bool[B, N]}); None or {} for a text-only model.
      prompt_ids: Int[B, T] prompts, right-padded when ``prompt_lengths`` is given.
      max_new_tokens: tokens to generate per example.
      sampling: 'greedy' | 'temperature' | 'top_k' | 'top_p' or a ``Sampling``.
      rng: a PRNG key (required unless greedy).
      prompt_lengths: Int[B] true prompt lengths (default: all T).
      eos_token_id: stop an example after it emits this token (default: never).
      pad_id: the token written after eos and used to pad prompts.
    """
    sampling = as_sampling(sampling)
    if sampling.method != "greedy" and rng is None:
      raise ValueError(f"sampling method {sampling.method!r} needs rng (a PRNG key)")
    rng = jax.random.key(0) if rng is None else rng
    inputs, padded, lengths, cache_len = prepare_prompts(
        self.decoding, self.prompt_buckets, self.length_buckets, inputs, prompt_ids, prompt_lengths,
        max_new_tokens, pad_id)
    b = padded.shape[0]
    params = nn.unbox(params)
    params = params if "params" in params else {"params": params}
    cache = self.decoding.init_cache(b, cache_len)

    knob = knobs(sampling)
    rng, step_rng = jax.random.split(rng)
    token, cache, context = self.prefill_step(
        params, inputs, jnp.asarray(padded), jnp.asarray(lengths), cache, step_rng, knob)
    out = np.full((b, max_new_tokens), pad_id, np.int32)
    done = np.zeros((b,), bool)
    gen_lengths = np.zeros((b,), np.int32)
    position = jnp.asarray(lengths)
    for step in range(max_new_tokens):
      tok = np.asarray(token)
      out[:, step] = np.where(done, pad_id, tok)
      gen_lengths += (~done).astype(np.int32)
      if eos_token_id is not None:
        done |= tok == eos_token_id
      if done.all() or step == max_new_tokens - 1:
        break
      rng, step_rng = jax.random.split(rng)
      token, cache = self.decode_step(params, token, position, context, cache, step_rng, knob)
      position = position + 1
    return GenerateOutput(tokens=out, lengths=gen_lengths)


_GENERATORS: dict[int, Generator] = {}


def generate(
    decoding: Decoding,
    params: Any,
    inputs: Mapping[str, Any] | None,
    prompt_ids: Any,
    max_new_tokens: int,
    sampling: Sampling | str = "greedy",
    rng: jax.Array | None = None,
    **kwargs,
) -> GenerateOutput:
  """``Generator(decoding).generate(...)`` with one Generator (and its compilations) per
  Decoding object (a family memoises its Decoding per model config).

  See ``Generator.generate`` for the arguments (``prompt_lengths``, ``eos_token_id``,
  ``pad_id``).
  """
  key = id(decoding)
  if key not in _GENERATORS or _GENERATORS[key].decoding is not decoding:
    _GENERATORS[key] = Generator(decoding)
  return _GENERATORS[key].generate(
      params, inputs, prompt_ids, max_new_tokens, sampling=sampling, rng=rng, **kwargs)
