"""flamingo/staged: the Flamingo recipe on the embedded dataset, over a pretrained LM.

Run (the LM first: `lm/tiny` is flamingo-tiny's LM, trained on the dataset's text):
  mmjax train --config configs/lm/tiny.py --workdir work/lm-tiny
  mmjax train --config configs/flamingo/staged.py --workdir work/flamingo-staged
  mmjax eval --workdir work/flamingo-staged

`init.from_workdir` names the `lm` run whose newest checkpoint becomes this Flamingo's
decoder (`mmjax.train.pretrained`; the tokenizer must be the same). The LM is frozen from
the first step, as in the Flamingo recipe. The vision tower has no pretrained weights to
import here, so stage 0 (steps 0-599) trains it with the resampler and the gated
cross-attention; stage 1 (from step 600) freezes it too and trains only the resampler and
the cross-attention (their optimizer state is created afresh at the boundary, the
learning-rate schedule runs on over the global step). Frozen parameters stay bitwise at
their values (the trainer's tests check this).

Measured (seed 0, 2026-12-01, 2 CPU cores, over lm/tiny trained 600 steps): validation loss
0.386, QA exact match 59.5% on the 400 balanced validation questions (2-shot 35.5%,
CIDEr-D 2.70), against 24.5% with `--config.data.blank_images=True` (loss
0.504); flamingo/tiny, which trains its LM too, reaches 0.284 and 62.3%. 536 s with
evaluation on a loaded machine. docs/families.md ("Flamingo over a pretrained LM") has
the table.

With real weights (`mmjax.families.flamingo.convert`), set `--config.init.from_workdir=`
(empty), `--config.freeze.stages=0:resampler,xattn` and `--config.init.gate_value=0`
(Flamingo's zero-init gates, so that the model starts as the pretrained LM).
"""

import importlib.util
import os


def _tiny():
  spec = importlib.util.spec_from_file_location("flamingo_tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _tiny().get_config(arg)
  # The lm run to start from (configs/lm/tiny.py trains it; its LM is flamingo-tiny's).
  c.init.from_workdir = "work/lm-tiny"
  c.train.num_steps = 900
  c.freeze.stages = "0:vision,resampler,xattn;600:resampler,xattn"
  c.checkpoint.every_steps = 300
  c.eval.every_steps = 300
  return c
