"""What Flamingo's cached generation differs in (`mmjax.infer.Decoding`): the prefill encodes
the images once into every cross-attention layer's media keys/values, and generated tokens
attend to the last image of their prompt (their ``image_index`` is the prompt's image
count, as OpenFlamingo's cached-media generation does); ``<image>`` is never sampled.

Inputs: {"images": UInt8/Float[B, N, H, W, 3] (padding images last), "image_mask":
Bool[B, N] (optional, True for real images)}, one ``<image>`` token per real image.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from mmjax.families.flamingo.model import (Flamingo, FlamingoConfig, image_index_from_ids, init_cache,
                                           validate_inputs)
from mmjax.infer import Decoding


@functools.lru_cache(maxsize=32)
def decoding(config: FlamingoConfig) -> Decoding:
  """The Decoding of `config` (one per config, so the generator's compilations are reused)."""
  model = Flamingo(config)

  def prefill(params, inputs, ids, positions, lengths, cache):
    media_kv = model.apply(params, inputs["images"], method=Flamingo.compute_media_kv)
    image_index = image_index_from_ids(ids, config.media_token_id)
    logits, cache = model.apply(params, ids, image_index=image_index, media_kv=media_kv, positions=positions,
                                cache=cache, method=Flamingo.decode)
    images_so_far = image_index[jnp.arange(ids.shape[0]), lengths - 1]
    return logits, cache, {"media_kv": media_kv, "image_index": images_so_far}

  def step(params, token, position, context, cache):
    return model.apply(params, token, image_index=context["image_index"][:, None], media_kv=context["media_kv"],
                       positions=position, cache=cache, method=Flamingo.decode)

  def validate(inputs, prompt_ids):
    if "images" not in inputs:
      raise ValueError(f"Flamingo generation needs inputs['images'] [B, N, H, W, 3]; got keys {sorted(inputs)}")
    validate_inputs(config, inputs["images"], prompt_ids, inputs.get("image_mask"))

  return Decoding(max_length=config.decoder.max_length,
                  init_cache=lambda batch, length: init_cache(config, batch, length),
                  prefill=prefill, step=step, banned_ids=(config.media_token_id,), validate=validate)
