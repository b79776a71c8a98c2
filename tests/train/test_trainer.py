"""The trainer's contract, on a tiny stand-in model: freezing, stages, accumulation,
divergence handling, metrics and the config command line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import families
from mmjax.families.flamingo.gates import gate_values
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from mmjax.train import optimizer as optimizer_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib
from tests.train import toy


def _init(config):
  task = toy.task(config)
  return task, jax.jit(task.init_params)(jax.random.key(int(config.seed)))


def test_config_overrides_set_typed_fields_and_reject_unknown_ones():
  c = toy.config("--config.optimizer.lr=0.5", "--config.freeze.stages=0:xattn")
  assert c.optimizer.lr == 0.5 and c.freeze.stages == "0:xattn"
  with pytest.raises(ValueError, match="nope"):
    toy.config("--config.optimizer.nope=1")
  with pytest.raises(ValueError, match="could not convert"):
    toy.config("--config.optimizer.lr=fast")


def test_resolved_config_round_trips_through_the_workdir(tmp_path):
  c = toy.config("--config.optimizer.lr=0.25")
  config_lib.write_resolved(c, str(tmp_path))
  back = config_lib.read_resolved(str(tmp_path))
  assert back.optimizer.lr == 0.25
  assert back.model.vision.image_mean == c.model.vision.image_mean


def test_stages_parse_sorted_and_bad_specs_are_rejected():
  stages = optimizer_lib.parse_stages("10:lm,xattn;0:resampler,xattn", toy.COMPONENTS)
  assert [s.start_step for s in stages] == [0, 10]
  assert stages[1].trainable == frozenset({"lm", "xattn"})
  assert optimizer_lib.stage_index(stages, 9) == 0 and optimizer_lib.stage_index(stages, 10) == 1
  for bad in ("5:lm", "0:decoder", "0:", "x:lm"):
    with pytest.raises(ValueError):
      optimizer_lib.parse_stages(bad, toy.COMPONENTS)


def test_frozen_parameters_carry_no_optimizer_state():
  c = toy.config()
  task, params = _init(c)
  mask = optimizer_lib.trainable_mask(task.param_labels(params), frozenset({"resampler", "xattn"}))
  tx = optimizer_lib.make_transform(c, mask)
  opt_state = tx.init(params)
  n_train = sum(np.size(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  # Adam keeps two moments per trainable value and nothing for the frozen ones.
  n_state = sum(np.size(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0 or np.size(x) > 1)
  assert n_state == 2 * n_train


def _run_steps(config, params, batches, trainable, accum=1):
  task = toy.task(config)
  mask = optimizer_lib.trainable_mask(task.param_labels(params), trainable)
  tx = optimizer_lib.make_transform(config, mask)
  fn = jax.jit(step_lib.make_train_step(apply_fn=task.apply_fn, tx=tx, mask=mask,
                                        schedule=optimizer_lib.make_schedule(config), grad_accum_steps=accum))
  state = state_lib.create(params, tx, 0)
  out = []
  for b in batches:
    state, m = fn(state, b)
    out.append(m)
  return state, out


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
  c = toy.config()
  _, params = _init(c)
  batches = [toy.make_batch(i, 8) for i in range(3)]
  every = frozenset(toy.COMPONENTS)
  s1, m1 = _run_steps(c, params, batches, every, accum=1)
  s4, m4 = _run_steps(c, params, batches, every, accum=4)
  for a, b in zip(m1, m4):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1.params, s4.params)


def test_remat_does_not_change_the_update():
  c = toy.config()
  task, params = _init(c)
  mask = optimizer_lib.trainable_mask(task.param_labels(params), frozenset(toy.COMPONENTS))
  tx = optimizer_lib.make_transform(c, mask)
  sched = optimizer_lib.make_schedule(c)
  outs = []
  for remat in ("none", "full"):
    fn = jax.jit(step_lib.make_train_step(apply_fn=task.apply_fn, tx=tx, mask=mask, schedule=sched, remat=remat))
    outs.append(fn(state_lib.create(params, tx, 0), toy.make_batch(0, 8))[0].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *outs)


def test_flamingo_recipe_leaves_frozen_parameters_bitwise_unchanged_and_opens_the_gates(tmp_path):
  c = toy.config("--config.freeze.stages=0:resampler,xattn", "--config.train.num_steps=12",
                 "--config.checkpoint.every_steps=0")
  task, params0 = _init(c)
  summary = loop.train(c, str(tmp_path), task)
  params = summary["state"].params
  labels = task.param_labels(params0)
  for (path, p0), p1, label in zip(jax.tree_util.tree_flatten_with_path(params0)[0], jax.tree.leaves(params),
                                   jax.tree.leaves(labels)):
    if label in ("vision", "lm"):
      assert np.array_equal(np.asarray(p0).view(np.uint32), np.asarray(p1).view(np.uint32)), path
    else:
      assert not np.array_equal(np.asarray(p0), np.asarray(p1)), path
  gates = gate_values(params)
  assert set(gates) == {"gate/xattn_0/attn_gate", "gate/xattn_0/ff_gate"}
  assert all(abs(float(v)) > 1e-3 for v in gates.values())


def test_a_stage_unfreezes_the_lm_at_its_step(tmp_path):
  c = toy.config("--config.freeze.stages=0:resampler,xattn;6:resampler,xattn,lm", "--config.train.num_steps=6",
                 "--config.checkpoint.every_steps=3")
  task, params0 = _init(c)
  lm0 = np.asarray(params0["lm_head"]["kernel"])
  s6 = loop.train(c, str(tmp_path), task)
  np.testing.assert_array_equal(np.asarray(s6["state"].params["lm_head"]["kernel"]), lm0)
  c2 = toy.config("--config.freeze.stages=0:resampler,xattn;6:resampler,xattn,lm", "--config.train.num_steps=9",
                  "--config.checkpoint.every_steps=3")
  s9 = loop.train(c2, str(tmp_path), task)  # resumes at the stage boundary
  assert s9["start_step"] == 6
  assert not np.array_equal(np.asarray(s9["state"].params["lm_head"]["kernel"]), lm0)
  assert np.array_equal(np.asarray(s9["state"].params["vision"]["kernel"]), np.asarray(params0["vision"]["kernel"]))


class _PoisonedData(toy.ToyData):
  """Yields a NaN in the loss mask at batch `at` (a stand-in for a diverging run)."""

  def __init__(self, batch_size, at):
    super().__init__(batch_size)
    self.at = at

  def __next__(self):
    i = self.index
    batch = super().__next__()
    if i == self.at:
      batch["loss_mask"] = batch["loss_mask"].copy()
      batch["loss_mask"][0, -1] = np.nan
    return batch


def _poisoned_task(config, at):
  task = toy.task(config)
  task.train_data = lambda: _PoisonedData(int(config.data.batch_size), at)
  return task


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_checkpoint(tmp_path):
  c = toy.config("--config.train.num_steps=12")
  with pytest.raises(loop.TrainingDiverged, match=r"at step 7;.*checkpoint step 5"):
    loop.train(c, str(tmp_path), _poisoned_task(c, 7))


def test_a_nan_loss_is_skipped_when_configured(tmp_path):
  c = toy.config("--config.train.num_steps=10", "--config.train.nan_policy=skip",
                 "--config.checkpoint.every_steps=0")
  summary = loop.train(c, str(tmp_path), _poisoned_task(c, 4))
  assert summary["step"] == 10
  recs = {r["step"]: r for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "train"}
  assert recs[4]["finite"] == 0.0 and recs[5]["finite"] == 1.0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(summary["state"].params))


def test_metrics_hold_lr_grad_norm_throughput_mfu_and_gates_per_step(tmp_path):
  c = toy.config("--config.train.num_steps=6", "--config.log.tensorboard=True", "--config.eval.every_steps=3")
  loop.train(c, str(tmp_path), toy.task(c))
  recs = metrics_lib.read_metrics(str(tmp_path))
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(6))
  for key in ("loss", "lr", "grad_norm", "step_time", "tokens_per_s", "images_per_s", "mfu",
              "gate/xattn_0/attn_gate", "gate/xattn_0/ff_gate"):
    assert key in train[-1], key
  assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0.0  # linear warmup from 0
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  assert json.load(open(tmp_path / "config.json"))["train"]["num_steps"] == 6


def test_every_config_file_loads_with_a_docstring_and_valid_stages():
  import glob
  files = sorted(f for f in glob.glob(os.path.join(os.path.dirname(toy.CONFIG), "*.py"))
                 if not f.endswith("__init__.py"))
  assert {os.path.basename(f) for f in files} >= {"tiny.py", "staged.py"}
  for path in files:
    c = config_lib.load_config(path)
    stages = optimizer_lib.parse_stages(c.freeze.stages, families.of_config(c).components)
    assert stages[-1].start_step < c.train.num_steps, path
    assert "mmjax train --config" in open(path).read().split('"""')[1], path
  staged = optimizer_lib.parse_stages(config_lib.load_config(files[0] if "staged" in files[0] else
                                                             [f for f in files if "staged" in f][0]).freeze.stages,
                                      families.get("flamingo").components)
  assert staged[-1].trainable == frozenset({"resampler", "xattn"})
