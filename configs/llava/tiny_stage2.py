"""llava/tiny_stage2: LLaVA's stage 2 (visual instruction tuning) on the embedded dataset:
the projector and the LM train on conversations (the embedded questions and captions as
single-turn chats in the Vicuna-v1 template), the loss on the assistant's turns only,
starting from stage 1's checkpoint; the tower stays frozen.

Run (from a fresh clone: lm/tiny, clip/tiny, llava/tiny_stage1, then this, then `mmjax eval`):
  mmjax recipe llava/tiny_stage2          # or: make recipe-llava
and its blanked control (every image black in this stage, over the same earlier runs):
  mmjax train --config configs/llava/tiny_stage2.py --config.data.blank_images=True \\
    --workdir work/llava-tiny_stage2-blank
  mmjax eval --workdir work/llava-tiny_stage2-blank
Then ask it:
  mmjax generate --workdir work/llava-tiny_stage2 --image scene.png --prompt "<image>\\nhow many shapes are there?"
"""

import importlib.util
import os


def _stage1():
  spec = importlib.util.spec_from_file_location("llava_tiny_stage1",
                                                os.path.join(os.path.dirname(__file__), "tiny_stage1.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _stage1().get_config(arg)
  c.init.from_workdir = "work/llava-tiny_stage1"
  c.init.from_configs = "llava/tiny_stage1"
  # LLaVA-1.5's template; the tiny tokenizer (trained on the embedded captions) would spend
  # 45 tokens on Vicuna's system line, so the tiny config leaves it out.
  c.data.chat_template = "vicuna_v1"
  c.data.system_prompt = ""
  c.data.mixture = "qa:1,captions:1"
  # The longest conversation: an instruction, a caption and the template's markers around
  # the image's 64 tokens come to 119 (the questions to 89).
  c.data.text_length = 120
  c.optimizer.lr = 1e-3
  c.schedule.warmup_steps = 50
  c.train.num_steps = 600
  # The tower frozen; the projector and the LM train.
  c.freeze.stages = "0:projector,lm"
  c.checkpoint.every_steps = 300
  c.eval.every_steps = 300
  return c
