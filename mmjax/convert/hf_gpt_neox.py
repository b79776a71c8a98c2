"""HF ``GPTNeoXForCausalLM`` state_dicts -> ``Decoder`` params (the LM of RedPajama-INCITE,
OpenFlamingo-4B's; Pythia), through the decoder's variant fields.

Key layout (``transformers`` GPT-NeoX; torch ``nn.Linear`` weights are [out, in]):

  gpt_neox.embed_in.weight                           [V, D]      -> embed/embedding
  gpt_neox.layers.{i}.input_layernorm.{weight,bias}  [D]         -> layers_{i}/attn_norm/{scale,bias}
  gpt_neox.layers.{i}.attention.query_key_value.weight [3*H*K, D] -> layers_{i}/attn/{query,key,value}/kernel
  gpt_neox.layers.{i}.attention.query_key_value.bias [3*H*K]     -> .../{query,key,value}/bias [H, K]
  gpt_neox.layers.{i}.attention.dense.{weight,bias}  [D, H*K]    -> layers_{i}/attn/out/{kernel [H, K, D], bias}
  gpt_neox.layers.{i}.post_attention_layernorm.*     [D]         -> layers_{i}/mlp_norm/{scale,bias}
  gpt_neox.layers.{i}.mlp.dense_h_to_4h.{weight,bias} [F, D]     -> layers_{i}/mlp/fc1/{kernel,bias}
  gpt_neox.layers.{i}.mlp.dense_4h_to_h.{weight,bias} [D, F]     -> layers_{i}/mlp/fc2/{kernel,bias}
  gpt_neox.final_layer_norm.{weight,bias}            [D]         -> norm/{scale,bias}
  embed_out.weight (lm_head.weight in transformers 5) [V, D]     -> lm_head/kernel [D, V]

The fused projection's rows are per head: head h holds [q (K rows), k (K rows), v (K rows)]
(``modeling_gpt_neox``: ``qkv.view(..., H, 3K)`` then ``chunk(3)``). Its rotary embedding
rotates the first ``partial_rotary_factor`` of each head half-split, as ``mmjax.layers.rope``
does. Dimension letters: V vocabulary, D width, H heads, K head dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig

# Buffers some transformers versions save, which carry no learned weight.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def _split_qkv(w: np.ndarray | None, b: np.ndarray | None, h: int, k: int, d: int) -> dict:
  """Fused [3*H*K, D] weight (kernel [D, 3*H*K] here) and [3*H*K] bias -> q, k, v params."""
  out = {}
  for j, name in enumerate(("query", "key", "value")):
    entry = {}
    if w is not None:
      entry["kernel"] = np.ascontiguousarray(w.reshape(d, h, 3, k)[:, :, j, :])
    if b is not None:
      entry["bias"] = np.ascontiguousarray(b.reshape(h, 3, k)[:, j, :])
    out[name] = entry
  return out


def gpt_neox_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig, *, prefix: str = "") -> dict:
  """``GPTNeoXForCausalLM`` state_dict -> ``Decoder(config)`` params (plain dict); one
  ValueError lists every missing, unexpected and mis-shaped key."""
  c = config
  if (c.norm, c.mlp, c.attention_bias, c.attention_out_bias, c.mlp_bias, c.num_kv_heads) != \
      ("layer", c.mlp, True, True, True, c.num_heads) or c.mlp == "swiglu":
    raise ValueError(f"a GPT-NeoX state_dict needs a DecoderConfig with norm='layer', a two-layer mlp, "
                     f"attention_bias, attention_out_bias and mlp_bias, num_kv_heads == num_heads; got norm={c.norm!r}, mlp={c.mlp!r}, "
                     f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias}, num_kv_heads={c.num_kv_heads} "
                     "(config_from_hf_gpt_neox builds one)")
  d, h, k, f = c.width, c.num_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"a GPT-NeoX decoder (width={d}, depth={c.depth}) from the keys under {prefix!r}")
  base = prefix + "gpt_neox."
  params: dict[str, Any] = {"embed": {"embedding": r.get(base + "embed_in.weight", (c.vocab_size, d))}}
  for i in range(c.depth):
    p = f"{base}layers.{i}."
    a = p + "attention."
    qkv = _split_qkv(r.linear(a + "query_key_value.weight", 3 * h * k, d),
                     r.get(a + "query_key_value.bias", (3 * h * k,)), h, k, d)
    dense_w = r.linear(a + "dense.weight", d, h * k)
    params[f"layers_{i}"] = {
        "attn_norm": r.layer_norm(p + "input_layernorm.", d),
        "attn": {**qkv, "out": {"kernel": None if dense_w is None else dense_w.reshape(h, k, d),
                                "bias": r.get(a + "dense.bias", (d,))}},
        "mlp_norm": r.layer_norm(p + "post_attention_layernorm.", d),
        "mlp": {"fc1": {"kernel": r.linear(p + "mlp.dense_h_to_4h.weight", f, d),
                        "bias": r.get(p + "mlp.dense_h_to_4h.bias", (f,))},
                "fc2": {"kernel": r.linear(p + "mlp.dense_4h_to_h.weight", d, f),
                        "bias": r.get(p + "mlp.dense_4h_to_h.bias", (d,))}},
    }
  params["norm"] = r.layer_norm(base + "final_layer_norm.", d)
  if not c.tie_embeddings:
    # Released checkpoints name it embed_out; transformers 5 saves it as lm_head.
    head = prefix + ("lm_head.weight" if prefix + "lm_head.weight" in sd else "embed_out.weight")
    params["lm_head"] = {"kernel": r.linear(head, c.vocab_size, d)}
  unexpected = {key for key in sd if key.startswith(prefix) and key not in r.used
                and not key.endswith(_IGNORED_SUFFIXES)}
  r.raise_if_errors(unexpected)
  return params


def config_from_hf_gpt_neox(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``GPTNeoXConfig`` (object or ``config.json`` dict)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  rope = cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
    raise ValueError(f"rope_parameters={rope} (rope_scaling={cfg.get('rope_scaling')}) is not supported; "
                     "expected the default RoPE")
  act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
         "quick_gelu": "quick_gelu"}
  if cfg.get("hidden_act", "gelu") not in act:
    raise ValueError(f"hidden_act={cfg.get('hidden_act')!r}; expected one of {sorted(act)}")
  if not cfg.get("attention_bias", True):
    raise ValueError("attention_bias=False; expected True (the GPT-NeoX layout this importer reads)")
  heads = cfg["num_attention_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=heads,
      num_kv_heads=heads, head_dim=cfg["hidden_size"] // heads, mlp_dim=cfg["intermediate_size"],
      rope_theta=float(rope.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))),
      rotary_fraction=float(rope.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))),
      norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_length=int(cfg.get("max_position_embeddings", 2048)), norm="layer", mlp=act[cfg.get("hidden_act", "gelu")],
      mlp_bias=True, attention_bias=True, attention_out_bias=True, parallel_residual=bool(cfg.get("use_parallel_residual", True)))
  fields.update(overrides)
  return DecoderConfig(**fields)
