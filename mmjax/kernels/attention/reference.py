"""The XLA attention reference: written for clarity, it is the oracle of every kernel.

Dimension letters: B batch, T query length, S key length, H query heads, G key/value
heads (H is a multiple of G), K head dim.

One mask language serves every attention in the zoo. A query may attend to a key iff
all of the following that are given hold:

- ``causal``:   ``key_positions[s] <= query_positions[t]``;
- segments:     ``query_segment_ids[t] == key_segment_ids[s]`` (packed sequences);
- media:        the Flamingo image mask. ``query_image_index[t]`` is the number of
                ``<image>`` tokens at or before token t (0: no image yet);
                ``key_image_ids[s]`` is the 1-based image a key (a latent) belongs to.
                With ``only_attend_immediate_media`` a token sees the keys of image
                ``query_image_index[t]`` only, otherwise those of every image up to it.
                A token with index 0 sees nothing.
- ``sliding_window`` W (with ``causal``): ``query_positions[t] - key_positions[s] < W``,
                so each query sees itself and the W - 1 positions before it (Mistral's
                window, as transformers masks it).

``alibi_slopes`` [H] (ALiBi, MPT) adds ``slopes[h] * (key_positions[s] - query_positions[t])``
to the logits of head h, in float32, before the mask (positions default to the indices, as
for ``causal``). Within a query row this differs from MPT's ``slope * (s - S + 1)`` by a
constant only, which softmax ignores.

A query row with no allowed key produces zeros (not the uniform average a large negative
bias would give).

Two computations of the same values. Under rematerialisation (`mmjax.kernels.remat`: the
decoder's remat and scanned layers, the train step's remat policies) the grouped one
(`_grouped`), differentiated by JAX, so that checkpoint policies see its products and the
TPU fit table's programs stay as they were. Everywhere else the heads-major one
(`_heads_major`) with its own backward pass: plain batched products, and the softmax's row
sums taken over the head dim (the flash identity). On XLA:CPU it made issue 20's train steps
1.10x (small) and 1.09x (large) faster (docs/training.md); tests/kernels/test_reference_backward.py
checks the two agree to 1e-12 in float64 on every part of the mask language.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.kernels import remat


def default_positions(batch, query_length, key_length, query_positions=None, key_positions=None):
  """The positions given, or the indices 0..T-1 and 0..S-1 for those that are None."""
  if query_positions is None:
    query_positions = jnp.broadcast_to(jnp.arange(query_length, dtype=jnp.int32), (batch, query_length))
  if key_positions is None:
    key_positions = jnp.broadcast_to(jnp.arange(key_length, dtype=jnp.int32), (batch, key_length))
  return query_positions, key_positions


def allowed_mask(
    batch: int,
    query_length: int,
    key_length: int,
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
) -> jax.Array:
  """Bool[B, T, S]: which keys each query may attend to (see the module docstring)."""
  mask = jnp.ones((batch, query_length, key_length), dtype=bool)
  if sliding_window is not None and not causal:
    raise ValueError(f"sliding_window={sliding_window} needs causal=True")
  if causal:
    query_positions, key_positions = default_positions(batch, query_length, key_length,
                                                       query_positions, key_positions)
    mask &= key_positions[:, None, :] <= query_positions[:, :, None]
    if sliding_window is not None:
      mask &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
  if query_segment_ids is not None:
    mask &= query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
  if query_image_index is not None:
    q_img = query_image_index[:, :, None]
    k_img = key_image_ids[:, None, :]
    if only_attend_immediate_media:
      mask &= k_img == q_img
    else:
      mask &= k_img <= q_img
    mask &= q_img > 0
  return mask


def attention_reference(
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
) -> jax.Array:
  """Float[B, T, H, K] from query [B, T, H, K] and key, value [B, S, G, K].

  Logits and softmax are computed in float32 whatever the input dtype; the output has
  the dtype of ``value``.
  """
  b, t, h, k = query.shape
  s, g = key.shape[1], key.shape[2]
  if scale is None:
    scale = k**-0.5
  mask = allowed_mask(
      b, t, s,
      causal=causal,
      query_positions=query_positions,
      key_positions=key_positions,
      query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids,
      query_image_index=query_image_index,
      key_image_ids=key_image_ids,
      only_attend_immediate_media=only_attend_immediate_media,
      sliding_window=sliding_window,
  )
  # Grouped-query attention: query head h reads key/value head h // (H // G).
  grouped = query.reshape(b, t, g, h // g, k)
  bias = None
  if alibi_slopes is not None:
    qp, kp = default_positions(b, t, s, query_positions, key_positions)
    acc = _acc(query, key)
    distance = (kp[:, None, :] - qp[:, :, None]).astype(acc)  # [B, T, S]
    slopes = alibi_slopes.astype(acc).reshape(g, h // g)
    bias = slopes[None, :, :, None, None] * distance[:, None, None]  # [B, G, R, T, S]
  mask = mask[:, None, None, :, :]
  if remat.active():
    out = _grouped(grouped, key, value, mask, bias, scale)
  else:
    # Causal over the indices themselves (no positions given): the queries of a block of
    # rows see no key past the block's end, so each block attends only up to it.
    indices = causal and query_positions is None and key_positions is None and t == s
    blocks = min(CAUSAL_BLOCKS, t // CAUSAL_BLOCK_ROWS) if indices and t >= 2 * CAUSAL_BLOCK_ROWS else 1
    out = _heads_major(grouped, key, value, mask, bias, scale, blocks)
  return out.reshape(b, t, h, k).astype(value.dtype)


def _acc(*xs) -> jnp.dtype:
  """The dtype of logits, softmax and accumulation: float32, or float64 for float64 inputs."""
  return jnp.dtype(jnp.float64 if any(x.dtype == jnp.float64 for x in xs) else jnp.float32)


def _softmax(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis of logits with -inf at disallowed keys."""
  # The max only keeps exp() in range; it cancels out of the result, so no gradient.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  # Rows with no allowed key: weights are all 0; dividing by 1 keeps them 0.
  return weights / jnp.where(denom > 0, denom, 1.0)


def _grouped(grouped, key, value, mask, bias, scale):
  """Attention of grouped queries [B, T, G, R, K] over key, value [B, S, G, K] (mask and
  bias over [B, G, R, T, S]), differentiated by JAX: float32 [B, T, G, R, K].

  Used where a checkpoint policy must see the products (`mmjax.kernels.remat`), so that
  programs compiled with remat (the TPU fit table) stay as they were.
  """
  acc = _acc(grouped, key)
  logits = jnp.einsum("BTGRK,BSGK->BGRTS", grouped, key, preferred_element_type=acc)
  logits = logits.astype(acc) * scale
  if bias is not None:
    logits = logits + bias
  probs = _softmax(jnp.where(mask, logits, -jnp.inf))
  return jnp.einsum("BGRTS,BSGK->BTGRK", probs.astype(value.dtype), value,
                    preferred_element_type=acc)


# Causal self-attention over the indices is cut into at most CAUSAL_BLOCKS blocks of at least
# CAUSAL_BLOCK_ROWS query rows; block i attends to the keys before its end only (forward and
# backward of the LM's attention, 8 x 256 tokens, 8 heads over 4 of 64: 40.8 ms whole, 31.8
# in 2 blocks, 30.0 in 4; at 512 tokens 85.3, 50.8 in 4, 46.9 in 8; at 64 no difference).
CAUSAL_BLOCKS = 8
CAUSAL_BLOCK_ROWS = 64


def _heads_major(grouped, key, value, mask, bias, scale, blocks: int = 1):
  """`_grouped` computed with the heads leading (queries [B, G, R x T, K], keys and values
  [B, G, S, K]) and its own backward pass (`_attend`): the same values. With ``blocks`` > 1
  (causal over the indices only) the query rows go in that many blocks, each over the keys
  up to its last row.

  Why (docs/training.md, issue 20): every product is then a plain batched matrix product,
  which XLA:CPU hands to its fast library, where the grouped layout made it copy the
  [T, S] probabilities and their gradient between layouts; and the softmax's backward
  needs the row sums of dP * P, which `_attend` takes over K instead of S.
  """
  b, t, g, r, k = grouped.shape
  s = key.shape[1]
  query = grouped.transpose(0, 2, 3, 1, 4)  # [B, G, R, T, K]
  key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  no_bias = jnp.zeros((), _acc(grouped, key))
  rows = -(-t // blocks)
  outs = []
  for start in range(0, t, rows):
    stop = min(t, start + rows)
    n, keys = stop - start, (s if blocks == 1 else stop)
    fold = lambda x: jnp.broadcast_to(x[..., start:stop, :keys], (b, x.shape[1], r, n, keys)).reshape(
        b, x.shape[1], r * n, keys)
    out = _attend(query[:, :, :, start:stop].reshape(b, g, r * n, k), key[:, :, :keys], value[:, :, :keys],
                  fold(mask), no_bias if bias is None else fold(bias), scale)
    outs.append(out.reshape(b, g, r, n, k))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4)


def _attend_forward(query, key, value, mask, bias, scale):
  acc = _acc(query, key)
  logits = jnp.einsum("BGMK,BGSK->BGMS", query, key, preferred_element_type=acc)
  probs = _softmax(jnp.where(mask, logits.astype(acc) * scale + bias, -jnp.inf))
  out = jnp.einsum("BGMS,BGSK->BGMK", probs.astype(value.dtype), value, preferred_element_type=acc)
  return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(query, key, value, mask, bias, scale):
  """[B, G, M, K] in the accumulation dtype (`_acc`) of query [B, G, M, K] over key, value
  [B, G, S, K]; mask and bias broadcast to [B, G, M, S] and get no gradient (neither
  depends on a parameter)."""
  return _attend_forward(query, key, value, mask, bias, scale)[0]


def _attend_fwd(query, key, value, mask, bias, scale):
  out, probs = _attend_forward(query, key, value, mask, bias, scale)
  return out, (query, key, value, probs, out)


def _attend_bwd(scale, residuals, dout):
  query, key, value, probs, out = residuals
  acc = lambda x: x.astype(dout.dtype)  # dout, like the output, is in the accumulation dtype
  dvalue = jnp.einsum("BGMS,BGMK->BGSK", probs, dout)
  dprobs = jnp.einsum("BGMK,BGSK->BGMS", dout, acc(value))
  # The softmax's backward needs sum_s P * dP per row; it equals sum_k dO * O (O = P V), a
  # reduction over the head dim rather than over the keys (as flash attention computes it).
  delta = jnp.sum(dout * out, axis=-1, keepdims=True)
  dlogits = probs * (dprobs - delta) * scale  # 0 wherever P is 0: masked keys, empty rows
  dquery = jnp.einsum("BGMS,BGSK->BGMK", dlogits, acc(key))
  dkey = jnp.einsum("BGMS,BGMK->BGSK", dlogits, acc(query))
  return dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
