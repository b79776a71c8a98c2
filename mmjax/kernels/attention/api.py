"""The attention entry point: validates inputs, picks a backend, calls it under shard_map.

Every attention in the zoo calls :func:`attention`; ``reference.py`` defines the mask
semantics, which every backend reproduces exactly:

- ``XLA``: the reference itself (dense [T, S] logits; fine for short sequences).
- ``PALLAS_TPU``: ``tpu.py``, Mosaic flash kernels, forward and backward.
- ``PALLAS_GPU``: ``gpu.py``, Triton-lowered flash kernels, forward and backward.
- ``CUDNN``: ``jax.nn.dot_product_attention(implementation='cudnn')`` with a dense
  mask built from the ids (JAX turns it into a bias; slow, but the comparison point).

With ``backend=None`` the platform picks (:func:`default_backend`) and calls whose
dense logits would be small go to XLA (:data:`XLA_BELOW_LOGITS`). A Pallas kernel runs
inside ``jax.shard_map`` whenever a mesh is given (``mesh=``) or in context (``jax.set_mesh``
/ ``jax.sharding.use_abstract_mesh``; not the deprecated ``with mesh:``, which JAX gives no
public way to read): batch split over the mesh's ``dcn``/``data``/``fsdp`` axes, heads over
``tensor``. Mosaic kernels cannot be partitioned automatically, so this boundary is what
lets sharded models use them.
"""

from __future__ import annotations

import contextlib
import enum
import threading

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmjax.kernels.attention import masking, reference
from mmjax.kernels.attention.block_sizes import BlockSizes


class AttentionBackend(enum.Enum):
  XLA = "xla"
  PALLAS_TPU = "pallas_tpu"
  PALLAS_GPU = "pallas_gpu"
  CUDNN = "cudnn"


# With backend=None, a call whose logits T x S hold fewer elements than this per head
# runs on XLA: its dense logits are at most 4 MiB of float32 per head, so the reference
# costs little memory, and a flash kernel's tiling overhead dominates short sequences
# (decode steps with T = 1, Flamingo cross-attention over a few hundred latents). The
# value comes from that memory argument; kernel-versus-XLA speed has not been measured
# on a TPU or GPU yet (see README.md), and the crossover should be set from that.
XLA_BELOW_LOGITS = 1024 * 1024

# Mesh axes that split the batch, and the one that splits heads (mmjax/sharding.py).
BATCH_MESH_AXES = ("dcn", "data", "fsdp")
HEADS_MESH_AXIS = "tensor"


def default_backend(platform: str | None = None) -> AttentionBackend:
  """The backend used when none is given, for ``platform`` (default: JAX's backend).

  TPU: the Pallas TPU kernels (their Mosaic lowering is compiled for v5e and v6e in the
  tests; memory linear in length). GPU and CPU: XLA, until the GPU kernel has been
  measured on a GPU (it has only run in interpret mode).
  """
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return AttentionBackend.PALLAS_TPU
  return AttentionBackend.XLA


_interpret = threading.local()


@contextlib.contextmanager
def force_interpret():
  """Within this context (at trace time) the Pallas backends run in interpret mode:
  TPU kernels through ``pltpu.InterpretParams()``, GPU kernels with ``interpret=True``.
  This is how tests run models with a Pallas backend on CPU."""
  previous = getattr(_interpret, "on", False)
  _interpret.on = True
  try:
    yield
  finally:
    _interpret.on = previous


def _check_ids(name: str, ids: jax.Array | None, shape: tuple[int, int]) -> None:
  if ids is None:
    return
  if ids.shape != shape:
    raise ValueError(f"{name} has shape {ids.shape}, expected {shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} has dtype {ids.dtype}, expected an integer dtype")


def validate(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    query_positions=None,
    key_positions=None,
    query_segment_ids=None,
    key_segment_ids=None,
    query_image_index=None,
    key_image_ids=None,
) -> None:
  """Raises ValueError naming the first input whose shape or dtype is wrong."""
  if query.ndim != 4:
    raise ValueError(f"query has shape {query.shape}, expected [batch, length, heads, head_dim]")
  if key.ndim != 4 or value.shape != key.shape:
    raise ValueError(
        f"key {key.shape} and value {value.shape} must share one [batch, length, kv_heads, head_dim] shape")
  b, t, h, k = query.shape
  _, s, g, kk = key.shape
  if key.shape[0] != b or kk != k:
    raise ValueError(f"key {key.shape} does not match query {query.shape} in batch or head_dim")
  if h % g:
    raise ValueError(f"query has {h} heads, not a multiple of the {g} key/value heads")
  if (query_segment_ids is None) != (key_segment_ids is None):
    raise ValueError("query_segment_ids and key_segment_ids must be given together")
  if (query_image_index is None) != (key_image_ids is None):
    raise ValueError("query_image_index and key_image_ids must be given together")
  _check_ids("query_positions", query_positions, (b, t))
  _check_ids("key_positions", key_positions, (b, s))
  _check_ids("query_segment_ids", query_segment_ids, (b, t))
  _check_ids("key_segment_ids", key_segment_ids, (b, s))
  _check_ids("query_image_index", query_image_index, (b, t))
  _check_ids("key_image_ids", key_image_ids, (b, s))


def _context_mesh(mesh):
  """The mesh to shard_map over: the given one, the one in context, or None.

  ``jax.sharding.get_abstract_mesh()`` sees ``jax.set_mesh`` and ``use_abstract_mesh``, inside
  and outside jit, in JAX 0.10 to 0.12. The deprecated ``with mesh:`` sets only JAX-internal
  state: read through JAX's private modules it would quietly become "no mesh" the day JAX
  drops them, so it is not read at all; pass ``mesh=`` or use ``jax.set_mesh``.
  """
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def _mesh_axes(mesh, batch: int, heads: int, kv_heads: int):
  """(batch axes, heads axis or None): the mesh axes the kernel call is split over.

  An axis is used only if it is in the mesh, larger than 1, not already manual (we may
  be inside an enclosing shard_map), and divides the dimension it splits.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  manual = set(getattr(mesh, "manual_axes", ()))
  batch_axes, parts = [], 1
  for name in BATCH_MESH_AXES:
    n = sizes.get(name, 1)
    if n > 1 and name not in manual and batch % (parts * n) == 0:
      batch_axes.append(name)
      parts *= n
  n = sizes.get(HEADS_MESH_AXIS, 1)
  heads_axis = None
  if n > 1 and HEADS_MESH_AXIS not in manual and heads % n == 0 and kv_heads % n == 0:
    heads_axis = HEADS_MESH_AXIS
  return tuple(batch_axes), heads_axis


def _tpu_generation(mesh) -> str | None:
  """'v5e', 'v5p', 'v6e', ... of the devices the call will run on (None if not TPU)."""
  try:
    device = mesh.devices.flat[0]
  except (AttributeError, ValueError):  # no mesh, or an AbstractMesh (no devices)
    device = jax.devices()[0]
  kind = getattr(device, "device_kind", "").lower()
  if not kind.startswith("tpu"):
    return None
  if "v6" in kind:
    return "v6e"
  if "v5 lite" in kind or "v5e" in kind:
    return "v5e"
  if "v5" in kind:
    return "v5p"
  return kind.removeprefix("tpu").strip() or None


def _cudnn(query, key, value, allowed, scale, bias=None):
  """cuDNN fused attention with the mask (and any bias [B, H, T, S]) made dense; rows with no
  allowed key -> 0."""
  if bias is not None:
    bias = bias.astype(query.dtype)
  out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=allowed[:, None], scale=scale,
                                     implementation="cudnn")
  any_allowed = jnp.any(allowed, axis=-1)[:, :, None, None]
  return jnp.where(any_allowed, out, jnp.zeros((), out.dtype))


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    query_image_index: jax.Array | None = None,
    key_image_ids: jax.Array | None = None,
    only_attend_immediate_media: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: jax.Array | None = None,
    scale: float | None = None,
    backend: AttentionBackend | str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> jax.Array:
  """Float[B, T, H, K]: attention of query [B, T, H, K] over key, value [B, S, G, K].

  Args:
    causal, query_positions, ..., only_attend_immediate_media: the mask (see
      ``reference.py``). Decode over a KV cache: ``causal=True``, ``query_positions``
      [B, 1] the current position, ``key_positions`` the cache slots' positions.
    sliding_window: with ``causal``, each query sees only keys less than this many
      positions back (Mistral); None: no window. The Pallas kernels skip (and on TPU
      do not fetch) the key tiles wholly outside the window.
    alibi_slopes: Float[H] ALiBi slopes (MPT): ``slopes[h] * (key_position -
      query_position)`` is added to head h's logits; None: no bias. The slopes are
      treated as constants: no gradient flows to them (``stop_gradient``; MPT fixes them).
      The Pallas kernels rebuild the bias per tile from the positions.
    scale: multiplies the logits; default ``head_dim ** -0.5``.
    backend: an :class:`AttentionBackend` or its string value; None picks one by
      platform and size (module docstring).
    block_sizes: tiles of the Pallas kernels; default per backend.
    interpret: run a Pallas backend in interpret mode (for CPU tests); default: inside
      :func:`force_interpret` only.
    mesh: shard_map the kernel over this mesh; default: the mesh in context, if any.
  """
  validate(
      query, key, value,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
  )
  b, t, h, d = query.shape
  s, g = key.shape[1], key.shape[2]
  if sliding_window is not None:
    if not causal or isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
      raise ValueError(f"sliding_window={sliding_window!r} (causal={causal}); expected a positive int with "
                       "causal=True")
  if alibi_slopes is not None and tuple(alibi_slopes.shape) != (h,):
    raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}; expected ({h},), one slope per "
                     "query head")
  if alibi_slopes is not None:
    # The slopes are constants (MPT derives them from the head count) and the kernels give
    # them no gradient; every backend stops it, so switching backends changes no gradient.
    alibi_slopes = jax.lax.stop_gradient(alibi_slopes)
  if scale is None:
    scale = d**-0.5
  if backend is None:
    backend = default_backend()
    if t * s < XLA_BELOW_LOGITS:
      backend = AttentionBackend.XLA
  else:
    try:
      backend = AttentionBackend(backend)
    except ValueError:
      raise ValueError(f"backend={backend!r}, expected one of "
                       f"{[b_.value for b_ in AttentionBackend]} or None") from None
  mask_kwargs = dict(
      causal=causal,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
  )
  if backend is AttentionBackend.XLA:
    return reference.attention_reference(
        query, key, value, **mask_kwargs,
        only_attend_immediate_media=only_attend_immediate_media, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, scale=scale)
  if backend is AttentionBackend.CUDNN:
    allowed = reference.allowed_mask(b, t, s, **mask_kwargs,
                                     only_attend_immediate_media=only_attend_immediate_media,
                                     sliding_window=sliding_window)
    bias = None
    if alibi_slopes is not None:
      qp, kp = reference.default_positions(b, t, s, query_positions, key_positions)
      distance = (kp[:, None, :] - qp[:, :, None]).astype(jnp.float32)
      bias = alibi_slopes.astype(jnp.float32)[None, :, None, None] * distance[:, None]  # [B, H, T, S]
    return _cudnn(query, key, value, allowed, scale, bias)
  if interpret is None:
    interpret = getattr(_interpret, "on", False)
  if backend is AttentionBackend.PALLAS_TPU:
    from mmjax.kernels.attention import tpu as kernel
  else:
    from mmjax.kernels.attention import gpu as kernel
  spec = masking.MaskSpec(
      causal=causal,
      segments=query_segment_ids is not None,
      images=query_image_index is not None,
      only_attend_immediate_media=only_attend_immediate_media,
      sliding_window=sliding_window,
      alibi=alibi_slopes is not None,
  )
  del mask_kwargs["causal"]
  query_ids, key_ids = masking.stack_ids(spec, b, t, s, **mask_kwargs)

  if block_sizes is None and backend is AttentionBackend.PALLAS_TPU:
    block_sizes = BlockSizes.for_tpu(_tpu_generation(_context_mesh(mesh)))

  def call(q, k, v, q_ids, k_ids, slopes):
    return kernel.flash_attention(q, k, v, q_ids, k_ids, spec=spec, scale=scale,
                                  alibi_slopes=slopes, block_sizes=block_sizes,
                                  interpret=interpret)

  mesh = _context_mesh(mesh)
  if mesh is None:
    return call(query, key, value, query_ids, key_ids, alibi_slopes)
  batch_axes, heads_axis = _mesh_axes(mesh, b, h, g)
  batch_spec = batch_axes if batch_axes else None
  qkv_spec = PartitionSpec(batch_spec, None, heads_axis, None)
  ids_spec = PartitionSpec(batch_spec, None, None)
  # Each shard's kernel indexes the slopes by its local head: they split with the heads.
  slopes_spec = PartitionSpec(heads_axis)
  args = (query, key, value, query_ids, key_ids, alibi_slopes)
  specs = (qkv_spec, qkv_spec, qkv_spec, ids_spec, ids_spec, slopes_spec)
  if getattr(mesh, "explicit_axes", ()):
    # Explicit-sharding meshes make shard_map check, not change, its inputs' shardings.
    args = tuple(None if x is None else jax.sharding.reshard(x, spec)
                 for x, spec in zip(args, specs))
  return jax.shard_map(
      call,
      mesh=mesh,
      in_specs=specs,
      out_specs=qkv_spec,
      check_vma=False,
  )(*args)
