"""blip2/tiny_stage2: BLIP-2's stage 2 (vision-to-language generative learning) on the embedded
dataset: stage 1's Q-Former reads the frozen tower, a linear projection writes its 8 query
outputs before the text of the frozen `lm/tiny_reading` decoder, and the Q-Former and the projection
train on the embedded questions ("Question: {q} Answer: {a}") and captions (the caption after
the image, as LAVIS trains them), the loss on the answers only.

The LM is `lm/tiny_reading` (lm/tiny's model trained on the questions after their scenes'
captions), not `lm/tiny`: a frozen LM can answer from the query outputs only if it reads what
stands before a question, and lm/tiny, which never needed to, does not (29.0% QA with images
vs 27.3% blanked; docs/blip2.md).

Run (from a fresh clone: lm/tiny_reading, clip/tiny, blip2/tiny_stage1, then this, then `mmjax eval`):
  mmjax recipe blip2/tiny_stage2          # or: make recipe-blip2
and its blanked control (every image black in this stage, over the same earlier runs):
  mmjax train --config configs/blip2/tiny_stage2.py --config.data.blank_images=True \\
    --workdir work/blip2-tiny_stage2-blank
  mmjax eval --workdir work/blip2-tiny_stage2-blank
Then ask it:
  mmjax generate --workdir work/blip2-tiny_stage2 --image scene.png --prompt "<image>how many shapes are there?"

The Q-Former's text embeddings, text feed-forwards and stage-1 heads are left behind (the
stage-2 model has none, as LAVIS's stage 2 drops them); the LM and the tower stay bitwise
as they were (tests/families/test_blip2.py).
"""

import dataclasses
import importlib.util
import os

from mmjax import zoo


def _stage1():
  spec = importlib.util.spec_from_file_location("blip2_tiny_stage1",
                                                os.path.join(os.path.dirname(__file__), "tiny_stage1.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _stage1().get_config(arg)
  c.model.qformer = dict(c.model.qformer, text_input=False)
  c.model.decoder = dataclasses.asdict(zoo.get("lm-tiny").decoder)
  c.model.heads = ()
  del c["loss"]
  c.init.from_workdir = "work/lm-tiny_reading,work/blip2-tiny_stage1"
  c.init.from_configs = "lm/tiny_reading,blip2/tiny_stage1"
  c.data.batch_size = 32
  # The questions and captions as prompts and answers; each example holds BOS and the 8 query
  # placeholders; the longest (a caption) comes to 32 tokens.
  c.data.mixture = "qa:1,captions:1"
  c.data.text_length = 40
  # The frozen LM learned "<s>{caption}Question: ... Answer: 3<|endofchunk|>": the queries go
  # where it saw the caption (after BOS), and an answer ends as its chunks do, which it
  # already emits after an answer. (BLIP-2 as Hugging Face lays it out: "before_bos", "eos".)
  c.data.image_position = "after_bos"
  c.data.answer_end = "<|endofchunk|>"
  c.data.max_slots = 1
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.0
  c.schedule.warmup_steps = 50
  c.train.num_steps = 600
  # The tower and the LM frozen; the Q-Former and the projection train.
  c.freeze.stages = "0:qformer,projector"
  c.eval.num_questions = 0
  c.eval.max_new_tokens = 6
  return c
