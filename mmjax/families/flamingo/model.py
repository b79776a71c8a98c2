"""Flamingo: vision tower -> Perceiver Resampler -> decoder with gated cross-attention.

Dimension letters: B batch, N images, H/W pixels, P patches, L latents, Dv vision width,
T text length, V vocabulary.

Top-level parameters: ``vision`` (a ``VisionTransformer``), ``resampler`` (a
``PerceiverResampler``), ``decoder`` (a ``Decoder`` with ``XAttnInsert`` inserted before every
``cross_attn_every_n_layers``-th layer: its ``xattn_{i}`` modules, or ``blocks/xattn`` when
scanned, are the gated cross-attention layers). :func:`param_labels` names each parameter's component so
that training can freeze any set of them (optax masks).

Input checks (:func:`validate_inputs`): shapes, ranks and dtypes are checked always;
checks on values (token ids in the vocabulary, one image per ``<image>`` token) run
eagerly, when the arrays are concrete. Under ``jax.jit`` only the shape checks can run:
the trainer's data pipeline validates the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import sharding as sh
from mmjax.models import scan_layout
from mmjax.models.decoder import Decoder, DecoderConfig, init_decoder_cache
from mmjax.models.gated_xattn import GatedXAttnConfig, GatedXAttnDense
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  vision: ViTConfig = ViTConfig()
  resampler: PerceiverConfig = PerceiverConfig()
  decoder: DecoderConfig = DecoderConfig()
  # Token id of <image>; image_index = cumsum(input_ids == media_token_id).
  media_token_id: int = 32000
  # Token id of <|endofchunk|>.
  end_of_chunk_token_id: int = 32001
  # A GatedXAttnDense before every n-th LM layer (layers n-1, 2n-1, ... as in
  # open_flamingo); 0 for none (the plain LM).
  cross_attn_every_n_layers: int = 4
  # Shape of each GatedXAttnDense (its width is the decoder's, its media width the
  # resampler's).
  xattn_num_heads: int = 8
  xattn_head_dim: int = 64
  xattn_ff_mult: int = 4
  # True: a token sees only the latents of the last image before it.
  only_attend_immediate_media: bool = True


# Fields that sat in DecoderConfig before the decoder became family-neutral (work
# directories and checkpoints written then record them under `model.decoder`).
MOVED_DECODER_FIELDS = ("cross_attn_every_n_layers", "xattn_num_heads", "xattn_head_dim", "xattn_ff_mult",
                        "only_attend_immediate_media", "media_width")


def upgrade_model_dict(model: dict) -> dict:
  """A recorded `config.model` dict in today's layout: fields the decoder and the ViT gained
  since take their defaults (the behaviour it was recorded with); the cross-attention fields that an
  older DecoderConfig held move up to FlamingoConfig (`media_width` is the resampler's
  width and goes; a differing one is refused, as the model would have been)."""
  from mmjax.families import common  # pylint: disable=g-import-not-at-top
  decoder = common.with_new_fields(DecoderConfig, dict(model.get("decoder", {})))
  if "vision" in model:  # fields the ViT gained since (post_norm_tokens) take their defaults
    model = {**model, "vision": common.with_new_fields(ViTConfig, dict(model["vision"]))}
  moved = {k: decoder.pop(k) for k in MOVED_DECODER_FIELDS if k in decoder}
  if not moved:
    return {**model, "decoder": decoder}
  media_width = moved.pop("media_width", None)
  width = model.get("resampler", {}).get("width")
  if media_width is not None and moved.get("cross_attn_every_n_layers") and media_width != width:
    raise ValueError(f"model.decoder.media_width={media_width} differs from model.resampler.width={width}; "
                     "expected them equal (the cross-attention reads the resampler's latents)")
  return {**model, **moved, "decoder": decoder}


def xattn_config(config: FlamingoConfig) -> GatedXAttnConfig:
  """The GatedXAttnConfig of the model's cross-attention layers."""
  d = config.decoder
  return GatedXAttnConfig(
      width=d.width, media_width=config.resampler.width, num_heads=config.xattn_num_heads,
      head_dim=config.xattn_head_dim, ff_mult=config.xattn_ff_mult,
      only_attend_immediate_media=config.only_attend_immediate_media, dtype=d.dtype,
      attention_backend=d.attention_backend)


class XAttnInsert(GatedXAttnDense):
  """A GatedXAttnDense as the decoder's insert: ``side`` = {"image_index", "media"}, state =
  its media keys/values (``prepare(media)``), or None to compute them from side's media."""

  def prepare(self, media: jax.Array) -> dict:
    return self.compute_media_kv(media)

  def __call__(self, x: jax.Array, side: dict, state: dict | None = None) -> jax.Array:  # pylint: disable=arguments-differ
    if state is not None:
      return super().__call__(x, side["image_index"], media_kv=state)
    return super().__call__(x, side["image_index"], media=side["media"])


def insert(config: FlamingoConfig) -> scan_layout.Insert:
  """Where the cross-attention layers go in the decoder, and how to build one."""
  if config.cross_attn_every_n_layers < 0:
    raise ValueError(f"cross_attn_every_n_layers={config.cross_attn_every_n_layers}; expected >= 0 "
                     "(0: no cross-attention)")
  return scan_layout.Insert("xattn", config.cross_attn_every_n_layers, XAttnInsert, (xattn_config(config),))


def xattn_layer_indices(config: FlamingoConfig) -> tuple[int, ...]:
  """The LM layers preceded by a GatedXAttnDense: i with (i + 1) % n == 0 (open_flamingo)."""
  return scan_layout.insert_layer_indices(config.decoder.depth, insert(config))


def scan_plan(config: FlamingoConfig) -> scan_layout.ScanPlan:
  return scan_layout.scan_plan(config.decoder.depth, insert(config))


def stack_layers(params, config: FlamingoConfig):
  """Unrolled Flamingo (or its decoder's) params -> the ``scan_layers`` layout."""
  return scan_layout.stack_layers(params, config.decoder.depth, insert(config))


def unstack_layers(params, config: FlamingoConfig):
  """The ``scan_layers`` layout -> unrolled params (exact inverse of ``stack_layers``)."""
  return scan_layout.unstack_layers(params, config.decoder.depth, insert(config))


def init_cache(config: FlamingoConfig, batch: int, length: int) -> dict:
  """An empty self-attention cache for the model's decoder."""
  return init_decoder_cache(config.decoder, batch, length, insert(config))


LABELS = ("vision", "resampler", "xattn", "lm")


def image_index_from_ids(input_ids: jax.Array, media_token_id: int) -> jax.Array:
  """Int32[B, T]: number of <image> tokens at or before each token (0: no image yet)."""
  return jnp.cumsum((input_ids == media_token_id).astype(jnp.int32), axis=1, dtype=jnp.int32)


def _concrete(x) -> np.ndarray | None:
  """x as a numpy array, or None when it is a tracer (inside jit)."""
  if x is None:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def validate_inputs(
    config: FlamingoConfig,
    images: Any,
    input_ids: Any,
    image_mask: Any = None,
    *,
    max_length: int | None = None,
) -> None:
  """Raises ValueError naming the first bad input of ``Flamingo.__call__``.

  Args:
    config: the model config.
    images: UInt8 or Float[B, N, H, W, 3].
    input_ids: Int[B, T].
    image_mask: optional Bool[B, N], True for real images (the rest are padding).
    max_length: the longest allowed T (default ``config.decoder.max_length``).
  """
  max_length = config.decoder.max_length if max_length is None else max_length
  vocab = config.decoder.vocab_size
  if images is None:
    raise ValueError("images is None; expected UInt8 or Float[B, N, H, W, 3]")
  if getattr(input_ids, "ndim", None) != 2:
    raise ValueError(
        f"input_ids has shape {getattr(input_ids, 'shape', None)}; expected [batch, length]")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids has dtype {input_ids.dtype}; expected an integer dtype")
  b, t = input_ids.shape
  if t > max_length:
    raise ValueError(f"sequence length {t} exceeds the configured maximum {max_length}")
  if images.ndim != 5 or images.shape[-1] != 3:
    raise ValueError(
        f"images has shape {images.shape}; expected rank 5 [batch, images, height, width, 3]")
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images has dtype {images.dtype}; expected uint8 or a float dtype")
  if images.shape[0] != b:
    raise ValueError(f"images has batch {images.shape[0]} but input_ids has batch {b}")
  n = images.shape[1]
  if image_mask is not None and tuple(image_mask.shape) != (b, n):
    raise ValueError(f"image_mask has shape {image_mask.shape}; expected {(b, n)}")

  ids = _concrete(input_ids)
  if ids is None:
    return  # Under jit: values are the data pipeline's to validate.
  bad = (ids < 0) | (ids >= vocab)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"token id {int(ids[where])} at {where} is outside the vocabulary [0, {vocab})")
  num_tokens = (ids == config.media_token_id).sum(axis=1)
  mask = _concrete(image_mask)
  num_images = np.full((b,), n) if mask is None else mask.astype(bool).sum(axis=1)
  for i in range(b):
    if num_tokens[i] != num_images[i]:
      raise ValueError(
          f"example {i} has {int(num_images[i])} images but {int(num_tokens[i])} <image>"
          f" tokens (id {config.media_token_id}); expected one image per <image> token")


class Flamingo(nn.Module):
  """Images [B, N, H, W, 3] and token ids [B, T] -> logits float32 [B, T, V]."""

  config: FlamingoConfig

  def setup(self):
    from mmjax.models.perceiver import PerceiverResampler  # pylint: disable=g-import-not-at-top
    from mmjax.models.vit import VisionTransformer  # pylint: disable=g-import-not-at-top
    c = self.config
    if c.resampler.width != c.vision.width:
      raise ValueError(
          f"resampler.width={c.resampler.width} differs from vision.width={c.vision.width}")
    self.vision = VisionTransformer(c.vision)
    self.resampler = PerceiverResampler(c.resampler)
    self.decoder = Decoder(c.decoder, insert(c))

  def encode_images(self, images: jax.Array) -> jax.Array:
    """Float[B, N, L, Dv] latents from images UInt8/Float[B, N, H, W, 3].

    Images are normalised with the vision config's mean/std; the CLS token is dropped
    (OpenFlamingo feeds the resampler ``visual(x)[1]``, the patch tokens).
    """
    from mmjax.models.vit import normalize_images  # pylint: disable=g-import-not-at-top
    b, n, h, w, ch = images.shape
    pixels = normalize_images(images.reshape(b * n, h, w, ch), self.config.vision)
    tokens = self.vision(pixels)  # [B*N, P(+1), Dv]
    if self.config.vision.class_token:
      tokens = tokens[:, 1:]
    tokens = tokens.reshape(b, n, 1, tokens.shape[1], tokens.shape[2])  # one frame each
    tokens = nn.with_logical_constraint(tokens, ("batch", "images", "frames", "patches", "embed"))
    latents = self.resampler(tokens)
    return nn.with_logical_constraint(latents, ("batch", "images", "latents", "embed"))

  def compute_media_kv(self, images: jax.Array) -> dict:
    """Every cross-attention layer's media keys/values for images [B, N, H, W, 3]."""
    return self.decoder.prepare_inserts(self.encode_images(images))

  def decode(
      self,
      input_ids: jax.Array,
      *,
      image_index: jax.Array,
      media_kv: dict,
      positions: jax.Array | None = None,
      cache: dict | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """The decoder over precomputed media keys/values: (logits [B, T, V], new cache)."""
    return self.decoder(input_ids, side={"image_index": image_index, "media": None},
                        insert_state=media_kv, positions=positions, cache=cache)

  def __call__(
      self,
      images: jax.Array,
      input_ids: jax.Array,
      image_index: jax.Array | None = None,
      image_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Logits float32 [B, T, V].

    Args:
      images: UInt8 (0..255) or Float[B, N, H, W, 3] (as ``vit.normalize_images``
        expects); N may include padding images (see image_mask).
      input_ids: Int[B, T], with one ``media_token_id`` per real image.
      image_index: Int[B, T]; default ``cumsum(input_ids == media_token_id)``.
      image_mask: Bool[B, N], True for real images; padding images must come last.
    """
    validate_inputs(self.config, images, input_ids, image_mask)
    if image_index is None:
      image_index = image_index_from_ids(input_ids, self.config.media_token_id)
    media = self.encode_images(images)
    logits, _ = self.decoder(input_ids, side={"image_index": image_index, "media": media})
    return logits


# The labels `param_label` gives, in the order data flows.
COMPONENTS = ("vision", "resampler", "xattn", "lm")


def param_label(keys: list[str] | tuple[str, ...]) -> str:
  """'vision' | 'resampler' | 'xattn' | 'lm' for one parameter's key path."""
  keys = [k for k in keys if k != "params"]
  if keys and keys[0] == "vision":
    return "vision"
  if keys and keys[0] == "resampler":
    return "resampler"
  if any(k.startswith("xattn") for k in keys):  # xattn_{i}, or blocks/xattn (scan_layers)
    return "xattn"
  return "lm"


def param_labels(params: Any) -> Any:
  """A tree like ``params`` (boxed or not, with or without the 'params' level) whose
  leaves are 'vision', 'resampler', 'xattn' or 'lm' — for ``optax.multi_transform``
  or freezing masks."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_label(sh.key_names(path)), params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
