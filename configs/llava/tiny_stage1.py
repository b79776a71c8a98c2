"""llava/tiny_stage1: LLaVA's stage 1 (feature alignment) on the embedded dataset, 2 CPU cores:
only the projector trains, on captions, over a frozen pretrained tower and LM.

Run (the whole two-stage recipe, from a fresh clone, each stage resuming its work directory):
  mmjax recipe llava/tiny_stage2          # lm/tiny, clip/tiny, this, then stage 2 and its eval
or this stage alone, once work/lm-tiny and work/clip-tiny exist:
  mmjax train --config configs/llava/tiny_stage1.py --workdir work/llava-tiny_stage1

The model is the `llava-tiny` preset: `clip-tiny`'s image tower (64 px, 8 px patches: 64
tokens per image from its penultimate block, CLS dropped) and `lm-tiny`'s decoder, joined by
LLaVA-1.5's two-layer GELU projector. `init.from_workdir` adopts the `lm` run's decoder and
the `contrastive` run's tower; both stay frozen (bitwise: tests/families/test_llava.py).
Each caption is rendered with the "plain" template of LLaVA's pretraining (the image, then
the caption and its end-of-sequence token, the loss on the caption only).
"""

import dataclasses

import ml_collections

from mmjax import zoo


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The model: every LlavaConfig field from the zoo preset (vocab_size and the <image> id
  # come from the data's tokenizer).
  c.model = dataclasses.asdict(zoo.get("llava-tiny"))
  c.model["family"] = "llava"

  c.mixed_precision = ml_collections.ConfigDict()
  c.mixed_precision.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded"
  c.data.dir = ""  # empty: the default data directory of mmjax.data
  c.data.batch_size = 32
  # Tokens per sequence, the image's 64 included.
  c.data.text_length = 112
  c.data.image_size = 64
  # Image slots per sequence (LLaVA-1.5: one per image).
  c.data.max_slots = 1
  # LLaVA's stage-1 format: <image> caption </s>, the loss on the caption.
  c.data.chat_template = "plain"
  c.data.system_prompt = None
  # Several conversations per sequence (segment ids); off: one conversation, padded.
  c.data.pack = False
  # Length buckets (ascending, the largest = text_length): each batch is cut to the smallest
  # that holds its longest conversation, and the step compiles once per bucket. () : one
  # length. Not with pack (a packed row is full by design).
  c.data.buckets = ()
  c.data.num_workers = 0
  c.data.max_consecutive_bad_records = 1000
  c.data.mixture = "captions:1"
  c.data.shard_by_process = True
  # The control run: every image black.
  c.data.blank_images = False

  c.init = ml_collections.ConfigDict()
  # The pretrained runs, adopted in this order (their decoder, their image tower), and the
  # configs that train them (`mmjax recipe` runs those first).
  c.init.from_workdir = "work/lm-tiny,work/clip-tiny"
  c.init.from_configs = "lm/tiny,clip/tiny"

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
  c.optimizer.lr = 2e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  c.optimizer.grad_accum_steps = 1

  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 30
  c.schedule.end_lr_fraction = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 300
  c.train.nan_policy = "stop"
  c.train.max_consecutive_skips = 5
  c.train.remat = "none"
  c.freeze = ml_collections.ConfigDict()
  # The tower and the LM frozen from step 0: only the projector trains.
  c.freeze.stages = "0:projector"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 300
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = False
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 300
  c.eval.num_batches = 4
  # Validation questions `mmjax eval` asks (0: all 400 embedded ones).
  c.eval.num_questions = 0
  c.eval.max_new_tokens = 6

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.print_every = 50
  c.log.peak_tflops = 0.0
  return c
