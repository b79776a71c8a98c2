"""How `mmjax recipe` runs its stages (mmjax.train.recipe.run_stages), on stand-in processes
that record when they start and end: a stage waits for the stages it starts from, at most
`jobs` run side by side, a failing stage or a SIGTERM stops the others with a saved step and
starts nothing more."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mmjax.train import recipe

# A stand-in `mmjax train`: argv = name, what (seconds to run, "fail", "preempt"), directory.
# SIGTERM makes it print what the trainer prints when preempted and exit 0, as the trainer does.
# "fail" exits 3 once stage b has installed its SIGTERM handler (b writes its start file after
# that): on a loaded machine a stage that failed at once could stop b before b's interpreter
# had started, and b then died without a word.
STAND_IN = r"""
import os, signal, sys, time
name, what, d = sys.argv[1:4]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
open(os.path.join(d, name + ".start"), "w").write(repr(time.time()))
print(f"{name} training", flush=True)
if what == "fail":
  while not os.path.exists(os.path.join(d, "b.start")):
    time.sleep(0.01)
  sys.exit(3)
if what == "preempt":
  print("mmjax train: preempted (SIGTERM), saved at step 2 (started at 0); last loss 1.0", flush=True)
  sys.exit(0)
end = time.time() + float(what)
while time.time() < end and not stop:
  time.sleep(0.01)
open(os.path.join(d, name + ".end"), "w").write(repr(time.time()))
if stop:
  print("mmjax train: preempted (SIGTERM), saved at step 1 (started at 0); last loss 1.0", flush=True)
else:
  print("mmjax train: done at step 5 (started at 0); last loss 1.0", flush=True)
"""


def _launch(argv):
  return subprocess.Popen([sys.executable, "-c", STAND_IN, *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _recipe(tmp_path, **what):
  """Stages a, b (independent) and c (starts from both), each doing `what[name]`."""
  stages = (recipe.Stage("a", "x"), recipe.Stage("b", "y"), recipe.Stage("c", "z", ("a", "b")))
  return stages, [[s.name, str(what[s.name]), str(tmp_path)] for s in stages]


def _times(tmp_path, name, edge):
  path = tmp_path / f"{name}.{edge}"
  return float(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stage_starts_after_the_stages_it_starts_from_and_at_most_jobs_run_at_once(tmp_path, jobs, capsys):
  stages, commands = _recipe(tmp_path, a=0.6, b=0.6, c=0.1)
  assert recipe.run_stages(stages, commands, jobs, launch=_launch, poll_s=0.02) == 0
  start = {n: _times(tmp_path, n, "start") for n in "abc"}
  end = {n: _times(tmp_path, n, "end") for n in "abc"}
  assert start["c"] >= max(end["a"], end["b"])
  overlap = min(end["a"], end["b"]) - max(start["a"], start["b"])
  assert (overlap > 0.2) if jobs == 2 else (overlap < 0)
  out = capsys.readouterr().out
  for n in "abc":  # each stage's output relayed behind its name
    assert f"[{n}] {n} training" in out and f"[{n}] mmjax train: done at step 5" in out
  assert out.index("stage 3/3 (c)") > out.index("[a] mmjax train: done") and out.index("[b] mmjax train: done")


def test_a_failing_stage_stops_the_running_ones_with_a_saved_step_and_starts_nothing_more(tmp_path, capsys):
  stages, commands = _recipe(tmp_path, a="fail", b=30, c=0.1)
  t = time.time()
  assert recipe.run_stages(stages, commands, 2, launch=_launch, poll_s=0.02) == 3
  assert time.time() - t < 20  # b was stopped, not waited for
  assert _times(tmp_path, "c", "start") is None
  out = capsys.readouterr()
  assert "[b] mmjax train: preempted (SIGTERM)" in out.out
  assert "stage 1 (a) failed (exit 3)" in out.err


def test_a_stage_preempted_on_its_own_stops_the_recipe_before_what_starts_from_it(tmp_path, capsys):
  stages, commands = _recipe(tmp_path, a="preempt", b=0.3, c=0.1)
  assert recipe.run_stages(stages, commands, 2, launch=_launch, poll_s=0.02) == 128 + signal.SIGTERM
  assert _times(tmp_path, "c", "start") is None
  assert "rerun the recipe to resume" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_reaches_every_running_stage_as_sigterm(tmp_path, signum, capsys):
  stages, commands = _recipe(tmp_path, a=30, b=30, c=0.1)

  def signal_once_both_train():
    while not ((tmp_path / "a.start").exists() and (tmp_path / "b.start").exists()):
      time.sleep(0.01)
    os.kill(os.getpid(), signum)

  threading.Thread(target=signal_once_both_train, daemon=True).start()
  previous = signal.getsignal(signal.SIGTERM)
  assert recipe.run_stages(stages, commands, 2, launch=_launch, poll_s=0.02) == 128 + signum
  assert signal.getsignal(signal.SIGTERM) is previous  # the recipe's handler is gone again
  assert _times(tmp_path, "c", "start") is None
  out = capsys.readouterr()
  assert "[a] mmjax train: preempted" in out.out and "[b] mmjax train: preempted" in out.out
  assert f"stopped by {signal.Signals(signum).name}" in out.err


def test_jobs_must_be_positive(tmp_path, capsys):
  stages, commands = _recipe(tmp_path, a=0, b=0, c=0)
  with pytest.raises(ValueError, match="jobs=0; expected at least 1"):
    recipe.run_stages(stages, commands, 0, launch=_launch)
  assert recipe.main(["blip2/tiny_stage2", "--jobs=0"]) == 2
  assert "--jobs=0; expected a positive number" in capsys.readouterr().err
