"""lm/tiny_reading: `lm/tiny`'s model trained to read what precedes a question: each embedded
question's and caption's `<image>` is replaced by the left-to-right caption of its scene, and
two more questions about a question's scene follow it ("<s>from left to right: a red circle
and a blue square.Question: what colour is the rightmost shape? Answer: blue<|endofchunk|>
Question: how many circles are there? Answer: 1<|endofchunk|>..."), so every answer follows
from the text before it. The inserted captions are out of the loss (`data.caption_loss`):
what a random scene holds cannot be guessed, only read.

This is the LM that BLIP-2's tiny stage 2 (configs/blip2/tiny_stage2.py) keeps frozen. A
frozen LM behind a bridge answers from the query outputs that stand where text would stand
only if it reads what stands there; `lm/tiny`, trained on the embedded text alone (where no
answer depends on anything before its question), does not (docs/blip2.md).

Run:
  mmjax train --config configs/lm/tiny_reading.py --workdir work/lm-tiny_reading
  mmjax eval --workdir work/lm-tiny_reading     # reading_qa_described vs reading_qa_bare
  mmjax generate --workdir work/lm-tiny_reading \\
    --prompt "from left to right: a red circle and a blue square.Question: what colour is the leftmost shape? Answer:"

Measured (seed 0, 600 steps, 2026-12-02, 2 CPU cores): on the 400 validation questions the
LM answers 70.3% after the caption and 26.0% with the question alone (the answers are
balanced: that is chance); by kind, after the caption: count 100%, leftmost 79.4%, count_shape
77.4%, shape 61.2%, colour 59.7%, rightmost 52.3%, position 47.1%. With the inserted captions
in the loss it read 64.8% after 1200 steps on one machine and 52.8% on another (colours at
chance there); the variants are in docs/blip2.md.
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
  # Questions, and captions after their scene's description (stage 2 trains the bridge on
  # both: an LM that never wrote a caption gives it nothing to aim at there).
  c.data.mixture = "qa:2,captions:1"
  c.data.describe_images = 1.0
  # Two more questions about a described question's scene after it (none asked twice): three
  # answers to read per sequence instead of one. 64 tokens hold the caption and the first two
  # questions whole (a third may be cut).
  c.data.more_questions = 2
  c.data.text_length = 64
  # The captions' own tokens are out of the loss: a random scene's caption cannot be guessed,
  # and its loss drowned the answers' (with it the LM read 52.8-64.8% after 1200 steps, colours
  # at chance on one machine; without it 69.3% after 400).
  c.data.caption_loss = False
  c.optimizer.lr = 2e-3
  c.train.num_steps = 600
  c.checkpoint.every_steps = 300
  c.eval.every_steps = 300
  c.eval.num_questions = 0  # `mmjax eval`: all 400 validation questions
  return c
