"""What `mmjax compile` needs of the `blip2` family beyond the task's abstract model: the
FLOPs XLA's cost analysis misses when the LM's layers are scanned (`--scan-layers`).

XLA counts a `lax.scan` body once, so a scanned 32-layer LM shows one layer's FLOPs;
`uncounted_flops` adds the other layers analytically from `task.forward_flops`, each
counted as the train step runs it: x3 when the LM trains, x2 when it is frozen but a
trained component upstream (the Q-Former, the projection) needs its gradient passed back
through it (BLIP-2's stage 2), x1 when nothing upstream trains; +1 forward under
per-layer remat (`DecoderConfig.remat`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmjax.families import base
from mmjax.families.blip2 import model as blip2
from mmjax.families.blip2 import task as task_lib
from mmjax.models.scan_layout import scan_plan


def uncounted_flops(cfg: blip2.Blip2Config, trainable: frozenset, batch: int, length: int, instruction: int,
                    chips: int) -> float:
  """FLOPs per chip of the scanned LM layers XLA's cost analysis does not see: (blocks - 1)
  x one LM layer's train-step FLOPs x batch / chips; 0 without a scanned LM (stage 1)."""
  d = cfg.decoder
  if d is None or not d.scan_layers:
    return 0.0
  plan = scan_plan(d.depth)
  if plan.num_blocks < 2:
    return 0.0
  fwd = task_lib.forward_flops(cfg, length, instruction)
  per_layer = (fwd["lm"] - 2 * length * d.width * d.vocab_size) / d.depth
  upstream = bool({"vision", "qformer", "projector"} & trainable)
  mult = (3 if "lm" in trainable else 2 if upstream else 1) + (1 if d.remat else 0)
  return (plan.num_blocks - 1) * plan.block_size * mult * per_layer * batch / chips


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  """`task.abstract` with the scanned LM's uncounted FLOPs (`Family.abstract`)."""
  model = task_lib.abstract(config)
  cfg = model.config
  instruction = task_lib.instruction_length(config) if cfg.instruction else 0
  return dataclasses.replace(model, uncounted_flops=lambda trainable, batch, length, num_images, chips: uncounted_flops(
      cfg, trainable, batch, length, instruction, chips))
