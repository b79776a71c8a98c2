"""Parts of the training loop on their own: the batch the step sees (text-only batches
included) and the preemption exit taken from inside an evaluation."""

import os
import signal

import jax
import numpy as np
import pytest

from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from tests.train import toy


def _text_only_batch() -> dict:
  """A toy batch as a text-only stream gives it: no "images", no "image_mask"."""
  return {k: v for k, v in toy.make_batch(0, 4).items() if k not in ("images", "image_mask")}


def test_blanking_a_text_only_batch_returns_it_unchanged():
  batch = _text_only_batch()
  assert loop.blank_images(batch) is batch
  assert loop.prepare_batch(toy.config("--config.data.blank_images=True"), batch) is batch


def test_blanking_zeroes_every_pixel_and_leaves_the_text_and_the_callers_batch_alone():
  batch = toy.make_batch(0, 4)
  pixels = batch["images"].copy()
  blanked = loop.prepare_batch(toy.config("--config.data.blank_images=True"), batch)
  assert blanked["images"].shape == pixels.shape and blanked["images"].dtype == pixels.dtype
  assert not np.any(blanked["images"])
  np.testing.assert_array_equal(batch["images"], pixels)
  assert all(blanked[k] is batch[k] for k in batch if k != "images")


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_a_sigterm_during_an_evaluation_saves_that_step_and_resumes_bitwise(tmp_path):
  # The signal arrives while the validation data is read (outside the data loader's
  # interruptible section), so the loop sees it at the end of the step that evaluated:
  # the step's metrics were already fetched for the evaluation, and the exit must still
  # save it rather than fail on the absent pending step.
  c = toy.config("--config.train.num_steps=12", "--config.eval.every_steps=3")
  interrupted, reference = str(tmp_path / "interrupted"), str(tmp_path / "reference")
  task = toy.task(c)
  evaluations = []

  def val_data():
    evaluations.append(len(evaluations))
    if len(evaluations) == 2:  # the evaluation at step 6
      os.kill(os.getpid(), signal.SIGTERM)
    return toy.task(c).val_data()

  task.val_data = val_data
  stopped = loop.train(c, interrupted, task)
  assert stopped["preempted"] and stopped["step"] == 6
  assert loop.restore_params(c, interrupted, toy.task(c))[0] == 6

  resumed = loop.train(c, interrupted, toy.task(c))
  assert resumed["start_step"] == 6 and resumed["step"] == 12 and not resumed["preempted"]
  straight = loop.train(c, reference, toy.task(c))
  bitwise = jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                         resumed["state"].params, straight["state"].params)
  assert all(jax.tree.leaves(bitwise)), bitwise

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir) if r["kind"] == "train"}
  assert losses(interrupted) == losses(reference)
