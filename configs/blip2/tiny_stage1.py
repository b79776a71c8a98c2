"""blip2/tiny_stage1: BLIP-2's stage 1 (vision-language representation learning) on the
embedded captions, 2 CPU cores: the Q-Former trains with ITC, ITM and ITG over the frozen
image tower of a `clip/tiny` run.

Run (the whole recipe from a fresh clone: clip/tiny, lm/tiny, this, stage 2, and evaluation):
  mmjax recipe blip2/tiny_stage2          # or: make recipe-blip2
or this stage alone, once work/clip-tiny exists:
  mmjax train --config configs/blip2/tiny_stage1.py --workdir work/blip2-tiny_stage1
  mmjax eval --workdir work/blip2-tiny_stage1     # retrieval recall (ITC, then ITM re-ranked), ITM accuracy

The model: `clip-tiny`'s tower (64 px, 8 px patches: 65 tokens of width 64, post-normed)
read by a Q-Former of 8 queries, width 64, 2 layers (each cross-attending: with 2 layers,
BLIP-2's every-other-layer placement would leave one), 4 heads; ITC in a 64-wide space.
Each text is BOS (the [CLS]), the caption and EOS; the Q-Former's vocabulary is the data
tokenizer's plus [DEC].
"""

import dataclasses

import ml_collections

from mmjax import zoo


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.family = "blip2"
  c.model.vision = dataclasses.asdict(zoo.get("clip-tiny").vision)
  # vocab_size, encoder_width and the special ids come from the tokenizer and the tower.
  c.model.qformer = dict(width=64, depth=2, num_heads=4, mlp_dim=128, cross_attention_frequency=1, num_queries=8,
                         max_length=32, activation="gelu", norm_eps=1e-12, text_input=True)
  c.model.decoder = None
  c.model.heads = ("itc", "itm", "itg")
  c.model.embed_dim = 64
  c.model.temperature = 0.07
  c.model.temperature_range = (0.001, 0.5)
  c.model.instruction = False

  # The stage-1 losses' weights (LAVIS: 1, 1, 1).
  c.loss = ml_collections.ConfigDict()
  c.loss.itc = 1.0
  c.loss.itm = 1.0
  c.loss.itg = 1.0

  c.mixed_precision = ml_collections.ConfigDict()
  c.mixed_precision.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded"
  c.data.dir = ""  # empty: the default data directory of mmjax.data
  # The global batch: ITC's negatives, and the rows ITM draws hard negatives from.
  c.data.batch_size = 64
  # BOS + the longest embedded caption (22) + EOS.
  c.data.text_length = 24
  c.data.truncate_text = False
  c.data.image_size = 64
  c.data.num_workers = 0
  c.data.max_consecutive_bad_records = 1000
  c.data.mixture = "captions:1"
  c.data.shard_by_process = True
  c.data.blank_images = False

  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = "work/clip-tiny"
  c.init.from_configs = "clip/tiny"

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
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.optimizer.grad_accum_steps = 1

  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 50
  c.schedule.end_lr_fraction = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.nan_policy = "stop"
  c.train.max_consecutive_skips = 5
  c.train.remat = "none"

  # The tower frozen (bitwise: tests/families/test_blip2.py); the Q-Former and its heads train.
  c.freeze = ml_collections.ConfigDict()
  c.freeze.stages = "0:qformer"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 300
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = False
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 300
  c.eval.num_batches = 4
  # Validation pairs `mmjax eval` retrieves among (0: the whole split, 400 embedded), and
  # how many of each row's best by ITC the ITM head re-ranks.
  c.eval.num_pairs = 0
  c.eval.rerank_k = 16

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.print_every = 50
  c.log.peak_tflops = 0.0
  return c
