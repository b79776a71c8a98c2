"""The train step jitted over a mesh: in/out shardings from the logical rules.

`shard_train_step` takes the trainer's pure `train_step(state, batch) -> (state, metrics)`
(`mmjax.train.step.make_train_step`), the abstract train state and batch, and the
boxed abstract model variables (their `nn.Partitioned` names), and returns a
`ShardedStep`: the jitted step, the shardings of the state and batch, and `put_state` /
`put_batch` to place host values on the mesh. The step is traced inside
`mmjax.sharding.activation_rules`, so the models' `nn.with_logical_constraint`s are
active; parameters, their optimizer moments and the updated state keep the shardings
the rules give (frozen parameters may follow their own rule set, and carry no optimizer
state: the trainer stores `optax.MaskedNode` for them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import sharding as sh


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """A train step jitted for a mesh, with the shardings it reads and writes."""
  mesh: Mesh
  rules: sh.Rules
  jitted: Any
  state_shardings: Any
  batch_shardings: Any
  param_shardings: Any

  def __call__(self, state, batch):
    with sh.activation_rules(self.mesh, self.rules):
      return self.jitted(state, batch)

  def lower(self, state, batch):
    """``jax.jit(...).lower`` under the activation rules (for AOT compilation)."""
    with sh.activation_rules(self.mesh, self.rules):
      return self.jitted.lower(state, batch)

  def put_state(self, state):
    """Places a host (or differently sharded) state onto the mesh."""
    return jax.device_put(state, self.state_shardings)

  def put_batch(self, local_batch):
    """This process's rows of a batch -> global arrays sharded over the batch axes."""
    return sh.global_batch(local_batch, self.mesh, self.rules)


def state_shardings(abstract_state, params_of: Callable[[Any], Any], boxed_params, mesh: Mesh,
                    rules: sh.Rules, *, trainable=None, frozen_rules: sh.Rules | None = None):
  """Shardings for a whole train state from the boxed parameter tree.

  Args:
    abstract_state: the train state (``jax.eval_shape`` of its constructor, or real).
    params_of: picks the parameter tree out of a state (``lambda s: s.params``).
    boxed_params: the same parameter tree with ``nn.Partitioned`` boxes (from
      ``jax.eval_shape(model.init, ...)``).
    mesh, rules: the mesh and rule set of trainable parameters.
    trainable: optional pytree of bools over the parameters (True = trainable), as the
      trainer's freeze mask; frozen ones use ``frozen_rules``.
    frozen_rules: rules of frozen parameters (default ``rules``).

  Returns:
    (state shardings, param shardings), both plain pytrees of ``NamedSharding``.
  """
  frozen = None
  if trainable is not None and frozen_rules is not None:
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    frozen_paths = {sh.key_names(path) for path, t in flat if not t}
    frozen = lambda keys: keys in frozen_paths
  pshard = sh.param_shardings(boxed_params, mesh, rules, frozen=frozen, frozen_rules=frozen_rules)
  params = params_of(abstract_state)
  return sh.like_params(abstract_state, params, pshard, mesh), pshard


def shard_train_step(train_step: Callable, abstract_state, abstract_batch, boxed_params, mesh: Mesh,
                     rules: sh.Rules, *, params_of: Callable[[Any], Any] = lambda s: s.params,
                     trainable=None, frozen_rules: sh.Rules | None = None,
                     donate: bool = True) -> ShardedStep:
  """Jits ``train_step`` over ``mesh`` with shardings from ``rules``.

  The updated state comes out with the same shardings as it went in (so the step can be
  called in a loop with no resharding), metrics replicated.
  """
  sshard, pshard = state_shardings(abstract_state, params_of, boxed_params, mesh, rules,
                                   trainable=trainable, frozen_rules=frozen_rules)
  bshard = sh.batch_shardings(abstract_batch, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(train_step, in_shardings=(sshard, bshard), out_shardings=(sshard, replicated),
                   donate_argnums=(0,) if donate else ())
  return ShardedStep(mesh=mesh, rules=rules, jitted=jitted, state_shardings=sshard,
                     batch_shardings=bshard, param_shardings=pshard)
