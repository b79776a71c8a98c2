"""The Flamingo family: Perceiver Resampler latents read by gated cross-attention layers
inserted between the LM's layers (Alayrac et al. 2022; open_flamingo's `helpers.py`).

Components: `vision` (the ViT), `resampler`, `xattn` (the gated cross-attention layers),
`lm` (the decoder). The task (`task.flamingo_task`) trains on the embedded dataset or a
user's imported data; `abstract` gives `mmjax compile` the model with no tokenizer.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections

from mmjax.families import base
from mmjax.families.flamingo import convert
from mmjax.families.flamingo import flops as flops_lib
from mmjax.families.flamingo import gates
from mmjax.families.flamingo import generation
from mmjax.families.flamingo import model as flamingo
from mmjax.families.flamingo import original
from mmjax.families.flamingo import presets as presets_lib
from mmjax.families.flamingo import task as task_lib

COMPONENTS = flamingo.COMPONENTS


def model_config(config: ml_collections.ConfigDict) -> flamingo.FlamingoConfig:
  """The FlamingoConfig of `config.model`, as the trainer builds it, without a tokenizer
  (the vocabulary and special ids come from `config.model` itself)."""
  m = config.model
  vocab = types.SimpleNamespace(vocab_size=int(m.decoder.vocab_size), image_id=int(m.media_token_id),
                                end_of_chunk_id=int(m.end_of_chunk_token_id))
  return task_lib.model_config(config, vocab)


def abstract_batch(cfg: flamingo.FlamingoConfig, batch: int, length: int, num_images: int) -> dict:
  s = cfg.vision.image_size
  sds = jax.ShapeDtypeStruct
  return {"images": sds((batch, num_images, s, s, 3), jnp.uint8), "image_mask": sds((batch, num_images), jnp.bool_),
          "input_ids": sds((batch, length), jnp.int32), "image_index": sds((batch, length), jnp.int32),
          "targets": sds((batch, length), jnp.int32), "loss_mask": sds((batch, length), jnp.float32)}


def uncounted_flops(cfg: flamingo.FlamingoConfig, trainable: frozenset[str], batch: int, length: int,
                    num_images: int, chips: int) -> float:
  """FLOPs per chip that XLA's cost analysis misses with ``scan_layers``.

  XLA counts a while loop's body once, whatever its trip count, so a scanned decoder's
  G blocks are counted as one. This returns (G - 1) x one block's train-step matmul
  FLOPs (`flops`: forward x1, input gradient x1, weight gradient x1 when trainable,
  recomputation x1 for rematerialised LM layers; causal attention counted half) / chips.
  Checked against an unscanned compile: OpenFlamingo-3B on v5e:2x2, 13.71 (scanned +
  this) vs 13.48 TFLOP/chip.
  """
  d = cfg.decoder
  if not d.scan_layers:
    return 0.0
  plan = flamingo.scan_plan(cfg)
  if plan.num_blocks < 2:
    return 0.0
  fwd = flops_lib.flamingo_forward_flops(cfg, num_images, length)
  lm = fwd["lm"][0]
  # Every scanned block but (at most) the first lies above a trainable parameter (the
  # resampler or a cross-attention), so gradients pass through all repeated blocks.
  lm_mult = (3 if "lm" in trainable else 2) + (1 if d.remat else 0)
  block = plan.block_size * lm_mult * lm
  if plan.with_insert:
    block += (3 if "xattn" in trainable else 2) * fwd["xattn"][0]
  return (plan.num_blocks - 1) * block * batch / chips


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  cfg = model_config(config)
  one = {k: jnp.zeros((1,) + v.shape[1:], v.dtype)
         for k, v in abstract_batch(cfg, 1, int(config.data.text_length), int(config.data.num_images)).items()}
  model = task_lib.Model(cfg, one)
  return base.AbstractModel(
      config=cfg, init_params=model.init, apply_fn=model.apply, boxed_params=model.boxed,
      param_labels=flamingo.param_labels, param_metrics=gates.gate_values,
      abstract_batch=lambda batch, length, num_images: abstract_batch(cfg, batch, length, num_images),
      uncounted_flops=lambda trainable, batch, length, num_images, chips: uncounted_flops(
          cfg, trainable, batch, length, num_images, chips))


FAMILY = base.Family(name="flamingo", components=COMPONENTS, config_class=flamingo.FlamingoConfig,
                     presets=presets_lib.presets, task=task_lib.flamingo_task, abstract=abstract,
                     override=presets_lib.override, upgrade_model=flamingo.upgrade_model_dict,
                     decoding=generation.decoding,
                     importers={"open_flamingo": convert.flamingo_from_state_dict},
                     originals={"open_flamingo": original.open_flamingo_arm})
