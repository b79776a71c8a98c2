"""BLIP-2's Querying Transformer (Q-Former): learned query tokens, and optionally text, through
BERT-style post-LayerNorm layers; the query positions also cross-attend to a frozen image
encoder's features every `cross_attention_frequency` layers.

Dimension letters: B batch, Q query tokens, T text tokens, L = Q + T positions, P image
features, W the Q-Former's width, E the image features' width, H heads, K head width.

  queries [B, Q, W] (+ text ids [B, T] -> word + position embeddings)
    -> concatenated [B, L, W] -> LayerNorm -> depth x layer -> [B, L, W]

  layer: a = LN(x + SelfAttn(x, mask))                       every position
         q = LN(a[:Q] + CrossAttn(a[:Q], image))             layers 0, f, 2f, ... (f the frequency)
         out = [LN(q + FFN_query(q)), LN(t + FFN_text(t))]   t = a[Q:]

Which position sees which is the caller's `mask` Bool[B, L, L] (`masks`): BLIP-2's three
objectives differ only there (the paper's Figure 2): ITC's queries and text never see each
other ("unimodal"), ITM's see everything ("bidirectional"), ITG's text sees the queries and its
own past while the queries see only themselves ("multimodal_causal"). Text padding is hidden
from every query as the mask's columns.

The attention is written out (a [B, H, L, L] softmax in float32): the masks are arbitrary
block patterns over a short sequence (32 queries and a caption), which neither the flash
kernels' segment ids nor causality describe, and the weights are recorded
(`sow("intermediates", "attention_weights")`) for the tests of the masks. The Q-Former runs in
float32, as Hugging Face keeps it.

Layout and names follow Hugging Face's `Blip2QFormerModel` and `Blip2TextEmbeddings`
(`InstructBlipQFormerModel` is the same computation): the parameters are `word_embeddings`
and `position_embeddings` (with text input only), `layernorm`, and per layer `attention`, `crossattention` (where present),
`ffn_query`, `ffn_text` (each a dense in, a dense out and a LayerNorm).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.embed import Embed
from mmjax.layers.linear import dense
from mmjax.layers.mlp import ACTIVATIONS
from mmjax.layers.norms import LayerNorm

MASKS = ("unimodal", "bidirectional", "multimodal_causal")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  # BERT-base's shape (BLIP-2, InstructBLIP, MiniGPT-4).
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  # Cross-attention to the image in layers 0, f, 2f, ... (Hugging Face's placement).
  cross_attention_frequency: int = 2
  # The image features' width E (the vision tower's).
  encoder_width: int = 1408
  # Learned query tokens Q.
  num_queries: int = 32
  # The text vocabulary (BERT's 30522 + BLIP-2's [DEC] token) and position table.
  vocab_size: int = 30523
  max_length: int = 512
  activation: str = "gelu"
  norm_eps: float = 1e-12
  # Whether text positions have their own feed-forward (`ffn_text`); Hugging Face's
  # `use_qformer_text_input`: the stage-1 model and InstructBLIP do, BLIP-2's generation
  # model (queries only) does not.
  text_input: bool = True

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0

  def validate(self) -> QFormerConfig:
    """Returns self, or raises ValueError naming the first field with a value the Q-Former does not take."""
    if self.width % self.num_heads:
      raise ValueError(f"QFormerConfig.width={self.width} is not a multiple of num_heads={self.num_heads}")
    for name in ("depth", "num_queries", "cross_attention_frequency", "vocab_size", "max_length", "mlp_dim",
                 "encoder_width"):
      if getattr(self, name) < 1:
        raise ValueError(f"QFormerConfig.{name}={getattr(self, name)}; expected >= 1")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"QFormerConfig.activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
    return self


def masks(kind: str, num_queries: int, text_mask: jax.Array | None) -> jax.Array:
  """Bool[B, L, L] (query position, key position): whether the row may attend the column.

  kind "unimodal" (ITC): queries see queries, text sees text; "bidirectional" (ITM): all see
  all; "multimodal_causal" (ITG): queries see queries, text sees the queries and the text up
  to itself. `text_mask` Int/Bool[B, T] hides padded text columns (None: no text, or none
  padded; then B is 1 and broadcasts).
  """
  if kind not in MASKS:
    raise ValueError(f"mask kind {kind!r}; expected one of {MASKS}")
  q = num_queries
  if text_mask is None:
    text = jnp.ones((1, 0), bool)
  else:
    text = jnp.asarray(text_mask).astype(bool)
  b, t = text.shape
  n = q + t
  is_query = jnp.arange(n) < q
  rows, cols = is_query[:, None], is_query[None, :]
  if kind == "bidirectional":
    pattern = jnp.ones((n, n), bool)
  elif kind == "unimodal":
    pattern = rows == cols
  else:
    causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    pattern = jnp.where(rows, cols, cols | causal)
  keys = jnp.concatenate([jnp.ones((b, q), bool), text], axis=1)
  return pattern[None] & keys[:, None, :]


class Attention(nn.Module):
  """Post-LN attention: LN(x + out(softmax(q k^T / sqrt(K) + mask) v)); keys from `context`
  when given (cross-attention), else from x."""

  config: QFormerConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, context: jax.Array | None = None) -> jax.Array:
    c = self.config
    h, k = c.num_heads, c.head_dim
    source = x if context is None else context
    proj = lambda name: dense((h, k), ("embed", "heads", "kv"), use_bias=True, name=name)  # noqa: E731
    query = proj("query")(x)
    key, value = proj("key")(source), proj("value")(source)
    logits = jnp.einsum("bqhk,bshk->bhqs", query, key, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(k))
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention_weights", weights)
    out = jnp.einsum("bhqs,bshk->bqhk", weights, value)
    out = dense(c.width, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, name="out")(out)
    return LayerNorm(eps=c.norm_eps, name="layernorm")(x + out)


class FeedForward(nn.Module):
  """Post-LN feed-forward: LN(x + dense_out(act(dense_in(x))))."""

  config: QFormerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    y = dense(c.mlp_dim, ("embed", "mlp"), use_bias=True, name="dense_in")(x)
    y = ACTIVATIONS[c.activation](y)
    y = dense(c.width, ("mlp", "embed"), use_bias=True, name="dense_out")(y)
    return LayerNorm(eps=c.norm_eps, name="layernorm")(x + y)


class Layer(nn.Module):
  config: QFormerConfig
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, num_queries: int, image: jax.Array | None) -> jax.Array:
    c = self.config
    x = Attention(c, name="attention")(x, mask)
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if num_queries and c.has_cross_attention(self.index):
      if image is None:
        raise ValueError(f"Q-Former layer {self.index} cross-attends to the image, but no image features were given")
      queries = Attention(c, cross=True, name="crossattention")(queries, None, image)
    parts = []
    if num_queries:
      parts.append(FeedForward(c, name="ffn_query")(queries))
    if text.shape[1]:
      if not c.text_input:
        raise ValueError("this Q-Former has no text feed-forward (QFormerConfig.text_input=False) but was given "
                         f"{text.shape[1]} text positions; expected queries only")
      parts.append(FeedForward(c, name="ffn_text")(text))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class QFormer(nn.Module):
  """(queries Float[B, Q, W] or None, text ids Int[B, T] or None, mask, image features
  Float[B, P, E] or None) -> Float[B, Q + T, W]; see the module docstring."""

  config: QFormerConfig

  def setup(self):
    c = self.config.validate()
    if c.text_input:
      self.word_embeddings = Embed(c.vocab_size, c.width)
      self.position_embeddings = self.param(
          "position_embeddings", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "embed")),
          (c.max_length, c.width), jnp.float32)
    self.layernorm = LayerNorm(eps=c.norm_eps)
    self.layers = [Layer(c, i, name=f"layers_{i}") for i in range(c.depth)]

  def embed(self, queries: jax.Array | None, ids: jax.Array | None) -> jax.Array:
    """Float[B, Q + T, W]: the queries, then each text token's word + position embedding
    (text positions count from 0), LayerNorm'd together."""
    c = self.config
    parts = []
    if queries is not None:
      parts.append(queries.astype(jnp.float32))
    if ids is not None:
      if not c.text_input:
        raise ValueError("this Q-Former takes no text (QFormerConfig.text_input=False: BLIP-2's generation "
                         f"model) but was given text ids {ids.shape}; expected queries only")
      if ids.ndim != 2:
        raise ValueError(f"Q-Former text ids have shape {ids.shape}; expected [batch, length]")
      if ids.shape[1] > c.max_length:
        raise ValueError(f"Q-Former text of {ids.shape[1]} tokens is longer than its {c.max_length} position "
                         "embeddings (QFormerConfig.max_length); expected at most that")
      parts.append(self.word_embeddings(ids) + self.position_embeddings[None, : ids.shape[1]])
    if not parts:
      raise ValueError("the Q-Former needs queries, text, or both; got neither")
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return self.layernorm(x)

  def __call__(self, queries: jax.Array | None, ids: jax.Array | None, mask: jax.Array,
               image: jax.Array | None = None) -> jax.Array:
    x = self.embed(queries, ids)
    q = 0 if queries is None else queries.shape[1]
    if image is not None:
      image = image.astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, mask, q, image)
    return x


def count_params(c: QFormerConfig) -> int:
  """Parameters of `QFormer` (embeddings, layers), as `eval_shape` counts them."""
  w, m = c.width, c.mlp_dim
  attn = lambda kv_in: w * w + w + 2 * (kv_in * w + w) + w * w + w + 2 * w  # noqa: E731
  ffn = w * m + m + m * w + w + 2 * w
  total = (c.vocab_size * w + c.max_length * w if c.text_input else 0) + 2 * w
  for i in range(c.depth):
    total += attn(w) + ffn * (2 if c.text_input else 1)
    if c.has_cross_attention(i):
      total += attn(c.encoder_width)
  return total
