"""Contrastive image-text losses over the global batch: CLIP's softmax, SigLIP's sigmoid.

Dimension letters: B the global batch, N the devices the batch is split over, b = B/N the
rows one device holds, D the embedding width. Both losses take L2-normalised image and text
embeddings ``[B, D]`` (row i of each is a matching pair) and ``logit_scale`` = log t, the
learned log-temperature (exp'd here, as CLIP and SigLIP store it).

- ``softmax_contrastive_loss`` (CLIP, InfoNCE): the mean of the image->text and text->image
  cross-entropies over all B x B pairs. Each row's normaliser needs every column, so each
  device all-gathers both embeddings ([B, D], gradients flow back through the gather as a
  reduce-scatter) and builds only its own rows: two [b, B] logit blocks, never B x B.
  ``logit_bias`` is not taken: a constant added to every logit of a row cancels in a softmax.
- ``query_contrastive_loss`` (BLIP-2's ITC): the softmax loss between each image's best-matching
  query embedding and the text, with label smoothing; gathered like CLIP's.
- ``sigmoid_contrastive_loss`` (SigLIP): -sum over all pairs of log_sigmoid(z_ij (t <x_i,
  y_j> + b)), z = +1 on the diagonal and -1 elsewhere, divided by B (the paper's
  normalisation). Chunked: each device keeps its image rows and the text rows travel round
  the ring of the batch devices (``jax.lax.ppermute``, N-1 hops), so a device holds one
  [b, b] logit block at a time. The backward pass (a ``custom_vjp``) sends the text rows round
  again together with their gradient, which is home after N hops; nothing of size B is kept.

Meshes: given one (``mesh=``) or in context (``jax.set_mesh``), the batch is split over its
``dcn``, ``data`` and ``fsdp`` axes of size > 1 (the rest replicate the work). Without a mesh
the dense references run, so one device and N devices give the same value and gradients.

Indivisible batches are refused, not padded: a global batch that is not a multiple of the
batch devices raises ``ValueError`` naming both. Padding with masked rows would change
neither loss if done right, but costs a mask on every block; a data pipeline that feeds a
sharded step already produces multiples of the device count.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec
import jax.numpy as jnp

from mmjax import sharding

# Mesh axes the global batch is split over (mmjax/sharding.py: dcn, data, fsdp).
BATCH_MESH_AXES: tuple[str, ...] = tuple(a for a in sharding.MESH_AXES if a != "tensor")


# --------------------------------------------------------------------------- references


def _logits(image_embeddings, text_embeddings, logit_scale):
  """[B, B] (or [b, c]) logits t <x_i, y_j> in float32."""
  dots = jnp.einsum("bd,cd->bc", image_embeddings, text_embeddings,
                    preferred_element_type=jnp.float32)
  return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * dots


def softmax_contrastive_loss_reference(image_embeddings, text_embeddings, logit_scale):
  """CLIP's loss over the whole [B, D] batch on one device: the dense B x B reference."""
  _check(image_embeddings, text_embeddings)
  logits = _logits(image_embeddings, text_embeddings, logit_scale)
  positives = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def sigmoid_contrastive_loss_reference(image_embeddings, text_embeddings, logit_scale, logit_bias):
  """SigLIP's loss over the whole [B, D] batch on one device: the dense B x B reference."""
  _check(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  logits = _logits(image_embeddings, text_embeddings, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
  signs = 2 * jnp.eye(batch, dtype=jnp.float32) - 1
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / batch


# --------------------------------------------------------------------------- meshes


def _check(image_embeddings, text_embeddings):
  if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
    raise ValueError(f"image_embeddings {image_embeddings.shape} and text_embeddings "
                     f"{text_embeddings.shape} must both be [B, D] and of one shape")


def _context_mesh(mesh):
  """The given mesh, else the one set with ``jax.set_mesh`` (None if neither)."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def _batch_axes(mesh, batch: int) -> tuple[tuple[str, ...], int]:
  """(mesh axes the batch is split over, their device count); refuses an indivisible batch."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  manual = set(getattr(mesh, "manual_axes", ()))
  axes = tuple(a for a in BATCH_MESH_AXES if sizes.get(a, 1) > 1 and a not in manual)
  devices = math.prod(sizes[a] for a in axes)
  if batch % devices:
    raise ValueError(
        f"global batch {batch} is not divisible by the {devices} devices of the batch mesh axes "
        f"{axes} ({ {a: sizes[a] for a in axes} }); contrastive losses do not pad: give a batch "
        f"that is a multiple of {devices}")
  return axes, devices


def _sharded(local, mesh, axes, args):
  """``local`` under shard_map: the embeddings split over ``axes``, scalars replicated."""
  rows = PartitionSpec(axes)
  specs = (rows, rows) + (PartitionSpec(),) * (len(args) - 2)
  if getattr(mesh, "explicit_axes", ()):
    args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, specs))
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(*args)


# --------------------------------------------------------------------------- softmax (CLIP)


def softmax_contrastive_loss(image_embeddings, text_embeddings, logit_scale, *, mesh=None):
  """CLIP's symmetric InfoNCE over the global batch: image_embeddings, text_embeddings [B, D],
  logit_scale (log temperature, a scalar) -> the scalar loss.

  Each device gathers both embeddings and builds its own [b, B] rows (no B x B logits).
  """
  _check(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  mesh = _context_mesh(mesh)
  axes = _batch_axes(mesh, batch)[0] if mesh is not None else ()
  if not axes:
    return softmax_contrastive_loss_reference(image_embeddings, text_embeddings, logit_scale)

  def local(image, text, log_t):  # image, text [b, D]
    all_image = jax.lax.all_gather(image, axes, tiled=True)  # [B, D]
    all_text = jax.lax.all_gather(text, axes, tiled=True)
    t = jnp.exp(log_t)
    positives = t * jnp.sum(image.astype(jnp.float32) * text.astype(jnp.float32), axis=-1)  # [b]
    image_to_text = jax.nn.logsumexp(_logits(image, all_text, log_t), axis=1) - positives
    text_to_image = jax.nn.logsumexp(_logits(text, all_image, log_t), axis=1) - positives
    return jax.lax.psum(jnp.sum(image_to_text) + jnp.sum(text_to_image), axes) / (2 * batch)

  return _sharded(local, mesh, axes, (image_embeddings, text_embeddings,
                                      jnp.asarray(logit_scale, jnp.float32)))


# --------------------------------------------------------------------------- sigmoid (SigLIP)


def _block_loss(image, text, t, bias, own: bool):
  """-sum log_sigmoid(z * logits) of one [b, b] block; z = +1 on the diagonal of one's own."""
  logits = t * jnp.einsum("bd,cd->bc", image, text) + bias
  if own:
    signs = 2 * jnp.eye(image.shape[0], dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits))
  return -jnp.sum(jax.nn.log_sigmoid(-logits))


def _block_grads(image, text, t, bias, own: bool, g):
  """Gradients of ``g * _block_loss`` w.r.t. (image, text, t, bias), without autodiff's
  residuals: d/dlogits of -log_sigmoid(z l) is -z sigmoid(-z l)."""
  dots = jnp.einsum("bd,cd->bc", image, text)
  logits = t * dots + bias
  if own:
    signs = 2 * jnp.eye(image.shape[0], dtype=logits.dtype) - 1
  else:
    signs = -jnp.ones((), logits.dtype)
  d_logits = -g * signs * jax.nn.sigmoid(-signs * logits)  # [b, b]
  d_image = t * jnp.einsum("bc,cd->bd", d_logits, text)
  d_text = t * jnp.einsum("bc,bd->cd", d_logits, image)
  return d_image, d_text, jnp.sum(d_logits * dots), jnp.sum(d_logits)


def _ring(axes, devices):
  """A pass of each device's block to the next device of the ring over ``axes``."""
  perm = [(i, (i + 1) % devices) for i in range(devices)]
  return functools.partial(jax.lax.ppermute, axis_name=axes, perm=perm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sigmoid_sum(image, text, t, bias, axes, devices):
  """This device's share of the SigLIP sum: its b image rows against all B text rows, the text
  arriving one [b, D] block per hop. image, text [b, D] float32; t, bias device-varying."""
  send = _ring(axes, devices)

  def hop(_, carry):
    total, block = carry
    block = send(block)
    return total + _block_loss(image, block, t, bias, own=False), block

  own = _block_loss(image, text, t, bias, own=True)
  return jax.lax.fori_loop(1, devices, hop, (own, text))[0]


def _ring_sigmoid_fwd(image, text, t, bias, axes, devices):
  return _ring_sigmoid_sum(image, text, t, bias, axes, devices), (image, text, t, bias)


def _ring_sigmoid_bwd(axes, devices, residuals, g):
  image, text, t, bias = residuals
  send = _ring(axes, devices)

  def hop(_, carry):
    d_image, d_t, d_bias, block, d_block = carry
    block, d_block = send(block), send(d_block)  # the block's gradient travels with it
    di, dtx, dt, db = _block_grads(image, block, t, bias, False, g)
    return d_image + di, d_t + dt, d_bias + db, block, d_block + dtx

  d_image, d_text, d_t, d_bias = _block_grads(image, text, t, bias, True, g)
  d_image, d_t, d_bias, _, d_block = jax.lax.fori_loop(
      1, devices, hop, (d_image, d_t, d_bias, text, d_text))
  # After N-1 hops the block here is the next device's: one more hop takes its gradient home.
  return d_image, send(d_block), d_t, d_bias


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_contrastive_loss(image_embeddings, text_embeddings, logit_scale, logit_bias, *,
                             mesh=None, chunked: bool = True):
  """SigLIP's pairwise sigmoid loss over the global batch: image_embeddings, text_embeddings
  [B, D], logit_scale (log t) and logit_bias (b), scalars -> the scalar loss.

  chunked=True (default): the text rows go round the ring; a device holds one [b, b] block.
  chunked=False: each device all-gathers the text rows and builds its [b, B] rows at once
  (the comparison ``mmjax bench contrastive`` makes).
  """
  _check(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  mesh = _context_mesh(mesh)
  axes, devices = _batch_axes(mesh, batch) if mesh is not None else ((), 1)
  if not axes:
    return sigmoid_contrastive_loss_reference(image_embeddings, text_embeddings, logit_scale,
                                              logit_bias)

  def local(image, text, log_t, bias):  # image, text [b, D]
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    t = jnp.exp(log_t)
    if chunked:
      # Device-varying copies of the replicated scalars: the custom_vjp returns this device's
      # share of their gradient, and pcast's transpose sums the shares over the devices.
      t, bias = (jax.lax.pcast(x, axes, to="varying") for x in (t, bias))
      total = _ring_sigmoid_sum(image, text, t, bias, axes, devices)
    else:
      all_text = jax.lax.all_gather(text, axes, tiled=True)  # [B, D]
      logits = t * jnp.einsum("bd,cd->bc", image, all_text) + bias  # [b, B]
      rows = image.shape[0]
      first = jax.lax.axis_index(axes) * rows
      columns = jnp.arange(batch)[None, :]
      positive = columns == first + jnp.arange(rows)[:, None]
      total = -jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)))
    return jax.lax.psum(total, axes) / batch

  return _sharded(local, mesh, axes, (image_embeddings, text_embeddings,
                                      jnp.asarray(logit_scale, jnp.float32),
                                      jnp.asarray(logit_bias, jnp.float32)))


# --------------------------------------------------------------------------- max over queries (BLIP-2)


def _smoothed_cross_entropy(logits, target_columns, smoothing: float):
  """Per-row cross-entropy of logits [r, C] with target columns [r] against a target
  distribution (1 - smoothing) one-hot + smoothing / C (torch's `label_smoothing`)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = jnp.take_along_axis(logp, target_columns[:, None], axis=1)[:, 0]
  return -(1.0 - smoothing) * target - smoothing * jnp.mean(logp, axis=-1)


def _query_logits(queries, text, temperature):
  """[r, c] logits: for each row's Q query embeddings [r, Q, D] and each text [c, D], the
  largest query-text cosine, divided by the temperature."""
  sims = jnp.einsum("rqd,cd->rcq", queries, text, preferred_element_type=jnp.float32)
  return jnp.max(sims, axis=-1) / temperature


def query_contrastive_loss_reference(image_embeddings, text_embeddings, temperature, label_smoothing: float = 0.1):
  """BLIP-2's ITC over the whole batch on one device: image_embeddings [B, Q, D] (one per
  query), text_embeddings [B, D], temperature (not its log: LAVIS stores t itself)."""
  _check_queries(image_embeddings, text_embeddings)
  logits = _query_logits(image_embeddings, text_embeddings, jnp.asarray(temperature, jnp.float32))  # [B, B]
  targets = jnp.arange(logits.shape[0])
  return (jnp.mean(_smoothed_cross_entropy(logits, targets, label_smoothing))
          + jnp.mean(_smoothed_cross_entropy(logits.T, targets, label_smoothing))) / 2


def query_contrastive_loss(image_embeddings, text_embeddings, temperature, *, label_smoothing: float = 0.1,
                           mesh=None):
  """BLIP-2's image-text contrastive loss (ITC) over the global batch.

  image_embeddings [B, Q, D]: each image's Q query outputs, projected and L2-normalised;
  text_embeddings [B, D]: each text's [CLS], likewise; the similarity of image i and text j
  is the largest of the Q cosines (LAVIS's `sim_i2t`, which is also `sim_t2i` transposed),
  divided by `temperature`; the loss is the mean of the image->text and text->image
  cross-entropies with `label_smoothing` (BLIP-2: 0.1). Sharded as `softmax_contrastive_loss`:
  each device gathers both sides ([B, Q, D] and [B, D]) and builds its own [b, B] rows, the
  gradients flowing back through the gathers. LAVIS gathers without gradient (the other
  devices' rows are constants); here every row is a differentiable negative, so N devices
  give exactly the one-device loss and gradients.
  """
  _check_queries(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  mesh = _context_mesh(mesh)
  axes = _batch_axes(mesh, batch)[0] if mesh is not None else ()
  if not axes:
    return query_contrastive_loss_reference(image_embeddings, text_embeddings, temperature, label_smoothing)

  def local(image, text, t):  # image [b, Q, D], text [b, D]
    all_image = jax.lax.all_gather(image, axes, tiled=True)  # [B, Q, D]
    all_text = jax.lax.all_gather(text, axes, tiled=True)  # [B, D]
    rows = image.shape[0]
    targets = jax.lax.axis_index(axes) * rows + jnp.arange(rows)
    image_to_text = _smoothed_cross_entropy(_query_logits(image, all_text, t), targets, label_smoothing)
    text_to_image = _smoothed_cross_entropy(_query_logits(all_image, text, t).T, targets, label_smoothing)
    return jax.lax.psum(jnp.sum(image_to_text) + jnp.sum(text_to_image), axes) / (2 * batch)

  return _sharded(local, mesh, axes, (image_embeddings, text_embeddings, jnp.asarray(temperature, jnp.float32)))


def _check_queries(image_embeddings, text_embeddings):
  if (image_embeddings.ndim != 3 or text_embeddings.ndim != 2 or image_embeddings.shape[0] != text_embeddings.shape[0]
      or image_embeddings.shape[2] != text_embeddings.shape[1]):
    raise ValueError(f"image_embeddings {image_embeddings.shape} and text_embeddings {text_embeddings.shape}; "
                     "expected [B, Q, D] and [B, D]")
