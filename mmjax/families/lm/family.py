"""The `lm` family's registry entry: a plain decoder-only LM (component `lm`), trained on the
text of a data directory (`task.lm_task`), presets at published sizes (`presets`), cached
generation (`task.decoding`), and its abstract model for `mmjax compile`."""

from __future__ import annotations

import ml_collections

from mmjax.families import base, common
from mmjax.families.lm import convert
from mmjax.families.lm import model as lm
from mmjax.families.lm import presets as presets_lib
from mmjax.families.lm import task as task_lib
from mmjax.models.decoder import DecoderConfig


def upgrade_model(model: dict) -> dict:
  """A recorded `config.model`: decoder fields added since then take their defaults."""
  return {**model, "decoder": common.with_new_fields(DecoderConfig, dict(model.get("decoder", {})))}


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  cfg = task_lib.model_config(config, int(config.model.decoder.vocab_size))
  model = task_lib.Model(cfg, int(config.data.text_length))
  return base.AbstractModel(
      config=cfg, init_params=model.init, apply_fn=model.apply, boxed_params=model.boxed,
      param_labels=lm.param_labels,
      abstract_batch=lambda batch, length, num_images: task_lib.abstract_batch(batch, length),
      uncounted_flops=lambda trainable, batch, length, num_images, chips: task_lib.uncounted_flops(
          cfg, trainable, batch, length, chips))


FAMILY = base.Family(name="lm", components=lm.COMPONENTS, config_class=lm.LMConfig, presets=presets_lib.presets,
                     task=task_lib.lm_task, abstract=abstract, override=presets_lib.override,
                     upgrade_model=upgrade_model,
                     decoding=task_lib.decoding,
                     importers={"hf_llama": convert.lm_from_state_dict, "hf": convert.lm_from_hf_directory})
