"""siglip/tiny: a SigLIP dual encoder trained on the embedded dataset's captions, on 2 CPU cores.

Run:
  mmjax train --config configs/siglip/tiny.py --workdir work/siglip-tiny
  mmjax eval --workdir work/siglip-tiny

The model is the `siglip-tiny` preset: the sizes of clip/tiny shaped as SigLIP (no CLS
token, an attention-pooling head gives the image embedding, a bidirectional text tower
pooled at the last position, padding attended as SigLIP trains), trained with the
pairwise sigmoid loss (temperature 10 and bias -10 at the start), chunked over the devices
of the mesh when there are several. Everything else is clip/tiny's.

Measured: docs/contrastive.md ("The tiny configs").
"""

import importlib.util
import os

from mmjax import zoo
import dataclasses


def _clip_tiny():
  path = os.path.join(os.path.dirname(__file__), "..", "clip", "tiny.py")
  spec = importlib.util.spec_from_file_location("clip_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _clip_tiny().get_config(arg)
  c.model = dataclasses.asdict(zoo.get("siglip-tiny"))
  c.model["family"] = "contrastive"
  return c
