"""BLIP-2 (Li et al. 2023), InstructBLIP (Dai et al. 2023) and MiniGPT-4 (Zhu et al. 2023): a
frozen image encoder, a Q-Former (`qformer.py`) whose learned queries read the image, and
(stage 2) a linear projection of the query outputs into a frozen decoder-only LM.

Dimension letters: B batch, S image side, P image features, E their width, Q queries, W the
Q-Former's width, T text tokens, D the LM's width, V a vocabulary, F the ITC width.

Stage 1 (representation learning; `heads` "itc", "itm", "itg"; no LM):
  images --tower--> image [B, P, E]; the queries cross-attend to it through the Q-Former
  ITC: max over queries of <vision_projection(query out), text_projection(text CLS)>
  ITM: itm_head(mean over queries of the query outputs of [queries; text], bidirectional)
  ITG: the text after the queries, causally, predicts its next token (`itg_*` head, tied
       to the Q-Former's word embeddings)
  (`losses.py` computes all three from `Blip2.pretrain`.)

Stage 2 (generative learning; `decoder` set):
  query out [B, Q, W] --language_projection--> [B, Q, D], written in order over the
  `image_token_id` placeholders of the LM's input ids (Hugging Face's layout since
  transformers 4.47: the processor puts Q placeholders before the text) --decoder--> logits.
  InstructBLIP (`instruction=True`): the instruction's tokens enter the Q-Former after the
  queries (one bidirectional self-attention); only the query outputs go on to the LM.
  MiniGPT-4: the same model, over a LLaMA/Vicuna decoder, trained with everything but
  `language_projection` frozen.

Parameters: `vision` (component "vision"), `query_tokens`, `qformer` and the stage-1 heads
`vision_projection`, `text_projection`, `itm_head`, `itg_transform`, `itg_layernorm`,
`itg_bias`, `temperature` (component "qformer"), `language_projection` (component
"projector"), `decoder` (component "lm").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.families.blip2 import qformer as qformer_lib
from mmjax.families.blip2.qformer import QFormer, QFormerConfig
from mmjax.layers.linear import dense
from mmjax.layers.mlp import ACTIVATIONS
from mmjax.layers.norms import LayerNorm
from mmjax.models.decoder import Decoder, DecoderConfig, init_decoder_cache
from mmjax.models.vit import ViTConfig, VisionTransformer, normalize_images

COMPONENTS = ("vision", "qformer", "projector", "lm")
HEADS = ("itc", "itm", "itg")
# The stage-1 heads' parameters.
HEAD_PARAMS = ("vision_projection", "text_projection", "temperature", "itm_head", "itg_transform", "itg_layernorm",
               "itg_bias")


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  vision: ViTConfig = ViTConfig()
  qformer: QFormerConfig = QFormerConfig()
  # The LM of stage 2; None: the stage-1 model (no LM, no projection).
  decoder: DecoderConfig | None = None
  # The stage-1 heads this model has: "itc" (vision/text projections and the temperature),
  # "itm" (the matching head), "itg" (the generation head over the Q-Former's text).
  heads: tuple[str, ...] = ()
  # ITC's shared embedding width F (Hugging Face's image_text_hidden_size).
  embed_dim: int = 256
  # ITC's temperature at initialisation, and the range it is clamped to (LAVIS).
  temperature: float = 0.07
  temperature_range: tuple[float, float] = (0.001, 0.5)
  # InstructBLIP: the instruction enters the Q-Former with the queries.
  instruction: bool = False
  # The LM-input placeholder id each query output replaces (stage 2).
  image_token_id: int = 50265
  # The Q-Former text's first token in ITG (BLIP-2's [DEC]; the BERT vocabulary's extra row).
  decoder_token_id: int = 30522
  # The Q-Former text's padding id.
  pad_token_id: int = 0

  def validate(self) -> Blip2Config:
    """Returns self, or raises ValueError naming the first field with a value BLIP-2 does not take."""
    self.qformer.validate()
    bad = [h for h in self.heads if h not in HEADS]
    if bad:
      raise ValueError(f"Blip2Config.heads has {bad}; expected names from {HEADS}")
    if self.qformer.encoder_width != self.vision.width:
      raise ValueError(f"Blip2Config.qformer.encoder_width={self.qformer.encoder_width} but the vision tower is "
                       f"{self.vision.width} wide; expected equal")
    if self.heads and not self.qformer.text_input:
      raise ValueError(f"Blip2Config.heads={self.heads} need text in the Q-Former, but qformer.text_input=False")
    if self.instruction and not self.qformer.text_input:
      raise ValueError("Blip2Config.instruction=True (InstructBLIP) needs qformer.text_input=True")
    if self.instruction and self.decoder is None:
      raise ValueError("Blip2Config.instruction=True (InstructBLIP) is a stage-2 model; expected a decoder")
    if "itg" in self.heads and not 0 <= self.decoder_token_id < self.qformer.vocab_size:
      raise ValueError(f"Blip2Config.decoder_token_id={self.decoder_token_id} is outside the Q-Former's "
                       f"vocabulary of {self.qformer.vocab_size}")
    lo, hi = self.temperature_range
    if not 0 < lo <= self.temperature <= hi:
      raise ValueError(f"Blip2Config.temperature={self.temperature} outside temperature_range={self.temperature_range}")
    return self

  @property
  def num_queries(self) -> int:
    return self.qformer.num_queries


class Blip2(nn.Module):
  """See the module docstring. Stage 2's `__call__(images, input_ids, ...)` -> (logits, cache)."""

  config: Blip2Config

  def setup(self):
    c = self.config.validate()
    q = c.qformer
    self.vision = VisionTransformer(c.vision)
    self.query_tokens = self.param(
        "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("queries", "embed")),
        (q.num_queries, q.width), jnp.float32)
    self.qformer = QFormer(q)
    if "itc" in c.heads:
      self.vision_projection = dense(c.embed_dim, ("embed", None), use_bias=True, name="vision_projection")
      self.text_projection = dense(c.embed_dim, ("embed", None), use_bias=True, name="text_projection")
      self.temperature = self.param("temperature", nn.initializers.constant(c.temperature), (), jnp.float32)
    if "itm" in c.heads:
      self.itm_head = dense(2, ("embed", None), use_bias=True, name="itm_head")
    if "itg" in c.heads:
      self.itg_transform = dense(q.width, ("embed", "mlp"), use_bias=True, name="itg_transform")
      self.itg_layernorm = LayerNorm(eps=q.norm_eps, name="itg_layernorm")
      self.itg_bias = self.param("itg_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                 (q.vocab_size,), jnp.float32)
    if c.decoder is not None:
      self.language_projection = dense(c.decoder.width, ("mlp", "embed"), use_bias=True,
                                       dtype=c.decoder.dtype, name="language_projection")
      self.decoder = Decoder(c.decoder)

  # ------------------------------------------------------------------ shared pieces

  def image_features(self, images: jax.Array) -> jax.Array:
    """UInt8/Float[B, S, S, 3] -> the tower's last post-normed tokens Float[B, P, E]."""
    c = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images have shape {images.shape}; expected [batch, height, width, 3]")
    return self.vision(normalize_images(images, c.vision).astype(c.vision.dtype))

  def _queries(self, batch: int) -> jax.Array:
    q = jnp.broadcast_to(self.query_tokens[None], (batch,) + self.query_tokens.shape)
    return nn.with_logical_constraint(q, ("batch", "queries", "embed"))

  def query_outputs(self, image: jax.Array, instruction_ids: jax.Array | None = None,
                    instruction_mask: jax.Array | None = None) -> jax.Array:
    """Float32[B, Q, W]: the queries after the Q-Former, reading `image` [B, P, E] (and, for
    InstructBLIP, the instruction, bidirectionally with the queries)."""
    c = self.config
    b = image.shape[0]
    if c.instruction:
      if instruction_ids is None:
        raise ValueError("InstructBLIP reads an instruction in its Q-Former (Blip2Config.instruction=True), but "
                         "none was given; expected instruction_ids [batch, length] (and instruction_mask)")
      mask = instruction_mask if instruction_mask is not None else jnp.ones(instruction_ids.shape, bool)
      attend = qformer_lib.masks("bidirectional", c.num_queries, mask)
      out = self.qformer(self._queries(b), instruction_ids, attend, image)
    else:
      if instruction_ids is not None:
        raise ValueError(f"an instruction of shape {instruction_ids.shape} was given to a BLIP-2 Q-Former that takes "
                         "none (Blip2Config.instruction=False); expected InstructBLIP's config for instructions")
      out = self.qformer(self._queries(b), None, qformer_lib.masks("bidirectional", c.num_queries, None), image)
    return out[:, : c.num_queries]

  # ------------------------------------------------------------------ stage 1

  def _normalize(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """ITC image embeddings Float32[B, Q, F], L2-normalised per query."""
    return self._normalize(self.vision_projection(self.query_outputs(self.image_features(images))))

  def encode_text(self, ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """ITC text embeddings Float32[B, F]: the text alone through the Q-Former, its first
    ([CLS]) position projected and L2-normalised."""
    out = self.qformer(None, ids, qformer_lib.masks("unimodal", 0, text_mask))
    return self._normalize(self.text_projection(out[:, 0]))

  def match(self, image: jax.Array, ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """ITM logits Float32[B, 2] (not matched, matched) of image features [B, P, E] with texts:
    queries and text in one bidirectional self-attention, the head over each query output,
    averaged over the queries (Hugging Face's `Blip2ForImageTextRetrieval`)."""
    c = self.config
    attend = qformer_lib.masks("bidirectional", c.num_queries, text_mask)
    out = self.qformer(self._queries(image.shape[0]), ids, attend, image)
    return jnp.mean(self.itm_head(out[:, : c.num_queries]).astype(jnp.float32), axis=1)

  def itg_logits(self, hidden: jax.Array) -> jax.Array:
    """The generation head: Float[..., W] -> Float32[..., V] (BERT's LM head, tied to the
    Q-Former's word embeddings)."""
    x = ACTIVATIONS[self.config.qformer.activation](self.itg_transform(hidden))
    x = self.itg_layernorm(x)
    logits = self.qformer.word_embeddings.attend(x)
    return logits + self.itg_bias.reshape((1,) * (logits.ndim - 1) + (-1,))

  def pretrain(self, images: jax.Array, ids: jax.Array, text_mask: jax.Array) -> dict:
    """The passes every stage-1 loss reads, with the images encoded once:

    image: Float[B, P, E] tower features (the ITM pass reads them again);
    image_embeds Float32[B, Q, F], text_embeds Float32[B, F] (ITC);
    itg_logits Float32[B, T, V]: the text with its first token replaced by [DEC], after the
      queries (which see only themselves, so this one pass also gives ITC's query outputs);
    temperature: the clamped ITC temperature.
    """
    c = self.config
    image = self.image_features(images)
    b, t = ids.shape
    out = {"image": image}
    text_embeds = self.encode_text(ids, text_mask)
    if "itg" in c.heads:
      dec = jnp.concatenate([jnp.full((b, 1), c.decoder_token_id, ids.dtype), ids[:, 1:]], axis=1)
      attend = qformer_lib.masks("multimodal_causal", c.num_queries, text_mask)
      hidden = self.qformer(self._queries(b), dec, attend, image)
      query_out = hidden[:, : c.num_queries]
      out["itg_logits"] = self.itg_logits(hidden[:, c.num_queries:])
    else:
      query_out = self.query_outputs(image)
    out["image_embeds"] = self._normalize(self.vision_projection(query_out))
    out["text_embeds"] = text_embeds
    out["temperature"] = jnp.clip(self.temperature, *c.temperature_range)
    return out

  def initialize(self, images: jax.Array, ids: jax.Array, text_mask: jax.Array) -> dict:
    """Every stage-1 pass once (`init` through this creates every head's parameters)."""
    out = self.pretrain(images, ids, text_mask)
    if "itm" in self.config.heads:
      out["itm_logits"] = self.match(out["image"], ids, text_mask)
    return out

  # ------------------------------------------------------------------ stage 2

  def embed(self, images: jax.Array, input_ids: jax.Array, instruction_ids: jax.Array | None = None,
            instruction_mask: jax.Array | None = None) -> jax.Array:
    """The LM's input Float[B, T, D]: token embeddings, with the k-th `image_token_id`
    position of each row taking the k-th projected query output."""
    c = self.config
    text = self.decoder.embed(input_ids)
    table = self.language_projection(
        self.query_outputs(self.image_features(images), instruction_ids, instruction_mask).astype(c.decoder.dtype))
    is_image = input_ids == c.image_token_id
    k = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=-1) - 1, 0, c.num_queries - 1)
    picked = jnp.take_along_axis(table, k[..., None], axis=1)
    return jnp.where(is_image[..., None], picked.astype(text.dtype), text)

  def __call__(self, images: jax.Array, input_ids: jax.Array, instruction_ids: jax.Array | None = None,
               instruction_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: dict | None = None):
    if self.config.decoder is None:
      raise ValueError("this BLIP-2 has no LM (Blip2Config.decoder=None: the stage-1 model); expected a stage-2 "
                       "config to generate text")
    x = self.embed(images, input_ids, instruction_ids, instruction_mask)
    return self.decoder(embeddings=x, positions=positions, segment_ids=segment_ids, cache=cache)

  def decode(self, input_ids: jax.Array, *, positions: jax.Array, cache: dict):
    """Text tokens only (generation after the prefill): (logits, cache)."""
    return self.decoder(input_ids, positions=positions, cache=cache)


def placeholders(num_queries: int, image_token_id: int) -> list[int]:
  """The LM-input ids that stand for the query outputs, as the processor writes them."""
  return [image_token_id] * num_queries


def init_cache(config: Blip2Config, batch: int, length: int) -> dict:
  return init_decoder_cache(config.decoder, batch, length)


_LABELS = {"vision": "vision", "query_tokens": "qformer", "qformer": "qformer", "vision_projection": "qformer",
           "text_projection": "qformer", "itm_head": "qformer", "itg_transform": "qformer",
           "itg_layernorm": "qformer", "itg_bias": "qformer", "temperature": "qformer",
           "language_projection": "projector", "decoder": "lm"}


def param_labels(params: Any) -> Any:
  """The component of each parameter leaf (module docstring)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  out = {}
  for key, sub in params.items():
    if key not in _LABELS:
      raise ValueError(f"BLIP-2 parameters have an entry {key!r}; expected {sorted(_LABELS)}")
    out[key] = jax.tree.map(lambda _, label=_LABELS[key]: label, sub, is_leaf=is_box)
  return out
