"""The `llava` family's registry entry: LLaVA-1.5 and LLaVA-NeXT (components `vision`,
`projector`, `lm`), trained on conversations with the loss on the assistant's turns
(`task.llava_task`), presets at published sizes (`presets`), cached generation through the
shared generator (`task.decoding`), imports of Hugging Face `LlavaForConditionalGeneration`
and `LlavaNextForConditionalGeneration` (`convert`)."""

from __future__ import annotations

import ml_collections

from mmjax.families import base
from mmjax.families.llava import convert
from mmjax.families.llava import model as llava
from mmjax.families.llava import presets as presets_lib
from mmjax.families.llava import task as task_lib
from mmjax.models.scan_layout import scan_plan


def uncounted_flops(cfg: llava.LlavaConfig, trainable: frozenset, batch: int, length: int, num_slots: int,
                    chips: int) -> float:
  """FLOPs per chip XLA's cost analysis misses with a scanned decoder (it counts a loop body
  once): (blocks - 1) x one LM layer's train-step FLOPs (+1 forward with remat)."""
  d = cfg.decoder
  plan = scan_plan(d.depth)
  if not d.scan_layers or plan.num_blocks < 2:
    return 0.0
  fwd = task_lib.forward_flops(cfg, num_slots, length)
  per_layer = (fwd["lm"] - 2 * length * d.width * d.vocab_size) / d.depth
  upstream = bool({"vision", "projector"} & trainable)
  mult = (3 if "lm" in trainable else 2 if upstream else 1) + (1 if d.remat else 0)
  return (plan.num_blocks - 1) * plan.block_size * mult * per_layer * batch / chips


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  cfg = task_lib.model_config(config)
  default_slots = task_lib.slots(config)
  length = int(config.data.text_length)
  model = task_lib.Model(cfg, length, default_slots)
  n = lambda num_images: int(num_images) or default_slots
  return base.AbstractModel(
      config=cfg, init_params=model.init, apply_fn=model.apply, boxed_params=model.boxed,
      param_labels=llava.param_labels,
      abstract_batch=lambda batch, length, num_images: task_lib.abstract_batch(cfg, batch, length, n(num_images)),
      uncounted_flops=lambda trainable, batch, length, num_images, chips: uncounted_flops(
          cfg, trainable, batch, length, n(num_images), chips))


FAMILY = base.Family(name="llava", components=llava.COMPONENTS, config_class=llava.LlavaConfig,
                     presets=presets_lib.presets, task=task_lib.llava_task, abstract=abstract,
                     override=presets_lib.override, upgrade_model=task_lib.upgrade_model,
                     decoding=task_lib.decoding,
                     importers={"hf_llava": convert.llava_from_state_dict, "hf": convert.llava_from_hf_directory})
