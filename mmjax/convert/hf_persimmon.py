"""HF ``PersimmonForCausalLM`` state_dicts -> ``Decoder`` params (Persimmon-8B, the LM of
Fuyu and OtterHD), through the decoder's variant fields: LayerNorms with bias, a fused q/k/v
projection laid out per head as GPT-NeoX's, a LayerNorm over each head's query and key
(``qk_norm``), partial rotary, a squared-ReLU MLP with biases, an untied output.

Key layout (``transformers`` Persimmon; torch ``nn.Linear`` weights are [out, in]):

  model.embed_tokens.weight                              [V, D]       -> embed/embedding
  model.layers.{i}.input_layernorm.*                     [D]          -> layers_{i}/attn_norm/{scale,bias}
  model.layers.{i}.self_attn.query_key_value.*           [3*H*K, D]   -> layers_{i}/attn/{query,key,value}
  model.layers.{i}.self_attn.{q,k}_layernorm.*           [K]          -> layers_{i}/attn/{query,key}_norm
  model.layers.{i}.self_attn.dense.*                     [D, H*K]     -> layers_{i}/attn/out
  model.layers.{i}.post_attention_layernorm.*            [D]          -> layers_{i}/mlp_norm/{scale,bias}
  model.layers.{i}.mlp.dense_h_to_4h.*, dense_4h_to_h.*               -> layers_{i}/mlp/fc1, fc2
  model.final_layernorm.*                                [D]          -> norm/{scale,bias}
  lm_head.weight                                         [V, D]       -> lm_head/kernel [D, V]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert.hf_gpt_neox import _split_qkv
from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig


def config_from_hf_persimmon(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``PersimmonConfig`` (object or ``config.json`` dict)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  rope = cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
    raise ValueError(f"rope_parameters={rope} (rope_scaling={cfg.get('rope_scaling')}) is not supported; "
                     "expected the default RoPE")
  act = {"relu2": "relu2", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}
  if cfg.get("hidden_act", "relu2") not in act:
    raise ValueError(f"hidden_act={cfg.get('hidden_act')!r}; expected one of {sorted(act)}")
  heads, d = cfg["num_attention_heads"], cfg["hidden_size"]
  fields = dict(
      vocab_size=cfg["vocab_size"], width=d, depth=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
      head_dim=d // heads, mlp_dim=cfg["intermediate_size"], norm="layer",
      norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), mlp=act[cfg.get("hidden_act", "relu2")], mlp_bias=True,
      attention_bias=True, attention_out_bias=True, qk_norm="head" if cfg.get("qk_layernorm", True) else "none",
      rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 25000.0))),
      rotary_fraction=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_length=int(cfg.get("max_position_embeddings", 16384)))
  fields.update(overrides)
  return DecoderConfig(**fields)


def persimmon_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig, *, prefix: str = "") -> dict:
  """``PersimmonForCausalLM`` state_dict -> ``Decoder(config)`` params (plain dict); one
  ValueError lists every missing, unexpected and mis-shaped key."""
  c = config
  if (c.norm, c.attention_bias, c.attention_out_bias, c.mlp_bias, c.num_kv_heads, c.parallel_residual) != \
      ("layer", True, True, True, c.num_heads, False) or c.mlp == "swiglu":
    raise ValueError(f"a Persimmon state_dict needs a DecoderConfig with norm='layer', a two-layer mlp, every bias, "
                     f"num_kv_heads == num_heads and a sequential residual; got norm={c.norm!r}, mlp={c.mlp!r}, "
                     f"attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias} (config_from_hf_persimmon builds one)")
  d, h, k, f = c.width, c.num_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"a Persimmon decoder (width={d}, depth={c.depth}) from the keys under {prefix!r}")
  base = prefix + "model."
  params: dict[str, Any] = {"embed": {"embedding": r.get(base + "embed_tokens.weight", (c.vocab_size, d))}}
  for i in range(c.depth):
    p = f"{base}layers.{i}."
    a = p + "self_attn."
    attn = _split_qkv(r.linear(a + "query_key_value.weight", 3 * h * k, d),
                      r.get(a + "query_key_value.bias", (3 * h * k,)), h, k, d)
    if c.qk_norm != "none":
      if c.qk_norm != "head":
        raise ValueError(f"a Persimmon state_dict has per-head q/k LayerNorms; got qk_norm={c.qk_norm!r}, expected "
                         "'head' or 'none'")
      attn["query_norm"] = r.layer_norm(a + "q_layernorm.", k)
      attn["key_norm"] = r.layer_norm(a + "k_layernorm.", k)
    dense_w = r.linear(a + "dense.weight", d, h * k)
    attn["out"] = {"kernel": None if dense_w is None else dense_w.reshape(h, k, d), "bias": r.get(a + "dense.bias", (d,))}
    params[f"layers_{i}"] = {
        "attn_norm": r.layer_norm(p + "input_layernorm.", d),
        "attn": attn,
        "mlp_norm": r.layer_norm(p + "post_attention_layernorm.", d),
        "mlp": {"fc1": {"kernel": r.linear(p + "mlp.dense_h_to_4h.weight", f, d),
                        "bias": r.get(p + "mlp.dense_h_to_4h.bias", (f,))},
                "fc2": {"kernel": r.linear(p + "mlp.dense_4h_to_h.weight", d, f),
                        "bias": r.get(p + "mlp.dense_4h_to_h.bias", (d,))}},
    }
  params["norm"] = r.layer_norm(base + "final_layernorm.", d)
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": r.linear(prefix + "lm_head.weight", c.vocab_size, d)}
  r.raise_if_errors({key for key in sd if key.startswith(prefix) and key not in r.used
                     and not key.endswith("rotary_emb.inv_freq")})
  return params
