"""HF ``PhiForCausalLM`` state_dicts -> ``Decoder`` params (Phi-1.5, Phi-2: MoE-LLaVA's LM),
through the decoder's variant fields: one LayerNorm per layer read by both the attention and
the MLP (``parallel_residual``, ``parallel_norms=1``), biases everywhere, a two-layer GELU
(tanh) MLP, partial rotary, a final LayerNorm and an output projection with a bias.

Key layout (torch ``nn.Linear`` weights are [out, in]):

  model.embed_tokens.weight                       [V, D]   -> embed/embedding
  model.layers.{i}.input_layernorm.{weight,bias}  [D]      -> layers_{i}/attn_norm/{scale,bias}
  model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}    -> layers_{i}/attn/{query,key,value}/{kernel,bias}
  model.layers.{i}.self_attn.dense.{weight,bias}  [D, H*K] -> layers_{i}/attn/out/{kernel,bias}
  model.layers.{i}.mlp.fc1, fc2 .{weight,bias}             -> layers_{i}/mlp/fc1, fc2/{kernel,bias}
  model.final_layernorm.{weight,bias}             [D]      -> norm/{scale,bias}
  lm_head.{weight,bias}                           [V, D]   -> lm_head/{kernel [D, V], bias}

Dimension letters: V vocabulary, D width, H heads, G key/value heads, K head dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def phi_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig) -> dict:
  """``PhiForCausalLM`` state_dict -> ``Decoder(config)`` params; one ValueError lists every
  missing, unexpected and mis-shaped key."""
  c = config
  want = ("layer", True, 1, True, True, True, True)
  got = (c.norm, c.parallel_residual, c.parallel_norms, c.attention_bias, c.attention_out_bias, c.mlp_bias,
         c.lm_head_bias)
  if got != want or c.mlp == "swiglu":
    raise ValueError(f"a Phi state_dict needs (norm, parallel_residual, parallel_norms, attention_bias, "
                     f"attention_out_bias, mlp_bias, lm_head_bias) = {want} and a two-layer mlp; got {got}, "
                     f"mlp={c.mlp!r} (config_from_hf_phi builds one)")
  d, h, g, k, f = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"a Phi decoder (width={d}, depth={c.depth})")

  def proj(key, heads):
    w = r.linear(key + ".weight", heads * k, d)
    b = r.get(key + ".bias", (heads * k,))
    return {"kernel": None if w is None else w.reshape(d, heads, k), "bias": None if b is None else b.reshape(heads, k)}

  params: dict[str, Any] = {"embed": {"embedding": r.get("model.embed_tokens.weight", (c.vocab_size, d))}}
  for i in range(c.depth):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out_w = r.linear(a + "dense.weight", d, h * k)
    params[f"layers_{i}"] = {
        "attn_norm": r.layer_norm(p + "input_layernorm.", d),
        "attn": {"query": proj(a + "q_proj", h), "key": proj(a + "k_proj", g), "value": proj(a + "v_proj", g),
                 "out": {"kernel": None if out_w is None else out_w.reshape(h, k, d), "bias": r.get(a + "dense.bias", (d,))}},
        "mlp": {"fc1": {"kernel": r.linear(p + "mlp.fc1.weight", f, d), "bias": r.get(p + "mlp.fc1.bias", (f,))},
                "fc2": {"kernel": r.linear(p + "mlp.fc2.weight", d, f), "bias": r.get(p + "mlp.fc2.bias", (d,))}},
    }
  params["norm"] = r.layer_norm("model.final_layernorm.", d)
  params["lm_head"] = {"kernel": r.linear("lm_head.weight", c.vocab_size, d), "bias": r.get("lm_head.bias", (c.vocab_size,))}
  r.raise_if_errors({key for key in sd if key not in r.used and not key.endswith(_IGNORED_SUFFIXES)})
  return params


def config_from_hf_phi(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``PhiConfig`` (object or ``config.json`` dict)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  rope = cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
    raise ValueError(f"rope_parameters={rope} is not supported; expected the default RoPE")
  if cfg.get("qk_layernorm"):
    raise ValueError("qk_layernorm=True is not supported yet; expected False")
  act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
  if cfg.get("hidden_act", "gelu_new") not in act:
    raise ValueError(f"hidden_act={cfg.get('hidden_act')!r}; expected one of {sorted(act)}")
  heads = cfg["num_attention_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg["hidden_size"] // heads,
      mlp_dim=cfg["intermediate_size"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
      rotary_fraction=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 0.5)),
      norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), tie_embeddings=False,
      max_length=int(cfg.get("max_position_embeddings", 2048)), norm="layer",
      mlp=act[cfg.get("hidden_act", "gelu_new")], mlp_bias=True, attention_bias=True, attention_out_bias=True,
      parallel_residual=True, parallel_norms=1, lm_head_bias=True)
  fields.update(overrides)
  return DecoderConfig(**fields)
