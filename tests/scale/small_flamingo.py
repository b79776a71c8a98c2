"""The real Flamingo (mmjax.models.flamingo via the trainer's task.Model) at a size that
compiles in seconds, with the trainer's optimizer and train step, for the mesh tests.

Dimension letters: B batch, N images, T text length.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import zoo
from mmjax.models.decoder import DecoderConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig
from tests.scale import standin

MEDIA, VOCAB, IMAGE, LENGTH = 4, 64, 16, 8


def config():
  """flamingo-tiny, shrunk: 1 ViT block, 1 resampler layer, 2 decoder layers (1 gated xattn)."""
  tiny = zoo.get("flamingo-tiny")
  return dataclasses.replace(
      tiny,
      vision=dataclasses.replace(tiny.vision, image_size=IMAGE, patch_size=8, width=32, depth=1, num_heads=2,
                                 mlp_dim=64),
      resampler=dataclasses.replace(tiny.resampler, width=32, depth=1, num_heads=2, head_dim=16, num_latents=4,
                                    ff_mult=2),
      decoder=dataclasses.replace(tiny.decoder, vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, mlp_dim=64),
      cross_attn_every_n_layers=2, xattn_num_heads=2, xattn_head_dim=16, xattn_ff_mult=2,
      media_token_id=MEDIA, end_of_chunk_token_id=MEDIA + 1)


def make_batch(seed: int, batch_size: int = 8) -> dict:
  """One image per example, its <image> token first; the trainer's batch layout (numpy)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(MEDIA + 2, VOCAB, (batch_size, LENGTH + 1)).astype(np.int32)
  ids[:, 0] = MEDIA
  inputs = ids[:, :-1]
  return {
      "images": rng.integers(0, 256, (batch_size, 1, IMAGE, IMAGE, 3)).astype(np.uint8),
      "image_mask": np.ones((batch_size, 1), bool),
      "input_ids": inputs,
      "image_index": np.cumsum(inputs == MEDIA, axis=1).astype(np.int32),
      "targets": ids[:, 1:],
      "loss_mask": (ids[:, 1:] != MEDIA).astype(np.float32),
  }


def build(trainable=("vision", "resampler", "xattn", "lm"), gate_init: float = 0.0):
  """(boxed abstract params, host train state, trainable mask, train_step)."""
  from mmjax.families.flamingo import model as flamingo
  from mmjax.families.flamingo import task
  from mmjax.train import optimizer, state as state_lib, step as step_lib
  cfg = config()
  example = make_batch(0, 1)
  model = task.Model(cfg, example, gate_init=gate_init)
  ex = jax.tree.map(jnp.asarray, example)
  boxed = jax.eval_shape(lambda k: flamingo.Flamingo(cfg).init(
      k, ex["images"], ex["input_ids"], ex["image_index"], ex["image_mask"]), jax.random.key(0))["params"]
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))
  mask = optimizer.trainable_mask(flamingo.param_labels(params), frozenset(trainable))
  opt_config = standin.optimizer_config()
  tx = optimizer.make_transform(opt_config, mask)
  train_step = step_lib.make_train_step(apply_fn=model.apply, tx=tx, mask=mask,
                                        schedule=optimizer.make_schedule(opt_config))
  return boxed, jax.device_get(state_lib.create(params, tx, seed=0)), mask, train_step


def logical_names(boxed):
  return nn.get_partition_spec(boxed)
