"""flamingo/staged: the Flamingo recipe on the embedded dataset: a contrastively pretrained
vision tower and a pretrained LM, both frozen; only the resampler and the gated
cross-attention train.

Run (one command, the three stages in order, each resuming its work directory, so a
finished stage is a no-op; then `mmjax eval` of the Flamingo; the stages are this config's
`init.from_configs`, each training the work directory of `init.from_workdir` at its place):
  mmjax recipe flamingo/staged            # or: make recipe
which is
  mmjax train --config configs/lm/tiny.py --workdir work/lm-tiny
  mmjax train --config configs/clip/tiny.py --workdir work/clip-tiny
  mmjax train --config configs/flamingo/staged.py --workdir work/flamingo-staged
  mmjax eval --workdir work/flamingo-staged
and its blanked control (every image black, over the same two runs):
  mmjax train --config configs/flamingo/staged.py --config.data.blank_images=True \
    --workdir work/flamingo-staged-blank

`init.from_workdir` names the two pretrained runs (`mmjax.train.pretrained`), adopted in
that order: the `lm` run's newest checkpoint becomes this Flamingo's decoder, the
`contrastive` run's image tower (`clip-tiny`: flamingo/tiny's tower, 64 px, convolutional
stem) its vision tower; both must tokenize as this run does. Both are frozen from the
first step, as in Flamingo and OpenFlamingo: only the Perceiver resampler and the gated
cross-attention layers train, and the frozen parameters stay bitwise at the adopted values
(tests/families/test_flamingo_recipe.py checks this).

Measured (seed 0, 2026-12-01, 2 CPU cores, over lm/tiny 600 steps and clip/tiny 1000
steps): validation loss 0.3655, QA exact match 63.0% on the 400 balanced validation
questions (2-shot 32.8%, CIDEr-D 3.44), against 24.5% with `--config.data.blank_images=True`
on this stage over the same two runs (loss 0.5036): 2.6x. flamingo/tiny, which trains
everything from scratch, reaches 62.3% (blanked 25.2%, loss 0.284); the previous staged
recipe, which trained its own vision tower to step 600, 59.5%. 528 s with evaluation on a
loaded machine (the whole recipe 23.5 min). docs/families.md ("The Flamingo recipe: frozen
contrastive tower and LM") has the table.

With real weights (`mmjax.families.flamingo.convert`), set `--config.init.from_workdir=`
(empty) and `--config.init.gate_value=0` (Flamingo's zero-init gates, so that the model
starts as the pretrained LM).
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
  # The pretrained runs, adopted in this order: configs/lm/tiny.py trains the LM (the
  # `lm-tiny` preset is flamingo-tiny's), configs/clip/tiny.py the image tower (the
  # `clip-tiny` preset's is flamingo/tiny's).
  c.init.from_workdir = "work/lm-tiny,work/clip-tiny"
  # ...and the configs that train them: `mmjax recipe flamingo/staged` runs both, then this.
  c.init.from_configs = "lm/tiny,clip/tiny"
  c.train.num_steps = 900
  # The vision tower and the LM frozen from step 0.
  c.freeze.stages = "0:resampler,xattn"
  c.checkpoint.every_steps = 300
  c.eval.every_steps = 300
  return c
