"""lm/tiny_reading: `lm/tiny`'s model trained to read what precedes a question: each embedded
question's `<image>` is replaced by the left-to-right caption of its scene ("<s>from left to
right: a red circle and a blue square.Question: what colour is the rightmost shape? Answer:
blue"), so the answer follows from the text before it.

This is the LM that BLIP-2's tiny stage 2 (configs/blip2/tiny_stage2.py) keeps frozen. A
frozen LM behind a bridge answers from the query outputs that stand where text would stand
only if it reads what stands there; `lm/tiny`, trained on the embedded text alone (where no
answer depends on anything before its question), does not (docs/blip2.md).

Run:
  mmjax train --config configs/lm/tiny_reading.py --workdir work/lm-tiny_reading
  mmjax eval --workdir work/lm-tiny_reading     # reading_qa_described vs reading_qa_bare
  mmjax generate --workdir work/lm-tiny_reading \\
    --prompt "from left to right: a red circle and a blue square.Question: what colour is the leftmost shape? Answer:"

Measured (seed 0, 1500 steps, 2026-12-02, 2 CPU cores, 256 s): on the 400 validation
questions the LM answers 50.0% after the caption and 20.5% with the question alone (the
answers are balanced: chance); by kind, after the caption: count 100%, position 54.9%,
count_shape 43.4%, rightmost 43.2%, leftmost 38.1%, colour 34.3%, shape 20.4%. Variants
measured on the way (docs/blip2.md): questions and captions mixed 2:1 with 3 of 4 images
described, 600 steps: 44.8% vs 27.8%; the captions' random templates instead of the
left-to-right one, 1200 steps: 52.0% vs 24.3%, with colour questions at chance.
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
  c.data.text_length = 48  # the longest described question is 42 tokens
  c.optimizer.lr = 2e-3
  c.train.num_steps = 1500
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 500
  c.eval.num_questions = 0  # `mmjax eval`: all 400 validation questions
  return c
