"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) that can carry
Flamingo's gated cross-attention before every n-th layer.

Dimension letters: B batch, T length, S cache length, D width, H heads, G key/value
heads, K head dim, V vocabulary, N images, L latents, Dm media width.

Parameters (names chosen so that ``flamingo.param_labels`` and the converters are rename
tables): ``embed`` {``embedding`` [V, D]}; ``layers_{i}`` {``attn_norm``, ``attn``
{``query``, ``key``, ``value``, ``out``}, ``mlp_norm``, ``mlp`` {``gate_proj``,
``up_proj``, ``down_proj``}}; ``xattn_{i}`` (a ``GatedXAttnDense`` run just before LM layer
i, for i = n-1, 2n-1, ... exactly as open_flamingo's ``FlamingoLMMixin.init_flamingo``
places them: ``(i + 1) % cross_attn_every_n_layers == 0``); ``norm``; ``lm_head``
{``kernel`` [D, V]} unless the embeddings are tied.

Scanned layout (``scan_layers=True``). The layers run under ``flax.linen.scan`` so that
the compiled program holds one block body instead of ``depth`` copies. With n =
``cross_attn_every_n_layers`` (n = 0 counts as blocks of one plain layer) the decoder is
num_blocks = depth // n *blocks* of n LM layers, the cross-attention before each block's last
layer (LM layer g*n + n-1: the same placement as above), then depth % n remainder layers
without cross-attention, unscanned. ``remat`` applies per LM layer inside the scan. Parameters:

- ``blocks`` {``layers_{j}`` (j < n; the LM layer g*n + j of block g), ``xattn`` (the
  ``xattn_{g*n + n-1}`` of block g, absent when n = 0)}: every leaf gets a leading axis of
  size num_blocks, logical name ``layers`` (never sharded);
- ``layers_{i}`` for the remainder i >= num_blocks*n, unstacked, as in the unrolled layout;
- ``embed``, ``norm``, ``lm_head`` as above.

:func:`stack_layers` / :func:`unstack_layers` convert between the two layouts exactly.
The KV cache (:func:`init_decoder_cache`) and ``compute_media_kv`` follow the same layout:
``{"blocks": {"layers_{j}": {"key", "value": [num_blocks, B, S, G, K]}}, "layers_{i}": ...}``
and ``{"blocks": {"key", "value": [num_blocks, B, N*L, H, K], "key_image_ids": [num_blocks,
B, N*L]}}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.attention import Attention, init_cache
from mmjax.layers.embed import Embed
from mmjax.layers.linear import dense
from mmjax.layers.mlp import SwiGLU
from mmjax.layers.norms import RMSNorm


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
  # Insert a GatedXAttnDense before every n-th layer (layers n-1, 2n-1, ... as in
  # open_flamingo); 0 for a plain LM.
  cross_attn_every_n_layers: int = 0
  # Shape of each GatedXAttnDense (width is taken from `width`).
  xattn_num_heads: int = 8
  xattn_head_dim: int = 64
  xattn_ff_mult: int = 4
  only_attend_immediate_media: bool = True
  # Width of the media latents fed to the cross-attention.
  media_width: int = 1024
  dtype: str = "float32"
  attention_backend: str | None = None
  # Rematerialise each LM layer in the backward pass (saves activation memory when
  # training; no effect on the forward values).
  remat: bool = False
  # Run the layers under flax.linen.scan (blocks of cross_attn_every_n_layers LM layers,
  # the cross-attention before each block's last layer): the compiled program holds one
  # block body instead of depth copies, so big models compile in minutes. Changes the
  # parameter layout (see the module docstring; stack_layers/unstack_layers convert).
  scan_layers: bool = False


def xattn_layer_indices(config: DecoderConfig) -> tuple[int, ...]:
  """The LM layers preceded by a GatedXAttnDense: i with (i + 1) % n == 0 (open_flamingo)."""
  n = config.cross_attn_every_n_layers
  if n < 0:
    raise ValueError(f"cross_attn_every_n_layers={n}; expected >= 0 (0: no cross-attention)")
  if n == 0:
    return ()
  return tuple(i for i in range(config.depth) if (i + 1) % n == 0)


def xattn_config(config: DecoderConfig):
  """The GatedXAttnConfig of the decoder's cross-attention layers."""
  from mmjax.models.gated_xattn import GatedXAttnConfig  # pylint: disable=g-import-not-at-top
  return GatedXAttnConfig(
      width=config.width,
      media_width=config.media_width,
      num_heads=config.xattn_num_heads,
      head_dim=config.xattn_head_dim,
      ff_mult=config.xattn_ff_mult,
      only_attend_immediate_media=config.only_attend_immediate_media,
      dtype=config.dtype,
      attention_backend=config.attention_backend,
  )


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  """How ``scan_layers`` splits the decoder: ``num_blocks`` blocks of ``block_size`` LM
  layers (the cross-attention before each block's last layer when ``with_xattn``), then
  the unscanned ``remainder`` layers."""
  block_size: int
  num_blocks: int
  with_xattn: bool
  remainder: tuple[int, ...]


def scan_plan(config: DecoderConfig) -> ScanPlan:
  """The block structure of the scanned layout (see the module docstring)."""
  n = config.cross_attn_every_n_layers
  xattn_layer_indices(config)  # validates n
  size = n if n > 0 else 1
  blocks = config.depth // size
  return ScanPlan(block_size=size, num_blocks=blocks, with_xattn=n > 0,
                  remainder=tuple(range(blocks * size, config.depth)))


def init_decoder_cache(config: DecoderConfig, batch: int, length: int) -> dict:
  """An empty self-attention cache: {"layers_{i}": {"key", "value": [B, S, G, K]}}.

  With ``scan_layers`` the scanned blocks' entries are stacked:
  {"blocks": {"layers_{j}": {"key", "value": [num_blocks, B, S, G, K]}}, "layers_{i}": ...}
  for the remainder layers i.
  """
  if length > config.max_length:
    raise ValueError(f"cache length {length} exceeds max_length={config.max_length}")
  one = lambda: init_cache(batch, length, config.num_kv_heads, config.head_dim,
                           jnp.dtype(config.dtype))
  if not config.scan_layers:
    return {f"layers_{i}": one() for i in range(config.depth)}
  plan = scan_plan(config)
  cache = {f"layers_{i}": one() for i in plan.remainder}
  if plan.num_blocks:
    stacked = lambda: jax.tree.map(
        lambda x: jnp.broadcast_to(x[None], (plan.num_blocks,) + x.shape), one())
    cache["blocks"] = {f"layers_{j}": stacked() for j in range(plan.block_size)}
  return cache


def _cache_layout(config: DecoderConfig) -> set[str]:
  """The top-level keys a cache for ``config`` has."""
  if not config.scan_layers:
    return {f"layers_{i}" for i in range(config.depth)}
  plan = scan_plan(config)
  return {f"layers_{i}" for i in plan.remainder} | ({"blocks"} if plan.num_blocks else set())


def _stack(trees: Sequence[Any]) -> Any:
  """Leaf-wise stack on a new leading axis (numpy in, numpy out; else jax)."""
  def one(*xs):
    if all(isinstance(x, np.ndarray) for x in xs):
      return np.stack(xs)
    return jnp.stack(xs)
  return jax.tree.map(one, *trees)


def _decoder_subtree(params: Any, rebuild):
  """Applies ``rebuild`` to the decoder tree inside ``params`` ({"params": ...} and/or
  {"decoder": ...} levels allowed, as in a Flamingo param tree)."""
  if isinstance(params, Mapping) and "params" in params:
    return {**params, "params": _decoder_subtree(params["params"], rebuild)}
  if isinstance(params, Mapping) and "decoder" in params:
    return {**params, "decoder": rebuild(params["decoder"])}
  return rebuild(params)


def stack_layers(params: Any, config: Any) -> Any:
  """An unrolled decoder param tree -> the ``scan_layers`` layout (module docstring).

  Args:
    params: the decoder's params (``layers_{i}``, ``xattn_{i}``, ...), or a tree holding
      them under "params" and/or "decoder" (a Flamingo tree); plain arrays (numpy stays
      numpy).
    config: the DecoderConfig (or a FlamingoConfig: its ``decoder``).
  """
  config = getattr(config, "decoder", config)
  plan = scan_plan(config)
  def rebuild(tree):
    expect = {f"layers_{i}" for i in range(config.depth)} | {
        f"xattn_{i}" for i in xattn_layer_indices(config)}
    missing = sorted(expect - set(tree))
    if missing or "blocks" in tree:
      raise ValueError(f"stack_layers expects an unrolled decoder tree; missing {missing}"
                       f"{' and it already has blocks' if 'blocks' in tree else ''}")
    out = {k: v for k, v in tree.items() if k not in expect}
    size = plan.block_size
    if plan.num_blocks:
      blocks = {f"layers_{j}": _stack([tree[f"layers_{g * size + j}"] for g in range(plan.num_blocks)])
                for j in range(size)}
      if plan.with_xattn:
        blocks["xattn"] = _stack([tree[f"xattn_{g * size + size - 1}"] for g in range(plan.num_blocks)])
      out["blocks"] = blocks
    out.update({f"layers_{i}": tree[f"layers_{i}"] for i in plan.remainder})
    return out
  return _decoder_subtree(params, rebuild)


def unstack_layers(params: Any, config: Any) -> Any:
  """The ``scan_layers`` layout -> the unrolled decoder param tree (inverse of
  :func:`stack_layers`, exact)."""
  config = getattr(config, "decoder", config)
  plan = scan_plan(config)
  def rebuild(tree):
    if plan.num_blocks and "blocks" not in tree:
      raise ValueError(f"unstack_layers expects a scanned decoder tree with 'blocks'; got keys {sorted(tree)}")
    out = {k: v for k, v in tree.items() if k != "blocks"}
    size = plan.block_size
    for g in range(plan.num_blocks):
      take = lambda t: jax.tree.map(lambda x: x[g], t)
      for j in range(size):
        out[f"layers_{g * size + j}"] = take(tree["blocks"][f"layers_{j}"])
      if plan.with_xattn:
        out[f"xattn_{g * size + size - 1}"] = take(tree["blocks"]["xattn"])
    return out
  return _decoder_subtree(params, rebuild)


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
  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
    c = self.config
    tie = (lambda cls: _read_after(x, cls)) if self.weights_after_input else (lambda cls: cls)
    h = tie(RMSNorm)(eps=c.norm_eps, dtype=c.dtype, name="attn_norm")(x)
    h, cache = tie(Attention)(
        num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
        rope_theta=c.rope_theta, dtype=c.dtype, backend=c.attention_backend, name="attn",
    )(h, causal=True, positions=positions, cache=cache)
    x = x + h
    h = tie(RMSNorm)(eps=c.norm_eps, dtype=c.dtype, name="mlp_norm")(x)
    x = x + tie(SwiGLU)(mlp_dim=c.mlp_dim, dtype=c.dtype, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache


class DecoderBlock(nn.Module):
  """One step of the scanned decoder: ``size`` LM layers, a GatedXAttnDense before the
  last one when ``with_xattn``. Scanned by ``Decoder`` (``nn.scan``), which stacks its
  params on a leading ``layers`` axis.

  Both methods have scan's signature (carry, broadcast inputs, per-block inputs) ->
  (carry, per-block outputs).
  """

  config: DecoderConfig
  size: int
  with_xattn: bool

  def setup(self):
    c = self.config
    from mmjax.models.gated_xattn import GatedXAttnDense  # pylint: disable=g-import-not-at-top
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
    if self.with_xattn:
      # Its weights through a barrier too, so that XLA cannot hoist their casts out of
      # the loop (one block's cross-attention may still be gathered early).
      barrier = nn.map_variables(GatedXAttnDense, "params", init=True, mutable=True,
                                 trans_in_fn=jax.lax.optimization_barrier,
                                 methods=["__call__", "compute_media_kv"])
      self.xattn = nn.remat(barrier, **keep_dots)(xattn_config(c))

  def __call__(self, x: jax.Array, shared: tuple, scanned: dict):
    """x [B, T, D]; shared = (positions, image_index, media); scanned = {"cache": this
    block's cache or None, "media_kv": this block's media K/V or None}. Returns (x,
    {"cache": the updated cache or None})."""
    positions, image_index, media = shared
    cache, media_kv = scanned["cache"], scanned["media_kv"]
    in_dtype = x.dtype
    new_cache = {} if cache is not None else None
    for j, layer in enumerate(self.layers):
      if self.with_xattn and j == self.size - 1:
        if media_kv is not None:
          x = self.xattn(x, image_index, media_kv=media_kv)
        else:
          x = self.xattn(x, image_index, media=media)
      x, layer_cache = layer(x, positions, None if cache is None else cache[f"layers_{j}"])
      if cache is not None:
        new_cache[f"layers_{j}"] = layer_cache
    # The scan carry keeps one dtype (the cross-attention computes in config.dtype).
    return x.astype(in_dtype), {"cache": new_cache}

  def media_kv(self, carry: Any, media: jax.Array, unused: Any):
    """(carry, this block's cross-attention media K/V) for media [B, N, L, Dm]."""
    del unused
    return carry, self.xattn.compute_media_kv(media)


def _scanned_blocks(config: DecoderConfig, plan: ScanPlan, name: str) -> nn.Module:
  scanned = nn.scan(
      DecoderBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, 0),
      length=plan.num_blocks,
      # The stacked axis is the logical axis "layers" (mmjax.sharding: never sharded).
      metadata_params={nn.PARTITION_NAME: "layers"},
      methods=["__call__", "media_kv"],
  )
  return scanned(config, plan.block_size, plan.with_xattn, name=name)


class Decoder(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V], with optional media cross-attention."""

  config: DecoderConfig

  def setup(self):
    c = self.config
    self.embed = Embed(c.vocab_size, c.width, dtype=c.dtype)
    layer_cls = nn.remat(DecoderLayer) if c.remat else DecoderLayer
    if c.scan_layers:
      plan = scan_plan(c)
      if plan.num_blocks:
        self.blocks = _scanned_blocks(c, plan, name="blocks")
      # A dict attribute names its modules layers_{i}, as in the unrolled layout.
      self.layers = {i: layer_cls(c) for i in plan.remainder}
    else:
      self.layers = [layer_cls(c) for _ in range(c.depth)]
    xattn_indices = xattn_layer_indices(c)
    if xattn_indices and not c.scan_layers:
      from mmjax.models.gated_xattn import GatedXAttnDense  # pylint: disable=g-import-not-at-top
      xc = xattn_config(c)
      # A dict attribute names its modules xattn_{i}: i is the LM layer they precede.
      self.xattn = {i: GatedXAttnDense(xc) for i in xattn_indices}
    self.norm = RMSNorm(eps=c.norm_eps, dtype=c.dtype)
    if not c.tie_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=c.dtype)

  def compute_media_kv(self, media: jax.Array) -> dict:
    """Every cross-attention layer's media keys/values, computed once per image.

    Args:
      media: Float[B, N, L, Dm] resampled latents.

    Returns:
      {"xattn_{i}": {"key", "value": [B, N*L, H, K]}} for each cross-attention layer;
      with ``scan_layers``: {"blocks": {"key", "value": [num_blocks, B, N*L, H, K], ...}}.
    """
    if self.config.scan_layers:
      if not xattn_layer_indices(self.config):
        return {}
      _, kv = self.blocks.media_kv(None, media, None)
      return {"blocks": kv}
    return {f"xattn_{i}": self.xattn[i].compute_media_kv(media)
            for i in xattn_layer_indices(self.config)}

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      image_index: jax.Array | None = None,
      media: jax.Array | None = None,
      media_kv: Mapping[str, dict] | Sequence[dict] | None = None,
      positions: jax.Array | None = None,
      cache: dict | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """Logits float32 [B, T, V] and the updated cache (None without one).

    Args:
      input_ids: Int[B, T].
      image_index: Int[B, T], number of <image> tokens at or before each token (0: none
        yet); needed by the cross-attention layers.
      media: Float[B, N, L, Dm] latents; or instead
      media_kv: the output of ``compute_media_kv`` (a dict keyed ``xattn_{i}``, or a
        list in layer order; with ``scan_layers`` also its stacked {"blocks": ...}), so
        generation does not recompute the media projections.
      positions: Int[B, T] absolute positions (RoPE and the causal mask); default
        0..T-1.
      cache: {"layers_{i}": {"key", "value": [B, S, G, K]}} from ``init_decoder_cache``
        (its stacked layout with ``scan_layers``); the new keys/values are written at
        ``positions``.
    """
    c = self.config
    b, t = input_ids.shape
    xattn_indices = xattn_layer_indices(c)
    if xattn_indices:
      if (media is None) == (media_kv is None):
        raise ValueError(
            f"the decoder has cross-attention layers {xattn_indices}: give exactly one of"
            f" media and media_kv (got media={media is not None}, media_kv={media_kv is not None})")
      if image_index is None:
        raise ValueError("the decoder has cross-attention layers: image_index [B, T] is required")
      if image_index.shape != (b, t):
        raise ValueError(f"image_index has shape {image_index.shape}; expected {(b, t)}")
      if media_kv is not None and not isinstance(media_kv, Mapping):
        media_kv = list(media_kv)
        if len(media_kv) != len(xattn_indices):
          raise ValueError(
              f"media_kv has {len(media_kv)} entries; expected {len(xattn_indices)} (one per"
              f" cross-attention layer {xattn_indices})")
        media_kv = {f"xattn_{i}": kv for i, kv in zip(xattn_indices, media_kv)}
      if media_kv is not None and c.scan_layers and "blocks" not in media_kv:
        # The unrolled form: stack it into the scanned one.
        media_kv = {"blocks": _stack([media_kv[f"xattn_{i}"] for i in xattn_indices])}
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None and set(cache) != _cache_layout(c):
      raise ValueError(f"cache has entries {sorted(cache)}; expected {sorted(_cache_layout(c))}"
                       f" (init_decoder_cache of this config, scan_layers={c.scan_layers})")

    x = self.embed(input_ids)
    new_cache = {} if cache is not None else None
    if c.scan_layers:
      if scan_plan(c).num_blocks:
        scanned = {"cache": None if cache is None else cache["blocks"],
                   "media_kv": None if media_kv is None else media_kv["blocks"]}
        x, out = self.blocks(x, (positions, image_index, media), scanned)
        if cache is not None:
          new_cache["blocks"] = out["cache"]
      layers = sorted(self.layers.items())
    else:
      layers = enumerate(self.layers)
    for i, layer in layers:
      if i in xattn_indices:
        if media_kv is not None:
          x = self.xattn[i](x, image_index, media_kv=media_kv[f"xattn_{i}"])
        else:
          x = self.xattn[i](x, image_index, media=media)
      layer_cache = None if cache is None else cache[f"layers_{i}"]
      x, layer_cache = layer(x, positions, layer_cache)
      if cache is not None:
        new_cache[f"layers_{i}"] = layer_cache
    x = self.norm(x)
    if c.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits, new_cache
