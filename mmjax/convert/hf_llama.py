"""HF ``LlamaForCausalLM`` (LLaMA-3's frequency scaling included; the LLaMA-layout
``MistralForCausalLM``: a sliding window; ``Qwen2ForCausalLM``: q/k/v biases;
``StableLmForCausalLM``: LayerNorms with biases, partial rotary, optional q/k/v biases)
state_dicts and ``.safetensors`` files -> ``Decoder`` params.

Key layout (``transformers`` LLaMA; torch ``nn.Linear`` weights are [out, in]):

  model.embed_tokens.weight                      [V, D]        -> embed/embedding
  model.layers.{i}.input_layernorm.weight        [D]           -> layers_{i}/attn_norm/scale
  model.layers.{i}.self_attn.q_proj.weight       [H*K, D]      -> layers_{i}/attn/query/kernel [D, H, K]
  model.layers.{i}.self_attn.k_proj.weight       [G*K, D]      -> layers_{i}/attn/key/kernel   [D, G, K]
  model.layers.{i}.self_attn.v_proj.weight       [G*K, D]      -> layers_{i}/attn/value/kernel [D, G, K]
  model.layers.{i}.self_attn.o_proj.weight       [D, H*K]      -> layers_{i}/attn/out/kernel   [H, K, D]
  model.layers.{i}.post_attention_layernorm.weight [D]         -> layers_{i}/mlp_norm/scale
  model.layers.{i}.mlp.{gate,up}_proj.weight     [F, D]        -> layers_{i}/mlp/{gate,up}_proj/kernel [D, F]
  model.layers.{i}.mlp.down_proj.weight          [D, F]        -> layers_{i}/mlp/down_proj/kernel [F, D]
  model.norm.weight                              [D]           -> norm/scale
  lm_head.weight                                 [V, D]        -> lm_head/kernel [D, V] (untied only)

HF's rotary embedding pairs dimension i with i + K/2 (half-split), as ``mmjax.layers.rope``
does, so q/k need no permutation. With tied embeddings a ``lm_head.weight`` key (torch's
``state_dict()`` lists the shared tensor under both names) is accepted if it equals the
embedding table. ``prefix`` selects the LM inside a larger state_dict (e.g.
``"lang_encoder."`` in an OpenFlamingo checkpoint).

Dimension letters: V vocabulary, D width, H heads, G key/value heads, K head dim,
F SwiGLU width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig

# Buffers some transformers versions save, which carry no learned weight.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _reshape(x: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
  return None if x is None else x.reshape(shape)


def _norm(r: StateDictReader, prefix: str, config: DecoderConfig) -> dict:
  """RMSNorm ``{prefix}weight``, or (``norm="layer"``: StableLM) LayerNorm weight and bias."""
  if config.norm == "layer":
    return r.layer_norm(prefix, config.width)
  return {"scale": r.get(prefix + "weight", (config.width,))}


def llama_layer_from_state_dict(r: StateDictReader, prefix: str, config: DecoderConfig) -> dict:
  """One ``LlamaDecoderLayer`` (keys ``{prefix}self_attn.q_proj.weight`` ...) -> DecoderLayer params."""
  c = config
  d, h, g, k, f = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  a = prefix + "self_attn."
  m = prefix + "mlp."
  layer = {
      "attn_norm": _norm(r, prefix + "input_layernorm.", c),
      "attn": {
          "query": {"kernel": _reshape(r.linear(a + "q_proj.weight", h * k, d), (d, h, k))},
          "key": {"kernel": _reshape(r.linear(a + "k_proj.weight", g * k, d), (d, g, k))},
          "value": {"kernel": _reshape(r.linear(a + "v_proj.weight", g * k, d), (d, g, k))},
          "out": {"kernel": _reshape(r.linear(a + "o_proj.weight", d, h * k), (h, k, d))},
      },
      "mlp_norm": _norm(r, prefix + "post_attention_layernorm.", c),
      "mlp": {
          "gate_proj": {"kernel": r.linear(m + "gate_proj.weight", f, d)},
          "up_proj": {"kernel": r.linear(m + "up_proj.weight", f, d)},
          "down_proj": {"kernel": r.linear(m + "down_proj.weight", d, f)},
      },
  }
  attn = layer["attn"]
  if c.attention_bias:  # Qwen2; LLaMA with attention_bias=True
    attn["query"]["bias"] = _reshape(r.get(a + "q_proj.bias", (h * k,)), (h, k))
    attn["key"]["bias"] = _reshape(r.get(a + "k_proj.bias", (g * k,)), (g, k))
    attn["value"]["bias"] = _reshape(r.get(a + "v_proj.bias", (g * k,)), (g, k))
  if c.attention_out_bias:
    attn["out"]["bias"] = r.get(a + "o_proj.bias", (d,))
  return layer


def llama_from_state_dict(
    sd: Mapping[str, Any],
    config: DecoderConfig,
    *,
    prefix: str = "",
    layer_template: str = "model.layers.{i}.",
    ignore: Callable[[str], bool] = lambda key: False,
    used: set[str] | None = None,
) -> dict:
  """``LlamaForCausalLM`` state_dict -> the LM part of ``Decoder(config)`` params (plain dict).

  Args:
    sd: key -> torch tensor or numpy array.
    config: the decoder config (``config_from_hf_llama`` builds one from an HF config).
    prefix: prepended to every key (``"lang_encoder."`` inside OpenFlamingo).
    layer_template: where decoder layer i lives under ``prefix``.
    ignore: keys under ``prefix`` another converter owns (e.g. OpenFlamingo's gated
      cross-attention layers, which sit among the LM's keys); neither read nor unexpected.
    used: if given, receives every key consumed.

  Returns:
    The tree of ``nn.unbox(Decoder(config).init(...)['params'])`` without any inserted
    entries (those come from the cross-attention converter).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped key.
  """
  c = config
  r = StateDictReader(sd, f"a LLaMA decoder (width={c.width}, depth={c.depth}) from the keys"
                          f" under {prefix!r}")
  params: dict[str, Any] = {
      "embed": {"embedding": r.get(prefix + "model.embed_tokens.weight", (c.vocab_size, c.width))}}
  for i in range(c.depth):
    params[f"layers_{i}"] = llama_layer_from_state_dict(r, prefix + layer_template.format(i=i), c)
  params["norm"] = _norm(r, prefix + "model.norm.", c)
  head_key = prefix + "lm_head.weight"
  if c.tie_embeddings:
    r.tied_head(head_key, params["embed"]["embedding"])
  else:
    params["lm_head"] = {"kernel": r.linear(head_key, c.vocab_size, c.width)}
  unexpected = {k for k in sd if k.startswith(prefix) and k not in r.used
                and not k.endswith(_IGNORED_SUFFIXES) and not ignore(k)}
  r.raise_if_errors(unexpected)
  if used is not None:
    used.update(r.used)
  return params


def config_from_hf_llama(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``LlamaConfig`` (object or ``config.json`` dict)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  rope = cfg.get("rope_parameters") or {}
  scaling = {**(cfg.get("rope_scaling") or {}), **rope}
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"rope_type={rope_type!r} (rope_parameters={rope}, rope_scaling={cfg.get('rope_scaling')}) "
                     "is not supported; expected 'default' or 'llama3'")
  if cfg.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported by the SwiGLU decoder; expected False")
  # Mistral masks to its sliding_window whenever it is set; Qwen2 only with use_sliding_window
  # (then from max_window_layers on, which mmjax does not split: refused unless every layer).
  window = 0
  if cfg.get("model_type") == "mistral" and cfg.get("sliding_window"):
    window = int(cfg["sliding_window"])
  elif cfg.get("use_sliding_window") and cfg.get("sliding_window"):
    if int(cfg.get("max_window_layers", 0) or 0) != 0:
      raise ValueError(f"use_sliding_window with max_window_layers={cfg.get('max_window_layers')} (a window on some "
                       "layers only) is not supported; expected max_window_layers=0 or use_sliding_window=False")
    window = int(cfg["sliding_window"])
  # Qwen2 biases q, k and v (not o); LLaMA's attention_bias biases all four. StableLM:
  # LayerNorms with biases, optional q/k/v biases, partial rotary.
  qwen2 = cfg.get("model_type") == "qwen2"
  stablelm = cfg.get("model_type") == "stablelm"
  if stablelm and (cfg.get("qk_layernorm") or cfg.get("use_parallel_residual")):
    raise ValueError(f"StableLM with qk_layernorm={cfg.get('qk_layernorm')}, use_parallel_residual="
                     f"{cfg.get('use_parallel_residual')} is not supported yet; expected both False")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={cfg['hidden_act']!r}; expected 'silu' (SwiGLU)")
  heads = cfg["num_attention_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"],
      width=cfg["hidden_size"],
      depth=cfg["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
      mlp_dim=cfg["intermediate_size"],
      rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      max_length=int(cfg.get("max_position_embeddings", 2048)),
      attention_bias=qwen2 or bool(cfg.get("attention_bias", False)) or bool(stablelm and cfg.get("use_qkv_bias")),
      attention_out_bias=(not qwen2) and bool(cfg.get("attention_bias", False)),
      rotary_fraction=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)),
  )
  if stablelm:
    fields.update(norm="layer", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))
  if window:
    fields.update(sliding_window=window)
  if rope_type == "llama3":
    fields.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                  rope_low_freq_factor=float(scaling["low_freq_factor"]),
                  rope_high_freq_factor=float(scaling["high_freq_factor"]),
                  rope_original_max_length=int(scaling["original_max_position_embeddings"]))
  return dataclasses.replace(DecoderConfig(**fields), **overrides)


def load_llama(paths, config: DecoderConfig, *, prefix: str = "") -> dict:
  """Decoder params from ``LlamaForCausalLM`` ``.safetensors`` file(s) or their directory."""
  from mmjax.convert.hf_vision import read_safetensors  # pylint: disable=g-import-not-at-top
  sd = read_safetensors(paths, lambda key: key.startswith(prefix))
  if not sd:
    raise ValueError(f"no tensor of {paths!r} has a key starting with {prefix!r}")
  return llama_from_state_dict(sd, config, prefix=prefix)
