"""Text towers of contrastive image-text models (CLIP, SigLIP): the module and its config.

``TextTower(config)(ids, attention_mask)`` maps token ids to one pooled, projected embedding
per text, the vector a contrastive loss compares with the image tower's; ``features`` also
returns the token states.

Parameter tree (all float32)::

  token_embed {embedding [V, D]}
  pos_embedding [max_length, D]
  layers_{i} {norm1, attn {query, key, value, out}, norm2, mlp {fc1, fc2}}
  final_norm {scale, bias}
  projection {kernel [D, P], bias [P] if projection_bias}   unless projection_dim is None

Masking, as transformers computes it (``CLIPTextModel`` / ``SiglipTextModel``):

- CLIP attends causally, and with an ``attention_mask`` padded keys are also hidden (HF
  combines the two in ``create_causal_mask``). With right padding the mask changes only the
  states at padded positions, never the pooled end-of-text token.
- SigLIP attends bidirectionally and uses no mask unless one is given: its tokenizer pads to
  a fixed length and returns no ``attention_mask``, so padding tokens are attended (the model
  was trained so). Given a mask, padded keys are hidden, padded queries still attend.

Either way a padded query attends every unpadded key it may see; a mask whose row hides all
keys (left padding with ``causal``) is not supported. Pooling: ``"eos"`` takes the first
position holding ``eos_token_id`` (HF CLIP since transformers PR #24773), or with
``eos_token_id=None`` the position of the highest id (the end-of-text token has the highest id
in OpenAI's vocabulary; HF does this for configs saying ``eos_token_id=2``); ``"last"`` takes
the last position, padding or not (SigLIP).

Dimension letters: B batch, T text length, D width, V vocabulary, P projection width,
H heads, K head dim.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import dot_product_attention
from mmjax.layers.embed import Embed
from mmjax.layers.linear import dense
from mmjax.layers.mlp import ACTIVATIONS, Mlp
from mmjax.layers.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
  # Token vocabulary size V.
  vocab_size: int = 49408
  # Token width D.
  width: int = 512
  # Number of transformer blocks.
  depth: int = 12
  num_heads: int = 8
  # Hidden width of each block's MLP.
  mlp_dim: int = 2048
  # Rows of the learned position embedding: the longest text (CLIP 77, SigLIP 64).
  max_length: int = 77
  # 'quick_gelu' (OpenAI CLIP), 'gelu_tanh' (SigLIP) or 'gelu' (LAION CLIP).
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  # Causal self-attention (CLIP) or bidirectional (SigLIP).
  causal: bool = True
  # 'eos' (CLIP: the end-of-text token) or 'last' (SigLIP: the last position).
  pooling: str = "eos"
  # With pooling='eos': the end-of-text id whose first occurrence is pooled, or None for the
  # position of the highest id (HF's legacy rule for CLIP configs with eos_token_id=2).
  eos_token_id: int | None = 49407
  # Width P of the projection of the pooled state (CLIP's projection_dim; SigLIP's head keeps
  # D), or None for no projection (HF CLIPTextModel's pooler_output: P = D).
  projection_dim: int | None = 512
  # Bias on the projection (SigLIP's head: yes; CLIP's text_projection: no).
  projection_bias: bool = False
  # Compute dtype of activations and matmuls; parameters stay float32.
  dtype: str = "float32"
  # mmjax.kernels.attention.AttentionBackend value, or None for the platform default.
  attention_backend: str | None = None

  def validate(self) -> "TextTowerConfig":
    """Returns self, or raises ValueError naming the first inconsistent field."""
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}, expected one of {sorted(ACTIVATIONS)}")
    if self.pooling not in ("eos", "last"):
      raise ValueError(f"pooling={self.pooling!r}, expected 'eos' or 'last'")
    if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(f"eos_token_id={self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})")
    if self.projection_dim is None and self.projection_bias:
      raise ValueError("projection_bias=True needs a projection: projection_dim is None")
    return self


# A CLIP-shaped tower small enough for CPU tests.
TEXT_TINY = TextTowerConfig(vocab_size=128, width=32, depth=2, num_heads=4, mlp_dim=64, max_length=16,
                            eos_token_id=127, projection_dim=24)


class TextSelfAttention(nn.Module):
  """Self-attention whose padding mask hides padded keys only: [B, T, D] -> [B, T, D].

  ``mmjax.layers.attention.Attention`` takes one segment-id array for queries and keys, which
  would also stop padded queries from seeing real keys; HF lets them (and SigLIP pools one),
  so the projections (the same ``query``/``key``/``value``/``out``) are built here.
  """

  num_heads: int
  causal: bool
  dtype: str = "float32"
  backend: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    h, k = self.num_heads, d // self.num_heads
    proj = lambda name: dense((h, k), ("embed", "heads", "kv"), use_bias=True, dtype=self.dtype, name=name)  # noqa: E731
    q, key, value = proj("query")(x), proj("key")(x), proj("value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    segments = {}
    if key_mask is not None:
      # Every query is in segment 1; a padded key is in segment 0, so nothing attends it.
      segments = dict(query_segment_ids=jnp.ones((b, t), jnp.int32),
                      key_segment_ids=key_mask.astype(jnp.int32))
    out = dot_product_attention(q, key, value, causal=self.causal, backend=self.backend, **segments)
    return dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, dtype=self.dtype,
                 name="out")(out)


class TextBlock(nn.Module):
  """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)). [B, T, D] -> same."""

  config: TextTowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    ln = lambda name: LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype, name=name)  # noqa: E731
    x = x + TextSelfAttention(cfg.num_heads, cfg.causal, dtype=cfg.dtype, backend=cfg.attention_backend,
                              name="attn")(ln("norm1")(x), key_mask)
    x = x + Mlp(cfg.mlp_dim, activation=cfg.activation, dtype=cfg.dtype, name="mlp")(ln("norm2")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def pool_positions(ids: jax.Array, config: TextTowerConfig) -> jax.Array:
  """Int32[B]: the position of each text whose final state is pooled (module docstring)."""
  if config.pooling == "last":
    return jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.int32)
  if config.eos_token_id is None:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)  # first maximum, as torch.argmax
  # The first end-of-text token (a pad id equal to it may follow); 0 when there is none, as HF.
  return jnp.argmax(ids == config.eos_token_id, axis=-1).astype(jnp.int32)


class TextTower(nn.Module):
  """Int[B, T] token ids (+ optional Bool/Int[B, T] attention mask) -> Float[B, P] embedding."""

  config: TextTowerConfig

  def setup(self):
    cfg = self.config.validate()
    self.token_embed = Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype)
    self.pos_embedding = self.param(
        "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.01), (None, "embed")),
        (cfg.max_length, cfg.width), jnp.float32)
    self.layers = [TextBlock(cfg, name=f"layers_{i}") for i in range(cfg.depth)]
    self.final_norm = LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype)
    if cfg.projection_dim is not None:
      self.projection = dense(cfg.projection_dim, ("embed", None), use_bias=cfg.projection_bias,
                              dtype=cfg.dtype)

  def features(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    """{"tokens": Float[B, T, D] final-normed states, "pooled": Float[B, P] projected}."""
    cfg = self.config
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids have shape {ids.shape} and dtype {ids.dtype}, expected integer [B, T]")
    b, t = ids.shape
    if t > cfg.max_length:
      raise ValueError(f"text length {t} exceeds max_length={cfg.max_length} position embeddings")
    if attention_mask is not None and attention_mask.shape != ids.shape:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected the ids' {ids.shape}")
    x = self.token_embed(ids) + self.pos_embedding[:t].astype(jnp.dtype(cfg.dtype))[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for layer in self.layers:
      x = layer(x, attention_mask)
    tokens = self.final_norm(x)
    pooled = tokens[jnp.arange(b), pool_positions(ids, cfg)]
    if cfg.projection_dim is not None:
      pooled = self.projection(pooled)
    pooled = nn.with_logical_constraint(pooled, ("batch", None))
    return {"tokens": tokens, "pooled": pooled}

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None, *,
               return_tokens: bool = False):
    """Float[B, P] pooled embeddings; with ``return_tokens``, (pooled, Float[B, T, D] tokens)."""
    out = self.features(ids, attention_mask)
    return (out["pooled"], out["tokens"]) if return_tokens else out["pooled"]
