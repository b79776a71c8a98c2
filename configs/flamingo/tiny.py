"""flamingo/tiny: a Flamingo small enough to learn the embedded dataset on 2 CPU cores.

Run:
  mmjax train --config configs/flamingo/tiny.py --workdir work/flamingo-tiny
  mmjax eval --workdir work/flamingo-tiny
  mmjax train --config configs/flamingo/tiny.py --config.data.blank_images=True --workdir work/flamingo-tiny-blank

Expected (seed 0, 900 steps; 3-6 minutes on 2 idle CPU cores): training loss from ~5.5
to ~0.29; validation QA exact match 62.3% with images (2-shot 32.0%, CIDEr-D 3.85)
against 25.2% with `--config.data.blank_images=True`, chance on the balanced questions
being about 28% (README, "What `make demo` shows": 2026-11-28; floating-point results,
and so the figures, differ by a few points between CPUs; seed 1 gave 60.2% against 24.8%).

The recipe here trains *every* component from random initialisation: the Flamingo recipe
(frozen vision tower and LM) learns nothing when the towers are random, and no pretrained
weights can be downloaded in this setting. `configs/flamingo/staged.py` shows the real
recipe: pretrain the towers on the embedded data, then freeze them and train only the
resampler and the gated cross-attention.

Any field can be overridden: `--config.optimizer.lr=1e-3 --config.train.num_steps=100`.
"""

import dataclasses

import ml_collections

from mmjax import zoo


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The model: every field of mmjax.families.flamingo.model.FlamingoConfig, from the zoo preset
  # (vocab_size, media_token_id and end_of_chunk_token_id come from the data's tokenizer).
  c.model = dataclasses.asdict(zoo.get("flamingo-tiny"))
  # The model family (mmjax.families): what builds the model, its loss and its data.
  c.model["family"] = "flamingo"
  # 64 px (the stored resolution) instead of the preset's 32: shapes of 8-12 px are
  # told apart much sooner, for 10% more compute per step.
  c.model["vision"]["image_size"] = 64
  # Three strided 3x3 convolutions instead of the 8x8 patchify (mmjax.layers.embed.ConvStem),
  # for 15% more time per step: a tower probe supervised with each column's shape learns
  # it to 99.9% instead of 42%; here QA 56.5% instead of 46.5-48.5% (one seed, lr 1e-3 vs
  # 3e-3/1.5e-3, the mixture below before its change; docs/history.md).
  c.model["vision"]["stem"] = "conv"

  # Initial value of every tanh gate (attn_gate, ff_gate). Flamingo uses 0 so that the
  # frozen LM's behaviour is untouched at the start; from scratch that only delays the
  # cross-attention's learning, so this recipe starts with the gates open.
  c.init = ml_collections.ConfigDict()
  c.init.gate_value = 1.0
  # Work directories (one, or several comma-separated, adopted in that order) whose newest
  # checkpoints initialise parts of the model: an `lm` run's LM becomes the decoder, a
  # `contrastive` run's image tower the vision tower (configs/flamingo/staged.py); empty:
  # everything from scratch.
  c.init.from_workdir = ""
  # The configs that train those work directories, in the same order (`mmjax recipe` trains
  # them first; configs/flamingo/staged.py); empty: none.
  c.init.from_configs = ""

  # Mixed precision: parameters stay float32; compute_dtype is the models' `dtype`
  # (bfloat16 on TPU/GPU); softmax and loss are float32 always.
  c.mixed_precision = ml_collections.ConfigDict()
  c.mixed_precision.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  # The dataset built by `mmjax data build` (the embedded one by default).
  c.data.name = "embedded"
  c.data.dir = ""  # empty: the default data directory of mmjax.data
  c.data.batch_size = 32
  c.data.num_images = 1
  c.data.text_length = 32
  c.data.image_size = 64
  c.data.num_workers = 0
  # Stop with an error naming the datasets after this many bad records in a row (>= 1):
  # the datasets repeat, so one with no good record would otherwise be skipped forever.
  c.data.max_consecutive_bad_records = 1000
  # Weights of the datasets ("name:weight,..."); empty: mmjax.data.DEFAULT_MIXTURE.
  # One image per example here, so the interleaved documents (2-5 images) are left out.
  # Captions name every shape left to right: twice the questions' weight, the tower learns
  # to count and place from them (QA 61% / 59% for seeds 0 / 1, against 56.5% / 42.5%
  # with "qa:1.5,captions:1.0"; 200 questions each).
  c.data.mixture = "qa:1.0,captions:2.0"
  # The ablation: replace every image by black pixels, in training and evaluation.
  c.data.blank_images = False
  # batch_size is the global batch. True: each JAX process reads its own disjoint slice
  # of every dataset and batch_size / processes rows of each batch (what a pod needs).
  # False: every process reads the whole global batch and keeps its rows, so the batches
  # are the same whatever the number of processes (reproducing a run across topologies).
  c.data.shard_by_process = True

  # The device mesh (mmjax.sharding.make_mesh): sizes of the data, fsdp and tensor axes,
  # one of them -1 for the rest of the devices; slices > 1 adds a dcn axis across the
  # slices of a multislice job. The default splits the weights and the batch over every
  # device (FSDP); on one device that is plain single-device training.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.mesh.slices = 1
  # 0: every device; n: the first n devices (one process only: to debug or share a host).
  c.mesh.num_devices = 0
  # Rule sets (mmjax.sharding.RULE_SETS) mapping logical axes onto the mesh: `rules` for
  # trained weights and their Adam moments, `frozen_rules` for frozen ones (no optimizer
  # state; empty: the same as `rules`).
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = "fsdp"
  c.sharding.frozen_rules = "frozen_towers"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Clip the global norm of the trainable gradients (0 disables).
  c.optimizer.clip_norm = 1.0
  # Micro-batches per update (the batch is split; the update equals the whole batch's).
  c.optimizer.grad_accum_steps = 1

  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 100
  # Cosine decay to lr * end_lr_fraction at train.num_steps.
  c.schedule.end_lr_fraction = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 900
  # 'stop': a non-finite loss stops the run naming the step; 'skip': drop that update.
  c.train.nan_policy = "stop"
  # With 'skip': stop anyway after this many skipped updates in a row (the run has diverged).
  c.train.max_consecutive_skips = 5
  # Rematerialisation: 'none'; 'layers' (each decoder layer, in the model); 'full' or
  # 'dots' (the whole forward pass, keeping nothing or only matmul outputs).
  c.train.remat = "none"

  c.freeze = ml_collections.ConfigDict()
  # "STEP:components;STEP:components": what is trainable from each step on.
  c.freeze.stages = "0:vision,resampler,xattn,lm"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 300
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = False
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  # Validation loss every N steps during training (0: only at the end, by `mmjax eval`).
  c.eval.every_steps = 300
  c.eval.num_batches = 4
  # In-context examples for the few-shot QA accuracy.
  c.eval.few_shot_k = 2
  # Questions scored for the QA accuracy (0: all of the split, 400 in the default build).
  c.eval.num_questions = 0
  c.eval.max_new_tokens = 4
  # Caption evaluation prompts `<image>` + this opening (one of the dataset's templates)
  # and scores the opening + continuation with CIDEr-D.
  c.eval.caption_prompt = "from left to right:"

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  # Progress line every N steps when stdout is not a terminal (every step on a terminal).
  c.log.print_every = 50
  # Peak TFLOP/s per device for MFU; 0: known accelerators only (none on CPU).
  c.log.peak_tflops = 0.0
  return c
