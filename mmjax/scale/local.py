"""Start N JAX processes on this machine, each with its own CPU devices, talking over gloo.

For development and tests of multi-process code paths (global arrays, checkpoints,
data sharding by process) without a pod. Each process gets the `MMJAX_*` variables of
`mmjax.scale.distributed`, `JAX_PLATFORMS=cpu` and its own device count; its output
goes to `<log_dir>/process_<i>.log`. If one process fails the others are stopped
(a collective would otherwise wait for it forever), and so is everything past
`timeout` seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from mmjax.scale import distributed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_environ(process_id: int, num_processes: int, devices: int, port: int,
                    base: dict[str, str] | None = None) -> dict[str, str]:
  """The full environment of local process ``process_id``."""
  env = dict(os.environ if base is None else base)
  env.update(distributed.process_env(f"127.0.0.1:{port}", num_processes, process_id))
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def start(command: list[str], *, processes: int, devices: int, log_dir: str,
          port: int | None = None) -> list[subprocess.Popen]:
  """Starts ``command`` as ``processes`` processes, each in its own process group, with
  its output in ``<log_dir>/process_<i>.log``; `stop` ends them."""
  if processes < 1 or devices < 1:
    raise ValueError(f"processes={processes} and devices={devices} must be >= 1")
  if not command:
    raise ValueError("no command to run")
  os.makedirs(log_dir, exist_ok=True)
  port = port or free_port()
  procs = []
  for i in range(processes):
    with open(os.path.join(log_dir, f"process_{i}.log"), "w") as log:  # the child keeps its own handle
      procs.append(subprocess.Popen(command, env=process_environ(i, processes, devices, port),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
  return procs


def stop(procs: list[subprocess.Popen]) -> None:
  """SIGKILLs the process group of every process `start` made that is still running."""
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)  # the process group this launcher created
      p.wait()


def run(command: list[str], *, processes: int, devices: int, log_dir: str, port: int | None = None,
        timeout: float | None = None, echo: bool = True) -> int:
  """Runs ``command`` as ``processes`` processes; returns the first non-zero exit code (or 0)."""
  procs = start(command, processes=processes, devices=devices, log_dir=log_dir, port=port)
  deadline = None if timeout is None else time.monotonic() + timeout
  codes: list[int | None] = [None] * processes
  try:
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        if codes[i] is None:
          codes[i] = p.poll()
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        break
      if deadline is not None and time.monotonic() > deadline:
        print(f"mmjax launch local: timed out after {timeout}s", file=sys.stderr)
        codes = [124 if c is None else c for c in codes]
        break
      time.sleep(0.2)
  finally:
    stop(procs)
  if echo:
    for i in range(processes):
      with open(os.path.join(log_dir, f"process_{i}.log")) as f:
        text = f.read()
      if i == 0 or codes[i]:
        print(f"----- process {i} (exit {codes[i]}) -----\n{text[-4000:]}", flush=True)
  bad = [c for c in codes if c]
  return bad[0] if bad else 0
