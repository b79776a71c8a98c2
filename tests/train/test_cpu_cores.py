"""`mmjax train` on a CPU machine gives JAX one host device per core (`loop.use_cpu_cores`), so
the batch splits over the cores; a count the user chose is kept, and a batch that does not
split over the cores trains on as many devices as split it. Each case runs in a fresh
process: the device count is fixed once JAX's backends start (this suite's own processes
have 8 host devices, tests/conftest.py)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
import json, sys
import jax, ml_collections
from mmjax.train import loop
chosen = loop.use_cpu_cores()
config = ml_collections.ConfigDict({"data": {"batch_size": int(sys.argv[1])},
                                    "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "slices": 1, "num_devices": 0}})
mesh, _, _ = loop.mesh_from_config(config)
print(json.dumps({"chosen": chosen, "devices": jax.device_count(), "mesh": int(mesh.devices.size)}))
"""


def _cores() -> int:
  return len(os.sched_getaffinity(0))


def _probe(batch: int, **env) -> dict:
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "MMJAX_NUM_PROCESSES", "MMJAX_COORDINATOR",
                       "MMJAX_DISTRIBUTED")}
  base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TPU_SKIP_MDS_QUERY="1", **env)
  out = subprocess.run([sys.executable, "-c", _PROBE, str(batch)], env=base, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to split")


@needs_two_cores
def test_a_device_per_core_and_the_mesh_takes_them_all():
  from mmjax.train import loop
  want = min(_cores(), loop.MAX_CPU_CORE_DEVICES)
  got = _probe(batch=8 * want)
  assert got == {"chosen": want, "devices": want, "mesh": want}


def test_a_count_the_user_set_is_kept():
  got = _probe(batch=8, XLA_FLAGS="--xla_force_host_platform_device_count=3")
  assert got == {"chosen": None, "devices": 3, "mesh": 3}


@needs_two_cores
def test_a_process_of_a_multiprocess_job_is_left_alone():
  got = _probe(batch=8, MMJAX_NUM_PROCESSES="2")
  assert got["chosen"] is None and got["devices"] == 1


@needs_two_cores
def test_a_batch_that_does_not_split_over_the_cores_trains_on_fewer():
  # An odd batch splits over no more than one device: the run trains as it did before,
  # instead of failing the batch-split check.
  got = _probe(batch=7)
  assert got["chosen"] and got["devices"] >= 2 and got["mesh"] == 1
