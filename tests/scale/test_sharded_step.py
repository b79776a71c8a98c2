"""The real Flamingo train step sharded over 8 CPU devices equals the single-device step.

Loss and every updated parameter after 3 steps (float32, relative error <= 1e-5) for
data-parallel, FSDP and FSDP + tensor-parallel meshes, with the frozen vision tower on
the frozen-towers rules; and every parameter and Adam moment carries the spec its rules
give (the tree is walked, and each spec compared with flax's own resolver).
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from mmjax import sharding as sh
from mmjax.families.flamingo.model import param_label
from mmjax.train.sharded_step import shard_train_step
from tests.scale import small_flamingo

STEPS = 3
TRAINABLE = ("resampler", "xattn", "lm")  # the vision tower is frozen, as in the recipe


@pytest.fixture(scope="module")
def reference():
  boxed, state, mask, train_step = small_flamingo.build(trainable=TRAINABLE, gate_init=0.1)
  step = jax.jit(train_step)
  final, losses = state, []
  for i in range(STEPS):
    final, metrics = step(final, jax.tree.map(jax.numpy.asarray, small_flamingo.make_batch(100 + i)))
    losses.append(float(metrics["loss"]))
  return (boxed, state, mask, train_step), jax.device_get(final), losses


def _keys(path):
  return tuple(str(k.key) for k in path)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("mesh_config,rules", [
    ({"data": 8}, "data_parallel"),
    ({"fsdp": 8}, "fsdp"),
    ({"fsdp": 4, "tensor": 2}, "fsdp_tensor"),
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tensor", marks=pytest.mark.slow),
])
def test_sharded_step_matches_the_single_device_step(reference, mesh_config, rules):
  (boxed, state, mask, train_step), want_state, want_losses = reference
  mesh = sh.make_mesh(mesh_config)
  step = shard_train_step(train_step, jax.eval_shape(lambda: state),
                          jax.eval_shape(lambda: small_flamingo.make_batch(0)), boxed, mesh, sh.get_rules(rules),
                          trainable=mask, frozen_rules=sh.FROZEN_TOWERS)
  sharded = step.put_state(state)
  losses = []
  for i in range(STEPS):
    sharded, metrics = step(sharded, step.put_batch(small_flamingo.make_batch(100 + i)))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)

  got = jax.device_get(sharded.params)
  for (path, w), g, w0 in zip(jax.tree_util.tree_flatten_with_path(want_state.params)[0], jax.tree.leaves(got),
                              jax.tree.leaves(state.params)):
    # Relative to the parameter's scale, so entries near zero are judged fairly.
    err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-12)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)
  kernel = ("decoder", "layers_0", "mlp", "gate_proj", "kernel")
  moved = np.max(np.abs(_get(want_state.params, kernel) - _get(state.params, kernel)))
  assert moved > 1e-3 * np.max(np.abs(_get(state.params, kernel))), "training should move the weights"

  # Walk the tree: params, mu and nu carry the spec of their rules; frozen ones have no moments.
  adam = sharded.opt_state.inner_states["train"].inner_state[1]
  checked = 0
  for path, logical in jax.tree_util.tree_flatten_with_path(
      nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
    keys = _keys(path)
    frozen = param_label(list(keys)) not in TRAINABLE
    expected = nn.logical_to_mesh_axes(tuple(logical), sh.FROZEN_TOWERS if frozen else sh.get_rules(rules))
    assert _get(sharded.params, keys).sharding.spec == expected, (keys, expected)
    if frozen:
      assert isinstance(_get(adam.mu, keys), optax.MaskedNode)
    else:
      assert _get(adam.mu, keys).sharding.spec == expected and _get(adam.nu, keys).sharding.spec == expected
    checked += 1
  assert checked == len(jax.tree.leaves(state.params))
  if rules != "data_parallel":
    w = _get(sharded.params, kernel)
    assert w.addressable_shards[0].data.size < w.size, "FSDP must split the weights"
