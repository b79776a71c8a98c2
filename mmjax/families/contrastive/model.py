"""Dual-encoder image-text models (CLIP, SigLIP): the module, its config and parameter labels.

``ContrastiveModel(config)`` holds an image tower (``mmjax.models.vit``), a text tower
(``mmjax.models.text_tower``), the image projection into the shared embedding space and the
learned temperature (and SigLIP's bias). Both towers' outputs are L2-normalised, so a logit
is ``exp(logit_scale) * cos(image, text) (+ logit_bias)``.

Parameter tree (all float32)::

  vision {...}                   the ViT (its own docstring), the tree Flamingo's `vision` has
  text {...}                     the text tower, its projection included
  visual_projection {kernel [Dv, E]}   if vision_projection_dim (CLIP; SigLIP's MAP head
                                       output is the embedding)
  logit_scale []                 log t: CLIP log(1/0.07), SigLIP log 10
  logit_bias []                  if loss == 'sigmoid': SigLIP -10

Components (`freeze.stages` names them): ``vision``, ``text``, ``head`` (the image
projection, ``logit_scale`` and ``logit_bias``; the text projection is the text tower's).

Dimension letters: B batch, S image side, T text length, Dv vision width, E embedding width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import sharding as sh
from mmjax.layers.linear import dense
from mmjax.models.text_tower import TextTower, TextTowerConfig
from mmjax.models.vit import ViTConfig, VisionTransformer, normalize_images

COMPONENTS = ("vision", "text", "head")
LOSSES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  vision: ViTConfig = ViTConfig()
  text: TextTowerConfig = TextTowerConfig()
  # Width E of the image projection (CLIP's visual_projection, no bias), or 0 for none: the
  # tower's pooled vector is the embedding (SigLIP's MAP head).
  vision_projection_dim: int = 512
  # 'softmax' (CLIP's InfoNCE) or 'sigmoid' (SigLIP's pairwise loss, with logit_bias).
  loss: str = "softmax"
  # Initial log temperature: CLIP log(1/0.07) = 2.659 (Radford et al. 2021, sec. 2.5),
  # SigLIP log 10 (Zhai et al. 2023, sec. 3.2).
  logit_scale_init: float = math.log(1 / 0.07)
  # Initial logit bias of the sigmoid loss: SigLIP -10 (ibid.); unused by 'softmax'.
  logit_bias_init: float = -10.0
  # The temperature is clipped at exp(max_logit_scale) = 100 in the loss and the logits,
  # CLIP's guard against training instability (Radford et al. 2021, sec. 2.5); 0: no clip.
  max_logit_scale: float = math.log(100.0)

  @property
  def embed_dim(self) -> int:
    """E: the width of both embeddings."""
    return self.vision_projection_dim or self.vision.width

  def validate(self) -> "ContrastiveConfig":
    """Returns self, or raises ValueError naming the first inconsistent field."""
    if self.loss not in LOSSES:
      raise ValueError(f"loss={self.loss!r}, expected one of {LOSSES}")
    if self.vision_projection_dim < 0:
      raise ValueError(f"vision_projection_dim={self.vision_projection_dim}, expected >= 0 (0: no projection)")
    text_dim = self.text.projection_dim or self.text.width
    if text_dim != self.embed_dim:
      raise ValueError(f"the text embedding has width {text_dim} (text.projection_dim or text.width) but the "
                       f"image embedding {self.embed_dim} (vision_projection_dim or vision.width); expected equal")
    if self.max_logit_scale < 0:
      raise ValueError(f"max_logit_scale={self.max_logit_scale}, expected >= 0 (0: no clip)")
    self.vision.validate()
    self.text.validate()
    return self


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis, in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class ContrastiveModel(nn.Module):
  """uint8 images [B, S, S, 3] and text ids [B, T] -> normalised embeddings and temperature."""

  config: ContrastiveConfig

  def setup(self):
    cfg = self.config.validate()
    self.vision = VisionTransformer(cfg.vision)
    self.text = TextTower(cfg.text)
    if cfg.vision_projection_dim:
      self.visual_projection = dense(cfg.vision_projection_dim, ("embed", None), dtype=cfg.vision.dtype)
    self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32)
    if cfg.loss == "sigmoid":
      self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
          nn.initializers.constant(cfg.logit_bias_init), ()), (), jnp.float32)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """uint8 (or [0, 1] float) images [B, S, S, 3] -> Float32[B, E], unit length."""
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}; expected [batch, side, side, 3]")
    pooled = self.vision.pooled(normalize_images(images, cfg.vision))
    if cfg.vision_projection_dim:
      pooled = self.visual_projection(pooled)
    return nn.with_logical_constraint(l2_normalize(pooled), ("batch", None))

  def encode_text(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Token ids Int[B, T] (+ optional mask [B, T]) -> Float32[B, E], unit length."""
    return nn.with_logical_constraint(l2_normalize(self.text(ids, attention_mask)), ("batch", None))

  def temperature(self) -> tuple[jax.Array, jax.Array]:
    """(log t clipped at max_logit_scale, logit bias (0 for 'softmax')), float32 scalars."""
    cfg = self.config
    scale = self.logit_scale
    if cfg.max_logit_scale:
      scale = jnp.minimum(scale, cfg.max_logit_scale)
    bias = self.logit_bias if cfg.loss == "sigmoid" else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, images: jax.Array, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    """{"image_embeds" [B, E], "text_embeds" [B, E], "logit_scale", "logit_bias"}."""
    scale, bias = self.temperature()
    return {"image_embeds": self.encode_image(images), "text_embeds": self.encode_text(ids, attention_mask),
            "logit_scale": scale, "logit_bias": bias}


def logits(outputs: dict) -> jax.Array:
  """The [B_image, B_text] logits exp(logit_scale) <x_i, y_j> + logit_bias (HF's logits_per_image)."""
  dots = jnp.einsum("ie,te->it", outputs["image_embeds"], outputs["text_embeds"])
  return jnp.exp(outputs["logit_scale"]) * dots + outputs["logit_bias"]


def param_label(keys: list[str] | tuple[str, ...]) -> str:
  """'vision' | 'text' | 'head' for one parameter's key path."""
  keys = [k for k in keys if k != "params"]
  if keys and keys[0] in ("vision", "text"):
    return keys[0]
  return "head"


def param_labels(params: Any) -> Any:
  """A tree like ``params`` (boxed or not) of component labels."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_label(sh.key_names(path)), params,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
