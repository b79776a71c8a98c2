"""The family interface: one registry that the trainer, evaluator and `mmjax compile` look a
family up in; bad names are errors listing what is valid; a family's own loss drives the
step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import families
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import metrics as metrics_lib
from tests.train import toy


def test_every_registered_family_is_complete_and_its_abstract_model_has_only_its_components():
  assert families.names() == sorted(families.REGISTRY)
  for name, family in families.REGISTRY.items():
    assert family.name == name
    optional = {"override", "upgrade_model", "decoding"}  # a family may do without these
    for field in dataclasses.fields(family):
      if field.name not in optional:
        assert getattr(family, field.name) is not None, (name, field.name)
    presets = family.presets()
    assert presets and all(isinstance(c, family.config_class) for c in presets.values())
  for shipped, family in (("flamingo/tiny", "flamingo"), ("lm/tiny", "lm"), ("llava/tiny_stage2", "llava")):
    config = config_lib.load_config(shipped)
    assert families.of_config(config).name == family
    model = families.of_config(config).abstract(config)
    labels = model.param_labels(jax.eval_shape(model.init_params, jax.random.key(0)))
    assert set(jax.tree.leaves(labels)) == set(families.get(family).components)
    batch = model.abstract_batch(2, 16, 1)
    assert batch["input_ids"].shape == (2, 16)
    assert ("images" in batch) == (family != "lm")


def test_an_unknown_family_is_an_error_listing_the_registered_ones(capsys, tmp_path):
  with pytest.raises(ValueError, match=r"model family 'cogvlm' is not registered; expected one of "
                                      r"\['blip2', 'contrastive', 'flamingo'"):
    families.get("cogvlm")
  code = cli.train_main([f"--config={cli.TINY}", f"--workdir={tmp_path}", "--config.model.family=cogvlm"])
  assert code == 2
  assert "model family 'cogvlm' is not registered" in capsys.readouterr().err


def test_a_config_without_a_family_is_the_default_one():
  config = config_lib.load_config("flamingo/tiny")
  with config.unlocked():
    del config.model["family"]
  assert families.of_config(config) is families.get(families.DEFAULT)


def test_freeze_stages_naming_a_component_the_family_lacks_lists_the_valid_ones(tmp_path):
  c = toy.config("--config.freeze.stages=0:projector,lm")
  task = toy.task(c)
  task.components = toy.COMPONENTS
  with pytest.raises(ValueError, match=r"names \['projector'\], which the model does not have; expected "
                                       r"components from \('vision', 'resampler', 'xattn', 'lm'\)"):
    loop.train(c, str(tmp_path), task)


def test_a_familys_own_loss_drives_the_step_and_its_named_metrics_are_reported(tmp_path):
  c = toy.config("--config.train.num_steps=3", "--config.checkpoint.every_steps=0")
  task = toy.task(c)

  def loss_fn(params, batch, rng):
    # Squared error of the last position's logits against a one-hot target, per example,
    # and a named metric (the count of examples whose argmax is right).
    logits = task.apply_fn(params, batch, rng)[:, -1].astype(jnp.float32)
    target = jax.nn.one_hot(batch["targets"][:, -1], logits.shape[-1])
    per_example = jnp.sum((logits - target) ** 2, axis=-1)
    right = jnp.sum(jnp.argmax(logits, -1) == batch["targets"][:, -1]).astype(jnp.float32)
    return jnp.sum(per_example), jnp.float32(per_example.shape[0]), {"accuracy": right}

  task.loss_fn = loss_fn
  loop.train(c, str(tmp_path), task)
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [0, 1, 2]
  # Step 0 runs on the initial parameters: its loss is this loss of them, not the NLL.
  params = jax.jit(task.init_params)(jax.random.key(int(c.seed)))
  batch = toy.make_batch(0, int(c.data.batch_size))
  total, count, extra = loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
  np.testing.assert_allclose(rows[0]["loss"], float(total / count), rtol=1e-5)
  np.testing.assert_allclose(rows[0]["accuracy"], float(extra["accuracy"] / count), rtol=1e-6)
  assert rows[0]["tokens"] == 8.0
