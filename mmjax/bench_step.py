"""`mmjax bench step`: the trainer's own train step, timed, for any family's config; with
``--compare NAME``, the PyTorch original of that family at the same sizes and recipe, in
alternating rounds of the same call.

It builds the task and the step exactly as `mmjax train` does (`mmjax.train.loop`'s plan:
mesh, shardings, optimizer, freezing; the first freeze stage), draws every timed batch from
the real pipeline beforehand, compiles (reported apart) and warms up on an untimed batch,
then times rounds of ``--steps`` steps. Per round: seconds/step, samples/s, tokens/s
(padded B x T); reported as the median over rounds with [min, max]. Beside them: the
FLOPs XLA counts in one compiled step (``compiled.cost_analysis()``), the family's analytic
model FLOPs (``Task.flops_per_example``), MFU against the device's dense peak where known
(n/a on CPU), and the compiled step's memory (``compiled.memory_analysis()``).

``--compare`` names one of the family's originals (``Family.originals``; the Flamingo
family has ``open_flamingo``, which needs the parity extra: torch, transformers,
open-flamingo). The original runs the same host batches, float32, AdamW with the config's
lr, betas, eps, weight decay and clipping, trains what the config's first freeze stage
trains; rounds alternate (mmjax first in odd rounds, the original first in even ones) and
the ratio mmjax/original of samples/s is taken per round.

The two sizes of issue 20 are named overrides of ``configs/flamingo/tiny.py`` (``--size``;
`SIZES` lists every field they set, and the run records them):

  mmjax bench step --config configs/flamingo/tiny.py --size issue20-small --compare open_flamingo
  mmjax bench step --config configs/flamingo/tiny.py --size issue20-large --compare open_flamingo

``--size gpu-1b`` is the accelerator script's ~1.1B-parameter Flamingo in bfloat16
(benchmarks/run_gpu.sh). Any other family: ``mmjax bench step --config configs/lm/tiny.py``
(or clip/tiny, ...).
Results go to OUT.json and OUT.md (``--out``, default benchmarks/step); ``--append`` merges
this run into OUT.json, replacing a run of the same config, size and overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import time
from typing import Callable

# Issue 20's two sizes, as overrides of configs/flamingo/tiny.py. The resampler and the
# gated cross-attention take open_flamingo's fixed shapes (its `Flamingo` builds
# `PerceiverResampler(dim=vis_dim)` and `GatedCrossAttentionBlock(dim, dim_visual)` with
# their defaults: depth 6, 8 heads of 64, 64 latents, ff x4), so that a comparison runs
# the same model; the recipe is Flamingo's (towers frozen, resampler and cross-attention
# trained), the towers are CLIP-like (patchify stem, QuickGELU, 4x MLP) and LLaMA-like.
_MATCH_OPEN_ORIGINAL = (
    "--config.model.vision.stem=patch", "--config.model.resampler.depth=6",
    "--config.model.resampler.num_heads=8", "--config.model.resampler.head_dim=64",
    "--config.model.resampler.num_latents=64", "--config.model.resampler.ff_mult=4",
    "--config.model.xattn_num_heads=8",
    "--config.model.xattn_head_dim=64", "--config.model.xattn_ff_mult=4",
    "--config.freeze.stages=0:resampler,xattn", "--config.data.num_images=2", "--config.data.mixture=",
    "--config.data.batch_size=8", "--config.mesh.num_devices=1")
SIZES = {
    # batch 8, 64 tokens, 2 images of 32 px patch 8, vision 2 x 128, LM 4 x 256, xattn every layer.
    "issue20-small": _MATCH_OPEN_ORIGINAL + (
        "--config.data.text_length=64", "--config.data.image_size=32", "--config.model.vision.image_size=32",
        "--config.model.vision.patch_size=8", "--config.model.vision.width=128", "--config.model.vision.depth=2",
        "--config.model.vision.num_heads=2", "--config.model.vision.mlp_dim=512",
        "--config.model.resampler.width=128", "--config.model.decoder.width=256",
        "--config.model.decoder.depth=4", "--config.model.decoder.num_heads=4",
        "--config.model.decoder.num_kv_heads=2", "--config.model.decoder.head_dim=64",
        "--config.model.decoder.mlp_dim=1024", "--config.model.cross_attn_every_n_layers=1"),
    # batch 8, 256 tokens, 2 images of 64 px, vision 4 x 256, LM 8 x 512 (8 heads / 4 kv), xattn every 2nd.
    "issue20-large": _MATCH_OPEN_ORIGINAL + (
        "--config.data.text_length=256", "--config.data.image_size=64", "--config.model.vision.image_size=64",
        "--config.model.vision.patch_size=8", "--config.model.vision.width=256", "--config.model.vision.depth=4",
        "--config.model.vision.num_heads=4", "--config.model.vision.mlp_dim=1024",
        "--config.model.resampler.width=256", "--config.model.decoder.width=512",
        "--config.model.decoder.depth=8", "--config.model.decoder.num_heads=8",
        "--config.model.decoder.num_kv_heads=4", "--config.model.decoder.head_dim=64",
        "--config.model.decoder.mlp_dim=2048", "--config.model.cross_attn_every_n_layers=2"),
    # The accelerator script's (benchmarks/run_gpu.sh) ~1.1B-parameter Flamingo in bfloat16:
    # a CLIP ViT-L/14 tower at 224 px (24 x 1024, MLP 4096: ~303M, frozen), a LLaMA-like LM of
    # 12 x 2048 (16 heads of 128, MLP 5632: ~617M, frozen), open_flamingo's resampler over the
    # tower's width and its cross-attention every 4th layer (~63M + 3 x ~37M, trained);
    # batch 8, 512 tokens, 2 images. `mmjax bench step` prints the exact count.
    "gpu-1b": _MATCH_OPEN_ORIGINAL + (
        "--config.mixed_precision.compute_dtype=bfloat16",
        "--config.data.text_length=512", "--config.data.image_size=224", "--config.model.vision.image_size=224",
        "--config.model.vision.patch_size=14", "--config.model.vision.width=1024", "--config.model.vision.depth=24",
        "--config.model.vision.num_heads=16", "--config.model.vision.mlp_dim=4096",
        "--config.model.resampler.width=1024", "--config.model.decoder.width=2048",
        "--config.model.decoder.depth=12", "--config.model.decoder.num_heads=16",
        "--config.model.decoder.num_kv_heads=16", "--config.model.decoder.head_dim=128",
        "--config.model.decoder.mlp_dim=5632", "--config.model.cross_attn_every_n_layers=4"),
}


@dataclasses.dataclass
class StepArm:
  """The trainer's jitted step over its own batches, timed in rounds."""
  name: str
  max_slots: int
  step_fn: object
  state: object
  batches: list  # on the mesh, rounds x steps of them, timed in order
  counts: list[dict]  # `count` of each timed host batch
  compile_s: float  # the first step; with length buckets, the first step of each length
  data_s_per_batch: float  # host pipeline, drawn before any timing
  seconds: list[float] = dataclasses.field(default_factory=list)  # per round
  # A copy of the freshly initialised state, for another arm to start from (None once taken).
  fresh_state: object = None
  plan: object = None  # mmjax.train.loop's plan the step came from
  host_batches: list = dataclasses.field(default_factory=list)  # the timed batches, on the host

  def time_round(self, steps: int) -> None:
    import jax
    start = len(self.seconds) * steps
    began = time.perf_counter()
    for batch in self.batches[start:start + steps]:
      self.state, _ = self.step_fn(self.state, batch)
    jax.block_until_ready(self.state)
    self.seconds.append(time.perf_counter() - began)


def batch_counts(batch: dict) -> dict[str, float]:
  """What one host batch carries whatever the family: rows, padded tokens (the text of
  every row), loss-carrying tokens and image slots in use, where the batch has them."""
  import numpy as np
  text = next((batch[k] for k in ("input_ids", "text_ids", "tokens") if k in batch), None)
  rows = next(iter(batch.values())).shape[0]
  return {"rows": float(rows), "padded_tokens": float(np.size(text)) if text is not None else 0.0,
          "loss_tokens": float(np.sum(batch["loss_mask"])) if "loss_mask" in batch else 0.0,
          "images": float(np.count_nonzero(batch["image_mask"])) if "image_mask" in batch
          else float(rows if "images" in batch else 0)}


def step_arm(name: str, config, batches_needed: int, initial_state=None,
             count: Callable[[dict], dict] = batch_counts) -> StepArm:
  """The task of `config` and the trainer's own jitted step for its first freeze stage
  (`mmjax.train.loop`'s plan, so the step is the one `mmjax train` runs), compiled and warmed
  up on a batch that is not timed. The state: `initial_state` (another arm's fresh one), else
  the loop's fresh init, a copy kept for another arm."""
  import jax
  from mmjax import families
  from mmjax.train import loop
  task = families.of_config(config).task(config, None)
  # The loop's own plan and initial state: the same mesh, shardings, optimizer, freezing and
  # step as a training run (a second trainer here would measure something else).
  plan = loop._plan(config, task)  # pylint: disable=protected-access
  data = iter(task.train_data())
  began = time.perf_counter()
  host = [loop.prepare_batch(config, next(data)) for _ in range(batches_needed + 1)]
  data_s = (time.perf_counter() - began) / len(host)
  fresh = None
  if initial_state is None:
    initial_state = loop._initial_state(plan)  # pylint: disable=protected-access
    # A copy, not the same buffers: off CPU the step donates the state it is given.
    fresh = jax.device_put(initial_state, may_alias=False)
  state = initial_state
  step_fn = plan.build_step(0, plan.put.global_shape(host[0]))
  placed = [plan.put(batch) for batch in host]
  # One compile per batch shape (length buckets give several), none inside the timed rounds.
  first_of_shape = {}
  for batch in placed:
    first_of_shape.setdefault(tuple(x.shape for x in jax.tree.leaves(batch)), batch)
  began = time.perf_counter()
  for batch in first_of_shape.values():
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - began
  state, metrics = step_fn(state, placed[0])  # warm: the first timed step pays nothing extra
  jax.block_until_ready(metrics)
  return StepArm(name=name, max_slots=int(config.data.get("max_slots", 0)), step_fn=step_fn, state=state,
                 batches=placed[1:], counts=[count(b) for b in host[1:]], compile_s=compile_s,
                 data_s_per_batch=data_s, fresh_state=fresh, plan=plan, host_batches=host[1:])


def parse_round_args(parser, argv: list[str]):
  """(args, --config.x=y overrides) of a benchmark timed in rounds (`--rounds`, `--steps`);
  any other unknown argument, or a count below 1, is a usage error naming it."""
  args, overrides = parser.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments {bad}; expected --config.x.y=VALUE overrides")
  if args.rounds < 1 or args.steps < 1:
    parser.error(f"--rounds={args.rounds} --steps={args.steps}; expected both >= 1")
  return args, overrides


def parameter_counts(plan) -> dict[str, int]:
  """The model's parameters, and those its first freeze stage trains (`plan.masks[0]`)."""
  import jax
  import numpy as np
  abstract = jax.eval_shape(plan.task.init_params, plan.init_key)
  sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)]
  trainable = [bool(m) for m in jax.tree.leaves(plan.masks[0])]
  return {"parameters": sum(sizes), "trainable_parameters": sum(n for n, t in zip(sizes, trainable) if t)}


def spread(values: list[float]) -> dict[str, float]:
  """Median, min and max of `values`."""
  import numpy as np
  return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def compiled_analysis(arm: StepArm) -> dict:
  """XLA's FLOPs of one compiled step over the whole mesh (the partitioned program's count
  times its devices) and its memory per device (bytes), None where the backend does not
  say. Lowered and compiled again ahead of time: the jit call path keeps no handle on its
  executable."""
  import jax
  compiled = arm.step_fn.lower(arm.state, arm.batches[0]).compile()
  devices = arm.plan.mesh.devices.size if arm.plan is not None else 1
  out = {"xla_flops": None, "temp_bytes": None, "argument_bytes": None, "output_bytes": None, "devices": devices}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float(cost["flops"]) * devices if cost and "flops" in cost else None
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    pass
  try:
    memory = compiled.memory_analysis()
    if memory is not None:
      out.update(temp_bytes=int(memory.temp_size_in_bytes), argument_bytes=int(memory.argument_size_in_bytes),
                 output_bytes=int(memory.output_size_in_bytes))
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    pass
  return out


def _rates(seconds: list[float], steps: int, counts: list[dict]) -> list[dict[str, float]]:
  """Per round: seconds/step, samples/s, padded tokens/s."""
  rounds = []
  for r, s in enumerate(seconds):
    window = counts[r * steps:(r + 1) * steps]
    rounds.append({"seconds_per_step": s / steps, "samples_per_s": sum(c["rows"] for c in window) / s,
                   "tokens_per_s": sum(c["padded_tokens"] for c in window) / s})
  return rounds


RATES = ("seconds_per_step", "samples_per_s", "tokens_per_s")


def _summary(seconds: list[float], steps: int, counts: list[dict], compile_s: float) -> dict:
  rounds = _rates(seconds, steps, counts)
  return {**{k: spread([r[k] for r in rounds]) for k in RATES}, "compile_s": compile_s,
          "round_seconds": list(seconds), "rounds": rounds}


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count() or 1} cores; {platform.platform()}"


def _fmt(x, fmt: str, unit: str = "") -> str:
  return "n/a" if x is None else f"{format(x, fmt)}{unit}"


def _rate(a: dict, key: str, fmt: str) -> str:
  return f"{format(a[key]['median'], fmt)} [{format(a[key]['min'], fmt)}, {format(a[key]['max'], fmt)}]"


def _markdown(runs: list[dict]) -> str:
  lines = ["# Train step: mmjax's own step, and the PyTorch originals at the same sizes", "",
           "Made with `mmjax bench step` (see its docstring and docs/training.md). Each run builds the task and the "
           "trainer's own jitted step (`mmjax.train.loop`'s plan: mesh, optimizer, freezing as `mmjax train`), "
           "compiles it (compile s, apart) and warms it up on an untimed batch, then times rounds of the same "
           "number of steps on batches drawn beforehand from the real pipeline. Figures are medians over rounds, "
           "[min, max] beside; tokens are padded (B x T). Counted FLOPs: `compiled.cost_analysis()` of one "
           "step for mmjax (the partitioned program's count times the mesh's devices; memory is per device), "
           "`torch.utils.flop_counter` of one step for a PyTorch original; "
           "model FLOPs: the family's analytic count (`Task.flops_per_example` x batch); MFU: model FLOPs/s over "
           "the device's dense peak (n/a where unknown, as on CPU). With a comparison, rounds alternate (mmjax "
           "first in odd rounds) and the ratio mmjax / original is taken per round.", ""]
  for run in runs:
    m, a = run["meta"], run["mmjax"]
    title = f"## {m['config']}" + (f" --size {m['size']}" if m["size"] else "")
    lines += [title + (f" ({' '.join(m['overrides'])})" if m["overrides"] else ""), "",
              f"{m['date']}; {m['machine']}; jax {m['jax']}"
              + (f", torch {m['torch']} ({run['original']['threads']} threads)" if m.get("torch") else "")
              + f" on {m['device']}; B={m['batch']}, T={m['text_length']}; {m['rounds']} rounds x {m['steps']} "
              f"steps; load average (1 min) {m['load_before'][0]} at the start, {m['load_after'][0]} at the end"
              + (" (the machine was shared with other work)" if m["shared"] else "") + f"; {m['wall_s']:.0f} s in all"
              + (f"; {a['parameters']:,} parameters, {a['trainable_parameters']:,} trained" if "parameters" in a
                 else "") + ".",
              "", "| arm | s/step | samples/s | tokens/s | compile s | counted GFLOP/step | model GFLOP/step | MFU "
              "| temp MiB | argument MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = lambda b: _fmt(None if b is None else b / 2**20, ".1f")
    gflop = lambda f: _fmt(None if f is None else f / 1e9, ".2f")
    lines.append(f"| mmjax | {_rate(a, 'seconds_per_step', '.4f')} | {_rate(a, 'samples_per_s', '.1f')} | "
                 f"{_rate(a, 'tokens_per_s', ',.0f')} | {a['compile_s']:.1f} | {gflop(a['xla_flops'])} | "
                 f"{gflop(a['model_flops'])} | {_fmt(a['mfu'], '.1%')} | {mib(a['temp_bytes'])} | "
                 f"{mib(a['argument_bytes'])} |")
    if run.get("original"):
      o = run["original"]
      lines.append(f"| {o['name']} | {_rate(o, 'seconds_per_step', '.4f')} | {_rate(o, 'samples_per_s', '.1f')} | "
                   f"{_rate(o, 'tokens_per_s', ',.0f')} | {o['compile_s']:.1f} | {gflop(o.get('flops'))} | | | | |")
      r = run["ratio"]
      lines += ["", f"mmjax / {o['name']} samples/s, per round: {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]."]
      if o.get("differences"):
        lines += ["", "Differences between the two models: " + "; ".join(o["differences"]) + "."]
    lines.append("")
  return "\n".join(lines)


def _run_key(run: dict) -> tuple:
  m = run["meta"]
  return m["config"], m["size"], tuple(m["overrides"]), (run.get("original") or {}).get("name")


def _ensure_data(config, data_dir: str) -> None:
  from mmjax import data as data_lib
  if str(config.data.get("name", "")) != "embedded":
    return
  try:
    data_lib.tokenizer_path(data_dir)
  except (OSError, ValueError, KeyError):
    print(f"mmjax bench step: no dataset in {data_dir}; building the embedded dataset there", flush=True)
    data_lib.build_embedded(data_dir, log=lambda m: print(f"mmjax bench step:   {m}", flush=True))


def main(argv: list[str]) -> int:
  """`mmjax bench step`: the trainer's train step of any config, timed; with --compare, the
  PyTorch original at the same sizes and recipe in alternating rounds (the module docstring
  has the issue-20 command lines). Writes OUT.json and OUT.md."""
  parser = argparse.ArgumentParser(prog="mmjax bench step", description=main.__doc__)
  parser.add_argument("--config", required=True, help="a config file or a shipped name, of any family")
  parser.add_argument("--size", default="", choices=["", *SIZES],
                      help="named overrides applied before --config.x=y ones (issue 20's sizes; see SIZES)")
  parser.add_argument("--compare", default="",
                      help="a PyTorch original of the config's family to time beside (one of its `originals`)")
  parser.add_argument("--data-dir", default=None,
                      help="default: $MMJAX_DATA_DIR, else ~/.cache/mmjax/data (the embedded data is built there "
                           "when absent)")
  parser.add_argument("--rounds", type=int, default=10, help="rounds (alternating with --compare)")
  parser.add_argument("--steps", type=int, default=5, help="train steps per round")
  parser.add_argument("--append", action="store_true",
                      help="add this run to OUT.json (a run of the same config, size, overrides and comparison "
                           "is replaced)")
  parser.add_argument("--out", default="benchmarks/step", help="results go to OUT.json and OUT.md")
  args, overrides = parse_round_args(parser, argv)
  load_before = [round(x, 2) for x in os.getloadavg()]
  began = time.perf_counter()

  import jax
  from mmjax import data as data_lib
  from mmjax import families
  from mmjax.train import config as config_lib
  from mmjax.train import flops as flops_lib
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir or data_lib.default_data_dir()))
  config = config_lib.load_config(args.config, [*SIZES.get(args.size, ()), *overrides,
                                                f"--config.data.dir={data_dir}"])
  if "init" in config and config.init.get("from_workdir"):  # fresh parameters: no other run's weights
    config.init.from_workdir = ""
  family = families.of_config(config)
  build_original = None
  if args.compare:
    if args.compare not in family.originals:
      raise ValueError(f"--compare={args.compare!r}: the {family.name!r} family of --config={args.config} has "
                       f"{sorted(family.originals) or 'no PyTorch originals'}; expected one of those")
    build_original = family.originals[args.compare]
  _ensure_data(config, data_dir)

  needed = args.rounds * args.steps
  arm = step_arm("mmjax", config, needed)
  analysis = compiled_analysis(arm)
  original = (build_original(config, arm.plan.task, arm.host_batches, arm.plan.stages[0].trainable)
              if build_original else None)
  if original is not None:
    original.warm_up()
  for r in range(args.rounds):
    arms = [arm] if original is None else ([arm, original] if r % 2 == 0 else [original, arm])
    for a in arms:
      a.time_round(args.steps)
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{a.name} {args.steps / a.seconds[-1]:.2f} steps/s" for a in arms), flush=True)

  summary = _summary(arm.seconds, args.steps, arm.counts, arm.compile_s)
  batch = int(config.data.batch_size)
  device = jax.devices()[0]
  peak = flops_lib.peak_flops_per_device(float(config.log.get("peak_tflops", 0.0)) if "log" in config else 0.0)
  per_example = (arm.plan.task.flops_per_example(arm.plan.stages[0].trainable)
                 if arm.plan.task.flops_per_example else None)
  model_flops = None if per_example is None else per_example * batch
  mfu = (None if model_flops is None or peak is None
         else model_flops / summary["seconds_per_step"]["median"] / (peak * arm.plan.mesh.devices.size))
  summary.update(analysis, model_flops=model_flops, mfu=mfu, peak_flops_per_device=peak,
                 **parameter_counts(arm.plan))
  run = {"mmjax": summary}
  if original is not None:
    o = _summary(original.seconds, args.steps, arm.counts, original.compile_s)
    o.update(name=args.compare, flops=original.flops, differences=original.differences,
             trainable_parameters=original.trainable_parameters, threads=original.torch_threads)
    per_round = [m["samples_per_s"] / t["samples_per_s"] for m, t in zip(summary["rounds"], o["rounds"])]
    run.update(original=o, ratio={**spread(per_round), "rounds": per_round})
  load_after = [round(x, 2) for x in os.getloadavg()]
  run["meta"] = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "machine": _machine(), "device": f"{arm.plan.mesh.devices.size} x {device.platform}: {device.device_kind}",
      "jax": jax.__version__, "torch": original.torch_version if original is not None else None,
      "config": args.config, "size": args.size, "size_overrides": list(SIZES.get(args.size, ())),
      "overrides": overrides, "family": family.name, "batch": batch,
      "text_length": int(config.data.get("text_length", 0)), "rounds": args.rounds, "steps": args.steps,
      # Other work on the machine: a 1-minute load above half a core before this run started.
      "load_before": load_before, "load_after": load_after, "shared": load_before[0] > 0.5,
      "wall_s": time.perf_counter() - began,
  }
  s = summary
  print(f"mmjax: compile {s['compile_s']:.1f} s; {_rate(s, 'seconds_per_step', '.4f')} s/step, "
        f"{_rate(s, 'samples_per_s', '.1f')} samples/s, {_rate(s, 'tokens_per_s', ',.0f')} tokens/s; "
        f"XLA {_fmt(s['xla_flops'] and s['xla_flops'] / 1e9, '.2f', ' GFLOP')}/step, model "
        f"{_fmt(model_flops and model_flops / 1e9, '.2f', ' GFLOP')}/step, MFU {_fmt(mfu, '.1%')}; temp "
        f"{_fmt(s['temp_bytes'] and s['temp_bytes'] / 2**20, '.1f', ' MiB')}, arguments "
        f"{_fmt(s['argument_bytes'] and s['argument_bytes'] / 2**20, '.1f', ' MiB')}")
  if original is not None:
    o, r = run["original"], run["ratio"]
    print(f"{o['name']}: {_rate(o, 'seconds_per_step', '.4f')} s/step, {_rate(o, 'samples_per_s', '.1f')} "
          f"samples/s; torch counts {_fmt(o['flops'] and o['flops'] / 1e9, '.2f', ' GFLOP')}/step")
    print(f"mmjax / {o['name']} samples/s: {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]")
    for d in o["differences"]:
      print(f"  differs: {d}")
  out = pathlib.Path(args.out)
  runs = [run]
  if args.append and out.with_suffix(".json").exists():
    previous = json.loads(out.with_suffix(".json").read_text())["runs"]
    runs = [p for p in previous if _run_key(p) != _run_key(run)] + [run]
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
  out.with_suffix(".md").write_text(_markdown(runs))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
  return 0
