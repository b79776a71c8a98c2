"""Where a decoder's layers and its inserted modules sit, unrolled or scanned, and the exact
conversion between the two parameter layouts.

An *insert* (:class:`Insert`) is a module a model family runs just before some of the LM's
layers: Flamingo's gated cross-attention before layer i when (i + 1) % n == 0 (open_flamingo's
``FlamingoLMMixin.init_flamingo`` placement); later a visual expert or an adapter would be
placed the same way. A decoder has at most one kind of insert.

Unrolled layout: ``layers_{i}`` for every LM layer, ``{name}_{i}`` for the insert before LM
layer i.

Scanned layout (``DecoderConfig.scan_layers``): with n = ``insert.every`` (n = 0, or no
insert, counts as blocks of one plain layer) the decoder is num_blocks = depth // n *blocks*
of n LM layers, the insert before each block's last layer (LM layer g*n + n-1: the same
placement), then depth % n remainder layers without insert, unscanned:

- ``blocks`` {``layers_{j}`` (j < n; LM layer g*n + j of block g), ``{name}`` (the insert of
  block g)}: every leaf has a leading axis of size num_blocks (logical name ``layers``);
- ``layers_{i}`` for the remainder i >= num_blocks*n, as unrolled;
- everything else (``embed``, ``norm``, ``lm_head``) as unrolled.

:func:`stack_layers` / :func:`unstack_layers` convert between the two, exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Insert:
  """A module run before every ``every``-th LM layer (layers every-1, 2*every-1, ...).

  ``module(*args)`` builds one; it is called as ``module(x, side, state) -> x`` with the
  decoder's hidden states x [B, T, D], the call's ``side`` inputs (the same for every
  insert, e.g. the image index and media latents) and its own ``state`` (what its
  ``prepare(source)`` method computed once, e.g. media keys/values; None to compute from
  ``side``). Parameters are named ``{name}_{i}`` (unrolled) or ``blocks/{name}`` (scanned).
  """
  name: str
  every: int
  module: Any = None  # a flax Module class (None: only the layout is needed)
  args: tuple = ()

  def __post_init__(self):
    if self.every < 0:
      raise ValueError(f"insert {self.name!r} every={self.every}; expected >= 0 (0: no insert)")


def insert_layer_indices(depth: int, insert: Insert | None) -> tuple[int, ...]:
  """The LM layers an insert precedes: i with (i + 1) % every == 0."""
  if insert is None or insert.every == 0:
    return ()
  return tuple(i for i in range(depth) if (i + 1) % insert.every == 0)


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  """How ``scan_layers`` splits the decoder: ``num_blocks`` blocks of ``block_size`` LM
  layers (the insert before each block's last layer when ``with_insert``), then the
  unscanned ``remainder`` layers."""
  block_size: int
  num_blocks: int
  with_insert: bool
  remainder: tuple[int, ...]


def scan_plan(depth: int, insert: Insert | None = None) -> ScanPlan:
  """The block structure of the scanned layout (see the module docstring)."""
  n = 0 if insert is None else insert.every
  size = n if n > 0 else 1
  blocks = depth // size
  return ScanPlan(block_size=size, num_blocks=blocks, with_insert=n > 0,
                  remainder=tuple(range(blocks * size, depth)))


def stack(trees: Sequence[Any]) -> Any:
  """Leaf-wise stack on a new leading axis (numpy in, numpy out; else jax)."""
  def one(*xs):
    if all(isinstance(x, np.ndarray) for x in xs):
      return np.stack(xs)
    return jnp.stack(xs)
  return jax.tree.map(one, *trees)


def _decoder_subtree(params: Any, rebuild):
  """Applies ``rebuild`` to the decoder tree inside ``params`` ({"params": ...} and/or
  {"decoder": ...} levels allowed, as in a multimodal model's tree)."""
  if isinstance(params, Mapping) and "params" in params:
    return {**params, "params": _decoder_subtree(params["params"], rebuild)}
  if isinstance(params, Mapping) and "decoder" in params:
    return {**params, "decoder": rebuild(params["decoder"])}
  return rebuild(params)


def stack_layers(params: Any, depth: int, insert: Insert | None = None) -> Any:
  """An unrolled decoder param tree -> the scanned layout (module docstring).

  Args:
    params: the decoder's params (``layers_{i}``, ``{insert.name}_{i}``, ...), or a tree
      holding them under "params" and/or "decoder"; plain arrays (numpy stays numpy).
    depth: the number of LM layers.
    insert: the decoder's insert, or None.
  """
  plan = scan_plan(depth, insert)
  indices = insert_layer_indices(depth, insert)
  def rebuild(tree):
    expect = {f"layers_{i}" for i in range(depth)} | {f"{insert.name}_{i}" for i in indices}
    missing = sorted(expect - set(tree))
    if missing or "blocks" in tree:
      raise ValueError(f"stack_layers expects an unrolled decoder tree; missing {missing}"
                       f"{' and it already has blocks' if 'blocks' in tree else ''}")
    out = {k: v for k, v in tree.items() if k not in expect}
    size = plan.block_size
    if plan.num_blocks:
      blocks = {f"layers_{j}": stack([tree[f"layers_{g * size + j}"] for g in range(plan.num_blocks)])
                for j in range(size)}
      if plan.with_insert:
        blocks[insert.name] = stack([tree[f"{insert.name}_{g * size + size - 1}"]
                                     for g in range(plan.num_blocks)])
      out["blocks"] = blocks
    out.update({f"layers_{i}": tree[f"layers_{i}"] for i in plan.remainder})
    return out
  return _decoder_subtree(params, rebuild)


def unstack_layers(params: Any, depth: int, insert: Insert | None = None) -> Any:
  """The scanned layout -> the unrolled decoder param tree (inverse of :func:`stack_layers`,
  exact)."""
  plan = scan_plan(depth, insert)
  def rebuild(tree):
    if plan.num_blocks and "blocks" not in tree:
      raise ValueError(f"unstack_layers expects a scanned decoder tree with 'blocks'; got keys {sorted(tree)}")
    out = {k: v for k, v in tree.items() if k != "blocks"}
    size = plan.block_size
    for g in range(plan.num_blocks):
      take = lambda t: jax.tree.map(lambda x: x[g], t)
      for j in range(size):
        out[f"layers_{g * size + j}"] = take(tree["blocks"][f"layers_{j}"])
      if plan.with_insert:
        out[f"{insert.name}_{g * size + size - 1}"] = take(tree["blocks"][insert.name])
    return out
  return _decoder_subtree(params, rebuild)
