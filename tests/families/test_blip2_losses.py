"""BLIP-2's stage-1 objectives against references: ITC against a float64 NumPy computation
(value and gradients) on 1 and 8 devices, the three self-attention masks read off the
attention weights, ITM's hard negatives, ITG's loss, and the errors for bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sharding
from mmjax.families.blip2 import losses
from mmjax.families.blip2 import model as blip2
from mmjax.families.blip2 import qformer as qformer_lib
from mmjax.losses import contrastive
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import VIT_TINY

QFORMER = qformer_lib.QFormerConfig(width=32, depth=2, num_heads=4, mlp_dim=48, cross_attention_frequency=1,
                                    encoder_width=VIT_TINY.width, num_queries=5, vocab_size=50, max_length=12)
STAGE1 = blip2.Blip2Config(vision=VIT_TINY, qformer=QFORMER, heads=blip2.HEADS, embed_dim=16, decoder_token_id=49)


# ---------------------------------------------------------------- ITC against float64 NumPy

def _itc_numpy(image, text, t, smoothing):
  """(loss, d image, d text, d t) in float64, the gradient written out: logits[i, j] =
  max_q <image[i, q], text[j]> / t; each direction's smoothed cross-entropy averaged."""
  image, text = image.astype(np.float64), text.astype(np.float64)
  b = image.shape[0]
  sims = np.einsum("iqd,jd->ijq", image, text)
  best = sims.argmax(-1)  # [B, B]: the query each pair's logit comes from
  logits = sims.max(-1) / t
  target = (1 - smoothing) * np.eye(b) + smoothing / b

  def direction(z):
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -(target * logp).sum(1).mean()
    return loss, (np.exp(logp) - target) / b  # d mean loss / d z

  l_i2t, g_i2t = direction(logits)
  l_t2i, g_t2i = direction(logits.T)
  d_logits = (g_i2t + g_t2i.T) / 2  # [B, B]
  d_image = np.zeros_like(image)
  for i in range(b):
    for j in range(b):
      d_image[i, best[i, j]] += d_logits[i, j] * text[j] / t
  d_text = np.einsum("ij,ijd->jd", d_logits, image[np.arange(b)[:, None], best]) / t
  d_t = -np.sum(d_logits * logits) / t
  return (l_i2t + l_t2i) / 2, d_image, d_text, d_t


def _normalised(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("mesh_config", [None, {"data": 8}, {"data": 2, "fsdp": 4}], ids=str)
def test_itc_equals_a_float64_numpy_reference_in_value_and_gradients(mesh_config):
  k1, k2 = jax.random.split(jax.random.key(0))
  image, text, t = _normalised(k1, (16, 4, 8)), _normalised(k2, (16, 8)), jnp.float32(0.07)
  mesh = sharding.make_mesh(mesh_config) if mesh_config else sharding.make_mesh({"data": 1}, jax.devices()[:1])
  fn = jax.jit(jax.value_and_grad(
      lambda a, b, c: contrastive.query_contrastive_loss(a, b, c, label_smoothing=0.1, mesh=mesh), argnums=(0, 1, 2)))
  value, (d_image, d_text, d_t) = fn(image, text, t)
  want = _itc_numpy(np.asarray(image), np.asarray(text), 0.07, 0.1)
  np.testing.assert_allclose(value, want[0], rtol=2e-6)
  for got, ref in zip((d_image, d_text, d_t), want[1:]):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_itc_refuses_mismatched_shapes_naming_them():
  with pytest.raises(ValueError, match=r"\(4, 3, 8\).*\(5, 8\).*\[B, Q, D\]"):
    contrastive.query_contrastive_loss(jnp.zeros((4, 3, 8)), jnp.zeros((5, 8)), 0.07)


# ---------------------------------------------------------------- the masks, on the weights

def _batch(b=3, t=7):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (b, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(1, 40, (b, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t)[None] < np.array([t, t - 2, 3])[:b, None], jnp.int32)
  return images, ids, mask


def _init(module, key, *args, method="__call__"):
  return jax.jit(lambda k, *a: module.init(k, *a, method=method))(key, *args)


def _weights(module, variables, *args, method):
  fn = jax.jit(lambda v, *a: module.apply(v, *a, method=method, mutable=["intermediates"]))
  out, state = fn(variables, *args)
  return out, state["intermediates"]


@pytest.mark.slow  # compiles the Q-Former's passes: about 20 s on 2 idle cores
def test_the_three_masks_as_the_attention_weights_show_them():
  module = blip2.Blip2(STAGE1)
  images, ids, mask = _batch()
  variables = nn.meta.unbox(_init(module, jax.random.key(1), images, ids, mask, method="initialize"))
  q, t = QFORMER.num_queries, ids.shape[1]
  text_cols = np.arange(q, q + t)
  pad = ~np.asarray(mask, bool)  # [B, T]

  # ITG (one pass with the queries, which is also where ITC's image embeddings come from):
  # queries see only queries, text sees the queries and its own past.
  image = jax.jit(lambda v, x: module.apply(v, x, method="image_features"))(variables, images)
  dec = ids.at[:, 0].set(STAGE1.decoder_token_id)
  attend = qformer_lib.masks("multimodal_causal", q, mask)
  queries = jnp.broadcast_to(variables["params"]["query_tokens"][None], (3, q, QFORMER.width))
  _, inter = _weights(qformer_lib.QFormer(QFORMER), {"params": variables["params"]["qformer"]}, queries, dec, attend,
                      image, method="__call__")
  for layer in range(QFORMER.depth):
    w = np.asarray(inter[f"layers_{layer}"]["attention"]["attention_weights"][0])  # [B, H, L, L]
    assert np.all(w[:, :, :q, q:] == 0), "a query attended to text: ITC's image embeddings would see the caption"
    assert np.all(w[:, :, :q, :q] > 0)
    for i in range(t):
      assert np.all(w[:, :, q + i, q + i + 1:] == 0), "text attended to a later token in ITG"
      assert np.all(w[:, :, q + i, :q] > 0)
      for row in range(3):
        seen = text_cols[: i + 1]
        assert np.all(w[row, :, q + i, seen[~pad[row, : i + 1]]] > 0)
        assert np.all(w[row, :, q + i, seen[pad[row, : i + 1]]] == 0)

  # ITM: everything sees everything but the padding.
  _, inter = _weights(module, variables, image, ids, mask, method="match")
  for layer in range(QFORMER.depth):
    w = np.asarray(inter["qformer"][f"layers_{layer}"]["attention"]["attention_weights"][0])
    visible = np.concatenate([np.ones((3, q), bool), ~pad], axis=1)  # [B, L]
    assert np.all(w[np.broadcast_to(~visible[:, None, None, :], w.shape)] == 0)
    assert np.all(w[np.broadcast_to(visible[:, None, None, :], w.shape)] > 0)

  # ITC's text: text sees text only (no queries in its pass), never the padding.
  _, inter = _weights(module, variables, ids, mask, method="encode_text")
  w = np.asarray(inter["qformer"]["layers_0"]["attention"]["attention_weights"][0])
  assert w.shape[-1] == t
  assert np.all(w[np.broadcast_to(pad[:, None, None, :], w.shape)] == 0)


@pytest.mark.slow  # compiles the Q-Former's passes: about 20 s on 2 idle cores
def test_itc_image_embeddings_do_not_depend_on_the_text():
  """The pretraining pass gives the queries with ITG's text alongside; they must equal the
  queries alone (`encode_image`), whatever the text."""
  module = blip2.Blip2(STAGE1)
  images, ids, mask = _batch()
  variables = _init(module, jax.random.key(1), images, ids, mask, method="initialize")
  alone = jax.jit(lambda v, x: module.apply(v, x, method="encode_image"))(variables, images)
  pretrain = jax.jit(lambda v, *a: module.apply(v, *a, method="pretrain"))
  for other in (ids, (ids * 7) % 40 + 1):
    out = pretrain(variables, images, other, mask)
    np.testing.assert_allclose(out["image_embeds"], alone, atol=1e-6)


def test_masks_refuse_an_unknown_kind():
  with pytest.raises(ValueError, match="'causal'.*unimodal"):
    qformer_lib.masks("causal", 4, None)


# ---------------------------------------------------------------- ITM's hard negatives

def test_hard_negatives_stay_in_their_group_and_skip_self_and_duplicates():
  k1, k2 = jax.random.split(jax.random.key(2))
  b, groups = 16, 4
  image, text = _normalised(k1, (b, 3, 8)), _normalised(k2, (b, 8))
  ids = jnp.asarray(np.arange(b)[:, None] * np.ones((1, 5), int), jnp.int32)
  ids = ids.at[1].set(ids[0])  # rows 0 and 1 hold the same caption
  draw = jax.jit(losses.hard_negatives, static_argnums=5)
  for seed in range(20):
    neg_text, neg_image = draw(image, text, ids, jnp.float32(0.1), jax.random.key(seed), groups)
    neg_text, neg_image = np.asarray(neg_text), np.asarray(neg_image)
    rows = np.arange(b)
    assert np.all(neg_text // 4 == rows // 4) and np.all(neg_image // 4 == rows // 4)
    assert np.all(neg_text != rows) and np.all(neg_image != rows)
    assert neg_text[0] != 1 and neg_text[1] != 0 and neg_image[0] != 1 and neg_image[1] != 0


def test_hard_negatives_follow_the_similarities():
  """With a sharp temperature, the negative is the most similar other text."""
  k1, k2 = jax.random.split(jax.random.key(3))
  image, text = _normalised(k1, (8, 2, 8)), _normalised(k2, (8, 8))
  ids = jnp.asarray(np.arange(8)[:, None] * np.ones((1, 3), int), jnp.int32)
  neg_text, _ = losses.hard_negatives(image, text, ids, jnp.float32(1e-4), jax.random.key(0), 1)
  sims = np.einsum("iqd,jd->ijq", np.asarray(image), np.asarray(text)).max(-1)
  np.fill_diagonal(sims, -np.inf)
  np.testing.assert_array_equal(neg_text, sims.argmax(1))


def test_an_itm_batch_too_small_for_a_hard_negative_is_refused_naming_it():
  image, text, ids = jnp.zeros((8, 2, 4)), jnp.zeros((8, 4)), jnp.zeros((8, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"batch of 8 over 8 devices leaves 1 row per device"):
    losses.hard_negatives(image, text, ids, jnp.float32(0.07), jax.random.key(0), 8)


# ---------------------------------------------------------------- ITG

def test_itg_loss_equals_a_numpy_reference():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  ids = rng.integers(0, 11, (2, 6))
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
  total, count = losses.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), 0.1)
  logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  want, n = 0.0, 0
  for b in range(2):
    for t in range(5):
      if mask[b, t + 1]:
        want += -0.9 * logp[b, t, ids[b, t + 1]] - 0.1 * logp[b, t].mean()
        n += 1
  assert int(count) == n == 8
  np.testing.assert_allclose(total, want, rtol=1e-5)


@pytest.mark.slow  # compiles the Q-Former's passes: about 20 s on 2 idle cores
def test_one_step_computes_all_three_losses_with_their_weights():
  module = blip2.Blip2(STAGE1)
  images, ids, mask = _batch(b=4)
  ids, mask = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, mask[:1]])
  images = jnp.concatenate([images, images[:1]])
  params = _init(module, jax.random.key(1), images[:4], ids[:4], mask[:4], method="initialize")["params"]
  batch = {"images": images[:4], "input_ids": ids[:4], "text_mask": mask[:4]}
  step = lambda weights: jax.jit(lambda p, b, k: losses.stage1_loss(module, p, b, k, weights))  # noqa: E731
  total, count, metrics = step({"itc": 1, "itm": 1, "itg": 1})(params, batch, jax.random.key(0))
  assert int(count) == 4
  np.testing.assert_allclose(total / 4, (metrics["itc"] + metrics["itm"] + metrics["itg"]) / 4, rtol=1e-5)
  only_itc, _, m2 = step({"itc": 2.0})(params, batch, jax.random.key(0))
  assert set(m2) == {"itc"}
  np.testing.assert_allclose(only_itc, 2 * m2["itc"], rtol=1e-6)


# ---------------------------------------------------------------- bad input

def test_text_longer_than_the_qformer_takes_is_refused_naming_both():
  module = blip2.Blip2(STAGE1)
  images, ids, mask = _batch(t=7)
  variables = jax.eval_shape(lambda k: module.init(k, images, ids, mask, method="initialize"), jax.random.key(1))
  long_ids = jnp.ones((3, 13), jnp.int32)
  with pytest.raises(ValueError, match=r"13 tokens is longer than its 12 position embeddings"):
    jax.eval_shape(lambda v: module.apply(v, long_ids, jnp.ones((3, 13), jnp.int32), method="encode_text"), variables)


def test_instructblip_without_its_instruction_is_refused():
  decoder = DecoderConfig(vocab_size=60, width=32, depth=1, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64,
                          max_length=32)
  cfg = dataclasses.replace(STAGE1, heads=(), decoder=decoder, instruction=True, image_token_id=59)
  module = blip2.Blip2(cfg)
  images, ids, mask = _batch()
  lm_ids = jnp.concatenate([jnp.full((3, 5), 59, jnp.int32), ids], axis=1)
  variables = jax.eval_shape(lambda k: module.init(k, images, lm_ids, ids, mask), jax.random.key(0))
  with pytest.raises(ValueError, match="InstructBLIP reads an instruction.*none was given"):
    jax.eval_shape(lambda v: module.apply(v, images, lm_ids), variables)
