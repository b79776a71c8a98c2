"""Tiny Flamingo configs and random parameters for tests (no init compilation)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from mmjax import zoo
from mmjax.models.decoder import DecoderConfig
from mmjax.families.flamingo.model import Flamingo, FlamingoConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig


_TOP = ("cross_attn_every_n_layers", "xattn_num_heads", "xattn_head_dim", "xattn_ff_mult",
        "only_attend_immediate_media")


def micro_config(**decoder) -> FlamingoConfig:
  """A Flamingo small enough to compile in seconds: 16 px images, 2 LM layers, vocab 64.
  Keyword arguments replace DecoderConfig fields, or FlamingoConfig's cross-attention ones."""
  tiny = zoo.get("flamingo-tiny")
  top = {k: decoder.pop(k) for k in _TOP if k in decoder}
  return FlamingoConfig(
      vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
      resampler=PerceiverConfig(width=32, depth=1, num_heads=2, head_dim=16, num_latents=4, ff_mult=2),
      decoder=dataclasses.replace(
          DecoderConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, max_length=64),
          **decoder),
      media_token_id=tiny.media_token_id, end_of_chunk_token_id=tiny.end_of_chunk_token_id,
      **{**dict(cross_attn_every_n_layers=1, xattn_num_heads=2, xattn_head_dim=16, xattn_ff_mult=2), **top})


def random_params(config: FlamingoConfig, seed: int = 0) -> dict:
  """{"params": ...} with every leaf drawn at random (gates included, so they are open)."""
  model = Flamingo(config)
  v = config.vision
  images = jax.ShapeDtypeStruct((1, 1, v.image_size, v.image_size, 3), np.uint8)
  ids = jax.ShapeDtypeStruct((1, 4), np.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, ids))
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if "gate" in name:
      return (0.5 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)
