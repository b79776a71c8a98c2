"""BLIP-2's stage-1 objectives, as LAVIS's `Blip2Qformer.forward` defines them, in one step.

Dimension letters: B the global batch, G the groups hard negatives are drawn within (the
batch devices), b = B / G, Q queries, T text tokens, V the Q-Former's vocabulary.

- ITC (image-text contrastive): `mmjax.losses.contrastive.query_contrastive_loss`, each image's
  best query against the text's [CLS], over the global batch, label smoothing 0.1.
- ITM (image-text matching): each image with its own text (matched), with a hard negative
  text and each text with a hard negative image (not matched): 3B pairs through the
  Q-Former with the bidirectional mask, the head over the mean of the query outputs, a
  two-way cross-entropy. A hard negative of image i is drawn from softmax(sim_i2t[i] / t)
  over the texts of i's group, never i's own text nor a text with the same tokens (a
  duplicate caption is a positive, not a negative: on the embedded scenes a one-shape
  scene's caption recurs); likewise for each text. Groups are the rows each batch device
  holds (LAVIS draws from the whole gathered batch; here the draw stays on the device and the
  similarities it draws from are the local [b, b] block, so nothing of size B is gathered
  for it). A group of one row has no negative: refused.
- ITG (image-grounded text generation): the text, its first token replaced by [DEC], after
  the queries with the multimodal causal mask, predicts each next token; cross-entropy with
  label smoothing 0.1 (LAVIS's BertLMHeadModel), averaged over the text's tokens.

`loss = w_itc * ITC + w_itm * ITM + w_itg * ITG` (weights from the config; LAVIS: 1, 1, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.losses import contrastive

LABEL_SMOOTHING = 0.1


def groups_of(batch: int, mesh=None) -> int:
  """The batch devices of the mesh given or in context (1 without one): the groups hard
  negatives are drawn within."""
  mesh = contrastive._context_mesh(mesh)  # pylint: disable=protected-access
  if mesh is None:
    return 1
  return contrastive._batch_axes(mesh, batch)[1]  # pylint: disable=protected-access


def hard_negatives(image_embeds: jax.Array, text_embeds: jax.Array, ids: jax.Array, temperature: jax.Array,
                   key: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """(negative text of each image Int[B], negative image of each text Int[B]): indices into
  the batch, drawn within each image's (text's) group as the module docstring says."""
  b_all = image_embeds.shape[0]
  if groups < 1 or b_all % groups:
    raise ValueError(f"batch {b_all} does not split into {groups} groups for ITM's hard negatives")
  b = b_all // groups
  if b < 2:
    raise ValueError(f"ITM draws each hard negative from the other rows of a device's batch, but the batch of {b_all} "
                     f"over {groups} devices leaves {b} row per device; expected at least 2 rows per device "
                     "(data.batch_size >= 2 x the batch devices)")
  image = jax.lax.stop_gradient(image_embeds).reshape(groups, b, *image_embeds.shape[1:])
  text = jax.lax.stop_gradient(text_embeds).reshape(groups, b, text_embeds.shape[-1])
  sim = jnp.max(jnp.einsum("giqd,gjd->gijq", image, text), axis=-1) / jax.lax.stop_gradient(temperature)  # [G,b,b]
  grouped_ids = ids.reshape(groups, b, ids.shape[-1])
  same = jnp.all(grouped_ids[:, :, None, :] == grouped_ids[:, None, :, :], axis=-1)  # [G, b, b], diagonal True
  self_only = jnp.eye(b, dtype=bool)[None]
  # A row whose every other text is a duplicate of its own falls back to any other row.
  allowed = jnp.where(jnp.all(same, axis=-1, keepdims=True), ~self_only, ~same)
  allowed_t = jnp.where(jnp.all(same, axis=-2, keepdims=True), ~self_only, ~same)
  k_text, k_image = jax.random.split(key)
  floor = jnp.finfo(jnp.float32).min
  neg_text = jax.random.categorical(k_text, jnp.where(allowed, sim, floor), axis=-1)  # [G, b]
  neg_image = jax.random.categorical(k_image, jnp.where(allowed_t, sim, floor), axis=-2)  # [G, b]
  offset = (jnp.arange(groups) * b)[:, None]
  return (neg_text + offset).reshape(b_all), (neg_image + offset).reshape(b_all)


def itg_loss(logits: jax.Array, ids: jax.Array, text_mask: jax.Array,
             smoothing: float = LABEL_SMOOTHING) -> tuple[jax.Array, jax.Array]:
  """(sum of the per-token losses, token count): position t predicts token t + 1 where that
  token is text (not padding)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  target = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  per_token = -(1.0 - smoothing) * target - smoothing * jnp.mean(logp, axis=-1)
  mask = text_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(per_token * mask), jnp.sum(mask)


def stage1_loss(module, params, batch: dict, key: jax.Array, weights: dict[str, float],
                smoothing: float = LABEL_SMOOTHING):
  """The trainer's (loss x B, B, {name: value x B}) of one stage-1 batch {"images" [B, S, S, 3],
  "input_ids" [B, T] (first token the [CLS]/BOS), "text_mask" [B, T]}; `module` a `Blip2`."""
  variables = {"params": params}
  images, ids, mask = batch["images"], batch["input_ids"], batch["text_mask"]
  b = ids.shape[0]
  out = module.apply(variables, images, ids, mask, method="pretrain")
  metrics, total = {}, jnp.float32(0.0)
  t = out["temperature"]
  if weights.get("itc", 0.0):
    itc = contrastive.query_contrastive_loss(out["image_embeds"], out["text_embeds"], t, label_smoothing=smoothing)
    metrics["itc"] = itc
    total += weights["itc"] * itc
  if weights.get("itm", 0.0):
    neg_text, neg_image = hard_negatives(out["image_embeds"], out["text_embeds"], ids, t, key, groups_of(b))
    image = out["image"]
    pair_images = jnp.concatenate([image, image[neg_image], image], axis=0)
    pair_ids = jnp.concatenate([ids, ids, ids[neg_text]], axis=0)
    pair_mask = jnp.concatenate([mask, mask, mask[neg_text]], axis=0)
    logits = module.apply(variables, pair_images, pair_ids, pair_mask, method="match")  # [3B, 2]
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    logp = jax.nn.log_softmax(logits, axis=-1)
    itm = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    metrics["itm"] = itm
    metrics["itm_accuracy"] = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    total += weights["itm"] * itm
  if weights.get("itg", 0.0):
    token_sum, tokens = itg_loss(out["itg_logits"], ids, mask, smoothing)
    itg = token_sum / jnp.maximum(tokens, 1.0)
    metrics["itg"] = itg
    total += weights["itg"] * itg
  count = jnp.float32(b)
  extra = {k: v * count for k, v in metrics.items()}
  if "text_truncated" in batch:
    extra["text_truncated"] = jnp.sum(batch["text_truncated"].astype(jnp.float32))
  return total * count, count, extra
