"""Cached generation for Flamingo: media keys/values computed once, a self-attention KV
cache, and fixed shape buckets so that each step compiles once per bucket.

Dimension letters: B batch, N images, H/W pixels, T prompt length, S cache length,
V vocabulary.

How a call runs (``Generator.generate``):

1. The prompt is right-padded to a *prompt bucket* Tb (the smallest of
   ``prompt_buckets`` >= the longest prompt) and the cache gets a *length bucket* S (the
   smallest of ``length_buckets`` >= max(Tb, longest prompt + max_new_tokens)).
2. Prefill (compiled once per (B, N, Tb, S)): images -> latents -> every cross-attention
   layer's media keys/values (kept for the whole generation), the prompt through the
   decoder writing the cache, and the first new token from the logits at each example's
   last prompt token.
3. Decode (compiled once per (B, N, S), however many tokens): one token per example
   at position ``prompt_length + step``, attending to the cache causally by position, so
   the padding the prefill wrote beyond a prompt is never seen (it is overwritten first).

The sampling method and its settings are traced inputs, so they cause no recompilation;
``eos_token_id`` is checked on the host between steps.

Generated tokens attend to the last image of their prompt (their ``image_index`` is the
prompt's image count, as OpenFlamingo's cached-media generation does); the ``<image>``
token is never sampled, since no image could follow it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.infer.sampling import Sampling, as_sampling, knobs, sample_with
from mmjax.models.decoder import init_decoder_cache
from mmjax.models.flamingo import Flamingo, FlamingoConfig, image_index_from_ids, validate_inputs

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


class Generator:
  """Holds a Flamingo model's jitted prefill and decode steps (compiled once per bucket).

  ``trace_counts`` counts how often each step was traced (= compiled) — a test reads it.
  """

  def __init__(
      self,
      config: FlamingoConfig,
      *,
      prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
      length_buckets: Sequence[int] = DEFAULT_BUCKETS,
  ):
    self.config = config
    self.model = Flamingo(config)
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self.length_buckets = tuple(sorted(length_buckets))
    self.trace_counts: collections.Counter[str] = collections.Counter()
    # Sampling settings are traced inputs: one compilation serves every method.
    self.prefill_step = jax.jit(self._prefill)
    self.decode_step = jax.jit(self._decode, donate_argnames=("cache",))

  def _mask_media_token(self, logits: jax.Array) -> jax.Array:
    """Logits [B, V] with <image> impossible (no image could follow it)."""
    v = logits.shape[-1]
    is_media = jnp.arange(v, dtype=jnp.int32) == jnp.int32(self.config.media_token_id)
    return jnp.where(is_media[None, :], -jnp.inf, logits)

  def _prefill(self, params, images, prompt_ids, prompt_lengths, cache, rng, knob):
    self.trace_counts["prefill"] += 1  # runs only while tracing
    b, t = prompt_ids.shape
    media_kv = self.model.apply(params, images, method=Flamingo.compute_media_kv)
    image_index = image_index_from_ids(prompt_ids, self.config.media_token_id)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = self.model.apply(
        params, prompt_ids, image_index=image_index, media_kv=media_kv, positions=positions,
        cache=cache, method=Flamingo.decode)
    last = (prompt_lengths - 1).astype(jnp.int32)
    rows = jnp.arange(b)
    next_logits = self._mask_media_token(logits[rows, last])
    token = sample_with(next_logits, rng, knob)
    return token, cache, media_kv, image_index[rows, last]

  def _decode(self, params, token, position, image_index, media_kv, cache, rng, knob):
    self.trace_counts["decode"] += 1  # runs only while tracing
    logits, cache = self.model.apply(
        params, token[:, None], image_index=image_index[:, None], media_kv=media_kv,
        positions=position[:, None], cache=cache, method=Flamingo.decode)
    return sample_with(self._mask_media_token(logits[:, 0]), rng, knob), cache

  def generate(
      self,
      params: Any,
      images: Any,
      prompt_ids: Any,
      max_new_tokens: int,
      *,
      sampling: Sampling | str = "greedy",
      rng: jax.Array | None = None,
      prompt_lengths: Any = None,
      image_mask: Any = None,
      eos_token_id: int | None = None,
      pad_id: int = 0,
  ) -> GenerateOutput:
    """New tokens after each prompt.

    Args:
      params: Flamingo params ({"params": ...} or the bare tree; boxes are removed).
      images: UInt8/Float[B, N, H, W, 3] (padding images last, see image_mask).
      prompt_ids: Int[B, T] prompts, right-padded when ``prompt_lengths`` is given; one
        <image> token per real image.
      max_new_tokens: tokens to generate per example.
      sampling: 'greedy' | 'temperature' | 'top_k' | 'top_p' or a ``Sampling``.
      rng: a PRNG key (required unless greedy).
      prompt_lengths: Int[B] true prompt lengths (default: all T).
      image_mask: Bool[B, N], True for real images.
      eos_token_id: stop an example after it emits this token (default: never).
      pad_id: the token written after eos and used to pad prompts.
    """
    sampling = as_sampling(sampling)
    if sampling.method != "greedy" and rng is None:
      raise ValueError(f"sampling method {sampling.method!r} needs rng (a PRNG key)")
    rng = jax.random.key(0) if rng is None else rng
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    if pad_id == self.config.media_token_id:
      raise ValueError(f"pad_id={pad_id} is the <image> token id; expected another id")
    images = jnp.asarray(images)
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2:
      raise ValueError(f"prompt_ids has shape {prompt_ids.shape}; expected [batch, length]")
    b, t = prompt_ids.shape
    lengths = (np.full((b,), t, np.int32) if prompt_lengths is None
               else np.asarray(prompt_lengths, np.int32))
    if lengths.shape != (b,) or (lengths < 1).any() or (lengths > t).any():
      raise ValueError(f"prompt_lengths {lengths.tolist()}; expected {b} values in [1, {t}]")
    # Padding beyond each prompt must not count as <image> tokens.
    beyond = np.arange(t)[None, :] >= lengths[:, None]
    prompt_ids = np.where(beyond, np.int32(pad_id), prompt_ids).astype(np.int32)
    max_length = self.config.decoder.max_length
    total = int(lengths.max()) + max_new_tokens
    if total > max_length:
      raise ValueError(
          f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
          f" exceeds the configured maximum {max_length}")
    validate_inputs(self.config, images, prompt_ids, image_mask)

    # max_length is an extra bucket: t <= total <= max_length, so both fit under it.
    prompt_bucket = min(bucket(t, self.prompt_buckets, "prompt length"), max_length)
    cache_len = min(bucket(max(prompt_bucket, total), self.length_buckets, "total length"),
                    max_length)
    padded = np.full((b, prompt_bucket), pad_id, np.int32)
    padded[:, :t] = prompt_ids
    params = nn.unbox(params)
    params = params if "params" in params else {"params": params}
    cache = init_decoder_cache(self.config.decoder, b, cache_len)

    knob = knobs(sampling)
    rng, step_rng = jax.random.split(rng)
    token, cache, media_kv, image_index = self.prefill_step(
        params, images, jnp.asarray(padded), jnp.asarray(lengths), cache, step_rng, knob)
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
      token, cache = self.decode_step(
          params, token, position, image_index, media_kv, cache, step_rng, knob)
      position = position + 1
    return GenerateOutput(tokens=out, lengths=gen_lengths)


_GENERATORS: dict[FlamingoConfig, Generator] = {}


def generate(
    model: Flamingo | FlamingoConfig,
    params: Any,
    images: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    sampling: Sampling | str = "greedy",
    rng: jax.Array | None = None,
    **kwargs,
) -> GenerateOutput:
  """``Generator(config).generate(...)`` with one Generator (and its compilations) per config.

  See ``Generator.generate`` for the arguments (``prompt_lengths``, ``image_mask``,
  ``eos_token_id``, ``pad_id``).
  """
  config = model.config if isinstance(model, Flamingo) else model
  if config not in _GENERATORS:
    _GENERATORS[config] = Generator(config)
  return _GENERATORS[config].generate(
      params, images, prompt_ids, max_new_tokens, sampling=sampling, rng=rng, **kwargs)
