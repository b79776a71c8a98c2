"""A work directory that nothing destroys: readers never write, a changed config or model
is an error and moves nothing, one training at a time, SIGTERM while the data hangs, a
skip policy that gives up, a read-only or full disk found before work is lost.

Each test reproduces a way users lost work (issue 13, defects 1, 2, 3, 4, 8 and 9) and
fails on the trainer as it was before the fix."""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from mmjax.train import workdir as workdir_lib
from tests.train import toy
from tests.train.test_checkpoint import ROOT, _cmd, _env, _wait_for_step


def _tree(path) -> dict:
  """Every file and folder under `path` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.lstat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy work directory trained to step 10 (checkpoints at 5 and 10)."""
  wd = str(tmp_path_factory.mktemp("trained"))
  c = toy.config("--config.train.num_steps=10")
  loop.train(c, wd, toy.task(c))
  return wd


def _copy(src, dst):
  subprocess.run(["cp", "-a", src, str(dst)], check=True)
  return str(dst)


# ------------------------------------------------------------- defect 1: readers never write

def test_a_reader_leaves_the_work_directory_untouched_including_a_save_in_progress(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  # What an asynchronous save of the training leaves while it writes: the reader must not
  # take it for debris (it deleted it, and the training died with NOT_FOUND at its commit).
  in_progress = os.path.join(wd, "checkpoints", "11.orbax-checkpoint-tmp-1796100254")
  os.makedirs(os.path.join(in_progress, "state"))
  with open(os.path.join(in_progress, "state", "d"), "wb") as f:
    f.write(b"x" * 100)
  before = _tree(wd)
  c = toy.config("--config.train.num_steps=10")
  step, params = loop.restore_params(c, wd, toy.task(c))
  assert step == 10 and params
  assert _tree(wd) == before


def test_a_reader_skips_a_corrupt_step_without_moving_it(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  _truncate_state(os.path.join(wd, "checkpoints", "10"))
  before = _tree(wd)
  c = toy.config("--config.train.num_steps=10")
  with pytest.warns(RuntimeWarning, match=r"step 10 .* corrupted .*\(left in place"):
    step, _ = loop.restore_params(c, wd, toy.task(c))
  assert step == 5
  assert _tree(wd) == before


def _truncate_state(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(0)


# --------------------------------------------- defect 2: a changed config is not corruption

def test_a_changed_model_field_is_an_error_naming_it_and_moves_nothing(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  before = _tree(wd)
  c = toy.config("--config.train.num_steps=20", "--config.model.decoder.mlp_dim=512")
  with pytest.raises(workdir_lib.ConfigChanged, match=r"model\.decoder\.mlp_dim: 256 -> 512"):
    loop.train(c, wd, toy.task(c))
  after = _tree(wd)
  after.pop("train.lock", None)  # the lock file is made empty, never left naming a holder
  before.pop("train.lock", None)
  assert after == before
  assert not os.path.exists(os.path.join(wd, "checkpoints_corrupt"))


def test_a_checkpoint_of_another_shape_is_a_mismatch_not_corruption(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  c = toy.config("--config.train.num_steps=20")
  # What a changed vocabulary or width does to the saved tree, past the config check.
  with pytest.raises(checkpoint_lib.CheckpointMismatch, match=r"lm_head/kernel: saved \[16, 16\], this config "
                                                               r"builds \[32, 16\].*Nothing was moved"):
    loop.train(c, wd, toy.task(c, width=32), allow_config_change=True)
  assert _steps(wd) == [5, 10]
  assert not os.path.exists(os.path.join(wd, "checkpoints_corrupt"))
  # The same checkpoints still resume the run they belong to.
  summary = loop.train(c, wd, toy.task(c))
  assert summary["start_step"] == 10 and summary["step"] == 20


def test_a_resume_may_change_logistics_but_not_the_run(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  c = toy.config("--config.train.num_steps=12", "--config.checkpoint.every_steps=3", "--config.log.print_every=1")
  assert loop.train(c, wd, toy.task(c))["start_step"] == 10
  c2 = toy.config("--config.train.num_steps=14", "--config.optimizer.lr=0.1")
  with pytest.raises(workdir_lib.ConfigChanged, match=r"optimizer\.lr: 0\.03 -> 0\.1"):
    loop.train(c2, wd, toy.task(c2))
  assert loop.train(c2, wd, toy.task(c2), allow_config_change=True)["start_step"] == 12


def test_restart_moves_the_old_run_aside_and_starts_at_step_0(trained, tmp_path):
  wd = _copy(trained, tmp_path / "wd")
  old = _tree(os.path.join(wd, "checkpoints"))
  c = toy.config("--config.train.num_steps=5", "--config.model.decoder.mlp_dim=512")
  summary = loop.train(c, wd, toy.task(c), restart=True)
  assert summary["start_step"] == 0
  (previous,) = os.listdir(os.path.join(wd, "previous"))
  assert _tree(os.path.join(wd, "previous", previous, "checkpoints")) == old
  assert _steps(wd) == [5]


def test_a_run_records_the_files_it_depends_on_and_refuses_another_version(tmp_path):
  c = toy.config("--config.train.num_steps=5")
  task = toy.task(c)
  task.workdir_files = lambda: {"tokenizer.model": b"first"}
  loop.train(c, str(tmp_path), task)
  assert (tmp_path / "tokenizer.model").read_bytes() == b"first"
  c2 = toy.config("--config.train.num_steps=10")
  task2 = toy.task(c2)
  task2.workdir_files = lambda: {"tokenizer.model": b"retrained"}
  with pytest.raises(workdir_lib.ConfigChanged, match="tokenizer.model of this run .* is not the one"):
    loop.train(c2, str(tmp_path), task2)
  assert (tmp_path / "tokenizer.model").read_bytes() == b"first" and _steps(tmp_path) == [5]


# ------------------------------------------------------------- defect 3: one training at a time

def test_a_second_training_is_refused_naming_the_holder(tmp_path):
  with workdir_lib.TrainLock(str(tmp_path), command="the first run"):
    c = toy.config("--config.train.num_steps=5")
    with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()} on host .*the first run"):
      loop.train(c, str(tmp_path), toy.task(c))
  assert not os.path.exists(tmp_path / "checkpoints")
  assert loop.train(c, str(tmp_path), toy.task(c))["step"] == 5  # released on exit


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_two_trainings_on_one_directory_one_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
  wd = str(tmp_path)
  overrides = ["--config.train.num_steps=100000", "--config.checkpoint.every_steps=3"]
  first = subprocess.Popen(_cmd(wd, *overrides), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for_step(first, wd, 4)
    second = subprocess.run(_cmd(wd, *overrides), env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"in use by another training: pid {first.pid} on host" in second.stderr
    assert "SUMMARY" not in second.stdout
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  saved = _steps(wd)
  # The killed holder's lock file still names it; the next run sees it dead and goes on.
  assert json.load(open(os.path.join(wd, "train.lock")))["pid"] == first.pid
  third = subprocess.run(_cmd(wd, "--config.train.num_steps=" + str(saved[-1] + 2),
                              "--config.checkpoint.every_steps=3"),
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stdout + third.stderr
  assert f"took over the lock of a training that is no longer running: pid {first.pid}" in third.stdout
  assert third.stdout.split("SUMMARY")[1].split()[:2] == [str(saved[-1]), str(saved[-1] + 2)]


# ---------------------------------------------- defect 4: SIGTERM while the data loader hangs

def test_sigterm_while_the_data_loader_hangs_saves_the_last_step_and_exits_in_seconds(tmp_path):
  wd = str(tmp_path)
  proc = subprocess.Popen(_cmd(wd, "--config.train.num_steps=1000", "--config.checkpoint.every_steps=1000",
                               "--stall-data-at=7"),
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for_step(proc, wd, 5)  # step 5's metrics are written once step 6 is dispatched
    time.sleep(2.0)  # the loop is now inside next() of a source that never returns
    proc.send_signal(signal.SIGTERM)
    try:
      out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      raise AssertionError("SIGTERM did not end a run blocked in its data loader within 60 s") from None
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out
  assert out.split("SUMMARY")[1].split()[1:3] == ["7", "True"]
  assert _steps(wd) == [7]  # steps 0..6 done: the state after them, with the data position after batch 6


# ------------------------------------------------------- defect 9: the skip policy gives up

def test_nan_policy_skip_stops_after_max_consecutive_skips_and_counts_them(tmp_path):
  c = toy.config("--config.train.num_steps=30", "--config.optimizer.lr=1e6", "--config.optimizer.clip_norm=0",
                 "--config.schedule.warmup_steps=0", "--config.train.nan_policy=skip",
                 "--config.train.max_consecutive_skips=3")
  with pytest.raises(loop.TrainingDiverged, match=r"3 updates in a row were skipped"):
    loop.train(c, str(tmp_path), toy.task(c))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "train"]
  assert rows[-1]["skipped_steps"] >= 3 and rows[-1]["finite"] == 0.0
  assert [r["skipped_steps"] for r in rows] == sorted(r["skipped_steps"] for r in rows)


def test_max_consecutive_skips_must_be_positive(tmp_path):
  c = toy.config("--config.train.max_consecutive_skips=0")
  with pytest.raises(ValueError, match="train.max_consecutive_skips=0; expected a count >= 1"):
    loop.train(c, str(tmp_path), toy.task(c))
  assert not os.listdir(tmp_path)


# --------------------------------------- defect 8: a read-only or full disk, found in time

@contextlib.contextmanager
def _mount(*args):
  """Mounts (tmpfs, or a read-only bind) at a fresh folder; skips where mounting is not allowed."""
  target = args[-1]
  os.makedirs(target, exist_ok=True)
  r = subprocess.run(["mount", *args], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount here ({r.stderr.strip()}); the in-process tests cover the logic")
  try:
    yield target
  finally:
    subprocess.run(["umount", "-l", target], check=False)


def test_a_read_only_work_directory_is_refused_before_any_work(trained, tmp_path):
  with _mount("--bind", "-o", "ro", trained, str(tmp_path / "ro")) as wd:
    c = toy.config("--config.train.num_steps=20")
    with pytest.raises(OSError, match=r"work directory .* is not writable \(Read-only file system\)"):
      loop.train(c, wd, toy.task(c))


def test_a_full_disk_is_found_at_save_time_with_the_bytes_needed_and_the_last_checkpoint_kept(tmp_path):
  with _mount("-t", "tmpfs", "-o", "size=12m", "tmpfs", str(tmp_path / "disk")) as disk:
    wd = os.path.join(disk, "wd")
    c = toy.config("--config.train.num_steps=5")
    loop.train(c, wd, toy.task(c))
    free = checkpoint_lib.free_bytes(disk)
    with open(os.path.join(disk, "filler"), "wb") as f:  # someone else's file fills the disk
      f.write(b"\0" * (free - (1 << 20)))
    c2 = toy.config("--config.train.num_steps=10")
    with pytest.raises(checkpoint_lib.DiskFull, match=r"cannot save the checkpoint of step 10: it needs about "
                                                      r"[\d.]+ MiB in .* which has [\d.]+ MiB free\. The "
                                                      r"checkpoint of step 5 is kept"):
      loop.train(c2, wd, toy.task(c2))
    os.remove(os.path.join(disk, "filler"))
    assert loop.train(c2, wd, toy.task(c2))["start_step"] == 5


def test_a_disk_that_fills_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  with _mount("-t", "tmpfs", "-o", "size=12m", "tmpfs", str(tmp_path / "disk")) as disk:
    wd = os.path.join(disk, "wd")
    c = toy.config("--config.train.num_steps=5", "--config.checkpoint.async_save=False")
    loop.train(c, wd, toy.task(c))
    with open(os.path.join(disk, "filler"), "wb") as f:  # room for the config and metrics, not a checkpoint
      f.write(b"\0" * (checkpoint_lib.free_bytes(disk) - (64 << 10)))
    # The free-space check is fooled (another writer filled the disk after it looked).
    monkeypatch.setattr(checkpoint_lib, "free_bytes", lambda path: 1 << 40)
    c2 = toy.config("--config.train.num_steps=10", "--config.checkpoint.async_save=False")
    with pytest.raises(checkpoint_lib.DiskFull, match="filled up while saving step 10; the checkpoint of step 5 "
                                                      "is kept"):
      loop.train(c2, wd, toy.task(c2))
    monkeypatch.undo()
    os.remove(os.path.join(disk, "filler"))
    assert loop.train(c2, wd, toy.task(c2))["start_step"] == 5
