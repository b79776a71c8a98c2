"""instructblip/tiny: InstructBLIP's instruction tuning on the embedded dataset: as
blip2/tiny_stage2, but the Q-Former also reads the instruction (the question, or the caption
request) with its queries, so what it extracts from the image depends on what is asked.

Run (after blip2/tiny_stage1; the recipe runs everything it needs):
  mmjax recipe instructblip/tiny
  mmjax generate --workdir work/instructblip-tiny --image scene.png --prompt "<image>how many shapes are there?"

The Q-Former keeps its text embeddings and text feed-forwards from stage 1 (the
instruction's tokens go through them); the tower and the LM stay frozen.
"""

import importlib.util
import os


def _stage2():
  spec = importlib.util.spec_from_file_location("blip2_tiny_stage2", os.path.join(
      os.path.dirname(os.path.dirname(__file__)), "blip2", "tiny_stage2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _stage2().get_config(arg)
  c.model.qformer = dict(c.model.qformer, text_input=True)
  c.model.instruction = True
  # BOS, the instruction's words, EOS: the longest embedded question or caption request fits.
  c.data.instruction_length = 24
  return c
