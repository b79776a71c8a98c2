"""A tiny stand-in for Flamingo and its data, so the trainer is tested without them.

The model has the four labelled components (`vision`, `resampler`, `xattn_0` with tanh
gates `attn_gate`/`ff_gate`, `lm`); the data is a deterministic synthetic stream whose
target token is a function of the image's brightness, so it can only be learned by
opening the gates. Iterator state is `{"index": i}`.
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.families.base import Task
from mmjax.families.flamingo.gates import gate_values
from mmjax.train import config as config_lib

VOCAB = 16
COMPONENTS = ("vision", "resampler", "xattn", "lm")  # the labels `labels` gives
IMG = 4
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "flamingo", "tiny.py")


class ToyFlamingo(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, images, input_ids, image_index=None, image_mask=None):
    b, n = images.shape[:2]
    pix = images.astype(jnp.float32).reshape(b, n, -1) / 255.0
    feats = nn.Dense(self.width, name="vision")(pix)  # [B, N, D]
    media = nn.Dense(self.width, name="resampler")(jnp.tanh(feats))  # [B, N, D]
    x = nn.Embed(VOCAB, self.width, name="lm_embed")(input_ids)  # [B, T, D]
    summary = jnp.mean(media, axis=1)[:, None, :]  # [B, 1, D]
    xattn = XAttn(self.width, name="xattn_0")
    x = xattn(x, jnp.broadcast_to(summary, x.shape))
    x = x + nn.Dense(self.width, name="lm_mlp")(jax.nn.gelu(x))
    return nn.Dense(VOCAB, name="lm_head")(x)


class XAttn(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, media):
    attn_gate = self.param("attn_gate", nn.initializers.zeros, (1,))
    ff_gate = self.param("ff_gate", nn.initializers.zeros, (1,))
    x = x + jnp.tanh(attn_gate).reshape(1, 1, 1) * nn.Dense(self.width, name="to_out")(media)
    return x + jnp.tanh(ff_gate).reshape(1, 1, 1) * nn.Dense(self.width, name="ff")(jax.nn.gelu(x))


def labels(params):
  def label(top):
    return {"vision": "vision", "resampler": "resampler", "xattn_0": "xattn"}.get(top, "lm")
  return {k: jax.tree.map(lambda _, k=k: label(k), v) for k, v in params.items()}


def make_batch(index: int, batch_size: int = 8, text_length: int = 6, seed: int = 0) -> dict:
  rng = np.random.default_rng([seed, index])
  level = rng.integers(0, 4, size=(batch_size,))
  images = (level[:, None, None, None, None] * 60 + rng.integers(0, 20, size=(batch_size, 1, IMG, IMG, 3)))
  ids = rng.integers(2, VOCAB - 4, size=(batch_size, text_length))
  ids[:, 0] = 1  # <image>
  targets = np.roll(ids, -1, axis=1)
  targets[:, -1] = VOCAB - 4 + level  # the answer depends on the image only
  loss_mask = np.zeros((batch_size, text_length), np.float32)
  loss_mask[:, -1] = 1.0
  loss_mask[:, :-1] = 0.2 * (np.arange(text_length - 1) >= 1)
  return {"images": images.astype(np.uint8), "image_mask": np.ones((batch_size, 1), bool),
          "input_ids": ids.astype(np.int32), "image_index": np.ones((batch_size, text_length), np.int32),
          "targets": targets.astype(np.int32), "loss_mask": loss_mask}


class ToyData:
  """The toy stream; with `stall_at`, batch `stall_at` never comes (a source that hangs:
  a dead network mount, a data loader skipping bad records without end)."""

  def __init__(self, batch_size: int, stall_at: int | None = None):
    self.index = 0
    self.batch_size = batch_size
    self.stall_at = stall_at

  def __iter__(self):
    return self

  def __next__(self):
    if self.stall_at is not None and self.index >= self.stall_at:
      while True:
        time.sleep(0.05)
    batch = make_batch(self.index, self.batch_size)
    self.index += 1
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def task(config, *, width: int = 16, stall_at: int | None = None) -> Task:
  """The toy Task; `width` changes every parameter's shape, `stall_at` hangs the data there."""
  model = ToyFlamingo(width)
  example = make_batch(0, 2)

  def init_params(key):
    return model.init(key, example["images"], example["input_ids"])["params"]

  def apply_fn(params, batch, rng):
    return model.apply({"params": params}, batch["images"], batch["input_ids"], batch["image_index"],
                       batch["image_mask"])

  bsz = int(config.data.batch_size)
  return Task(init_params=init_params, apply_fn=apply_fn, param_labels=labels,
                   train_data=lambda: ToyData(bsz, stall_at),
                   val_data=lambda: [make_batch(10_000 + i, bsz) for i in range(2)],
                   flops_per_example=lambda trainable: 1e6, param_metrics=gate_values)


def config(*overrides: str):
  """flamingo/tiny's config, shrunk for the toy: fast steps, checkpoints every 5 steps."""
  base = ["--config.data.batch_size=8", "--config.train.num_steps=30", "--config.schedule.warmup_steps=3",
          "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=3", "--config.eval.every_steps=0",
          "--config.log.tensorboard=False", "--config.optimizer.lr=0.03", "--config.log.peak_tflops=1.0"]
  return config_lib.load_config(CONFIG, [*base, *overrides])
