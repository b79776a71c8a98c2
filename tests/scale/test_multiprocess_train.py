"""`mmjax train` itself under `mmjax launch local`: 2 processes x 4 CPU devices (gloo)
train like 1 process x 8 devices, and each one resumes the other's checkpoint on
another mesh; SIGTERM sent to one of two processes stops both at the same step, saved.

`data.shard_by_process=False` makes the batches independent of the process count (every
process reads the global batch and keeps its rows), so the losses can be compared step
by step. Every run has a timeout: a hung collective fails the test instead of CI.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax.data import builders
from mmjax.scale import launch_cli, local
from mmjax.train import cli

pytestmark = pytest.mark.multiprocess

TIMEOUT = 300
ARGS = [f"--config={cli.TINY}", "--config.data.batch_size=8", "--config.data.text_length=32",
        "--config.data.image_size=16", "--config.model.vision.image_size=16", "--config.model.decoder.depth=2",
        "--config.model.resampler.depth=1", "--config.model.vision.depth=1", "--config.schedule.warmup_steps=1",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False", "--config.eval.every_steps=0",
        "--config.log.tensorboard=False", "--config.log.print_every=1", "--config.data.shard_by_process=False"]
MMJAX = [sys.executable, "-m", "mmjax", "train"]


def _two(tmp_path, name, workdir, *extra):
  code = launch_cli.main(["local", "--processes", "2", "--devices", "4", "--log-dir", str(tmp_path / f"logs-{name}"),
                          "--timeout", str(TIMEOUT), "--", *MMJAX, f"--workdir={workdir}", *ARGS, *extra])
  assert code == 0, f"2-process run {name} exited {code}"
  return (tmp_path / f"logs-{name}" / "process_0.log").read_text()


def _one(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for key in [k for k in env if k.startswith("MMJAX_")]:
    env.pop(key)
  out = subprocess.run([*MMJAX, f"--workdir={workdir}", *ARGS, *extra], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def _losses(workdir):
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["kind"] == "train":
        by_step[r["step"]] = r["loss"]
  return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mp_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


# Both end-to-end `mmjax train` runs on two processes are in the slow tier (each several
# minutes on 2 cores); tests/scale/test_multiprocess.py keeps two-process training and
# cross-mesh restores in the default tier.
@pytest.mark.slow
def test_mmjax_train_on_two_processes_matches_one_and_each_resumes_the_others_checkpoint(data_dir, tmp_path):
  data = f"--config.data.dir={data_dir}"
  two, one = tmp_path / "two", tmp_path / "one"
  # The same FSDP mesh over 8 devices, once as 2 processes x 4 devices, once as 1 x 8.
  log = _two(tmp_path, "train", two, data, "--config.train.num_steps=4", "--config.mesh.fsdp=-1")
  assert "in 2 processes" in log and "done at step 4" in log
  _one(one, data, "--config.train.num_steps=4", "--config.mesh.fsdp=-1")
  got, want = _losses(two), _losses(one)
  assert len(got) == len(want) == 4
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[-1] < got[0]  # it trained

  # Each run's step-4 checkpoint resumed by the other kind of job, on another mesh.
  two_to_one, one_to_two = tmp_path / "two_to_one", tmp_path / "one_to_two"
  shutil.copytree(two, two_to_one)
  shutil.copytree(one, one_to_two)
  out = _one(two_to_one, data, "--config.train.num_steps=6", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
             "--config.sharding.rules=fsdp_tensor")
  assert "resumed from step 4" in out and "done at step 6 (started at 4)" in out
  log = _two(tmp_path, "resume", one_to_two, data, "--config.train.num_steps=6", "--config.mesh.data=2",
             "--config.mesh.fsdp=-1")
  assert "resumed from step 4" in log and "done at step 6 (started at 4)" in log
  # Steps 4 and 5 start from equal states (the runs above agree) and read the same
  # batches (the data position is restored), on 2 different meshes and process counts.
  a, b = _losses(two_to_one), _losses(one_to_two)
  assert len(a) == len(b) == 6
  np.testing.assert_allclose(a[4:], b[4:], rtol=1e-4)
  np.testing.assert_allclose(a[:4], got, rtol=0)  # the resumed runs appended to the metrics


def _wait_for_train_step(procs, workdir, step, timeout):
  """Polls process 0's metrics.jsonl until it records train step `step`."""
  deadline = time.monotonic() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline:
    ended = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
    if ended:
      raise AssertionError(f"processes ended before step {step}: {ended}")
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line).get("step", -1) >= step for line in f if line.endswith("\n")):
          return
    time.sleep(0.1)
  raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_and_the_job_resumes_there(data_dir, tmp_path):
  # TPU maintenance or preemption may signal any one worker: the other must stop with it.
  data = f"--config.data.dir={data_dir}"
  workdir = tmp_path / "run"
  command = [*MMJAX, f"--workdir={workdir}", *ARGS, data, "--config.train.num_steps=100000",
             "--config.checkpoint.every_steps=100000", "--config.mesh.fsdp=-1"]
  procs = local.start(command, processes=2, devices=4, log_dir=str(tmp_path / "logs-sigterm"))
  try:
    _wait_for_train_step(procs, str(workdir), 3, TIMEOUT)
    procs[1].send_signal(signal.SIGTERM)  # the process that does not write the metrics
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    local.stop(procs)
  texts = [(tmp_path / "logs-sigterm" / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], [t[-3000:] for t in texts]
  stopped = []
  for text in texts:
    found = re.findall(r"preempted \(SIGTERM\), saved at step (\d+)", text)
    assert len(found) == 1, text[-3000:]
    stopped.append(int(found[0]))
  assert stopped[0] == stopped[1] >= 3, stopped
  step = stopped[0]
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [step]

  log = _two(tmp_path, "resume", workdir, data, f"--config.train.num_steps={step + 2}", "--config.mesh.fsdp=-1")
  assert f"resumed from step {step}" in log and f"done at step {step + 2} (started at {step})" in log
