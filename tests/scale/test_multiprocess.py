"""Two processes x 4 CPU devices (gloo, started by `mmjax launch local`) train like one
process x 8 devices, and checkpoints move between the two on different meshes.

Every launch has a timeout, so a hung collective fails the test instead of CI.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.scale import launch_cli

pytestmark = pytest.mark.multiprocess

WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")
TIMEOUT = 240


def _launch_two(tmp_path, name, *args):
  code = launch_cli.main(["local", "--processes", "2", "--devices", "4", "--log-dir", str(tmp_path / name),
                          "--timeout", str(TIMEOUT), "--", sys.executable, WORKER, *args])
  assert code == 0, f"2-process run {name} exited {code}"


def _run_one(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for key in ("MMJAX_NUM_PROCESSES", "MMJAX_COORDINATOR", "MMJAX_PROCESS_ID"):
    env.pop(key, None)
  out = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow  # two JAX processes over gloo, four trainings: 60 s on 2 cores (default-tier budget)
def test_two_processes_train_like_one_and_checkpoints_restore_across_meshes(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  two.mkdir(), one.mkdir()
  # 2 processes x 4 devices, FSDP over all 8: train, save.
  _launch_two(tmp_path, "logs-train", "--out", str(two), "--mesh", "fsdp=-1", "--rules", "fsdp")
  # 1 process x 8 devices on another mesh: train, save; restore the 2-process checkpoint
  # onto FSDP + tensor parallelism.
  stdout = _run_one("--out", str(one), "--mesh", "data=2,fsdp=-1", "--rules", "fsdp",
                    "--restore", str(two), "--restore-mesh", "fsdp=4,tensor=2", "--restore-rules", "fsdp_tensor")
  assert "restored" in stdout
  got, want = (json.loads((d / "losses.json").read_text()) for d in (two, one))
  assert (got["processes"], got["devices"], want["processes"], want["devices"]) == (2, 8, 1, 8)
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
  # The reverse: 2 processes restore the 1-process checkpoint on a data x fsdp mesh.
  _launch_two(tmp_path, "logs-restore", "--restore", str(one), "--restore-mesh", "data=4,fsdp=2",
              "--restore-rules", "fsdp")
  assert "restored" in (tmp_path / "logs-restore" / "process_0.log").read_text()
