"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, and a corrupted or
half-written latest checkpoint falls back to the previous one with a warning."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from tests.train import toy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "tests.train.toy_run", f"--workdir={workdir}", *overrides]


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=ROOT)
  return env


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir)) if r["kind"] == "train"}


def _wait_for_step(proc, workdir, step, timeout=240):
  """Polls metrics.jsonl until it records `step`; fails if the process ends first."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}: {proc.stdout.read()}")
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) > step:
          return
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_a_run_killed_at_a_random_step_resumes_with_bitwise_identical_losses(tmp_path):
  overrides = ["--config.train.num_steps=40", "--config.checkpoint.every_steps=4"]
  ref = tmp_path / "reference"
  subprocess.run(_cmd(ref, *overrides), check=True, env=_env(), cwd=ROOT, capture_output=True, timeout=300)
  reference = _losses(ref)
  assert sorted(reference) == list(range(40))

  run = tmp_path / "killed"
  kill_at = random.Random().randint(9, 30)
  proc = subprocess.Popen(_cmd(run, *overrides), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for_step(proc, str(run), kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = subprocess.run(_cmd(run, *overrides), check=True, env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300).stdout
  start = int(out.split("SUMMARY")[1].split()[0])
  assert 4 <= start <= 40 and start % 4 == 0, out
  resumed = _losses(run)
  for s in range(start, 40):
    assert np.float32(resumed[s]).tobytes() == np.float32(reference[s]).tobytes(), (s, resumed[s], reference[s])


def test_sigterm_saves_the_current_step_exits_0_and_the_next_run_starts_there(tmp_path):
  overrides = ["--config.train.num_steps=100000", "--config.checkpoint.every_steps=1000"]
  proc = subprocess.Popen(_cmd(tmp_path, *overrides), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for_step(proc, str(tmp_path), 7)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  _, stopped, preempted = out.split("SUMMARY")[1].split()[:3]
  assert preempted == "True"
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [int(stopped)]  # saved at the step it stopped, not at a multiple of 1000
  more = ["--config.train.num_steps=" + str(int(stopped) + 2), "--config.checkpoint.every_steps=1000"]
  out2 = subprocess.run(_cmd(tmp_path, *more), check=True, env=_env(), cwd=ROOT, capture_output=True, text=True,
                        timeout=300).stdout
  assert out2.split("SUMMARY")[1].split()[:2] == [stopped, str(int(stopped) + 2)]


def _corrupt(step_dir):
  # Truncate every file of the saved train state (a disk filled up, a copy cut short).
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(0)


def test_a_corrupted_latest_checkpoint_warns_naming_its_step_and_resumes_from_the_previous(tmp_path):
  c = toy.config("--config.train.num_steps=10")
  loop.train(c, str(tmp_path), toy.task(c))
  _corrupt(str(tmp_path / "checkpoints" / "10"))
  # A half-written save of a later step, as a process killed during an async save leaves it.
  os.makedirs(tmp_path / "checkpoints" / "15.orbax-checkpoint-tmp-1234" / "state")
  c2 = toy.config("--config.train.num_steps=12")
  with pytest.warns(RuntimeWarning, match="checkpoint at step 10 .* corrupted or incomplete"):
    summary = loop.train(c2, str(tmp_path), toy.task(c2))
  assert summary["start_step"] == 5 and summary["step"] == 12
  assert os.listdir(tmp_path / "checkpoints_corrupt")[0].startswith("10-")
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == 12


def test_keep_best_holds_the_step_with_the_lowest_validation_loss(tmp_path):
  c = toy.config("--config.train.num_steps=9", "--config.eval.every_steps=3", "--config.checkpoint.keep_best=True",
                 "--config.checkpoint.keep=1")
  loop.train(c, str(tmp_path), toy.task(c))
  evals = {r["step"]: r["val_loss"] for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "eval"}
  best = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints_best") if d.isdigit())
  assert best == [min(evals, key=evals.get)]
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [9]
