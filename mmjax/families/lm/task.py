"""The `lm` task: a decoder-only LM on the text of a data directory's datasets (the
embedded dataset's captions and questions with their `<image>` tokens dropped, or a
user's imported JSONL text), next-token loss over the text.

`config.model` is {"family": "lm", "decoder": every DecoderConfig field}; the vocabulary
size comes from the tokenizer and the compute dtype from `config.mixed_precision`.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.families import base, common
from mmjax.families.lm import model as lm
from mmjax.infer import Decoding
from mmjax.models.decoder import DecoderConfig, init_decoder_cache
from mmjax.models.scan_layout import scan_plan


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> lm.LMConfig:
  m = config.model.to_dict()
  unknown = sorted(set(m) - {"family", "decoder"})
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that family 'lm' does not; expected ['decoder', 'family']")
  dtype = str(config.mixed_precision.compute_dtype)
  remat = str(config.train.remat) == "layers" or bool(m["decoder"].get("remat", False))
  return lm.LMConfig(common.replace_fields(DecoderConfig, m["decoder"], "decoder", dtype=dtype,
                                           vocab_size=vocab_size, remat=remat))


def bucket(config: ml_collections.ConfigDict) -> data_lib.Bucket:
  """Text only (no image slots): `data.text_length` tokens per example."""
  return data_lib.Bucket(max_images=0, text_length=int(config.data.text_length))


def abstract_batch(batch: int, length: int) -> dict:
  sds = jax.ShapeDtypeStruct
  return {"input_ids": sds((batch, length), jnp.int32), "targets": sds((batch, length), jnp.int32),
          "loss_mask": sds((batch, length), jnp.float32)}


class Model:
  """The LM with unboxed float32 parameters: init(key) -> params, apply(params, batch) -> logits."""

  def __init__(self, cfg: lm.LMConfig, length: int):
    self.config = cfg
    self.module = lm.LanguageModel(cfg)
    self._ids = jnp.zeros((1, length), jnp.int32)

  def init(self, key):
    return flax.core.meta.unbox(self.module.init(key, self._ids)["params"])

  def boxed(self, key):
    return jax.eval_shape(self.module.init, key, self._ids)["params"]

  def apply(self, params, batch, rng=None):
    del rng  # no dropout
    logits, _ = self.module.apply({"params": params}, batch["input_ids"])
    return logits


def forward_flops(cfg: lm.LMConfig, length: int) -> float:
  """Forward matmul FLOPs of one example (2mnk per matmul, causal attention counted half)."""
  d = cfg.decoder
  w, hk, gk = d.width, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
  layer = 2 * length * w * hk + 2 * length * w * 2 * gk + 2 * length * hk * w + 4 * length * length * hk / 2 \
      + 3 * 2 * length * w * d.mlp_dim
  return float(d.depth * layer + 2 * length * w * d.vocab_size)


def train_flops(cfg: lm.LMConfig, length: int, trainable: frozenset) -> float:
  """x3 when the LM trains (forward, input and weight gradients), x1 when frozen."""
  return (3.0 if "lm" in trainable else 1.0) * forward_flops(cfg, length)


@functools.lru_cache(maxsize=32)
def decoding(cfg: lm.LMConfig) -> Decoding:
  """Cached generation: nothing but the KV cache (the context is empty)."""
  module = lm.LanguageModel(cfg)

  def prefill(params, inputs, ids, positions, lengths, cache):
    del inputs, lengths
    logits, cache = module.apply(params, ids, positions=positions, cache=cache)
    return logits, cache, ()

  def step(params, token, position, context, cache):
    del context
    return module.apply(params, token, positions=position, cache=cache)

  def validate(inputs, prompt_ids):
    if inputs:
      raise ValueError(f"an lm model takes no inputs besides the prompt; got {sorted(inputs)}")
    bad = (prompt_ids < 0) | (prompt_ids >= cfg.decoder.vocab_size)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"token id {int(prompt_ids[where])} at {where} is outside the vocabulary "
                       f"[0, {cfg.decoder.vocab_size})")

  return Decoding(max_length=cfg.decoder.max_length,
                  init_cache=lambda batch, length: init_decoder_cache(cfg.decoder, batch, length),
                  prefill=prefill, step=step, validate=validate)


def uncounted_flops(cfg: lm.LMConfig, trainable: frozenset, batch: int, length: int, chips: int) -> float:
  """FLOPs per chip XLA's cost analysis misses with ``scan_layers`` (it counts a loop body
  once): (blocks - 1) x one layer's train-step FLOPs (+1 forward with remat)."""
  d = cfg.decoder
  plan = scan_plan(d.depth)
  if not d.scan_layers or plan.num_blocks < 2:
    return 0.0
  per_layer = (forward_flops(cfg, length) - 2 * length * d.width * d.vocab_size) / d.depth
  mult = (3 if "lm" in trainable else 1) + (1 if d.remat else 0)
  return (plan.num_blocks - 1) * mult * per_layer * batch / chips


def lm_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory trains with."""
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer.vocab_size)
  bk = bucket(config)
  model = Model(cfg, bk.text_length)
  d = common.data_dir(config)
  train_data, val_data = common.pipelines(config, tokenizer, bk)

  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=lm.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: train_flops(cfg, bk.text_length, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes},
                   components=lm.COMPONENTS, tokenizer=tokenizer, data_dir=d, decoding=decoding(cfg))
