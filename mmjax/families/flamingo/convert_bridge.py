"""OpenFlamingo state_dict -> params of the Perceiver Resampler and the gated cross-attention.

The ``perceiver.*`` and ``lang_encoder.gated_cross_attn_layers.*`` parts of an
``open_flamingo.src.flamingo.Flamingo`` state_dict (torch tensors or numpy arrays). The vision
tower and the LM are converted by ``mmjax.convert.hf_vision`` / ``hf_llama``, and
``mmjax.families.flamingo.convert`` assembles the whole model, calling:

  used = set()
  resampler = perceiver_from_state_dict(sd, perceiver_config, used=used)
  xattn = gated_xattn_layers_from_state_dict(
      sd, xattn_config, layer_indices=model.xattn_layer_indices(config),
      decoder_layers_prefix="lang_encoder.model.layers.", used=used)
  # -> {"xattn_3": params, "xattn_7": params, ...}, to merge into the decoder params.
  unexpected = set(sd) - used - <keys consumed by the other converters>

Each function raises ONE ValueError listing every missing, unexpected (under its prefix) and
mis-shaped key. ``used`` (optional) collects every key consumed, aliases included, so that the
caller can report the keys no converter claimed.

Layout of the torch modules (``open_flamingo.src.helpers``):
- ``nn.Linear`` weights are [out, in]; ours are kernels [in, out], reshaped to heads: to_q
  [H*K, D] -> [D, H, K]; to_kv [2*H*K, Dm] -> [Dm, 2, H, K] (``.chunk(2, -1)``: keys first, then
  values; each ``(h d)``, head-major); to_out [D, H*K] -> [H, K, D].
- ``FeedForward`` is ``nn.Sequential(LayerNorm, Linear, GELU, Linear)``: ``ff.0`` -> ``norm``,
  ``ff.1`` -> ``fc1``, ``ff.3`` -> ``fc2``. LayerNorm ``weight`` -> ``scale``.
- PerceiverResampler layers are ``nn.ModuleList([PerceiverAttention, FeedForward])``:
  ``layers.{i}.0`` -> ``layers_{i}/attn``, ``layers.{i}.1`` -> ``layers_{i}/ff``;
  ``media_time_embs`` is stored [N_max, 1, D] in torch, [N_max, D] here.
- A Flamingo state_dict holds every gated cross-attention block twice: under
  ``lang_encoder.gated_cross_attn_layers.{i}.`` and (the same tensors, through the
  ``FlamingoLayer`` wrapper) under ``lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.``
  (``model.layers`` for LLaMA, ``transformer.blocks`` for MPT). Either may be given; the
  first is read when present, the alias is then marked used as well.

Dimension letters: D width, Dm media width, H heads, K head dim, L latents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.gated_xattn import GatedXAttnConfig
from mmjax.models.perceiver import PerceiverConfig

GATED_XATTN_PREFIX = "lang_encoder.gated_cross_attn_layers."
PERCEIVER_PREFIX = "perceiver."


def _heads_in(kernel: np.ndarray | None, heads: int, head_dim: int) -> np.ndarray | None:
  """Kernel [D, H*K] -> [D, H, K] (torch's ``(h d)`` order is head-major)."""
  return None if kernel is None else kernel.reshape(kernel.shape[0], heads, head_dim)


def _kv_in(kernel: np.ndarray | None, heads: int, head_dim: int) -> np.ndarray | None:
  """Kernel [Dm, 2*H*K] -> [Dm, 2, H, K]: ``.chunk(2, -1)`` puts keys first."""
  return None if kernel is None else kernel.reshape(kernel.shape[0], 2, heads, head_dim)


def _heads_out(kernel: np.ndarray | None, heads: int, head_dim: int) -> np.ndarray | None:
  """Kernel [H*K, D] -> [H, K, D]."""
  return None if kernel is None else kernel.reshape(heads, head_dim, kernel.shape[-1])


def _feed_forward(r: StateDictReader, prefix: str, dim: int, mlp_dim: int) -> dict:
  return {
      "norm": r.layer_norm(prefix + "0.", dim),
      "fc1": {"kernel": r.linear(prefix + "1.weight", mlp_dim, dim)},
      "fc2": {"kernel": r.linear(prefix + "3.weight", dim, mlp_dim)},
  }


def _under(sd: Mapping[str, Any], prefix: str) -> set[str]:
  return {k for k in sd if k.startswith(prefix)}


def perceiver_from_state_dict(
    sd: Mapping[str, Any],
    config: PerceiverConfig,
    prefix: str = PERCEIVER_PREFIX,
    *,
    used: set[str] | None = None,
) -> dict:
  """``perceiver.*`` of an OpenFlamingo state_dict -> PerceiverResampler params (plain dict).

  The result has the tree structure of ``nn.unbox(PerceiverResampler(config).init(...)['params'])``.
  Keys under ``prefix`` that the config does not explain (e.g. ``frame_embs`` with
  ``max_num_frames=None``, a layer beyond ``depth``) are unexpected.
  """
  c = config
  d, h, k = c.width, c.num_heads, c.head_dim
  hk = h * k
  r = StateDictReader(sd, f"a PerceiverResampler from the keys under {prefix!r}")
  params: dict[str, Any] = {"latents": r.get(prefix + "latents", (c.num_latents, d))}
  if c.max_num_frames is not None:
    params["frame_embs"] = r.get(prefix + "frame_embs", (c.max_num_frames, d))
  if c.max_num_media is not None:
    t = r.get(prefix + "media_time_embs", (c.max_num_media, 1, d))
    params["media_time_embs"] = None if t is None else t.reshape(c.max_num_media, d)
  for i in range(c.depth):
    a = f"{prefix}layers.{i}.0."
    params[f"layers_{i}"] = {
        "attn": {
            "norm_media": r.layer_norm(a + "norm_media.", d),
            "norm_latents": r.layer_norm(a + "norm_latents.", d),
            "to_q": {"kernel": _heads_in(r.linear(a + "to_q.weight", hk, d), h, k)},
            "to_kv": {"kernel": _kv_in(r.linear(a + "to_kv.weight", 2 * hk, d), h, k)},
            "to_out": {"kernel": _heads_out(r.linear(a + "to_out.weight", d, hk), h, k)},
        },
        "ff": _feed_forward(r, f"{prefix}layers.{i}.1.", d, c.ff_mult * d),
    }
  params["norm"] = r.layer_norm(prefix + "norm.", d)
  r.raise_if_errors(_under(sd, prefix) - r.used)
  if used is not None:
    used.update(r.used)
  return params


def _gated_xattn(r: StateDictReader, prefix: str, config: GatedXAttnConfig) -> dict:
  c = config
  d, dm, h, k = c.width, c.media_width, c.num_heads, c.head_dim
  hk = h * k
  return {
      "attn": {
          "norm": r.layer_norm(prefix + "attn.norm.", d),
          "to_q": {"kernel": _heads_in(r.linear(prefix + "attn.to_q.weight", hk, d), h, k)},
          "to_kv": {"kernel": _kv_in(r.linear(prefix + "attn.to_kv.weight", 2 * hk, dm), h, k)},
          "to_out": {"kernel": _heads_out(r.linear(prefix + "attn.to_out.weight", d, hk), h, k)},
      },
      "attn_gate": r.get(prefix + "attn_gate", (1,)),
      "ff": _feed_forward(r, prefix + "ff.", d, c.ff_mult * d),
      "ff_gate": r.get(prefix + "ff_gate", (1,)),
  }


def gated_xattn_from_state_dict(
    sd: Mapping[str, Any],
    config: GatedXAttnConfig,
    prefix: str,
    *,
    used: set[str] | None = None,
) -> dict:
  """One ``GatedCrossAttentionBlock`` (keys ``{prefix}attn.to_q.weight`` ...) -> GatedXAttnDense params.

  ``prefix`` is e.g. ``"lang_encoder.gated_cross_attn_layers.3."``, or ``""`` for the
  state_dict of a bare ``GatedCrossAttentionBlock``. Keys under a non-empty prefix that are
  not part of the block are unexpected; with an empty prefix every other key is.
  """
  r = StateDictReader(sd, f"a GatedXAttnDense from the keys under {prefix!r}")
  params = _gated_xattn(r, prefix, config)
  r.raise_if_errors(_under(sd, prefix) - r.used)
  if used is not None:
    used.update(r.used)
  return params


def gated_xattn_layers_from_state_dict(
    sd: Mapping[str, Any],
    config: GatedXAttnConfig,
    layer_indices: Sequence[int],
    *,
    prefix: str = GATED_XATTN_PREFIX,
    decoder_layers_prefix: str | None = "lang_encoder.model.layers.",
    used: set[str] | None = None,
) -> dict:
  """Every gated cross-attention block of a Flamingo LM -> {"xattn_{i}": params}.

  ``layer_indices``: the LM layers that carry a block (``model.xattn_layer_indices``: i with
  (i + 1) % cross_attn_every_n_layers == 0, as ``FlamingoLMMixin.init_flamingo``). Block i is
  read from ``{prefix}{i}.``, or from its alias ``{decoder_layers_prefix}{i}.gated_cross_attn_layer.``
  when the first is absent; the alias keys are marked used either way (pass
  ``decoder_layers_prefix=None`` to leave them to the caller). A block index under ``prefix``
  not in ``layer_indices`` is unexpected.
  """
  r = StateDictReader(sd, f"the gated cross-attention layers {list(layer_indices)} from the keys under {prefix!r}")
  out = {}
  for i in layer_indices:
    main = f"{prefix}{i}."
    alias = None if decoder_layers_prefix is None else f"{decoder_layers_prefix}{i}.gated_cross_attn_layer."
    source = main if (alias is None or _under(sd, main) or not _under(sd, alias)) else alias
    out[f"xattn_{i}"] = _gated_xattn(r, source, config)
    if alias is not None:
      r.used.update(_under(sd, alias) & {k.replace(source, alias, 1) for k in r.used if k.startswith(source)})
  unexpected = _under(sd, prefix) - r.used
  if decoder_layers_prefix is not None:
    unexpected |= {k for k in sd if k.startswith(decoder_layers_prefix) and ".gated_cross_attn_layer." in k} - r.used
  r.raise_if_errors(unexpected)
  if used is not None:
    used.update(r.used)
  return out
