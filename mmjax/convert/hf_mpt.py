"""HF ``MptForCausalLM`` state_dicts -> ``Decoder`` params (MPT-7B, OpenFlamingo-9B's LM),
through the decoder's variant fields: ALiBi instead of rotary positions, LayerNorms without
bias, no linear biases, a GELU MLP of 4x the width, optional ``clip_qkv``, tied embeddings.

Key layout (``transformers`` MPT; torch ``nn.Linear`` weights are [out, in]):

  transformer.wte.weight                      [V, D]     -> embed/embedding
  transformer.blocks.{i}.norm_1.weight        [D]        -> layers_{i}/attn_norm/scale
  transformer.blocks.{i}.attn.Wqkv.weight     [3*D, D]   -> layers_{i}/attn/{query,key,value}/kernel [D, H, K]
  transformer.blocks.{i}.attn.out_proj.weight [D, D]     -> layers_{i}/attn/out/kernel [H, K, D]
  transformer.blocks.{i}.norm_2.weight        [D]        -> layers_{i}/mlp_norm/scale
  transformer.blocks.{i}.ffn.up_proj.weight   [F, D]     -> layers_{i}/mlp/fc1/kernel [D, F]
  transformer.blocks.{i}.ffn.down_proj.weight [D, F]     -> layers_{i}/mlp/fc2/kernel [F, D]
  transformer.norm_f.weight                   [D]        -> norm/scale
  lm_head.weight                              [V, D]     -> (tied: equal to wte; accepted, not read)

The fused projection's rows are [q (D rows), k (D rows), v (D rows)] (``Wqkv(x).chunk(3)``),
each head-major. transformers' ALiBi adds ``slope_h * (s - S + 1)`` for key s, which differs
from mmjax's ``slope_h * (s - t)`` by a per-row constant that softmax ignores. Dimension letters:
V vocabulary, D width, H heads, K head dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig


def _attn_config(cfg: Mapping[str, Any]) -> dict:
  attn = cfg.get("attn_config") or {}
  return attn.to_dict() if hasattr(attn, "to_dict") else dict(attn)


def config_from_hf_mpt(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``MptConfig`` (object or ``config.json`` dict); the MPT
  options transformers does not implement either are refused by name."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  attn = _attn_config(cfg)
  unsupported = {
      "attn_config.alibi": (attn.get("alibi", True), True),
      "attn_config.qk_ln": (attn.get("qk_ln", False), False),
      "attn_config.softmax_scale": (attn.get("softmax_scale"), None),
      "attn_config.prefix_lm": (attn.get("prefix_lm", False), False),
      "attn_config.attn_uses_sequence_id": (attn.get("attn_uses_sequence_id", False), False),
      "attn_config.attn_type": (attn.get("attn_type", "multihead_attention"), "multihead_attention"),
      "logit_scale": (cfg.get("logit_scale"), None),
      "embedding_fraction": (cfg.get("embedding_fraction", 1.0), 1.0),
  }
  bad = {k: got for k, (got, want) in unsupported.items() if got != want}
  if bad:
    raise ValueError(f"MPT config {bad} is not supported; expected "
                     + ", ".join(f"{k}={unsupported[k][1]!r}" for k in bad))
  d, heads = cfg["d_model"], cfg["n_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"], width=d, depth=cfg["n_layers"], num_heads=heads, num_kv_heads=heads,
      head_dim=d // heads,
      # transformers' MptMLP is 4 x d_model whatever expansion_ratio says; MPT's own code reads it.
      mlp_dim=int(cfg.get("expansion_ratio", 4)) * d,
      norm="layer", norm_bias=False, norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), mlp="gelu",
      positions="alibi", alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
      clip_qkv=float(attn.get("clip_qkv") or 0.0),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), max_length=int(cfg.get("max_seq_len", 2048)))
  fields.update(overrides)
  return DecoderConfig(**fields)


def mpt_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig, *, prefix: str = "") -> dict:
  """``MptForCausalLM`` state_dict -> ``Decoder(config)`` params (plain dict); one ValueError
  lists every missing, unexpected and mis-shaped key."""
  c = config
  if (c.norm, c.norm_bias, c.mlp, c.positions, c.attention_bias, c.mlp_bias, c.num_kv_heads) != \
      ("layer", False, "gelu", "alibi", False, False, c.num_heads):
    raise ValueError(f"an MPT state_dict needs a DecoderConfig with norm='layer', norm_bias=False, mlp='gelu', "
                     f"positions='alibi', no biases and num_kv_heads == num_heads; got norm={c.norm!r}, norm_bias="
                     f"{c.norm_bias}, mlp={c.mlp!r}, positions={c.positions!r}, attention_bias={c.attention_bias}, "
                     f"mlp_bias={c.mlp_bias}, num_kv_heads={c.num_kv_heads} (config_from_hf_mpt builds one)")
  d, h, k, f = c.width, c.num_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"an MPT decoder (width={d}, depth={c.depth}) from the keys under {prefix!r}")
  base = prefix + "transformer."
  scale = lambda key: {"scale": r.get(key, (d,))}
  params: dict[str, Any] = {"embed": {"embedding": r.get(base + "wte.weight", (c.vocab_size, d))}}
  for i in range(c.depth):
    p = f"{base}blocks.{i}."
    qkv = r.linear(p + "attn.Wqkv.weight", 3 * h * k, d)
    out = r.linear(p + "attn.out_proj.weight", d, h * k)
    attn = {name: {"kernel": None if qkv is None else np.ascontiguousarray(qkv[:, j * h * k:(j + 1) * h * k]
                                                                            .reshape(d, h, k))}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": None if out is None else out.reshape(h, k, d)}
    params[f"layers_{i}"] = {
        "attn_norm": scale(p + "norm_1.weight"),
        "attn": attn,
        "mlp_norm": scale(p + "norm_2.weight"),
        "mlp": {"fc1": {"kernel": r.linear(p + "ffn.up_proj.weight", f, d)},
                "fc2": {"kernel": r.linear(p + "ffn.down_proj.weight", d, f)}},
    }
  params["norm"] = scale(base + "norm_f.weight")
  head_key = prefix + "lm_head.weight"
  if c.tie_embeddings:
    r.tied_head(head_key, params["embed"]["embedding"])
  else:
    params["lm_head"] = {"kernel": r.linear(head_key, c.vocab_size, d)}
  r.raise_if_errors({key for key in sd if key.startswith(prefix) and key not in r.used})
  return params
