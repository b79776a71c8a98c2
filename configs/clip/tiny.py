"""clip/tiny: a CLIP dual encoder trained on the embedded dataset's captions, on 2 CPU cores.

Run:
  mmjax train --config configs/clip/tiny.py --workdir work/clip-tiny
  mmjax eval --workdir work/clip-tiny
  mmjax compile --config configs/clip/tiny.py --topology v5e:2x2

The model is the `clip-tiny` preset: flamingo/tiny's image tower (64 px, convolutional
stem, width 64, 2 layers) and a 2-layer causal text tower pooled at the end-of-text token,
both projected to 64 wide, trained with CLIP's softmax loss over the global batch (the
temperature starts at 1/0.07). Each example is one scene and its caption (`data.mixture`:
the embedded `captions`; a user's imported captions by name). `configs/flamingo/staged.py`
freezes this run's image tower under a Flamingo.

Measured (seed 0, 1000 steps, 2026-12-01, 2 idle CPU cores): 264 s; on the 400 validation
pairs image-to-text recall@1 54.0% (chance 0.25%, so 216x), @5 84.5%, @10 96.0%,
text-to-image @1 57.3%; zero-shot "how many shapes" 48.3% (chance 25%), "colour of the
leftmost shape" 72.5% (chance 20%). With `--config.data.blank_images=True` (the control):
recall at chance, loss ln 64. docs/contrastive.md ("The tiny configs") has the table.

Any field can be overridden: `--config.optimizer.lr=1e-3 --config.train.num_steps=100`.
"""

import dataclasses

import ml_collections

from mmjax import zoo


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The model: every ContrastiveConfig field from the zoo preset (the text tower's
  # vocab_size and eos_token_id come from the data's tokenizer; its 32 position rows
  # hold data.text_length tokens).
  c.model = dataclasses.asdict(zoo.get("clip-tiny"))
  c.model["family"] = "contrastive"

  c.mixed_precision = ml_collections.ConfigDict()
  c.mixed_precision.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded"
  c.data.dir = ""  # empty: the default data directory of mmjax.data
  # The global batch: every other pair of it is a negative of each pair.
  c.data.batch_size = 64
  # Tokens per text, end-of-text included (the longest embedded caption has 22 + 1).
  c.data.text_length = 24
  # A longer text: cut to fit (True; the fraction cut is logged as `text_truncated`) or
  # skipped and counted as bad data "text_too_long" (False).
  c.data.truncate_text = False
  c.data.image_size = 64
  c.data.num_workers = 0
  c.data.max_consecutive_bad_records = 1000
  # The pair datasets: the embedded captions (an imported dataset of captions by its name).
  c.data.mixture = "captions:1"
  c.data.shard_by_process = True
  # The control run: every image black (retrieval and zero-shot fall to chance).
  c.data.blank_images = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.mesh.slices = 1
  c.mesh.num_devices = 0
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = "fsdp"
  c.sharding.frozen_rules = "frozen_towers"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0
  c.optimizer.grad_accum_steps = 1

  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 100
  c.schedule.end_lr_fraction = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.nan_policy = "stop"
  c.train.max_consecutive_skips = 5
  c.train.remat = "none"

  c.freeze = ml_collections.ConfigDict()
  c.freeze.stages = "0:vision,text,head"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = False
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.num_batches = 6
  # Validation pairs `mmjax eval` retrieves among (0: the whole split, 400 embedded).
  c.eval.num_pairs = 0

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.print_every = 100
  c.log.peak_tflops = 0.0
  return c
