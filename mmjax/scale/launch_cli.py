"""`mmjax launch local | tpu | xpk`: start training on local processes or on Cloud TPU.

  mmjax launch local --processes 2 [--devices 4] [--log-dir DIR] [--timeout S] -- ARGS...
      N processes on this machine (gloo). ARGS is a command (`python script.py ...`),
      or, when it starts with a flag, the arguments of `mmjax train`.
  mmjax launch tpu   create|install|train|logs|delete|all  --name N --accelerator v5p-32 ...
  mmjax launch xpk   create|run|delete ...
      print (`--dry-run`) or run the exact gcloud / xpk commands (see mmjax.scale.cloud).
"""

from __future__ import annotations

import argparse
import sys

from mmjax.scale import cloud, local


def _local(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="mmjax launch local")
  parser.add_argument("--processes", type=int, required=True, help="number of JAX processes")
  parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
  parser.add_argument("--log-dir", default="work/launch-local", help="one log file per process")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="stop every process after this many seconds")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command or `mmjax train` flags")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command or command[0].startswith("-"):
    command = [sys.executable, "-m", "mmjax.cli", "train", *command]
  try:
    return local.run(command, processes=args.processes, devices=args.devices, log_dir=args.log_dir,
                     port=args.port, timeout=args.timeout)
  except ValueError as e:
    print(f"mmjax launch local: {e}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  where, rest = argv[0], argv[1:]
  if where == "local":
    return _local(rest)
  if where == "tpu":
    return cloud.tpu_main(rest)
  if where == "xpk":
    return cloud.xpk_main(rest)
  print(f"mmjax launch: unknown target {where!r}; expected local, tpu or xpk", file=sys.stderr)
  return 2
