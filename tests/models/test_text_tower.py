"""TextTower without a reference model: its pooling rules, causality, masking and validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import text_tower
from mmjax.models.text_tower import TEXT_TINY, TextTower, TextTowerConfig, pool_positions

EOS = TEXT_TINY.eos_token_id


def _ids() -> jnp.ndarray:
  return jnp.asarray([[5, 6, 7, EOS, 0, 0], [5, EOS, EOS, EOS, EOS, EOS]], jnp.int32)


def _features(config, ids, mask=None):
  model = TextTower(config)
  params = model.init(jax.random.key(0), ids)["params"]
  return model.apply({"params": params}, ids, mask, method=TextTower.features)


def test_eos_pooling_picks_the_first_end_of_text_token():
  np.testing.assert_array_equal(pool_positions(_ids(), TEXT_TINY), [3, 1])


def test_legacy_pooling_picks_the_first_highest_id():
  config = dataclasses.replace(TEXT_TINY, eos_token_id=None)
  ids = jnp.asarray([[5, 90, 7, 3], [100, 2, 100, 1]], jnp.int32)
  np.testing.assert_array_equal(pool_positions(ids, config), [1, 0])


def test_last_pooling_picks_the_last_position_whatever_it_holds():
  config = dataclasses.replace(TEXT_TINY, pooling="last")
  np.testing.assert_array_equal(pool_positions(_ids(), config), [5, 5])


def test_causal_tower_states_do_not_depend_on_later_tokens():
  ids = _ids()
  changed = ids.at[:, 4:].set(42)
  a, b = _features(TEXT_TINY, ids), _features(TEXT_TINY, changed)
  np.testing.assert_allclose(a["tokens"][:, :4], b["tokens"][:, :4], atol=1e-6)
  np.testing.assert_allclose(a["pooled"][0], b["pooled"][0], atol=1e-6)


def test_bidirectional_tower_with_a_mask_ignores_what_padded_positions_hold():
  config = dataclasses.replace(TEXT_TINY, causal=False)
  ids = _ids()[:1]
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0]])
  a = _features(config, ids, mask)
  b = _features(config, ids.at[:, 4:].set(42), mask)
  np.testing.assert_allclose(a["tokens"][:, :4], b["tokens"][:, :4], atol=1e-6)
  unmasked = _features(config, ids.at[:, 4:].set(42))
  assert np.max(np.abs(unmasked["tokens"][:, :4] - a["tokens"][:, :4])) > 1e-4


def test_output_shapes_and_no_projection_gives_the_width():
  out = _features(TEXT_TINY, _ids())
  assert out["tokens"].shape == (2, 6, TEXT_TINY.width)
  assert out["pooled"].shape == (2, TEXT_TINY.projection_dim)
  bare = _features(dataclasses.replace(TEXT_TINY, projection_dim=None), _ids())
  assert bare["pooled"].shape == (2, TEXT_TINY.width)


def test_call_returns_pooled_and_optionally_tokens():
  model = TextTower(TEXT_TINY)
  params = model.init(jax.random.key(0), _ids())["params"]
  pooled, tokens = model.apply({"params": params}, _ids(), return_tokens=True)
  np.testing.assert_array_equal(model.apply({"params": params}, _ids()), pooled)
  assert tokens.shape == (2, 6, TEXT_TINY.width)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=5), "not a multiple of num_heads"),
    (dict(pooling="mean"), "pooling='mean'"),
    (dict(eos_token_id=128), "outside the vocabulary"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(projection_dim=None, projection_bias=True), "needs a projection"),
])
def test_inconsistent_configs_are_refused_naming_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TEXT_TINY, **changes).validate()


def test_text_longer_than_the_position_table_is_refused():
  ids = jnp.zeros((1, TEXT_TINY.max_length + 1), jnp.int32)
  with pytest.raises(ValueError, match="exceeds max_length=16"):
    _features(TEXT_TINY, ids)


def test_parameters_are_float32_with_logical_axes_under_bfloat16_compute():
  config = dataclasses.replace(TEXT_TINY, dtype="bfloat16")
  model = TextTower(config)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert all(hasattr(x, "names") for x in boxed)
  assert {x.value.dtype for x in boxed} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 4), jnp.int32)).dtype == jnp.bfloat16
