"""A small Flamingo-shaped model for the scale tests, built from mmjax.layers.

Stands in for `mmjax.models.flamingo` where a test needs a model with every kind of
annotation (patch embedding, frozen tower, learned latents, cross-attention, tanh gate,
GQA self-attention, SwiGLU, vocabulary) but not Flamingo's numerics. It plugs into the
trainer's real `make_train_step` / `make_transform`, with the same component labels
(`vision`, `resampler`, `xattn`, `lm`).

Keep it off 3-axis meshes: its pooled media hit an XLA partitioner bug there and its
resampler gradients come out wrong on data x fsdp x tensor = 2x2x2 (docs/sharding_notes.md).

Dimension letters: B batch, N images, T text length, P patches, L latents, D width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.layers.attention import Attention
from mmjax.layers.embed import Embed, PatchEmbed
from mmjax.layers.linear import dense
from mmjax.layers.mlp import SwiGLU
from mmjax.layers.norms import RMSNorm

WIDTH, VOCAB, LATENTS, IMAGE, PATCH = 32, 64, 4, 8, 4


class StandIn(nn.Module):
  """images uint8 [B, N, H, W, 3], input_ids [B, T] -> logits float32 [B, T, V]."""

  @nn.compact
  def __call__(self, batch):
    images, ids = batch["images"], batch["input_ids"]
    b, n = images.shape[:2]
    pixels = images.reshape((b * n,) + images.shape[2:]).astype(jnp.float32) / 255.0
    patches = PatchEmbed(PATCH, WIDTH, name="vision")(pixels)                 # [BN, P, D]
    patches = nn.with_logical_constraint(patches, ("batch", "patches", "embed"))
    latents = self.param("resampler_latents", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("latents", "embed")), (LATENTS, WIDTH), jnp.float32)
    q = jnp.broadcast_to(latents[None], (b * n, LATENTS, WIDTH))
    scores = jnp.einsum("BLD,BPD->BLP", q, patches)
    media = jnp.einsum("BLP,BPD->BLD", jax.nn.softmax(scores, axis=-1), patches)
    media = dense(WIDTH, ("embed", "mlp"), name="resampler_proj")(media)
    media = media.reshape(b, n * LATENTS, WIDTH)                              # [B, NL, D]

    x = Embed(VOCAB, WIDTH, name="lm_embed")(ids)                              # [B, T, D]
    gate = self.param("xattn_attn_gate", nn.with_logical_partitioning(
        nn.initializers.zeros, (None,)), (1,), jnp.float32)
    xq = dense((4, 8), ("embed", "heads", "kv"), name="xattn_q")(RMSNorm(name="xattn_norm")(x))
    xk = dense((4, 8), ("embed", "heads", "kv"), name="xattn_k")(media)
    att = jax.nn.softmax(jnp.einsum("BTHK,BSHK->BHTS", xq, xk), axis=-1)
    xo = jnp.einsum("BHTS,BSD->BTHD", att, media).mean(axis=2)
    x = x + jnp.tanh(gate)[0] * dense(WIDTH, ("mlp", "embed"), name="xattn_out")(xo)
    x = x + Attention(4, 8, num_kv_heads=2, rope_theta=10000.0, name="lm_attn")(
        RMSNorm(name="lm_norm1")(x), causal=True)[0]
    x = x + SwiGLU(64, name="lm_mlp")(RMSNorm(name="lm_norm2")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    logits = dense(VOCAB, ("embed", "vocab"), name="lm_head")(RMSNorm(name="lm_norm3")(x))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def label(path_keys) -> str:
  """Component of a parameter from its top-level name."""
  top = path_keys[0]
  for comp in ("vision", "resampler", "xattn", "lm"):
    if top.startswith(comp):
      return comp
  raise ValueError(f"parameter {path_keys} has no component prefix")


def make_batch(seed: int, batch_size: int = 8, length: int = 8, num_images: int = 1) -> dict:
  """A random batch in the trainer's layout (numpy, host)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (batch_size, length + 1)).astype(np.int32)
  return {
      "images": rng.integers(0, 256, (batch_size, num_images, IMAGE, IMAGE, 3)).astype(np.uint8),
      "image_mask": np.ones((batch_size, num_images), bool),
      "input_ids": ids[:, :-1],
      "image_index": np.ones((batch_size, length), np.int32),
      "targets": ids[:, 1:],
      "loss_mask": np.ones((batch_size, length), np.float32),
  }


def optimizer_config() -> ml_collections.ConfigDict:
  # eps=1e-4: Adam turns a gradient entry far below eps into a step proportional to it,
  # not into +-lr; with eps=1e-8 an entry whose true gradient is ~0 (a key bias, a sum
  # that happens to cancel) steps by +-lr on rounding noise alone, and two correct
  # reduction orders then disagree by a whole step.
  return ml_collections.ConfigDict({
      "optimizer": {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-4, "clip_norm": 1.0, "weight_decay": 0.1},
      "schedule": {"warmup_steps": 0, "end_lr_fraction": 0.1},
      "train": {"num_steps": 10},
  })


def build(trainable=("resampler", "xattn")):
  """(model, boxed abstract params, host params, trainable mask, train_step, tx)."""
  from mmjax.train import optimizer, state as state_lib, step as step_lib
  model = StandIn()
  example = jax.tree.map(jnp.asarray, make_batch(0))
  boxed = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), example)["params"])
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: label([getattr(k, "key", "") for k in p]), params)
  mask = optimizer.trainable_mask(labels, frozenset(trainable))
  config = optimizer_config()
  tx = optimizer.make_transform(config, mask)
  apply_fn = lambda p, batch, rng: model.apply({"params": p}, batch)
  train_step = step_lib.make_train_step(apply_fn=apply_fn, tx=tx, mask=mask,
                                        schedule=optimizer.make_schedule(config))
  state = state_lib.create(params, tx, seed=0)
  return model, boxed, state, mask, train_step
