"""`mmjax compile`: the train step compiled ahead of time for a TPU topology, on this host.

  mmjax compile --config configs/flamingo/tiny.py --topology v5e:2x2
  mmjax compile --config configs/flamingo/tiny.py --preset openflamingo-9b --topology v5p:2x2x2 \
      --trainable resampler,xattn --batch 8 --length 512 --mesh fsdp=-1 --rules fsdp
  mmjax compile ... --sweep     # every candidate mesh x rule set; a table
  mmjax compile ... --slices 2  # multislice: dcn axis across 2 slices of the topology
  mmjax compile ... --scan-layers  # decoder layers under nn.scan: big presets compile in minutes
  mmjax compile --report work/fit_table.jsonl   # the --json lines as a markdown table

Prints per chip: parameter, optimizer-state and temporary bytes, the total against the
chip's HBM, whether it fits, and the step's FLOPs (XLA's cost analysis). Needs libtpu
(`pip install 'mmjax[tpu]'`); no TPU is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': -1}."""
  out = {}
  for part in filter(None, text.split(",")):
    if "=" not in part:
      raise ValueError(f"mesh part {part!r} should look like axis=size (e.g. fsdp=-1)")
    axis, size = part.split("=", 1)
    if axis not in ("data", "fsdp", "tensor"):
      raise ValueError(f"mesh axis {axis!r} is not one of data, fsdp, tensor")
    out[axis] = int(size)
  return out


def sweep_candidates(chips_per_slice: int) -> list[tuple[dict, str, str | None]]:
  """Mesh x rule-set candidates: DP, FSDP, FSDP + frozen towers, FSDP + TP (2, 4)."""
  out = [({"data": -1}, "data_parallel", None), ({"fsdp": -1}, "fsdp", None),
         ({"fsdp": -1}, "fsdp", "frozen_towers")]
  for tp in (2, 4):
    if chips_per_slice % tp == 0 and chips_per_slice > tp:
      out.append(({"fsdp": -1, "tensor": tp}, "fsdp_tensor", "frozen_towers"))
  return out


def report(path: str) -> str:
  """A markdown table of the JSON lines `--json` wrote (for the fit table in docs/tpu.md)."""
  from mmjax.scale.aot import human as _human
  human = lambda b: _human(b) if b >= 0 else "-"
  rows = ["| model | topology | chips | mesh (dcn,data,fsdp,tensor) | batch x length | params/chip | opt/chip "
          "| temp/chip | peak/chip | HBM | fits | TFLOP/chip/step |", "|" + "---|" * 12]
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      mesh = ",".join(str(r["mesh"][a]) for a in ("dcn", "data", "fsdp", "tensor"))
      fits = {True: "yes", False: "no", None: "- (not compiled)"}[r["fits"]]
      flops = f"{r['flops_per_chip'] / 1e12:.2f}" if r["flops_per_chip"] >= 0 else "-"
      rows.append(f"| {r['model']} | {r['topology']} | {r['chips']} | {mesh} ({r['rules']}) | {r['batch']} x "
                  f"{r['length']} | {human(r['param_bytes'])} | {human(r['opt_bytes'])} | {human(r['temp_bytes'])} | "
                  f"{human(r['total_bytes'])} | {human(r['hbm_bytes'])} | {fits} | {flops} |")
  return "\n".join(rows)


def main(argv: list[str]) -> int:
  if argv[:1] == ["--report"] and len(argv) == 2:  # mmjax compile --report work/fit_table.jsonl
    print(report(argv[1]))
    return 0
  parser = argparse.ArgumentParser(prog="mmjax compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config (configs/...py)")
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5p:2x2x2, v6e:4x4")
  parser.add_argument("--slices", type=int, default=1, help="slices of that topology (multislice)")
  parser.add_argument("--preset", default=None, help="replace config.model by this zoo preset")
  parser.add_argument("--mesh", default="fsdp=-1", help="data=..,fsdp=..,tensor=.. (one may be -1)")
  parser.add_argument("--rules", default="fsdp", help="rule set of trainable weights")
  parser.add_argument("--frozen-rules", default=None, help="rule set of frozen weights (default: --rules)")
  parser.add_argument("--trainable", default=None,
                      help="components trained (default: the config's first freeze stage)")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default config.data.batch_size)")
  parser.add_argument("--length", type=int, default=None, help="text length (default config.data.text_length)")
  parser.add_argument("--num-images", type=int, default=None, help="images per example (default config.data)")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the config's; bfloat16 on TPU)")
  parser.add_argument("--remat", default=None, help="config.train.remat: none, layers, full, dots")
  parser.add_argument("--scan-layers", action="store_true",
                      help="decoder layers under nn.scan (model.decoder.scan_layers): one block body "
                           "compiled instead of depth copies, minutes instead of tens of minutes")
  parser.add_argument("--sweep", action="store_true", help="try every candidate mesh x rule set")
  parser.add_argument("--no-compile", action="store_true",
                      help="only size the sharded parameters and optimizer state (seconds, no peak/FLOPs)")
  parser.add_argument("--json", default=None, help="append each result as a JSON line to this file")
  args = parser.parse_args(argv)

  def _scan_layers(config) -> bool:
    # A family's config may name no decoder or a None one (BLIP-2's stage 1: model.decoder=None).
    return bool((config.model.get("decoder") or {}).get("scan_layers", False))

  import dataclasses as _dc
  from mmjax.scale import aot
  from mmjax import families
  from mmjax.train import config as config_lib, optimizer
  try:
    config = config_lib.load_config(args.config)
    with config.unlocked():
      if args.preset:
        from mmjax import zoo
        family = families.of_config(config)
        family.check_preset(args.preset)  # a preset of another family: ValueError listing this one's
        config.model = {**_dc.asdict(zoo.get(args.preset)), "family": family.name}
      if args.dtype:
        config.mixed_precision.compute_dtype = args.dtype
      if args.remat:
        config.train.remat = args.remat
      if args.scan_layers:
        if config.model.get("decoder") is None:
          raise ValueError(f"--scan-layers scans a decoder's layers; family {families.of_config(config).name!r} "
                           "has no decoder")
        config.model.decoder.scan_layers = True
    trainable = (frozenset(t for t in args.trainable.split(",") if t) if args.trainable
                 else optimizer.parse_stages(str(config.freeze.stages), families.of_config(config).components)[0]
                 .trainable)
    batch = args.batch or int(config.data.batch_size)
    length = args.length or int(config.data.text_length)
    num_images = args.num_images or int(config.data.get("num_images", 0))
    if not num_images:  # the family's own default (LLaVA: data.max_slots image slots per sequence)
      images = families.of_config(config).abstract(config).abstract_batch(1, length, 0).get("images")
      num_images = int(images.shape[1]) if images is not None and len(images.shape) == 5 else 0
    chips = len(aot.topology_devices(args.topology, args.slices))
    per_slice = chips // args.slices
    candidates = (sweep_candidates(per_slice) if args.sweep
                  else [(parse_mesh(args.mesh), args.rules, args.frozen_rules)])
  except ValueError as e:
    print(f"mmjax compile: {e}", file=sys.stderr)
    return 2

  model = args.preset or os.path.basename(args.config)
  print(f"{model}: batch {batch}, text length {length}, {num_images} image(s)/example, "
        f"trainable {','.join(sorted(trainable))}, compute {config.mixed_precision.compute_dtype}, "
        f"remat {config.train.remat}, scan_layers {_scan_layers(config)}")
  print(aot.HEADER)
  code = 0
  for mesh, rules, frozen_rules in candidates:
    try:
      fit = aot.compile_step(config, topology=args.topology, mesh=mesh, rules=rules, trainable=trainable,
                             batch=batch, length=length, num_images=num_images, slices=args.slices,
                             frozen_rules=frozen_rules, compile=not args.no_compile)
    except Exception as e:  # one candidate failing (an indivisible batch, OOM at compile) is a row
      print(f"{args.topology:<12}{args.slices:>3}{chips:>6}  {str(mesh):<24}{rules}: failed: "
            f"{str(e).splitlines()[0][:160]}")
      code = 1
      continue
    print(fit.row(), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps({"model": model, **dataclasses.asdict(fit), "fits": fit.fits,
                            "scan_layers": _scan_layers(config),
                            "remat": str(config.train.remat)}) + "\n")
  return code if not args.sweep else 0
