"""`mmjax train | eval | generate | plot | demo`: the trainer's command-line verbs.

  mmjax train --config configs/flamingo/tiny.py --workdir DIR [--config.x.y=value ...]
  mmjax eval --workdir DIR [--num-questions N] [--few-shot K]
  mmjax eval --workdir DIR --task vqa:embedded --shots 0,4,8 [--rices [--rices-tower DIR]] [--seeds 3]
  mmjax generate --workdir DIR --image a.png --prompt "<image>Question: ... Answer:"
  mmjax plot --workdir DIR --out curves.png
  mmjax demo --workdir work/flamingo-tiny

Each returns an exit status; expected errors (bad input, a locked or changed work
directory, a full disk: `mmjax.cli.expected_error`) print one line and return 2, a stopped
(diverged) training returns 1. Every verb answers `--help`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from mmjax import errors

def _demo_config() -> str:
  from mmjax import families  # pylint: disable=g-import-not-at-top
  return families.DEMO_CONFIG


# The demo's shipped config (mmjax.train.config.resolve_config_path), which tests also train.
TINY = _demo_config()


def _quiet_tpu_probe():
  # libtpu (the `tpu` extra) queries the GCE metadata server when jax starts; on a machine
  # without TPU device files skip that query (its warnings about the missing TPU remain;
  # `make demo` installs no libtpu). Must run before jax starts.
  import glob
  if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def _verb(prog: str):
  """Turns the expected errors of a verb into one line on stderr and its exit status."""
  def wrap(main):
    @functools.wraps(main)
    def run(argv: list[str]) -> int:
      try:
        return main(argv)
      except Exception as e:  # noqa: BLE001 -- only expected errors are caught
        if not errors.expected_error(e):
          raise
        diverged = type(e).__name__ == "TrainingDiverged"
        print(f"{prog}: {'stopped: ' if diverged else ''}{errors.describe_error(e)}", file=sys.stderr)
        return 1 if diverged else 2
    return run
  return wrap


TRAIN_FLAGS = {
    "workdir": (None, "work directory (required); a rerun resumes there"),
    "restart": (False, "start over in --workdir: its previous run moves to WORKDIR/previous/<time>/"),
    "allow_config_change": (False, "resume the checkpoints in --workdir under a config that differs from the one "
                                   "the run was started with"),
}


@_verb("mmjax train")
def train_main(argv: list[str]) -> int:
  _quiet_tpu_probe()
  from mmjax.train import config as config_lib
  try:
    config, extra = config_lib.parse_flags(argv, prog="mmjax train", extra=TRAIN_FLAGS, require_config=False)
  except config_lib.HelpRequested as h:
    print(h)
    return 0
  from mmjax import families
  from mmjax.train import loop
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  workdir = extra["workdir"]
  if not workdir:
    raise ValueError("--workdir=DIR is required")
  if config is None:  # `mmjax train --workdir DIR` resumes with the config written there
    config = config_lib.read_resolved(workdir)
  task = families.of_config(config).task(config, None if extra["restart"] else workdir)
  summary = loop.train(config, workdir, task, allow_config_change=extra["allow_config_change"],
                       restart=extra["restart"])
  what = "preempted (SIGTERM), saved" if summary["preempted"] else "done"
  skipped = f"; {summary['skipped_steps']} updates skipped (not finite)" if summary["skipped_steps"] else ""
  print(f"mmjax train: {what} at step {summary['step']} (started at {summary['start_step']}); "
        f"last loss {summary['last_loss']}{skipped}")
  return 0


@_verb("mmjax eval")
def eval_main(argv: list[str]) -> int:
  _quiet_tpu_probe()
  p = argparse.ArgumentParser(
      prog="mmjax eval", description="validation loss, QA accuracy, CIDEr; with --task (or config.eval.tasks): "
      "benchmark tasks zero- and few-shot (mmjax.train.fewshot, docs/evaluation.md)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num-questions", type=int, default=None, help="0: the whole validation split")
  p.add_argument("--few-shot", type=int, default=None, help="in-context examples (default: the config's)")
  p.add_argument("--no-cider", action="store_true")
  tasks = p.add_argument_group("benchmark tasks")
  tasks.add_argument("--task", action="append", default=[],
                     help="KIND:KEY=VALUE,... (repeatable), e.g. vqa:embedded or vqa:questions=Q,annotations=A,"
                          "images=DIR,support_questions=...; default: config.eval.tasks")
  tasks.add_argument("--shots", default="0", help="in-context examples per query, e.g. 0,4,8")
  tasks.add_argument("--rices", action="store_true", help="choose the examples by RICES instead of at random")
  tasks.add_argument("--rices-tower", default=None, help="work directory of the image tower RICES embeds with (a "
                     "contrastive run); default: the evaluated run's own tower")
  tasks.add_argument("--rices-cache", default=None, help="RICES embedding cache (default: WORKDIR/eval/rices-cache)")
  tasks.add_argument("--seeds", type=int, default=1, help="random examples: runs with seeds 0..N-1, averaged")
  tasks.add_argument("--num-beams", type=int, default=1, help="1: greedy; more: beam search")
  tasks.add_argument("--length-penalty", type=float, default=0.0, help="beam search's (0, the default: the plain sum "
                     "of log-probabilities)")
  tasks.add_argument("--postprocess", default=None, help="VQA answer post-processing, one of "
                     "mmjax.evaluation.vqa.POSTPROCESS_OPTIONS (default: the first)")
  tasks.add_argument("--limit", type=int, default=0, help="queries per task (0: all)")
  tasks.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
  tasks.add_argument("--num-devices", type=int, default=0, help="devices of the mesh (0: the config's)")
  tasks.add_argument("--max-new-tokens", type=int, default=0, help="tokens per answer (0: per kind)")
  tasks.add_argument("--text-only-examples", type=int, default=0, help="zero-shot: this many random support "
                     "examples' text before each query, their images left out (docs/evaluation.md: the zero-shot "
                     "protocol with 2)")
  tasks.add_argument("--prompt", action="append", default=[], help="KIND=TEMPLATE (repeatable): the prompt template "
                     "of a task kind, over config.eval.prompts and the defaults (mmjax.evaluation.prompts)")
  args = p.parse_args(argv)
  from mmjax.train import config as config_lib
  from mmjax.train import fewshot
  specs = args.task or (fewshot.tasks_of_config(config_lib.read_resolved(args.workdir))
                        if os.path.isfile(os.path.join(args.workdir, config_lib.RESOLVED_CONFIG)) else [])
  if specs:
    options = fewshot.Options(
        shots=fewshot.parse_shots(args.shots), selection="rices" if args.rices else "random", seeds=args.seeds,
        rices_tower=args.rices_tower, rices_cache=args.rices_cache, num_beams=args.num_beams,
        length_penalty=args.length_penalty, limit=args.limit,
        batch_size=args.batch_size, num_devices=args.num_devices, max_new_tokens=args.max_new_tokens,
        prompts=tuple(fewshot.parse_prompt(v) for v in args.prompt), text_only_examples=args.text_only_examples,
        **({"postprocess": args.postprocess} if args.postprocess else {}))
    for res in fewshot.run(args.workdir, specs, options):
      print(f"{res['path']}")
    return 0
  from mmjax.train import evaluate
  res = evaluate.evaluate(args.workdir, num_questions=args.num_questions, few_shot_k=args.few_shot,
                          with_cider=not args.no_cider)
  for k, v in res.items():
    if k != "examples":
      print(f"{k:>14}: {v:.4f}" if isinstance(v, float) else f"{k:>14}: {v}")
  return 0


@_verb("mmjax generate")
def generate_main(argv: list[str]) -> int:
  _quiet_tpu_probe()
  import jax
  import numpy as np
  from mmjax.data import preprocess
  from mmjax.train import config as config_lib
  p = argparse.ArgumentParser(prog="mmjax generate", description="continue a prompt (about images, for a family "
                              "whose model reads them) with the model of a work directory")
  p.add_argument("--workdir", required=True)
  p.add_argument("--image", action="append", default=[], help="an image file, one per <image> (repeatable)")
  p.add_argument("--prompt", required=True, help='e.g. "<image>Question: how many shapes are there? Answer:"')
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--sampling", default="greedy", help="greedy, or a mmjax.infer sampling name (top_p, ...)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  from mmjax import families
  from mmjax.train import loop
  config = config_lib.read_resolved(args.workdir)
  family = families.of_config(config)
  task = family.task(config, args.workdir)
  if task.decoding is None:
    raise ValueError(f"family {family.name!r} does not generate text; expected a work directory of one of "
                     f"{[f.name for f in families.REGISTRY.values() if f.decoding is not None]}")
  n_tokens = args.prompt.count("<image>")
  images = None
  if task.render_prompt is not None:
    if n_tokens != len(args.image):
      raise ValueError(f"the prompt has {n_tokens} <image> tokens but {len(args.image)} --image files were "
                       "given; expected one image per <image>")
    # Images first, at their own sizes (the family tiles or pads them): a bad file is
    # reported before the model is loaded.
    inputs, ids, stop_id = task.render_prompt(args.prompt, [preprocess.load_image_file(f, None) for f in args.image])
    _, params = loop.restore_params(config, args.workdir, task)
    from mmjax.infer import generate
    out = generate(task.decoding, {"params": params}, inputs, np.asarray(ids, np.int32)[None], args.max_new_tokens,
                   sampling=args.sampling, rng=jax.random.key(args.seed), eos_token_id=stop_id,
                   pad_id=task.tokenizer.pad_id)
    print(task.tokenizer.decode([int(t) for t in np.asarray(out.tokens)[0][:int(out.lengths[0])]]).strip())
    return 0
  if task.takes_images:
    if n_tokens != len(args.image) or not args.image:
      raise ValueError(f"the prompt has {n_tokens} <image> tokens but {len(args.image)} --image files were "
                       "given; expected one image (at least) per <image>")
    # Images first: a bad file is reported before the model is loaded.
    images = np.stack([preprocess.load_image_file(f, int(config.data.image_size)) for f in args.image])
  elif args.image or n_tokens:
    raise ValueError(f"family {family.name!r} reads no images; got {len(args.image)} --image files and "
                     f"{n_tokens} <image> tokens in the prompt, expected none")
  _, params = loop.restore_params(config, args.workdir, task)
  tok = task.tokenizer
  ids = np.asarray(tok.encode_prompt(args.prompt), np.int32)  # BOS first, as in training
  # The cached generator of mmjax.infer: the family's prefill once, a KV cache, greedy or sampled.
  from mmjax.infer import generate
  out = generate(task.decoding, {"params": params}, None if images is None else {"images": images[None]},
                 ids[None], args.max_new_tokens, sampling=args.sampling, rng=jax.random.key(args.seed),
                 eos_token_id=tok.end_of_chunk_id, pad_id=tok.pad_id)
  text = tok.decode([int(t) for t in np.asarray(out.tokens)[0][:int(out.lengths[0])]])
  print(text.split("<|endofchunk|>")[0].strip())
  return 0


@_verb("mmjax plot")
def plot_main(argv: list[str]) -> int:
  _quiet_tpu_probe()
  from mmjax.train import plot
  p = argparse.ArgumentParser(prog="mmjax plot", description="loss curves and gate values to a PNG")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None, help="default: WORKDIR/curves.png")
  args = p.parse_args(argv)
  out = plot.plot(args.workdir, args.out or os.path.join(args.workdir, "curves.png"))
  print(out)
  return 0


@_verb("mmjax demo")
def demo_main(argv: list[str]) -> int:
  _quiet_tpu_probe()
  from mmjax.train import demo
  p = argparse.ArgumentParser(prog="mmjax demo", description=f"build data, train {TINY}, show what it learned")
  p.add_argument("--workdir", default="work/" + TINY.replace("/", "-"))
  p.add_argument("--config", default=TINY)
  p.add_argument("--data-dir", default=None, help="default: $MMJAX_DATA_DIR, else ~/.cache/mmjax/data")
  p.add_argument("--skip-blank", action="store_true", help="do not train the blanked-images ablation")
  p.add_argument("--data-size", type=int, default=None, help="training scenes per dataset (default: mmjax data build's, 4000)")
  p.add_argument("--data-image-size", type=int, default=None, help="stored image side in pixels (default: 64)")
  p.add_argument("overrides", nargs="*", help="--config.x.y=value overrides for both runs")
  args, unknown = p.parse_known_args(argv)
  return demo.run(args.workdir, config_path=args.config, data_dir=args.data_dir,
                  overrides=[*args.overrides, *unknown], with_blank=not args.skip_blank,
                  data_size=args.data_size, data_image_size=args.data_image_size)
