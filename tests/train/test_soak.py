"""Soak: a Flamingo training checkpointing every step, read all along by `mmjax eval` and
`mmjax generate` in another process, and stopped at random by SIGTERM or SIGKILL and
restarted, ends bitwise where an uninterrupted run ends, with every checkpoint in place and
every reader either answering or failing in one clear line (issue 13).

Slow tier. The counts it prints (restarts by signal, reads, readers' failures by message)
are what docs/workdir.md reports."""

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mmjax.data import builders
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from mmjax.families.flamingo import task as task_lib
from tests.train.test_checkpoint import ROOT, _env

STEPS = 200
SMALL = ["--config.data.batch_size=4", "--config.data.text_length=32", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.schedule.warmup_steps=10",
         "--config.eval.every_steps=0", "--config.eval.num_batches=1", "--config.eval.max_new_tokens=2",
         "--config.log.tensorboard=False", "--config.log.print_every=1", "--config.model.decoder.depth=1",
         "--config.model.resampler.depth=1", "--config.model.vision.depth=1", "--config.mesh.num_devices=1",
         f"--config.train.num_steps={STEPS}", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=0"]


def _mmjax(*args):
  return [sys.executable, "-m", "mmjax.cli", *args]


def _train_cmd(data_dir, workdir):
  return _mmjax("train", "--config=flamingo/tiny", f"--workdir={workdir}", f"--config.data.dir={data_dir}", *SMALL)


def _committed_step(workdir) -> int:
  d = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


class Readers(threading.Thread):
  """`mmjax eval` and `mmjax generate` on the work directory, by turns, until stopped."""

  def __init__(self, workdir, image):
    super().__init__(daemon=True)
    self.workdir, self.image = workdir, image
    self.stop = threading.Event()
    self.outcomes = collections.Counter()
    self.unclear = []

  def run(self):
    commands = [
        _mmjax("eval", f"--workdir={self.workdir}", "--num-questions=2", "--few-shot=0", "--no-cider"),
        _mmjax("generate", f"--workdir={self.workdir}", f"--image={self.image}",
               "--prompt=<image>Question: how many shapes are there? Answer:", "--max-new-tokens=2")]
    i = 0
    while not self.stop.is_set():
      cmd = commands[i % 2]
      i += 1
      verb = cmd[3]
      r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
      if r.returncode == 0:
        self.outcomes[f"{verb} ok"] += 1
        continue
      lines = [line for line in r.stderr.splitlines() if line.startswith(f"mmjax {verb}: ")]
      if r.returncode == 2 and lines and "Traceback" not in r.stderr:
        # A clear refusal: one line saying why (no checkpoint yet, ...).
        reason = re.sub(r"'[^']*'", "W", lines[-1].split(": ", 1)[1])  # the paths out of the message
        self.outcomes[f"{verb} refused: {reason[:70]}"] += 1
      else:
        self.unclear.append((cmd, r.returncode, r.stderr[-3000:]))
      time.sleep(0.5)


@pytest.mark.slow
def test_training_under_readers_and_random_kills_ends_bitwise_as_an_uninterrupted_run(tmp_path):
  data_dir = str(tmp_path / "data")
  builders.build_embedded(data_dir, size=40, image_size=16, seed=0)
  image = tmp_path / "a.png"
  image.write_bytes(bytes(next(iter(builders.open_split(data_dir, "qa", "validation")))["images"][0]))

  reference = str(tmp_path / "reference")
  subprocess.run(_train_cmd(data_dir, reference), env=_env(), cwd=ROOT, check=True, capture_output=True,
                 timeout=1200)

  soak = str(tmp_path / "soak")
  readers = Readers(soak, image)
  readers.start()
  rng = random.Random(os.environ.get("MMJAX_SOAK_SEED", None))
  restarts = collections.Counter()
  try:
    while True:
      proc = subprocess.Popen(_train_cmd(data_dir, soak), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
      start = _committed_step(soak)
      # Let it get some steps past its start (or finish), then stop it at a random moment.
      target = start + rng.randint(3, 40)
      while proc.poll() is None and _committed_step(soak) < target:
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 0.5))
      if proc.poll() is None and _committed_step(soak) < STEPS:
        how = rng.choice([signal.SIGTERM, signal.SIGKILL])
        proc.send_signal(how)
        restarts[how.name] += 1
      out, _ = proc.communicate(timeout=600)
      assert proc.returncode in (0, -signal.SIGKILL), out
      if f"done at step {STEPS}" in out:
        break
  finally:
    readers.stop.set()
    readers.join(timeout=900)

  report = {"restarts": dict(restarts), "reads": dict(readers.outcomes), "unclear_failures": len(readers.unclear)}
  print("SOAK", json.dumps(report))
  assert not readers.unclear, readers.unclear
  assert sum(restarts.values()) >= 3, report
  assert sum(n for k, n in readers.outcomes.items() if k.endswith(" ok")) >= 2, report
  # Nothing lost or moved aside: every step's checkpoint is there.
  assert not os.path.exists(os.path.join(soak, "checkpoints_corrupt"))
  steps = sorted(int(n) for n in os.listdir(os.path.join(soak, "checkpoints")) if n.isdigit())
  assert steps == list(range(1, STEPS + 1))
  # Losses: every step's (each logged once per run that computed it) bitwise the reference's.
  ref_loss = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(reference) if r["kind"] == "train"}
  assert sorted(ref_loss) == list(range(STEPS))
  for r in metrics_lib.read_metrics(soak):
    if r["kind"] == "train":
      assert np.float32(r["loss"]).tobytes() == np.float32(ref_loss[r["step"]]).tobytes(), r
  # Final parameters: bitwise.
  config = config_lib.read_resolved(soak)
  task = task_lib.flamingo_task(config, soak)
  (s1, p1), (s2, p2) = loop.restore_params(config, soak, task), loop.restore_params(config, reference, task)
  assert s1 == s2 == STEPS
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
