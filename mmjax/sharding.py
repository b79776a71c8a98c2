"""Logical axis names, and how they map onto a device mesh.

Every weight and activation in mmjax names its dimensions from this one vocabulary.
A rule set (an ordered list of ``(logical_name, mesh_axes)`` pairs, first match wins)
then says which mesh axis each name is split over; models never mention mesh axes.

Logical axes
------------
``batch``     examples in a batch (activations only).
``length``    text positions: tokens of the decoder, queries of a text cross-attention.
``embed``     the model width of a stream: the LM's hidden size, the vision tower's width,
              the resampler's width. Weights and activations alike.
``mlp``       the hidden width of a feed-forward block.
``heads``     attention (query) heads.
``kv_heads``  key/value heads of grouped-query attention (``heads`` is a multiple of it).
``kv``        the width of one head (head dim).
``vocab``     the vocabulary, of the embedding table and the output projection.
``images``    media items (images or videos) of one example.
``frames``    frames of one video (1 for still images).
``patches``   patch tokens of one image, out of the vision tower.
``latents``   the learned queries of a Perceiver Resampler (and its output tokens).
``queries``   the learned query tokens of a Q-Former (BLIP-2) and its query outputs.
``cache``     positions of a decode-time key/value cache.
``norm``      a normalisation scale or bias vector (never sharded by default).
``conv_in``   the input pixels of a patch-embedding convolution (patch x patch x channels),
              or the input channels of a convolutional stem's convolution.
``layers``    the stacked leading axis of scanned layers (``DecoderConfig.scan_layers``):
              one entry per scanned block. Never sharded: every rule set maps it to no
              mesh axis, since each scan step needs its whole block's weights.

Mesh axes
---------
``dcn``     slices of a multislice job, joined by the data-centre network (size 1 on
            one slice). Only batch-parallel work crosses it: gradients are all-reduced
            over it once per step, weights are never split over it.
``data``    pure data parallelism inside a slice: weights replicated.
``fsdp``    data parallelism with weights and optimizer state split (ZeRO-3): each
            weight is all-gathered where it is used, gradients are reduce-scattered.
``tensor``  tensor (Megatron) parallelism: heads, MLP hidden units and the vocabulary
            split, with activations exchanged inside each block.

Rule sets
---------
A rule set is an ordered tuple of ``(logical_name, mesh_axes)`` pairs. For each array
the rules are walked in order; a rule assigns its mesh axes to the array dimension of
that name if the dimension is still free, the mesh axes are not used by another
dimension of the same array, and the dimension's size divides evenly (first match
wins; a name may appear in several rules, the later ones being fallbacks). Names no
rule assigns stay replicated. ``RULE_SETS`` holds the named sets: ``data_parallel``,
``fsdp``, ``fsdp_tensor``, and ``frozen_towers`` (for the frozen vision tower and LM,
which carry no optimizer state and receive no gradient, so they are split as finely
as possible and all-gathered where used). The same rules constrain activations
(``nn.with_logical_constraint``) inside ``activation_rules``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from flax import linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

LOGICAL_AXES: tuple[str, ...] = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "kv",
    "vocab",
    "images",
    "frames",
    "patches",
    "latents",
    "queries",
    "cache",
    "norm",
    "conv_in",
    "layers",
)


def check_logical_axes(names: tuple[str | None, ...]) -> tuple[str | None, ...]:
  """Returns ``names`` unchanged, or raises if one is not in the vocabulary."""
  for name in names:
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"logical axis {name!r} is not in the vocabulary {LOGICAL_AXES}")
  return names


# --------------------------------------------------------------------------- rule sets

MESH_AXES: tuple[str, ...] = ("dcn", "data", "fsdp", "tensor")

Rule = tuple[str, "str | tuple[str, ...] | None"]
Rules = tuple[Rule, ...]

# Every batch-parallel axis; the batch is split over all of them.
_BATCH = ("dcn", "data", "fsdp")

# The rule sets are composed from these pieces (first match wins, so order matters): a new
# logical axis is added to the piece it belongs to, once.
_EVERY_SET: Rules = (
    ("layers", None),  # scanned layers' stacked axis: never sharded
    ("batch", _BATCH),
)
# Megatron-style splits of the heads and hidden widths over `tensor`.
_TENSOR: Rules = (
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# Weights split over `fsdp`: the embed dimension, with fallbacks for weights that have no
# (divisible) embed dimension.
_FSDP_WEIGHTS: Rules = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("vocab", "fsdp"),
    ("latents", "fsdp"),
    ("queries", "fsdp"),
)

DATA_PARALLEL: Rules = _EVERY_SET
FSDP: Rules = _EVERY_SET + _FSDP_WEIGHTS
FSDP_TENSOR: Rules = _EVERY_SET + _TENSOR + _FSDP_WEIGHTS

# Frozen weights have no optimizer state and get no gradient reduce-scatter, so the
# only cost of splitting them further is the all-gather where they are used: split
# them over every in-slice axis (never over dcn, whose bandwidth is far lower).
FROZEN_TOWERS: Rules = _EVERY_SET + _TENSOR + (
    ("embed", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", ("data", "fsdp")),
    ("mlp", "fsdp"),
    ("heads", ("data", "fsdp")),
    ("vocab", ("data", "fsdp")),
    ("latents", "fsdp"),
    ("queries", "fsdp"),
)

RULE_SETS: dict[str, Rules] = {
    "data_parallel": DATA_PARALLEL,
    "fsdp": FSDP,
    "fsdp_tensor": FSDP_TENSOR,
    "frozen_towers": FROZEN_TOWERS,
}


def get_rules(rules: "str | Sequence[Sequence[Any]]") -> Rules:
  """A rule set by name (``RULE_SETS``) or an explicit list of pairs, validated."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"rule set {rules!r} is not one of {sorted(RULE_SETS)}")
    return RULE_SETS[rules]
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"rule {rule!r} should be a (logical_name, mesh_axes) pair")
    name, axes = rule
    check_logical_axes((name,))
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"rule {rule!r} names mesh axis {axis!r}; expected one of {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def _axes_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return axes if isinstance(axes, tuple) else (axes,)


def logical_to_mesh_spec(
    names: "Sequence[str | None]",
    rules: Rules,
    shape: "Sequence[int] | None" = None,
    mesh: "jax.sharding.Mesh | jax.sharding.AbstractMesh | None" = None,
) -> PartitionSpec:
  """The mesh ``PartitionSpec`` of an array whose dimensions have logical ``names``.

  First match wins (see the module docstring). With ``shape`` and ``mesh``, a rule is
  skipped for a dimension its mesh axes do not divide, so that a later rule (or
  replication) takes over instead of an uneven split. Mesh axes of size 1 are kept in
  the spec (they cost nothing), which keeps specs the same across mesh shapes.
  """
  names = tuple(names)
  check_logical_axes(names)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"array of shape {tuple(shape)} has {len(names)} logical names {names}")
  sizes = dict(mesh.shape) if mesh is not None else {}
  result: list[Any] = [None] * len(names)
  assigned = [False] * len(names)
  used: set[str] = set()
  for rule_name, rule_axes in rules:
    if rule_name not in names:
      continue
    pos = names.index(rule_name)
    axes = _axes_tuple(rule_axes)
    if assigned[pos] or used.intersection(axes):
      continue
    if mesh is not None:
      axes = tuple(a for a in axes if a in sizes)
    if shape is not None and mesh is not None:
      split = math.prod(sizes[a] for a in axes)
      if shape[pos] % split:
        continue
    assigned[pos] = True
    used.update(axes)
    result[pos] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*result)


# --------------------------------------------------------------------------- meshes


def mesh_shape(
    config: "Mapping[str, int]", num_devices: int
) -> dict[str, int]:
  """Resolves ``{'data','fsdp','tensor'[, 'slices']}`` (one may be -1) to a mesh shape.

  Returns sizes for ``MESH_AXES``: ``dcn`` = slices, and the three in-slice axes whose
  product is the devices of one slice.
  """
  slices = int(config.get("slices", 1) or 1)
  if slices < 1 or num_devices % slices:
    raise ValueError(f"slices={slices} does not divide the {num_devices} devices")
  per_slice = num_devices // slices
  sizes = {axis: int(config.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1, got {free}")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh {sizes}: sizes must be positive or -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if per_slice % fixed:
      raise ValueError(f"mesh {sizes}: {fixed} does not divide {per_slice} devices per slice")
    sizes[free[0]] = per_slice // fixed
  if math.prod(sizes.values()) != per_slice:
    raise ValueError(
        f"mesh {sizes} has {math.prod(sizes.values())} devices per slice;"
        f" expected {per_slice} ({num_devices} devices / {slices} slices)")
  return {"dcn": slices, **sizes}


def make_mesh(
    config: "Mapping[str, int]", devices: "Sequence[Any] | None" = None
) -> Mesh:
  """A ``Mesh`` over ``MESH_AXES`` from a mesh config (see ``mesh_shape``).

  One slice: ``mesh_utils.create_device_mesh`` lays the axes onto the physical ICI
  torus. Several slices: ``create_hybrid_device_mesh`` puts ``dcn`` across slices
  (devices' ``slice_index``) and the other axes inside each.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  ici = (1, shape["data"], shape["fsdp"], shape["tensor"])
  if shape["dcn"] > 1:
    by_process = not hasattr(devices[0], "slice_index")
    array = mesh_utils.create_hybrid_device_mesh(
        ici, (shape["dcn"], 1, 1, 1), devices, process_is_granule=by_process,
        allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices).reshape(ici)
  return Mesh(array, MESH_AXES)


# --------------------------------------------------------------------------- shardings


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def key_names(path) -> tuple[str, ...]:
  """The dict keys / attribute names of a pytree path (indices dropped)."""
  out = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      out.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      out.append(key.name)
  return tuple(out)


def logical_specs(abstract_variables: Any) -> Any:
  """The tree of logical ``PartitionSpec``s of boxed (``nn.Partitioned``) variables.

  Leaves created without ``with_logical_partitioning`` get ``PartitionSpec()``
  with the array's rank of ``None``s.
  """
  def leaf_spec(x):
    if isinstance(x, nn.Partitioned):
      return PartitionSpec(*x.names)
    return PartitionSpec(*([None] * len(getattr(x, "shape", ()))))
  return jax.tree_util.tree_map(
      leaf_spec, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(
    abstract_variables: Any,
    mesh: Mesh,
    rules: Rules,
    *,
    frozen: "Callable[[tuple[str, ...]], bool] | None" = None,
    frozen_rules: "Rules | None" = None,
) -> Any:
  """``NamedSharding``s for boxed abstract variables (``jax.eval_shape(model.init ...)``).

  Args:
    abstract_variables: the variables with ``nn.Partitioned`` boxes, as returned by
      ``jax.eval_shape(model.init, ...)`` (unboxed leaves are replicated).
    mesh: the device mesh.
    rules: the rule set for trainable weights.
    frozen: predicate on a parameter's key path (tuple of dict keys); parameters for
      which it is true use ``frozen_rules``.
    frozen_rules: rule set for frozen weights (default: ``rules``).

  Returns:
    The same tree, unboxed, with a ``NamedSharding`` per array.
  """
  frozen_rules = rules if frozen_rules is None else frozen_rules
  def one(path, x):
    names = x.names if isinstance(x, nn.Partitioned) else (None,) * len(x.shape)
    value = x.value if isinstance(x, nn.Partitioned) else x
    use = frozen_rules if frozen is not None and frozen(key_names(path)) else rules
    spec = logical_to_mesh_spec(names, use, value.shape, mesh)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(
      one, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def unbox(tree: Any) -> Any:
  """Strips ``nn.Partitioned`` boxes (``nn.meta.unbox``)."""
  return nn.meta.unbox(tree)


def like_params(abstract_tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that mirrors parameters (optimizer state, a train state).

  Each array leaf whose key path ends with a parameter's key path and has its shape
  gets that parameter's sharding (Adam's ``mu``/``nu``, the params inside a train
  state); anything else (step counts, scalars, ``optax.MaskedNode``s) is replicated.

  Args:
    abstract_tree: the tree to shard (abstract or concrete arrays).
    params: the parameter tree (abstract or concrete), unboxed.
    shardings: the parameter shardings (``param_shardings``), same structure.
    mesh: the mesh, for the replicated sharding.
  """
  table: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree_util.tree_leaves(shardings)
  if len(flat_p) != len(flat_s):
    raise ValueError(f"params have {len(flat_p)} leaves but shardings {len(flat_s)}")
  for (path, leaf), sharding in zip(flat_p, flat_s):
    table[key_names(path)] = (tuple(leaf.shape), sharding)
  longest = max((len(k) for k in table), default=0)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    keys = key_names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for start in range(max(0, len(keys) - longest), len(keys)):
      hit = table.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """The sharding of a batch leaf: dimension 0 (``batch``) split, the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",), rules))


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """``batch_sharding`` for every leaf; checks the batch divides over its mesh axes."""
  sharding = batch_sharding(mesh, rules)
  split = math.prod(mesh.shape[a] for a in _axes_tuple(sharding.spec[0]))
  def one(path, leaf):
    if not leaf.shape or leaf.shape[0] % split:
      raise ValueError(
          f"batch leaf {jax.tree_util.keystr(path)} of shape {leaf.shape}: its leading"
          f" (batch) dimension should be a multiple of {split} ({sharding.spec[0]})")
    return sharding
  return jax.tree_util.tree_map_with_path(one, batch)


def global_batch(local_batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Assembles this process's slice of the batch into global ``jax.Array``s.

  Each process passes its own rows (global batch / process count); with one process
  this is a ``device_put``.
  """
  shardings = batch_shardings(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype), local_batch),
      mesh, rules)
  return jax.tree.map(jax.make_array_from_process_local_data, shardings, local_batch)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes ``nn.with_logical_constraint`` active: the mesh and the rules in context.

  Trace (call, ``lower``) the step inside this context; outside it the models'
  constraints are no-ops.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def from_config(config: Any, devices: "Sequence[Any] | None" = None) -> tuple[Mesh, Rules, Rules | None]:
  """(mesh, rules, frozen_rules) from an experiment config.

  Reads ``config.mesh`` (``data``, ``fsdp``, ``tensor``, ``slices``; default: FSDP over
  every device) and ``config.sharding`` (``rules``: a ``RULE_SETS`` name or a list of
  pairs, default ``'fsdp'``; ``frozen_rules``: the same or empty for ``rules``). Configs
  without these fields get the defaults, so every config runs on any device count.
  """
  mesh_config = dict(config.get("mesh", None) or {"fsdp": -1})
  sharding = config.get("sharding", None) or {}
  rules = get_rules(sharding.get("rules", "fsdp") or "fsdp")
  frozen = sharding.get("frozen_rules", "") or None
  return make_mesh(mesh_config, devices), rules, (get_rules(frozen) if frozen else None)
