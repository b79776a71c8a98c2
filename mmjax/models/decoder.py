"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) that any model
family can drive: over token ids or over embeddings it made itself, with modules of its own
inserted between the layers.

  x = decoder.embed(ids)                   # or a family's own embeddings [B, T, D]
  hidden, cache = decoder.forward(x, positions=..., cache=..., side=..., insert_state=...)
  logits = decoder.logits(hidden)          # float32 [B, T, V]
  logits, cache = decoder(ids)             # all three at once (or embeddings=x)

LLaVA splices projected image tokens into ``x`` at its ``<image>`` placeholders, BLIP-2
prefixes its query outputs; Flamingo inserts its gated cross-attention before every n-th
layer (an :class:`~mmjax.models.scan_layout.Insert`, built by the Flamingo family: the decoder
itself knows nothing of images). Where later decoder variants go: a modality-routed MLP or
attention (CogVLM's visual expert, mPLUG-Owl2's modality-adaptive layers) replaces
``DecoderLayer``'s ``mlp`` / ``attn`` with a module reading a per-token modality id passed in
``side``; an MoE MLP (MoE-LLaVA) replaces ``mlp`` (a new logical axis ``experts`` in
``mmjax.sharding``); an adapter (LLaMA-Adapter) is an insert, or a prefix in ``attn``.

Dimension letters: B batch, T length, S cache length, D width, H heads, G key/value
heads, K head dim, V vocabulary.

Parameters (names chosen so that param labels and the converters are rename tables):
``embed`` {``embedding`` [V, D]}; ``layers_{i}`` {``attn_norm``, ``attn`` {``query``,
``key``, ``value``, ``out``}, ``mlp_norm``, ``mlp`` {``gate_proj``, ``up_proj``,
``down_proj``}}; ``{insert.name}_{i}`` for an insert before LM layer i; ``norm``;
``lm_head`` {``kernel`` [D, V]} unless the embeddings are tied.

Scanned layout (``scan_layers=True``): the layers run under ``flax.linen.scan`` so that the
compiled program holds one block body instead of ``depth`` copies; the parameters of the
blocks are stacked (``mmjax.models.scan_layout``, which also converts the two layouts
exactly). ``remat`` applies per LM layer inside the scan. The KV cache
(:func:`init_decoder_cache`) and ``prepare_inserts`` follow the same layout:
``{"blocks": {"layers_{j}": {"key", "value": [num_blocks, B, S, G, K]}}, "layers_{i}": ...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import Attention, init_cache
from mmjax.layers.embed import Embed
from mmjax.layers import linear
from mmjax.layers.linear import dense
from mmjax.layers.mlp import Mlp, SwiGLU
from mmjax.layers.norms import LayerNorm, RMSNorm
from mmjax.models.scan_layout import Insert, ScanPlan, insert_layer_indices, scan_plan, stack


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  # Key/value heads (grouped-query attention); equal to num_heads for plain MHA.
  num_kv_heads: int = 32
  head_dim: int = 128
  # Hidden width of the SwiGLU feed-forward.
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  # Share the embedding table with the output projection.
  tie_embeddings: bool = False
  # Longest sequence (prompt + generation) the model accepts.
  max_length: int = 2048
  dtype: str = "float32"
  attention_backend: str | None = None
  # Rematerialise each LM layer in the backward pass (saves activation memory when
  # training; no effect on the forward values).
  remat: bool = False
  # The LM variants (issue 15): defaults are LLaMA's. GPT-NeoX is norm="layer",
  # mlp="gelu", mlp_bias, attention_bias, attention_out_bias, parallel_residual,
  # rotary_fraction=0.25; Qwen2 is LLaMA with attention_bias.
  # "rms" (RMSNorm, no bias) or "layer" (LayerNorm with bias), for every norm.
  norm: str = "rms"
  # "swiglu" (gate_proj, up_proj, down_proj) or the activation of a two-layer MLP (fc1,
  # fc2): "gelu", "gelu_tanh", "relu", "quick_gelu".
  mlp: str = "swiglu"
  # Biases on the two-layer MLP's projections (SwiGLU has none).
  mlp_bias: bool = False
  # Biases on the query/key/value projections (Qwen2, GPT-NeoX), and on the output
  # projection (GPT-NeoX; Qwen2 has none).
  attention_bias: bool = False
  attention_out_bias: bool = False
  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, with its two norms) instead of the
  # sequential pre-norm residual.
  parallel_residual: bool = False
  # With parallel_residual: 2 norms (GPT-NeoX: the MLP has its own), or 1 (Phi, StableLM:
  # the MLP reads the attention's normed input; no mlp_norm parameters).
  parallel_norms: int = 2
  # A bias on the output projection (Phi).
  lm_head_bias: bool = False
  # The leading fraction of each head's dimensions RoPE rotates (GPT-NeoX's rotary_pct).
  rotary_fraction: float = 1.0
  # How tokens know their place: "rope" (rotary: rope_theta, rotary_fraction, rope_scaling),
  # "alibi" (MPT: per-head linear biases, alibi_bias_max), "learned" (OPT: a table ``pos_embed``
  # of max_length + position_offset rows added to the embeddings; OPT's offset is 2).
  positions: str = "rope"
  alibi_bias_max: float = 8.0
  position_offset: int = 0
  # "none", or "llama3" (LLaMA-3.1's frequency scaling with the four fields below).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_length: int = 8192
  # LayerNorms (norm="layer") with a bias; MPT's have none.
  norm_bias: bool = True
  # Clamp the query/key/value projections to [-clip_qkv, clip_qkv] (MPT); 0: no clamp.
  clip_qkv: float = 0.0
  # A LayerNorm (with a bias when norm_bias) on the queries and keys before RoPE: "head" over
  # each head's K dims (Persimmon's qk_layernorm), "width" over all H*K (G*K) of them at once
  # (MosaicGPT's attn_qk_ln, OpenFlamingo-3B's MPT-1B), or "none".
  qk_norm: str = "none"
  # Each query sees itself and the sliding_window - 1 positions before it (Mistral); 0: all.
  sliding_window: int = 0
  # Run the layers under flax.linen.scan (blocks of LM layers, an insert before each
  # block's last layer): the compiled program holds one block body instead of depth
  # copies, so big models compile in minutes. Changes the parameter layout
  # (mmjax.models.scan_layout: stack_layers/unstack_layers convert).
  scan_layers: bool = False


NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu")
POSITIONS = ("rope", "alibi", "learned")
ROPE_SCALINGS = ("none", "llama3")
QK_NORMS = ("none", "head", "width")


def check_config(config: DecoderConfig) -> None:
  """Raises ValueError naming a field whose value the decoder does not support."""
  if config.norm not in NORMS:
    raise ValueError(f"DecoderConfig.norm={config.norm!r}; expected one of {NORMS}")
  if config.mlp not in MLPS:
    raise ValueError(f"DecoderConfig.mlp={config.mlp!r}; expected one of {MLPS}")
  if config.mlp == "swiglu" and config.mlp_bias:
    raise ValueError("DecoderConfig.mlp_bias=True with mlp='swiglu'; expected a two-layer mlp (e.g. 'gelu') "
                     "for biases")
  if config.parallel_norms not in (1, 2):
    raise ValueError(f"DecoderConfig.parallel_norms={config.parallel_norms}; expected 1 or 2")
  if config.lm_head_bias and config.tie_embeddings:
    raise ValueError("DecoderConfig.lm_head_bias=True with tie_embeddings=True; expected an untied lm_head for a bias")
  if config.positions not in POSITIONS:
    raise ValueError(f"DecoderConfig.positions={config.positions!r}; expected one of {POSITIONS}")
  if config.positions != "rope" and (config.rotary_fraction != 1.0 or config.rope_scaling != "none"):
    raise ValueError(f"DecoderConfig.positions={config.positions!r} with rotary_fraction={config.rotary_fraction}, "
                     f"rope_scaling={config.rope_scaling!r}; expected rotary settings only with positions='rope'")
  if config.qk_norm not in QK_NORMS:
    raise ValueError(f"DecoderConfig.qk_norm={config.qk_norm!r}; expected one of {QK_NORMS}")
  if config.rope_scaling not in ROPE_SCALINGS:
    raise ValueError(f"DecoderConfig.rope_scaling={config.rope_scaling!r}; expected one of {ROPE_SCALINGS}")
  if config.position_offset < 0 or (config.position_offset and config.positions != "learned"):
    raise ValueError(f"DecoderConfig.position_offset={config.position_offset} with positions={config.positions!r}; "
                     "expected an offset >= 0, and only with positions='learned'")
  if config.alibi_bias_max <= 0:
    raise ValueError(f"DecoderConfig.alibi_bias_max={config.alibi_bias_max}; expected > 0")
  if config.clip_qkv < 0 or config.sliding_window < 0:
    raise ValueError(f"DecoderConfig.clip_qkv={config.clip_qkv}, sliding_window={config.sliding_window}; expected "
                     ">= 0 (0 turns either off)")
  if not config.norm_bias and config.norm != "layer":
    raise ValueError(f"DecoderConfig.norm_bias=False with norm={config.norm!r}; expected norm='layer' (RMSNorm has "
                     "no bias to drop)")
  rot = config.rotary_fraction * config.head_dim
  if not 0.0 < config.rotary_fraction <= 1.0 or abs(rot - round(rot)) > 1e-9 or round(rot) % 2:
    raise ValueError(f"DecoderConfig.rotary_fraction={config.rotary_fraction} of head_dim={config.head_dim}; "
                     "expected a fraction in (0, 1] that rotates an even number of dimensions")


def _norm(config: DecoderConfig, wrap, name: str | None = None) -> nn.Module:
  kwargs = {} if name is None else {"name": name}
  if config.norm == "layer":
    return wrap(LayerNorm)(eps=config.norm_eps, use_bias=config.norm_bias, dtype=config.dtype, **kwargs)
  return wrap(RMSNorm)(eps=config.norm_eps, dtype=config.dtype, **kwargs)


def _llama3(config: DecoderConfig) -> tuple[float, float, float, int] | None:
  if config.rope_scaling != "llama3":
    return None
  return (config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
          config.rope_original_max_length)


def init_decoder_cache(config: DecoderConfig, batch: int, length: int, insert: Insert | None = None) -> dict:
  """An empty self-attention cache: {"layers_{i}": {"key", "value": [B, S, G, K]}}.

  With ``scan_layers`` the scanned blocks' entries are stacked (the blocks depend on the
  decoder's ``insert``): {"blocks": {"layers_{j}": {"key", "value": [num_blocks, B, S, G,
  K]}}, "layers_{i}": ...} for the remainder layers i.
  """
  if length > config.max_length:
    raise ValueError(f"cache length {length} exceeds max_length={config.max_length}")
  one = lambda: init_cache(batch, length, config.num_kv_heads, config.head_dim,
                           jnp.dtype(config.dtype))
  if not config.scan_layers:
    return {f"layers_{i}": one() for i in range(config.depth)}
  plan = scan_plan(config.depth, insert)
  cache = {f"layers_{i}": one() for i in plan.remainder}
  if plan.num_blocks:
    stacked = lambda: jax.tree.map(
        lambda x: jnp.broadcast_to(x[None], (plan.num_blocks,) + x.shape), one())
    cache["blocks"] = {f"layers_{j}": stacked() for j in range(plan.block_size)}
  return cache


def _cache_layout(config: DecoderConfig, insert: Insert | None) -> set[str]:
  """The top-level keys a cache for ``config`` has."""
  if not config.scan_layers:
    return {f"layers_{i}" for i in range(config.depth)}
  plan = scan_plan(config.depth, insert)
  return {f"layers_{i}" for i in plan.remainder} | ({"blocks"} if plan.num_blocks else set())


def _read_after(x: jax.Array, module_cls):
  """``module_cls`` whose parameters are read through an optimization barrier with x.

  Inside a scanned block XLA would otherwise cast (and all-gather) the weights of every
  layer of the block as soon as the loop step starts, or hoist the casts out of the loop
  altogether, keeping a bf16 copy of the whole stack: tying each layer's weights to its
  input bounds the live gathered weights to about one layer.
  """
  return nn.map_variables(module_cls, "params", init=True, mutable=True,
                          trans_in_fn=lambda v: jax.lax.optimization_barrier((x, v))[1])


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)). Returns (x, cache)."""

  config: DecoderConfig
  # Read the weights only once x is ready (_read_after; the scanned layout sets it).
  weights_after_input: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None, cache: dict | None = None,
               segment_ids: jax.Array | None = None):
    c = self.config
    tie = (lambda cls: _read_after(x, cls)) if self.weights_after_input else (lambda cls: cls)
    attn_in = _norm(c, tie, "attn_norm")(x)
    h, cache = tie(Attention)(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads, use_bias=c.attention_bias,
        out_bias=c.attention_out_bias,
        rope_theta=c.rope_theta if c.positions == "rope" else None, rotary_fraction=c.rotary_fraction,
        rope_llama3=_llama3(c), alibi_bias_max=c.alibi_bias_max if c.positions == "alibi" else None,
        sliding_window=c.sliding_window or None, clip_qkv=c.clip_qkv or None, qk_norm=None if c.qk_norm == "none" else c.qk_norm,
        qk_norm_eps=c.norm_eps, qk_norm_bias=c.norm_bias, dtype=c.dtype, backend=c.attention_backend,
        name="attn",
    )(attn_in, causal=True, positions=positions, segment_ids=segment_ids, cache=cache)
    # Parallel: the MLP reads the layer's input (normed on its own, or as the attention's).
    if c.parallel_residual and c.parallel_norms == 1:
      mlp_in = attn_in
    else:
      mlp_in = _norm(c, tie, "mlp_norm")(x if c.parallel_residual else x + h)
    if c.mlp == "swiglu":
      m = tie(SwiGLU)(mlp_dim=c.mlp_dim, dtype=c.dtype, name="mlp")(mlp_in)
    else:
      m = tie(Mlp)(mlp_dim=c.mlp_dim, activation=c.mlp, use_bias=c.mlp_bias, dtype=c.dtype, name="mlp")(mlp_in)
    x = x + h + m
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache


class DecoderBlock(nn.Module):
  """One step of the scanned decoder: ``size`` LM layers, the insert before the last one
  (when there is one). Scanned by ``Decoder`` (``nn.scan``), which stacks its params on a
  leading ``layers`` axis.

  Both methods have scan's signature (carry, broadcast inputs, per-block inputs) ->
  (carry, per-block outputs).
  """

  config: DecoderConfig
  size: int
  insert: Insert | None = None

  def setup(self):
    c = self.config
    # prevent_cse=False: inside scan the loop already keeps XLA from merging the
    # recomputation with the forward pass (flax's advice for remat inside scan).
    # What the scan's forward pass keeps for the backward is stacked over the blocks as
    # a loop output, which XLA cannot recompute or share with the parameters: left to
    # itself it would keep a bf16 (all-gathered) copy of every block's weights. Layers
    # that are not fully rematerialised therefore save only their matmul outputs
    # (dots_saveable), recomputing the weight casts and gathers in the backward pass.
    keep_dots = dict(prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
    layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if c.remat else nn.remat(DecoderLayer, **keep_dots)
    self.layers = [layer_cls(c, weights_after_input=True) for _ in range(self.size)]
    if self._with_insert():
      # Its weights through a barrier too, so that XLA cannot hoist their casts out of
      # the loop (one block's insert may still be gathered early).
      barrier = nn.map_variables(self.insert.module, "params", init=True, mutable=True,
                                 trans_in_fn=jax.lax.optimization_barrier,
                                 methods=["__call__", "prepare"])
      # Named after the insert (blocks/xattn for Flamingo's), as in the unrolled layout.
      setattr(self, self.insert.name, nn.remat(barrier, **keep_dots)(*self.insert.args))

  def _with_insert(self) -> bool:
    return self.insert is not None and self.insert.every > 0

  def __call__(self, x: jax.Array, shared: tuple, scanned: dict):
    """x [B, T, D]; shared = (positions, side, segment_ids or None); scanned = {"cache":
    this block's cache or None, "state": this block's insert state or None}. Returns (x,
    {"cache": the updated cache or None})."""
    positions, side, segment_ids = shared
    cache, state = scanned["cache"], scanned["state"]
    in_dtype = x.dtype
    new_cache = {} if cache is not None else None
    for j, layer in enumerate(self.layers):
      if self._with_insert() and j == self.size - 1:
        x = getattr(self, self.insert.name)(x, side, state)
      x, layer_cache = layer(x, positions, None if cache is None else cache[f"layers_{j}"], segment_ids)
      if cache is not None:
        new_cache[f"layers_{j}"] = layer_cache
    # The scan carry keeps one dtype (an insert may compute in its own dtype).
    return x.astype(in_dtype), {"cache": new_cache}

  def prepare(self, carry: Any, source: Any, unused: Any):
    """(carry, this block's insert state from ``source``)."""
    del unused
    return carry, getattr(self, self.insert.name).prepare(source)


def _scanned_blocks(config: DecoderConfig, plan: ScanPlan, insert: Insert | None, name: str) -> nn.Module:
  scanned = nn.scan(
      DecoderBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, 0),
      length=plan.num_blocks,
      # The stacked axis is the logical axis "layers" (mmjax.sharding: never sharded).
      metadata_params={nn.PARTITION_NAME: "layers"},
      methods=["__call__", "prepare"],
  )
  return scanned(config, plan.block_size, insert, name=name)


class Decoder(nn.Module):
  """Token ids or embeddings [B, T(, D)] -> float32 logits [B, T, V]; see the module docstring."""

  config: DecoderConfig
  # Modules run before every insert.every-th layer (Flamingo's cross-attention), or None.
  insert: Insert | None = None

  def setup(self):
    c = self.config
    self.embed = Embed(c.vocab_size, c.width, dtype=c.dtype)
    if c.positions == "learned":
      # Logical axes ("vocab", "embed") like the token table's.
      self.pos_embed = Embed(c.max_length + c.position_offset, c.width, dtype=c.dtype)
    layer_cls = nn.remat(DecoderLayer) if c.remat else DecoderLayer
    if c.scan_layers:
      plan = scan_plan(c.depth, self.insert)
      if plan.num_blocks:
        self.blocks = _scanned_blocks(c, plan, self.insert, name="blocks")
      # A dict attribute names its modules layers_{i}, as in the unrolled layout.
      self.layers = {i: layer_cls(c) for i in plan.remainder}
    else:
      self.layers = [layer_cls(c) for _ in range(c.depth)]
      for i in insert_layer_indices(c.depth, self.insert):
        # Named {name}_{i}: i is the LM layer it precedes.
        setattr(self, f"{self.insert.name}_{i}", self.insert.module(*self.insert.args))
    check_config(c)
    self.norm = _norm(c, lambda cls: cls)
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=c.lm_head_bias, dtype=c.dtype)

  def _insert_at(self, i: int) -> nn.Module:
    return getattr(self, f"{self.insert.name}_{i}")

  def prepare_inserts(self, source: Any) -> dict:
    """Every insert's state (its ``prepare(source)``), computed once, e.g. Flamingo's media
    keys/values for every cross-attention layer: {"{name}_{i}": ...}, or with
    ``scan_layers`` {"blocks": stacked over the blocks}; {} without inserts."""
    indices = insert_layer_indices(self.config.depth, self.insert)
    if not indices:
      return {}
    if self.config.scan_layers:
      _, state = self.blocks.prepare(None, source, None)
      return {"blocks": state}
    return {f"{self.insert.name}_{i}": self._insert_at(i).prepare(source) for i in indices}

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Float32 [B, T, V] from the final hidden states [B, T, D] (``forward``'s)."""
    if self.config.tie_embeddings:
      logits = self.embed.attend(hidden)
    else:
      logits = self.lm_head(hidden).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def forward(
      self,
      x: jax.Array,
      *,
      positions: jax.Array | None = None,
      cache: dict | None = None,
      side: Any = None,
      insert_state: Mapping[str, Any] | None = None,
      segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """The layers and the final norm over embeddings: (hidden [B, T, D], the updated cache).

    Args:
      x: Float[B, T, D] embeddings (``embed(ids)``, or a family's own).
      positions: Int[B, T] absolute positions (RoPE and the causal mask); default 0..T-1.
      cache: {"layers_{i}": {"key", "value": [B, S, G, K]}} from ``init_decoder_cache``
        (its stacked layout with ``scan_layers``); the new keys/values are written at
        ``positions``.
      side: what every insert receives (e.g. Flamingo's image index and media latents).
      insert_state: ``prepare_inserts``' output (the unrolled {"{name}_{i}"} form is
        stacked for a scanned decoder), or None: each insert computes from ``side``.
      segment_ids: Int[B, T] or None: several sequences packed in one row (LLaVA's packed
        conversations), a token attending only to earlier tokens of its own segment (its
        ``positions`` restart at 0 with each segment); 0 marks padding. Not with a cache.
    """
    c = self.config
    if x.ndim != 3 or x.shape[-1] != c.width:
      raise ValueError(f"embeddings have shape {x.shape}; expected [batch, length, {c.width}]")
    b, t, _ = x.shape
    indices = insert_layer_indices(c.depth, self.insert)
    # Positions stay None when not given: the attention then knows they are the indices (and
    # cuts causal self-attention into blocks on the XLA path, mmjax.kernels.attention.reference).
    if positions is not None and positions.shape != (b, t):
      raise ValueError(f"positions have shape {positions.shape}; expected {(b, t)}")
    if segment_ids is not None and segment_ids.shape != (b, t):
      raise ValueError(f"segment_ids have shape {segment_ids.shape}; expected {(b, t)}")
    if cache is not None and set(cache) != _cache_layout(c, self.insert):
      raise ValueError(f"cache has entries {sorted(cache)}; expected {sorted(_cache_layout(c, self.insert))}"
                       f" (init_decoder_cache of this config, scan_layers={c.scan_layers})")
    if c.positions == "learned":
      # OPT's table starts position_offset rows in; a padding token's position may be anything.
      at = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
      rows = jnp.clip(at + c.position_offset, 0, c.max_length + c.position_offset - 1)
      x = x + self.pos_embed(rows).astype(x.dtype)
    if insert_state is not None and indices and c.scan_layers and "blocks" not in insert_state:
      insert_state = {"blocks": stack([insert_state[f"{self.insert.name}_{i}"] for i in indices])}

    # Rematerialised layers keep JAX's own projection backward, which their checkpoint
    # policy can see (mmjax.layers.linear.rematerialised).
    with linear.rematerialised() if c.scan_layers or c.remat else contextlib.nullcontext():
      return self._layers(x, positions, cache, side, insert_state, segment_ids, indices)

  def _layers(self, x, positions, cache, side, insert_state, segment_ids, indices):
    """`forward` once its inputs are checked: the layers, their inserts and the norm."""
    c = self.config
    new_cache = {} if cache is not None else None
    if c.scan_layers:
      if scan_plan(c.depth, self.insert).num_blocks:
        scanned = {"cache": None if cache is None else cache["blocks"],
                   "state": None if not insert_state else insert_state["blocks"]}
        x, out = self.blocks(x, (positions, side, segment_ids), scanned)
        if cache is not None:
          new_cache["blocks"] = out["cache"]
      layers = sorted(self.layers.items())
    else:
      layers = enumerate(self.layers)
    for i, layer in layers:
      if i in indices:
        state = None if not insert_state else insert_state[f"{self.insert.name}_{i}"]
        x = self._insert_at(i)(x, side, state)
      layer_cache = None if cache is None else cache[f"layers_{i}"]
      x, layer_cache = layer(x, positions, layer_cache, segment_ids)
      if cache is not None:
        new_cache[f"layers_{i}"] = layer_cache
    return self.norm(x), new_cache

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      embeddings: jax.Array | None = None,
      positions: jax.Array | None = None,
      cache: dict | None = None,
      side: Any = None,
      insert_state: Mapping[str, Any] | None = None,
      segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """Logits float32 [B, T, V] and the updated cache (None without one), from exactly one
    of ``input_ids`` Int[B, T] and ``embeddings`` Float[B, T, D]; the other arguments as in
    ``forward``."""
    if (input_ids is None) == (embeddings is None):
      raise ValueError("Decoder needs exactly one of input_ids and embeddings; got "
                       f"input_ids={'set' if input_ids is not None else None}, "
                       f"embeddings={'set' if embeddings is not None else None}")
    if input_ids is not None:
      if input_ids.ndim != 2:
        raise ValueError(f"input_ids have shape {input_ids.shape}; expected [batch, length]")
      embeddings = self.embed(input_ids)
    hidden, cache = self.forward(embeddings, positions=positions, cache=cache, side=side,
                                 insert_state=insert_state, segment_ids=segment_ids)
    return self.logits(hidden), cache
