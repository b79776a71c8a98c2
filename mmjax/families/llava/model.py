"""LLaVA: a vision tower's hidden states, a projector into the LM's width, and the projected
tokens written into the LM's input sequence where its `<image>` placeholders are.

  images [B, N, S, S, 3] --tower--> hidden states of `vision_feature_layers` (CLS dropped
  with select_strategy "default") --projector--> [B, N * P, D] per sample, + image_newline
  input_ids [B, T] --embed--> [B, T, D]; where feature_index >= 0 (or == NEWLINE) the row of
  the image table it names replaces the token's embedding --decoder--> logits [B, T, V]

N image *slots* per sample, each S x S pixels (LLaVA-1.5: one slot per image; LLaVA-NeXT:
the image's base view then its AnyRes tiles, `anyres.py`), P tokens per slot. Which tower
token goes where is the data pipeline's business (`feature_index`, computed on the host
from each image's size): the model only gathers, so a batch of images of different aspect
ratios has one shape and the splice shards like the rest of the batch (a
`take_along_axis` over each row, never a loop over examples). Hugging Face's order —
`LlavaForConditionalGeneration` fills its placeholders with the images' tokens in order;
`LlavaNextModel.pack_image_features` puts the base view's tokens, then the unpadded tile
grid row by row with `image_newline` after each row — is reproduced by the index maps of
`anyres.py`; `plain_feature_index` here gives LLaVA-1.5's.

Parameters: `vision` (a `VisionTransformer`, component "vision"), `projector` {linear_1,
linear_2} or {linear} (component "projector"), `image_newline` [D] with LLaVA-NeXT
(component "projector": it trains with the projector), `decoder` (component "lm").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.linear import dense
from mmjax.layers.mlp import ACTIVATIONS
from mmjax.models.decoder import Decoder, DecoderConfig, init_decoder_cache
from mmjax.models.vit import ViTConfig, VisionTransformer, normalize_images

COMPONENTS = ("vision", "projector", "lm")
# feature_index values that are not a tower token: a text token, LLaVA-NeXT's image_newline.
TEXT, NEWLINE = -1, -2
PROJECTORS = ("mlp2x", "linear")
SELECT_STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: ViTConfig = ViTConfig()
  decoder: DecoderConfig = DecoderConfig()
  # The tower's hidden states the projector reads (indices into the depth + 1 of them, the
  # embeddings first, as Hugging Face's `vision_feature_layer`): (-2,) the penultimate
  # block (LLaVA-1.5); several are concatenated along the width.
  vision_feature_layers: tuple[int, ...] = (-2,)
  # "default" drops each slot's first token (the CLS), "full" keeps it.
  select_strategy: str = "default"
  # "mlp2x": Linear-act-Linear (LLaVA-1.5's mlp2x_gelu); "linear": one Linear (LLaVA-1.0,
  # MiniGPT-4's projection).
  projector: str = "mlp2x"
  projector_activation: str = "gelu"
  projector_bias: bool = True
  # LLaVA-NeXT's learned vector after each row of tile tokens.
  image_newline: bool = False
  # LLaVA-NeXT's AnyRes grid resolutions as (height, width) pixel pairs, multiples of the
  # tower's image_size; () for LLaVA-1.5 (one slot per image).
  grid_pinpoints: tuple[tuple[int, int], ...] = ()
  # The id of `<image>` (each placeholder position holds it).
  image_token_id: int = 32000

  @property
  def tokens_per_slot(self) -> int:
    """P: the tower tokens one S x S slot gives the LM."""
    return self.vision.grid_size ** 2 + int(self.vision.class_token and self.select_strategy == "full")

  def validate(self) -> LlavaConfig:
    """Returns self, or raises ValueError naming the first field with a value LLaVA does not take."""
    if self.projector not in PROJECTORS:
      raise ValueError(f"LlavaConfig.projector={self.projector!r}; expected one of {PROJECTORS}")
    if self.select_strategy not in SELECT_STRATEGIES:
      raise ValueError(f"LlavaConfig.select_strategy={self.select_strategy!r}; expected one of {SELECT_STRATEGIES}")
    if self.projector_activation not in ACTIVATIONS:
      raise ValueError(f"LlavaConfig.projector_activation={self.projector_activation!r}; expected one of "
                       f"{sorted(ACTIVATIONS)}")
    if not self.vision_feature_layers:
      raise ValueError("LlavaConfig.vision_feature_layers=(); expected at least one layer index")
    depth = self.vision.depth
    bad = [i for i in self.vision_feature_layers if not -(depth + 1) <= i <= depth]
    if bad:
      raise ValueError(f"LlavaConfig.vision_feature_layers has {bad}; expected indices into the tower's "
                       f"{depth + 1} hidden states ({-(depth + 1)}..{depth})")
    if self.select_strategy == "default" and not self.vision.class_token:
      raise ValueError("LlavaConfig.select_strategy='default' drops the CLS token, but the tower has none "
                       "(vision.class_token=False); expected select_strategy='full'")
    s = self.vision.image_size
    bad = [p for p in self.grid_pinpoints if len(p) != 2 or p[0] % s or p[1] % s or min(p) < s]
    if bad:
      raise ValueError(f"LlavaConfig.grid_pinpoints has {bad}; expected (height, width) pairs of positive "
                       f"multiples of vision.image_size={s}")
    if self.grid_pinpoints and not self.image_newline:
      raise ValueError("LlavaConfig.grid_pinpoints without image_newline; LLaVA-NeXT's AnyRes puts a newline "
                       "after each tile row (expected image_newline=True)")
    return self


class Projector(nn.Module):
  """Tower features [..., F] -> LM embeddings [..., D]."""

  config: LlavaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    width, dtype = c.decoder.width, c.decoder.dtype
    if c.projector == "linear":
      return dense(width, ("mlp", "embed"), use_bias=c.projector_bias, dtype=dtype, name="linear")(x)
    x = dense(width, ("mlp", "embed"), use_bias=c.projector_bias, dtype=dtype, name="linear_1")(x)
    x = ACTIVATIONS[c.projector_activation](x)
    return dense(width, ("mlp", "embed"), use_bias=c.projector_bias, dtype=dtype, name="linear_2")(x)


class Llava(nn.Module):
  """(images, input_ids, feature_index) -> (logits float32 [B, T, V], cache); see the module docstring."""

  config: LlavaConfig

  def setup(self):
    c = self.config.validate()
    self.vision = VisionTransformer(c.vision)
    self.projector = Projector(c)
    if c.image_newline:
      scale = 1.0 / np.sqrt(c.decoder.width)
      self.image_newline = self.param(
          "image_newline", nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), ("embed",)),
          (c.decoder.width,), jnp.float32)
    self.decoder = Decoder(c.decoder)

  def image_features(self, images: jax.Array) -> jax.Array:
    """UInt8/Float[B, N, S, S, 3] slots -> the image table Float[B, N * P (+1 newline), D]."""
    c = self.config
    if images.ndim != 5 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}; expected [batch, slots, height, width, 3]")
    b, n = images.shape[:2]
    x = normalize_images(images.reshape((b * n,) + images.shape[2:]), c.vision).astype(c.vision.dtype)
    hidden = self.vision.features(x)["hidden_states"]
    chosen = [hidden[i] for i in c.vision_feature_layers]
    if c.select_strategy == "default":
      chosen = [h[:, 1:] for h in chosen]
    feats = self.projector(jnp.concatenate(chosen, axis=-1).astype(c.decoder.dtype))
    table = feats.reshape(b, n * feats.shape[1], feats.shape[-1])
    if c.image_newline:
      newline = jnp.broadcast_to(self.image_newline.astype(table.dtype), (b, 1, table.shape[-1]))
      table = jnp.concatenate([table, newline], axis=1)
    return nn.with_logical_constraint(table, ("batch", "length", "embed"))

  def embed(self, images: jax.Array, input_ids: jax.Array, feature_index: jax.Array) -> jax.Array:
    """The decoder's input Float[B, T, D]: token embeddings with the image table's rows
    written where feature_index names one (>= 0, or NEWLINE: the table's last row)."""
    if input_ids.ndim != 2 or feature_index.shape != input_ids.shape:
      raise ValueError(f"input_ids {input_ids.shape} and feature_index {feature_index.shape}; expected both "
                       "[batch, length]")
    text = self.decoder.embed(input_ids)
    table = self.image_features(images)
    rows = jnp.where(feature_index == NEWLINE, table.shape[1] - 1, feature_index)
    picked = jnp.take_along_axis(table, jnp.clip(rows, 0, table.shape[1] - 1)[..., None], axis=1)
    is_image = (feature_index >= 0) | (feature_index == NEWLINE)
    return jnp.where(is_image[..., None], picked.astype(text.dtype), text)

  def __call__(self, images: jax.Array, input_ids: jax.Array, feature_index: jax.Array, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache: dict | None = None):
    x = self.embed(images, input_ids, feature_index)
    return self.decoder(embeddings=x, positions=positions, segment_ids=segment_ids, cache=cache)

  def decode(self, input_ids: jax.Array, *, positions: jax.Array, cache: dict):
    """Text tokens only (generation after the prefill): (logits, cache)."""
    return self.decoder(input_ids, positions=positions, cache=cache)


def plain_feature_index(input_ids: np.ndarray | jax.Array, image_token_id: int):
  """LLaVA-1.5's map: the k-th `<image>` position of each row takes image-table row k (the
  images' tokens in order, as Hugging Face's `LlavaForConditionalGeneration` fills its
  placeholders); TEXT elsewhere. Works on numpy and jax arrays alike."""
  xp = jnp if isinstance(input_ids, jax.Array) else np
  is_image = input_ids == image_token_id
  k = xp.cumsum(is_image.astype(xp.int32), axis=-1) - 1
  return xp.where(is_image, k, TEXT).astype(xp.int32)


def init_cache(config: LlavaConfig, batch: int, length: int) -> dict:
  return init_decoder_cache(config.decoder, batch, length)


def param_labels(params: Any) -> Any:
  """{"vision": "vision", "projector" and "image_newline": "projector", "decoder": "lm"} per leaf."""
  names = {"vision": "vision", "projector": "projector", "image_newline": "projector", "decoder": "lm"}
  is_box = lambda x: isinstance(x, nn.Partitioned)
  out = {}
  for key, sub in params.items():
    if key not in names:
      raise ValueError(f"LLaVA parameters have an entry {key!r}; expected {sorted(names)}")
    out[key] = jax.tree.map(lambda _, label=names[key]: label, sub, is_leaf=is_box)
  return out
