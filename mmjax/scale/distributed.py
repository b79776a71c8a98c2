"""Multi-process JAX: join the job a launcher started, before anything touches a device.

`mmjax launch local` (and `launch/local.sh`) start N processes on this machine and give
each these environment variables; on Cloud TPU the launcher sets only
`MMJAX_DISTRIBUTED=auto` and JAX finds the coordinator from the TPU metadata.

  MMJAX_COORDINATOR    host:port of process 0's coordination service
  MMJAX_NUM_PROCESSES  number of processes in the job
  MMJAX_PROCESS_ID     this process's index, 0 .. N-1
  MMJAX_DISTRIBUTED    'auto': call jax.distributed.initialize() with no arguments

`maybe_initialize()` must run before the first `jax.devices()` (the trainer calls it
first thing in `mmjax train`). With none of these set it does nothing, so a single
process is unaffected.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "MMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "MMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MMJAX_PROCESS_ID"
ENV_DISTRIBUTED = "MMJAX_DISTRIBUTED"

_initialized = False


def process_env(coordinator: str, num_processes: int, process_id: int) -> dict[str, str]:
  """The environment variables a launcher gives process ``process_id``."""
  return {ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
          ENV_PROCESS_ID: str(process_id)}


def maybe_initialize() -> bool:
  """Calls ``jax.distributed.initialize`` when a launcher asked for it; True if it did.

  On CPU the collectives go through gloo (each process owns its own CPU devices). Safe
  to call twice.
  """
  global _initialized
  if _initialized:
    return True
  if os.environ.get(ENV_DISTRIBUTED) == "auto":
    jax.distributed.initialize()
    _initialized = True
    return True
  num = int(os.environ.get(ENV_NUM_PROCESSES, "1"))
  if num <= 1:
    return False
  coordinator = os.environ.get(ENV_COORDINATOR)
  if not coordinator:
    raise ValueError(f"{ENV_NUM_PROCESSES}={num} but {ENV_COORDINATOR} is not set; expected host:port")
  process_id = int(os.environ[ENV_PROCESS_ID])
  if not 0 <= process_id < num:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} is not in [0, {num})")
  if os.environ.get("JAX_PLATFORMS", "") in ("cpu", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=process_id)
  _initialized = True
  return True
