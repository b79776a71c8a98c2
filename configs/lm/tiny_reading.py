"""lm/tiny_reading: `lm/tiny`'s model trained to read what precedes a question: each embedded
question's `<image>` is replaced by the left-to-right caption of its scene, and two more
questions about the scene follow ("<s>from left to right: a red circle and a blue
square.Question: what colour is the rightmost shape? Answer: blue<|endofchunk|>Question: how
many circles are there? Answer: 1<|endofchunk|>..."), so every answer follows from the text
before it.

This is the LM that BLIP-2's tiny stage 2 (configs/blip2/tiny_stage2.py) keeps frozen. A
frozen LM behind a bridge answers from the query outputs that stand where text would stand
only if it reads what stands there; `lm/tiny`, trained on the embedded text alone (where no
answer depends on anything before its question), does not (docs/blip2.md).

Run:
  mmjax train --config configs/lm/tiny_reading.py --workdir work/lm-tiny_reading
  mmjax eval --workdir work/lm-tiny_reading     # reading_qa_described vs reading_qa_bare
  mmjax generate --workdir work/lm-tiny_reading \\
    --prompt "from left to right: a red circle and a blue square.Question: what colour is the leftmost shape? Answer:"

Measured (seed 0, 1200 steps, 2026-12-02, 2 CPU cores, about 290 s): on the 400 validation
questions the LM answers 64.8% after the caption and 26.8% with the question alone (the
answers are balanced: that is chance); by kind, after the caption: count 100%, count_shape
86.8%, colour 61.2%, shape 55.1%, leftmost 47.6%, position 45.1%, rightmost 43.2%. Without the
two more questions per sequence (48 tokens, 1500 steps) it reads 50.0%, with colour questions
near chance; the variants are in docs/blip2.md.
"""

import importlib.util
import os


def _lm_tiny():
  spec = importlib.util.spec_from_file_location("lm_tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _lm_tiny().get_config(arg)
  # Every question after its scene's caption: the answers are what the LM should learn to
  # read; the text around them it learned as lm/tiny does.
  c.data.mixture = "qa:1.0"
  c.data.describe_images = 1.0
  # Two more questions about a described question's scene after it (none asked twice): three
  # answers to read per sequence instead of one. 64 tokens hold the caption and the first two
  # questions whole (a third may be cut).
  c.data.more_questions = 2
  c.data.text_length = 64
  c.optimizer.lr = 2e-3
  c.train.num_steps = 1200
  c.checkpoint.every_steps = 600
  c.eval.every_steps = 600
  c.eval.num_questions = 0  # `mmjax eval`: all 400 validation questions
  return c
