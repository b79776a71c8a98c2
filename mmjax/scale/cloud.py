"""Cloud TPU and GKE launch commands: built as argument lists, printed or run.

`mmjax launch tpu ACTION` drives Cloud TPU VMs through `gcloud`:

  create   a queued resource (default; `--slices N` > 1 makes a multislice request with
           `--node-count N --node-prefix NAME`, nodes NAME-0 .. NAME-{N-1}), or with
           `--no-queue` a plain `tpu-vm create` (one slice)
  install  `pip install` mmjax on every worker of every slice (`--worker=all`), and copy
           the `--config` file there when it is not one mmjax ships (see `worker_config`)
  train    `mmjax train ARGS` on every worker at once, with `MMJAX_DISTRIBUTED=auto`
           (`jax.distributed.initialize()` reads the TPU metadata; on a multislice
           queued resource the runtime sets the MEGASCALE_* variables that join slices
           over DCN); output is tee'd to ~/mmjax-train.log on each worker
  logs     copy each worker's log to `--log-dir/<node>-w<i>.log`
  delete   the queued resource and its nodes (or the TPU VM)
  all      create, install, train, logs, delete

`mmjax launch xpk ACTION` does the same on GKE through xpk: `cluster` (create the
cluster), `run` (a workload running `mmjax train` in `--docker-image` on every host of
every slice), `delete` (the workload), `delete-cluster`.

Commands are local argument lists (never run through a local shell). What a remote shell
reads (an ssh `--command`, the remote side of an scp) is built with shlex.quote/shlex.join.

Every action takes `--dry-run`, which prints the exact commands (one per line, shell
quoted) and runs nothing; tests check those lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys

# Runtime (software) version of each generation's TPU VM image.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
# Each worker's training log, in its home directory.
LOG = "mmjax-train.log"
# Where a config file that mmjax does not ship is copied on each worker (home-relative).
WORKER_CONFIG_DIR = "mmjax-configs"


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A Cloud TPU accelerator type, e.g. v5p-32 (16 chips), v5litepod-16, v6e-16."""
  name: str
  generation: str
  chips: int

  @property
  def hosts(self) -> int:
    """VMs (workers) in one slice: 4 chips per host, except single-host 8-chip v5e/v6e."""
    if self.generation in ("v5e", "v6e") and self.chips <= 8:
      return 1
    return max(1, self.chips // 4)


def parse_accelerator(name: str) -> Accelerator:
  """'v5p-32' -> v5p with 16 chips (v4/v5p count TensorCores, 2 per chip); 'v5litepod-16',
  'v5e-16' and 'v6e-16' count chips."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"accelerator type {name!r} is not like v5p-32, v5litepod-16 or v6e-16")
  gen, n = m.group(1), int(m.group(2))
  if gen in ("v4", "v5p"):
    if n % 8:
      raise ValueError(f"accelerator type {name!r}: {gen} sizes are multiples of 8 TensorCores")
    return Accelerator(name, gen, n // 2)
  return Accelerator(name if gen != "v5e" else f"v5litepod-{n}", "v5e" if gen == "v5litepod" else gen, n)


@dataclasses.dataclass(frozen=True)
class TpuJob:
  name: str
  accelerator: Accelerator
  zone: str
  project: str
  slices: int = 1
  queued: bool = True
  provisioning: str = ""  # '', 'spot' or 'reserved'
  runtime_version: str = ""
  package: str = "mmjax[tpu]"
  train_args: tuple[str, ...] = ()
  log_dir: str = "logs"

  def __post_init__(self):
    if self.slices < 1:
      raise ValueError(f"slices={self.slices} must be >= 1")
    if self.slices > 1 and not self.queued:
      raise ValueError("a multislice job needs a queued resource; drop --no-queue")
    if self.provisioning not in ("", "spot", "reserved"):
      raise ValueError(f"provisioning={self.provisioning!r}; expected '', 'spot' or 'reserved'")

  @property
  def nodes(self) -> list[str]:
    if self.slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.slices)]

  @property
  def where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]

  @property
  def version(self) -> str:
    return self.runtime_version or RUNTIME_VERSIONS[self.accelerator.generation]


def worker_config(train_args: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
  """(local config file to copy to the workers or None, the train arguments the workers run).

  The workers pip-install mmjax; they do not have this machine's files. A `--config` file
  identical to a config mmjax ships becomes its name (`flamingo/tiny`), which every install
  resolves; any other local file (your experiment, an edited copy) is copied to
  `~/mmjax-configs/` on every worker (named by `worker_config_path`) and the argument
  points there. A copied config must not read files next to it (import mmjax, or a shipped
  config as `mmjax.configs...`).
  Values that are not local files are passed unchanged (a name, or a path on the workers).
  """
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  args, i = config_lib.config_argument(train_args)
  if i is None:
    return None, train_args
  train_args = tuple(args)
  path, sep, arg = args[i][len("--config="):].partition(":")
  if not os.path.isfile(path):
    return None, train_args
  with open(path, "rb") as f:
    mine = f.read()
  for name in config_lib.builtin_configs():
    with open(config_lib.resolve_config_path(name), "rb") as f:
      if f.read() == mine:
        return None, (*train_args[:i], f"--config={name}{sep}{arg}", *train_args[i + 1:])
  remote = worker_config_path(path)
  return path, (*train_args[:i], f"--config={remote}{sep}{arg}", *train_args[i + 1:])


def worker_config_path(local: str) -> str:
  """Where a local config file is copied on each worker: `mmjax-configs/<its base name>`,
  with every character but letters, digits, '.', '_' and '-' made '_'.

  Legacy scp hands the destination to the worker's shell, so `my$(touch x);y.py` would run
  a command there; scp over SFTP (OpenSSH >= 9.0's default) does not unquote it, so a
  quoted name would arrive with its quotes. A name that needs no quoting is the same file
  under both; it is shell-quoted all the same where it is used.
  """
  return f"{WORKER_CONFIG_DIR}/{re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(local))}"


def create_commands(job: TpuJob) -> list[list[str]]:
  if not job.queued:
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", job.name, *job.where,
             f"--accelerator-type={job.accelerator.name}", f"--version={job.version}"]
            + ([f"--{job.provisioning}"] if job.provisioning else [])]
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", job.name, *job.where,
         f"--accelerator-type={job.accelerator.name}", f"--runtime-version={job.version}"]
  if job.slices == 1:
    cmd.append(f"--node-id={job.name}")
  else:
    cmd += [f"--node-count={job.slices}", f"--node-prefix={job.name}"]
  if job.provisioning:
    cmd.append(f"--{job.provisioning}")
  # Wait until every node is ACTIVE before installing.
  wait = ["gcloud", "compute", "tpus", "queued-resources", "describe", job.name, *job.where,
          "--format=value(state.state)"]
  return [cmd, wait]


def _ssh(job: TpuJob, node: str, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *job.where, f"--worker={worker}",
          f"--command={command}"]


def install_commands(job: TpuJob) -> list[list[str]]:
  pip = f"python3 -m pip install --upgrade pip && python3 -m pip install {shlex.quote(job.package)}"
  local, _ = worker_config(job.train_args)
  if local is not None:
    pip += " && " + shlex.join(["mkdir", "-p", WORKER_CONFIG_DIR])
  out = [_ssh(job, node, pip) for node in job.nodes]
  if local is not None:
    out += [["gcloud", "compute", "tpus", "tpu-vm", "scp", local,
             f"{node}:{shlex.quote(worker_config_path(local))}", *job.where, "--worker=all"]
            for node in job.nodes]
  return out


def train_command_line(job: TpuJob) -> str:
  """What runs on each worker."""
  _, args = worker_config(job.train_args)
  train = shlex.join(["python3", "-m", "mmjax.cli", "train", *args])
  return (f"export MMJAX_DISTRIBUTED=auto TPU_STDERR_LOG_LEVEL=0; {train} 2>&1"
          f" | tee ~/{shlex.quote(LOG)}")


def train_commands(job: TpuJob) -> list[list[str]]:
  """One ssh per slice, started together (every worker of every slice must join)."""
  return [_ssh(job, node, train_command_line(job)) for node in job.nodes]


def logs_commands(job: TpuJob) -> list[list[str]]:
  out = [["mkdir", "-p", job.log_dir]]
  for node in job.nodes:
    for w in range(job.accelerator.hosts):
      out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{node}:{shlex.quote(LOG)}",
                  f"{job.log_dir}/{node}-w{w}.log", *job.where, f"--worker={w}"])
  return out


def delete_commands(job: TpuJob) -> list[list[str]]:
  if not job.queued:
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", job.name, *job.where, "--quiet"]]
  return [["gcloud", "compute", "tpus", "queued-resources", "delete", job.name, *job.where, "--force", "--quiet"]]


TPU_ACTIONS = {"create": create_commands, "install": install_commands, "train": train_commands,
               "logs": logs_commands, "delete": delete_commands}


def _run(commands: list[list[str]], dry_run: bool, parallel: bool = False) -> int:
  if dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  if parallel:
    procs = [subprocess.Popen(cmd) for cmd in commands]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)
  for cmd in commands:
    print("+ " + shlex.join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code:
      return code
  return 0


def _wait_active(job: TpuJob) -> int:
  """Polls the queued resource until ACTIVE (or a failed state)."""
  import time
  describe = create_commands(job)[1]
  while True:
    state = subprocess.run(describe, capture_output=True, text=True).stdout.strip()
    print(f"queued resource {job.name}: {state or '?'}", flush=True)
    if state == "ACTIVE":
      return 0
    if state in ("FAILED", "SUSPENDED"):
      return 1
    time.sleep(30)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
  """Own flags, and the `mmjax train` flags after `--`."""
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def tpu_main(argv: list[str]) -> int:
  argv, train_args = _split(argv)
  parser = argparse.ArgumentParser(prog="mmjax launch tpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("action", choices=[*TPU_ACTIONS, "all"])
  parser.add_argument("--name", required=True, help="queued resource / TPU VM name (node prefix if multislice)")
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-32, v5litepod-16, v6e-16")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", required=True)
  parser.add_argument("--slices", type=int, default=1, help="> 1: multislice over DCN")
  parser.add_argument("--no-queue", action="store_true", help="tpu-vm create instead of a queued resource")
  parser.add_argument("--provisioning", default="", choices=["", "spot", "reserved"])
  parser.add_argument("--runtime-version", default="", help="default: the generation's TPU VM image")
  parser.add_argument("--package", default="mmjax[tpu]", help="pip requirement to install (a git URL, a wheel)")
  parser.add_argument("--log-dir", default="logs")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  try:
    job = TpuJob(name=args.name, accelerator=parse_accelerator(args.accelerator), zone=args.zone,
                 project=args.project, slices=args.slices, queued=not args.no_queue,
                 provisioning=args.provisioning, runtime_version=args.runtime_version, package=args.package,
                 train_args=tuple(train_args), log_dir=args.log_dir)
  except ValueError as e:
    print(f"mmjax launch tpu: {e}", file=sys.stderr)
    return 2
  actions = list(TPU_ACTIONS) if args.action == "all" else [args.action]
  for action in actions:
    commands = TPU_ACTIONS[action](job)
    if action == "create" and job.queued and not args.dry_run:
      code = _run(commands[:1], False) or _wait_active(job)
    elif action == "create" and job.queued:
      code = _run(commands, True)
    else:
      code = _run(commands, args.dry_run, parallel=(action == "train"))
    if code:
      return code
  return 0


# ------------------------------------------------------------------------------ xpk


def xpk_commands(action: str, args) -> list[list[str]]:
  where = [f"--cluster={args.cluster}", f"--zone={args.zone}", f"--project={args.project}"]
  if action == "cluster":
    return [["xpk", "cluster", "create", *where, f"--tpu-type={args.tpu_type}",
             f"--num-slices={args.slices}"] + ([f"--{args.provisioning}"] if args.provisioning else [])]
  if action == "run":
    # A shipped config goes by its name; any other file must be in the image, at that path.
    local, worker_args = worker_config(tuple(args.train_args))
    train = shlex.join(["python3", "-m", "mmjax.cli", "train",
                        *(worker_args if local is None else args.train_args)])
    return [["xpk", "workload", "create", *where, f"--workload={args.workload}", f"--tpu-type={args.tpu_type}",
             f"--num-slices={args.slices}", f"--docker-image={args.docker_image}",
             f"--command=export MMJAX_DISTRIBUTED=auto; {train}"]]
  if action == "delete":
    return [["xpk", "workload", "delete", *where, f"--workload={args.workload}"]]
  if action == "delete-cluster":
    return [["xpk", "cluster", "delete", *where]]
  raise ValueError(f"xpk action {action!r} is not one of cluster, run, delete, delete-cluster")


def xpk_main(argv: list[str]) -> int:
  argv, train_args = _split(argv)
  parser = argparse.ArgumentParser(prog="mmjax launch xpk")
  parser.add_argument("action", choices=["cluster", "run", "delete", "delete-cluster"])
  parser.add_argument("--cluster", required=True)
  parser.add_argument("--workload", default="mmjax-train")
  parser.add_argument("--tpu-type", required=True, help="e.g. v5p-32, v5litepod-16")
  parser.add_argument("--slices", type=int, default=1)
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", required=True)
  parser.add_argument("--provisioning", default="", choices=["", "spot", "reserved"])
  parser.add_argument("--docker-image", default="python:3.11", help="an image with mmjax[tpu] installed")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  args.train_args = train_args
  try:
    parse_accelerator(args.tpu_type)
    commands = xpk_commands(args.action, args)
  except ValueError as e:
    print(f"mmjax launch xpk: {e}", file=sys.stderr)
    return 2
  return _run(commands, args.dry_run)
