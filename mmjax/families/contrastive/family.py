"""The `contrastive` family's registry entry: CLIP and SigLIP dual encoders (components
`vision`, `text`, `head`), trained on image-text pairs (`task.contrastive_task`) with the
losses of `mmjax.losses.contrastive`, evaluated by retrieval and zero-shot classification
(`evaluate`), presets at published sizes (`presets`), imports of Hugging Face CLIPModel and
SiglipModel (`convert`)."""

from __future__ import annotations

from mmjax.families import base
from mmjax.families.contrastive import convert
from mmjax.families.contrastive import model as contrastive
from mmjax.families.contrastive import presets as presets_lib
from mmjax.families.contrastive import task as task_lib

FAMILY = base.Family(name="contrastive", components=contrastive.COMPONENTS,
                     config_class=contrastive.ContrastiveConfig, presets=presets_lib.presets,
                     task=task_lib.contrastive_task, abstract=task_lib.abstract, override=presets_lib.override,
                     upgrade_model=task_lib.upgrade_model,
                     importers={"hf_clip": convert.clip_from_state_dict, "hf_siglip": convert.siglip_from_state_dict,
                                "hf": convert.contrastive_from_hf_directory})
