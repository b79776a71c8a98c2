"""benchmarks/run_gpu.sh, the one call a lent GPU gets (issue 20): its dry mode runs every
part on CPU at tiny shapes (kernels interpreted) and writes every result file; a wrong
argument is refused by name."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")


def _env(tmp_path) -> dict:
  # One CPU device, as a user's CPU machine has (this suite's own processes have 8).
  return dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, MMJAX_DATA_DIR=str(tmp_path / "data"),
              XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def test_a_wrong_argument_is_refused_naming_it(tmp_path):
  r = subprocess.run(["bash", SCRIPT, "--gpu"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 2
  assert "--gpu" in r.stderr and "--dry" in r.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_mode_runs_every_part_and_writes_its_files(tmp_path):
  r = subprocess.run(["bash", SCRIPT, "--dry"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                     timeout=1200)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == [
      "attention.json", "attention.md", "run_gpu.log", "step.json", "step.md"]
  log = (out / "run_gpu.log").read_text()
  assert "done, 0 part(s) failed" in log
  for part in ("data", "attention", "step-flamingo-small", "step-lm-tiny"):
    assert f"== {part}: exit 0" in log
  attention = json.loads((out / "attention.json").read_text())
  assert attention["mode"] == "memory" and attention["rows"]  # CPU: compiled memory, not timings
  runs = json.loads((out / "step.json").read_text())["runs"]
  assert {(run["meta"]["config"], run["meta"]["size"]) for run in runs} == {
      ("configs/flamingo/tiny.py", "issue20-small"), ("configs/lm/tiny.py", "")}
  for run in runs:
    m = run["mmjax"]
    assert m["seconds_per_step"]["median"] > 0 and m["parameters"] >= m["trainable_parameters"] > 0
    # One round of one step: samples/s is the batch over that step's seconds.
    assert m["samples_per_s"]["median"] == pytest.approx(run["meta"]["batch"] / m["seconds_per_step"]["median"])
