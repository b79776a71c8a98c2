"""The Flamingo recipe (`mmjax recipe flamingo/staged`): an `lm` run and a `contrastive` run
adopted, then frozen, under a Flamingo that trains only its resampler and cross-attention."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax import families
from mmjax.data import builders
from mmjax.train import config as config_lib
from mmjax.train import evaluate
from mmjax.train import pretrained
from mmjax.train import recipe

# Every stage small: a field goes to the stages whose config has it (lm has no images).
SMALL = ["--config.data.batch_size=4", "--config.train.num_steps=3", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=3", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.model.decoder.depth=2", "--config.mesh.num_devices=1",
         "--config.data.image_size=16", "--config.model.vision.image_size=16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("recipe_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.fixture(scope="module")
def recipe_run(data_dir, tmp_path_factory):
  """(workdir root, what the recipe printed) of the whole recipe on tiny overrides."""
  root = str(tmp_path_factory.mktemp("recipe"))
  capture = pytest.MonkeyPatch()
  printed = []
  real_print = print

  def tee(*args, **kwargs):
    if kwargs.get("file") is None:
      printed.append(" ".join(str(a) for a in args))
    real_print(*args, **kwargs)

  capture.setattr("builtins.print", tee)
  try:
    rc = recipe.main(["flamingo/staged", f"--workdir-root={root}", f"--config.data.dir={data_dir}", *SMALL])
  finally:
    capture.undo()
  assert rc == 0
  return root, printed


def _overrides(data_dir, *more):
  return [f"--config.data.dir={data_dir}", "--config.model.decoder.depth=2", "--config.data.image_size=16",
          "--config.model.vision.image_size=16", *more]


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow  # the recipe's three runs: minutes on 2 CPU cores
def test_the_recipe_trains_lm_then_clip_then_flamingo_over_both_and_evaluates_it(recipe_run):
  root, printed = recipe_run
  stages = [line for line in printed if line.startswith("mmjax recipe: stage")]
  assert [s.split("--workdir=")[1].split()[0] for s in stages] == [
      os.path.join(root, n) for n in ("lm-tiny", "clip-tiny", "flamingo-staged")]
  flamingo = config_lib.read_resolved(os.path.join(root, "flamingo-staged"))
  assert flamingo.init.from_workdir == f"{root}/lm-tiny,{root}/clip-tiny"
  assert flamingo.freeze.stages == "0:resampler,xattn"
  assert [config_lib.read_resolved(os.path.join(root, n)).model.family
          for n in ("lm-tiny", "clip-tiny")] == ["lm", "contrastive"]
  res = json.load(open(os.path.join(root, "flamingo-staged", "eval.json")))
  assert res["step"] == 3 and np.isfinite(res["val_loss"]) and "qa_zero_shot" in res


@pytest.mark.slow  # the recipe's three runs: minutes on 2 CPU cores
def test_a_finished_recipe_rerun_trains_nothing(recipe_run, data_dir, capsys):
  root, _ = recipe_run
  assert recipe.main(["flamingo/staged", f"--workdir-root={root}", "--no-eval", f"--config.data.dir={data_dir}",
                      *SMALL]) == 0
  out = capsys.readouterr().out
  assert out.count("done at step 3 (started at 3)") == 3


@pytest.mark.slow  # the recipe's three runs: minutes on 2 CPU cores
def test_frozen_vision_tower_and_lm_are_bitwise_the_adopted_ones_after_the_flamingo_stage(recipe_run):
  root, _ = recipe_run
  *_, lm_params = evaluate.load(os.path.join(root, "lm-tiny"))
  *_, clip_params = evaluate.load(os.path.join(root, "clip-tiny"))
  *_, flamingo_params = evaluate.load(os.path.join(root, "flamingo-staged"))
  assert _leaves(flamingo_params["vision"]).keys() == _leaves(clip_params["vision"]).keys()
  for key, leaf in _leaves(clip_params["vision"]).items():
    np.testing.assert_array_equal(_leaves(flamingo_params["vision"])[key], leaf, err_msg=key)
  decoder = _leaves(flamingo_params["decoder"])
  for key, leaf in _leaves(lm_params["decoder"]).items():
    np.testing.assert_array_equal(decoder[key], leaf, err_msg=key)
  # What is not frozen trained: the resampler moved from its init.
  config = config_lib.read_resolved(os.path.join(root, "flamingo-staged"))
  task = families.of_config(config).task(config, os.path.join(root, "flamingo-staged"))
  fresh = _leaves(task.init_params(jax.random.key(int(config.seed)))["resampler"])
  assert any(not np.array_equal(v, fresh[k]) for k, v in _leaves(flamingo_params["resampler"]).items())


@pytest.mark.slow  # the recipe's three runs: minutes on 2 CPU cores
def test_each_run_of_from_workdir_is_adopted_in_turn_with_its_family(recipe_run, data_dir):
  root, _ = recipe_run
  *_, lm_params = evaluate.load(os.path.join(root, "lm-tiny"))
  *_, clip_params = evaluate.load(os.path.join(root, "clip-tiny"))
  config = config_lib.load_config("flamingo/staged", _overrides(
      data_dir, f"--config.init.from_workdir={root}/lm-tiny, {root}/clip-tiny"))
  assert pretrained.sources(config) == [f"{root}/lm-tiny", f"{root}/clip-tiny"]
  task = families.of_config(config).task(config, None)
  fresh = task.init_params(jax.random.key(0))
  params = pretrained.adopt(config, task, fresh)
  for mine, theirs in ((params["vision"], clip_params["vision"]), (params["decoder"], lm_params["decoder"])):
    got = _leaves(mine)
    for key, leaf in _leaves(theirs).items():
      np.testing.assert_array_equal(got[key], leaf, err_msg=key)
  # The resampler and the cross-attention keep their fresh init.
  for key, leaf in _leaves(fresh["resampler"]).items():
    np.testing.assert_array_equal(_leaves(params["resampler"])[key], leaf, err_msg=key)
  # One work directory alone adopts only its own part.
  config = config_lib.load_config("flamingo/staged", _overrides(data_dir, f"--config.init.from_workdir={root}/clip-tiny"))
  only_vision = pretrained.adopt(config, task, fresh)
  for key, leaf in _leaves(fresh["decoder"]).items():
    np.testing.assert_array_equal(_leaves(only_vision["decoder"])[key], leaf, err_msg=key)


@pytest.mark.slow  # the recipe's three runs: minutes on 2 CPU cores
@pytest.mark.parametrize("override, message", [
    ("--config.model.vision.depth=3", r"vision tower does not fit this Flamingo's: missing \[.*layers_2"),
    ("--config.model.vision.mlp_dim=32", r"vision tower has other shapes at .*mlp.* vs "),
])
def test_a_vision_tower_of_another_shape_is_refused_naming_what_differs(recipe_run, data_dir, override, message):
  root, _ = recipe_run
  config = config_lib.load_config("flamingo/staged", _overrides(
      data_dir, override, f"--config.init.from_workdir={root}/clip-tiny"))
  task = families.of_config(config).task(config, None)
  with pytest.raises(ValueError, match=message):
    pretrained.adopt(config, task, task.init_params(jax.random.key(0)))


def _flamingo_task(data_dir, *more):
  config = config_lib.load_config("flamingo/staged", _overrides(data_dir, "--config.init.from_workdir=", *more))
  return families.of_config(config).task(config, None)


def test_a_contrastive_runs_vision_tower_is_adopted_bitwise_and_nothing_else(data_dir):
  task = _flamingo_task(data_dir)
  # Random values of the init's shapes stand for a fresh init (no init to run).
  shapes = jax.eval_shape(task.init_params, jax.random.key(0))
  rng = np.random.default_rng(0)
  draw = lambda tree: jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), tree)
  fresh = draw(shapes)
  # A contrastive run's parameters: its tower (another draw of the same shapes) beside a
  # text tower and projection that Flamingo does not use.
  tower = draw(shapes["vision"])
  other = {"vision": tower, "text": {"x": np.ones(3)}, "visual_projection": {"kernel": np.ones((2, 2))}}
  params = task.adopt_params(fresh, "contrastive", other)
  assert _leaves(params["vision"]).keys() == _leaves(tower).keys()
  for key, leaf in _leaves(tower).items():
    np.testing.assert_array_equal(_leaves(params["vision"])[key], leaf, err_msg=key)
  assert set(params) == set(fresh)
  for part in set(fresh) - {"vision"}:
    for key, leaf in _leaves(fresh[part]).items():
      np.testing.assert_array_equal(_leaves(params[part])[key], leaf, err_msg=key)


@pytest.mark.parametrize("override, message", [
    ("--config.model.vision.depth=3", r"vision tower does not fit this Flamingo's: missing \[.*layers_2"),
    ("--config.model.vision.mlp_dim=32", r"vision tower has other shapes at .*mlp.* vs "),
])
def test_a_contrastive_tower_of_another_shape_is_refused_naming_what_differs(data_dir, override, message):
  task = _flamingo_task(data_dir)
  # Shapes are all the refusal reads: no values needed.
  other = {"vision": jax.eval_shape(_flamingo_task(data_dir, override).init_params, jax.random.key(1))["vision"]}
  fresh = jax.eval_shape(task.init_params, jax.random.key(0))
  with pytest.raises(ValueError, match=message):
    task.adopt_params(fresh, "contrastive", other)
  with pytest.raises(ValueError, match="an 'lm' run's or a 'contrastive' run's checkpoint; got one of family 'vlm'"):
    task.adopt_params(fresh, "vlm", other)


def test_an_override_no_stage_has_is_refused_naming_it():
  with pytest.raises(ValueError, match=r"overrides \['--config.model.nope=1'\] name fields that no stage"):
    recipe.stage_commands("flamingo/staged", "work", ["--config.model.nope=1"])
  with pytest.raises(ValueError, match=r"config 'flamingo/tiny' names no runs to start from \(init.from_configs is empty\)"):
    recipe.stage_commands("flamingo/tiny", "work", [])
  with pytest.raises(ValueError, match=r"names 2 work directories in init.from_workdir .* but 1 configs in init.from_configs"):
    recipe.stages("flamingo/staged", ["--config.init.from_configs=lm/tiny"])


def test_the_recipe_builds_the_embedded_dataset_only_where_there_is_none(data_dir, tmp_path, monkeypatch):
  from mmjax import data as data_lib
  built = []
  monkeypatch.setattr(data_lib, "build_embedded", lambda d, **kwargs: built.append(d))
  for d in (data_dir, str(tmp_path / "fresh")):
    recipe._build_missing_data(recipe.stage_commands("flamingo/staged", str(tmp_path), [f"--config.data.dir={d}"])[0])
  assert built == [str(tmp_path / "fresh")]
