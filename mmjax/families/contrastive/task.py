"""The `contrastive` task: CLIP or SigLIP trained on image-text pairs of a data directory.

`config.model` is {"family": "contrastive", every ContrastiveConfig field, with `vision`
and `text` as dicts of their towers' fields}. The text tower's vocabulary and end-of-text
id come from the data's tokenizer, and the compute dtype is
`config.mixed_precision.compute_dtype`; `data.text_length` may be shorter than the tower's
position table (`model.text.max_length`), never longer.

Data (`mmjax.data.pairs`): one image and one text of `data.text_length` tokens per example,
from the datasets `data.mixture` names (the embedded `captions` by default; a user's
imported captions the same way). The sampler draws pairs uniformly, so the near-duplicates
of the embedded scenes (two scenes differing in one shape's colour, or one-shape scenes
with the same caption) meet in a batch only at the rate the data holds them: they are the
batch's hard negatives when they differ, false negatives when their captions are the same
(a one-shape scene's caption names all it shows). The evaluation counts both ways
(`evaluate.retrieval`: exact pairs, and pairs whose scenes say the same).

The loss (`mmjax.losses.contrastive`) is over the global batch: every device's rows are
the other devices' negatives. So it is not a sum over micro-batches, and
`optimizer.grad_accum_steps` > 1 is refused (it would shrink the negatives to a
micro-batch's). The text attention mask is given to a tower that pools at the end-of-text
token (CLIP: causal, the mask changes nothing it pools), not to one that pools the last
position (SigLIP is trained attending its padding, as its tokenizer returns no mask).
"""

from __future__ import annotations


import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.data import pairs
from mmjax.families import base, common
from mmjax.families.contrastive import evaluate as evaluate_lib
from mmjax.families.contrastive import model as contrastive
from mmjax.losses import contrastive as losses
from mmjax.models.text_tower import TextTowerConfig
from mmjax.models.vit import ViTConfig, stem_flops

NOT_MODEL_FIELDS = ("family",)


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                 eos_token_id: int | None = None) -> contrastive.ContrastiveConfig:
  """The ContrastiveConfig of an experiment config (vocabulary and EOS from the tokenizer when given)."""
  m = config.model.to_dict()
  dtype = str(config.mixed_precision.compute_dtype)
  top = {k: v for k, v in m.items() if k not in ("vision", "text") + NOT_MODEL_FIELDS}
  text = dict(m.get("text", {}), dtype=dtype)
  if vocab_size is not None:
    text.update(vocab_size=vocab_size, eos_token_id=eos_token_id)
  cfg = common.replace_fields(
      contrastive.ContrastiveConfig, top, "",
      vision=common.replace_fields(ViTConfig, m.get("vision", {}), "vision", dtype=dtype),
      text=common.replace_fields(TextTowerConfig, text, "text"))
  return cfg.validate()


def check_config(config: ml_collections.ConfigDict, cfg: contrastive.ContrastiveConfig, *, data: bool = True) -> None:
  """ValueError naming the first setting this family cannot train with (`data`: also the
  data settings, which `mmjax compile` of a preset does not use)."""
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  if accum != 1:
    raise ValueError(f"optimizer.grad_accum_steps={accum}; the contrastive loss compares every pair of the global "
                     "batch, which micro-batches would cut into separate, smaller sets of negatives: expected 1 "
                     "(use more devices, or a smaller batch)")
  length = int(config.data.text_length)
  if length > cfg.text.max_length:
    raise ValueError(f"data.text_length={length} is longer than the text tower's {cfg.text.max_length} position "
                     "embeddings (model.text.max_length); expected at most that")
  size = int(config.data.get("image_size", cfg.vision.image_size))
  if data and size != cfg.vision.image_size:
    raise ValueError(f"data.image_size={size} but model.vision.image_size={cfg.vision.image_size}; expected equal")


def abstract_batch(cfg: contrastive.ContrastiveConfig, batch: int, length: int) -> dict:
  sds, s = jax.ShapeDtypeStruct, cfg.vision.image_size
  return {"images": sds((batch, s, s, 3), jnp.uint8), "input_ids": sds((batch, length), jnp.int32),
          "text_mask": sds((batch, length), jnp.int32), "text_truncated": sds((batch,), jnp.float32)}


class Model:
  """The dual encoder with unboxed float32 parameters, and its loss over a batch."""

  def __init__(self, cfg: contrastive.ContrastiveConfig, length: int):
    self.config = cfg
    self.module = contrastive.ContrastiveModel(cfg)
    s = cfg.vision.image_size
    self._example = (jnp.zeros((1, s, s, 3), jnp.uint8), jnp.zeros((1, length), jnp.int32))

  def init(self, key):
    return flax.core.meta.unbox(self.module.init(key, *self._example)["params"])

  def boxed(self, key):
    return jax.eval_shape(self.module.init, key, *self._example)["params"]

  def apply(self, params, batch, rng=None) -> dict:
    """{"image_embeds", "text_embeds", "logit_scale", "logit_bias"} of a batch."""
    del rng  # no dropout
    mask = batch["text_mask"] if self.config.text.pooling == "eos" else None
    return self.module.apply({"params": params}, batch["images"], batch["input_ids"], mask)

  def loss(self, params, batch, rng):
    """(loss x B, B, {"text_truncated": count}): the mean loss over the global batch, as the
    trainer's (sum, count) convention wants it."""
    out = self.apply(params, batch, rng)
    if self.config.loss == "sigmoid":
      value = losses.sigmoid_contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                                              out["logit_bias"])
    else:
      value = losses.softmax_contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    b = jnp.float32(out["image_embeds"].shape[0])
    extra = {"text_truncated": jnp.sum(batch["text_truncated"].astype(jnp.float32))} if "text_truncated" in batch else {}
    return value * b, b, extra


def param_metrics(params) -> dict[str, jax.Array]:
  """The temperature t = exp(logit_scale) (and SigLIP's bias), logged every step."""
  out = {"temperature": jnp.exp(params["logit_scale"])}
  if "logit_bias" in params:
    out["logit_bias"] = params["logit_bias"]
  return out


def forward_flops(cfg: contrastive.ContrastiveConfig, length: int) -> dict[str, float]:
  """Forward matmul FLOPs of one pair, per component (2mnk per matmul; the text causal
  attention counted half). The loss's B x B logits (2·B·E per pair) are left out: small."""
  v, t = cfg.vision, cfg.text
  p, dv = (v.image_size // v.patch_size) ** 2 + int(v.class_token), v.width
  vit_layer = 2 * p * dv * 3 * dv + 2 * p * dv * dv + 4 * p * p * dv + 2 * 2 * p * dv * v.mlp_dim
  vision = stem_flops(v) + v.depth * vit_layer
  if v.map_head:
    vision += 2 * dv * dv + 2 * p * dv * 2 * dv + 4 * p * dv + 2 * dv * dv + 2 * 2 * dv * v.mlp_dim
  dt = t.width
  text_layer = 2 * length * dt * 4 * dt + 4 * length * length * dt * (0.5 if t.causal else 1.0) \
      + 2 * 2 * length * dt * t.mlp_dim
  text = t.depth * text_layer + 2 * dt * (t.projection_dim or 0)
  head = 2 * dv * cfg.vision_projection_dim
  return {"vision": float(vision), "text": float(text), "head": float(head)}


def train_flops(cfg: contrastive.ContrastiveConfig, length: int, trainable: frozenset) -> float:
  """x3 for a trainable component, x1 for a frozen one (each tower's gradient stops at it)."""
  fwd = forward_flops(cfg, length)
  return sum((3.0 if c in trainable else 1.0) * f for c, f in fwd.items())


def contrastive_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory trains with."""
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer.vocab_size, tokenizer.eos_id)
  check_config(config, cfg)
  length = int(config.data.text_length)
  model = Model(cfg, length)
  builder = pairs.PairBuilder(tokenizer, length, cfg.vision.image_size,
                              truncate=bool(config.data.get("truncate_text", False)))
  bucket = data_lib.Bucket(max_images=1, text_length=length, image_size=cfg.vision.image_size)
  train_data, val_data = common.pipelines(config, tokenizer, bucket, builder=builder,
                                          default_mixture=pairs.DEFAULT_MIXTURE)
  d = common.data_dir(config)

  def evaluate(params) -> dict:
    return evaluate_lib.evaluate(model, params, tokenizer, d, config)

  embed_images, embed_ids = evaluate_lib.embedding_fns(model)

  def embed_texts(params, texts: list[str]):
    encoded = [pairs.encode_text(tokenizer, text, length, truncate=True)[:2] for text in texts]
    return embed_ids(params, np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded]))

  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=contrastive.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: train_flops(cfg, length, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes},
                   loss_fn=model.loss, components=contrastive.COMPONENTS, tokenizer=tokenizer, data_dir=d,
                   param_metrics=param_metrics, evaluate=evaluate, embed_images=embed_images,
                   embed_texts=embed_texts)


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  cfg = model_config(config)
  check_config(config, cfg, data=False)
  model = Model(cfg, cfg.text.max_length)
  return base.AbstractModel(
      config=cfg, init_params=model.init, apply_fn=model.apply, boxed_params=model.boxed,
      param_labels=contrastive.param_labels, loss_fn=model.loss, param_metrics=param_metrics,
      abstract_batch=lambda batch, length_, num_images: abstract_batch(cfg, batch, length_))


def upgrade_model(model: dict) -> dict:
  """A recorded `config.model`: fields added since then take their defaults."""
  out = common.with_new_fields(contrastive.ContrastiveConfig, {k: v for k, v in model.items() if k != "family"})
  out["vision"] = common.with_new_fields(ViTConfig, dict(model.get("vision", {})))
  out["text"] = common.with_new_fields(TextTowerConfig, dict(model.get("text", {})))
  return {**out, **({"family": model["family"]} if "family" in model else {})}


