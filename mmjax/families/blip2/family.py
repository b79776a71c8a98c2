"""The `blip2` family's registry entry: BLIP-2 (stage 1: the Q-Former trained with ITC, ITM
and ITG over a frozen tower; stage 2: its queries bridged into a frozen LM), InstructBLIP and
MiniGPT-4 (components `vision`, `qformer`, `projector`, `lm`), presets at published sizes,
cached generation through the shared generator, the abstract model `mmjax compile` compiles
(`compile`: the task's, with a scanned LM's uncounted FLOPs), imports of Hugging Face's
`Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval` and
`InstructBlipForConditionalGeneration`."""

from __future__ import annotations

from mmjax.families import base
from mmjax.families.blip2 import compile as compile_lib
from mmjax.families.blip2 import convert
from mmjax.families.blip2 import model as blip2
from mmjax.families.blip2 import presets as presets_lib
from mmjax.families.blip2 import task as task_lib

FAMILY = base.Family(name="blip2", components=blip2.COMPONENTS, config_class=blip2.Blip2Config,
                     presets=presets_lib.presets, task=task_lib.blip2_task, abstract=compile_lib.abstract,
                     override=task_lib.override, upgrade_model=task_lib.upgrade_model, decoding=task_lib.decoding,
                     importers=convert.IMPORTERS)
