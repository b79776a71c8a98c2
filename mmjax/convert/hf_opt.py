"""HF ``OPTForCausalLM`` state_dicts -> ``Decoder`` params (BLIP-2's LMs), through the
decoder's variant fields: learned absolute positions with OPT's offset of 2, LayerNorms with
bias, a ReLU MLP with biases, biases on every attention projection, tied embeddings.

Key layout (``transformers`` OPT; torch ``nn.Linear`` weights are [out, in]):

  model.decoder.embed_tokens.weight                    [V, D]       -> embed/embedding
  model.decoder.embed_positions.weight                 [P + 2, D]   -> pos_embed/embedding
  model.decoder.layers.{i}.self_attn_layer_norm.*      [D]          -> layers_{i}/attn_norm/{scale,bias}
  model.decoder.layers.{i}.self_attn.{q,k,v}_proj.*    [D, D], [D]  -> layers_{i}/attn/{query,key,value}
  model.decoder.layers.{i}.self_attn.out_proj.*        [D, D], [D]  -> layers_{i}/attn/out
  model.decoder.layers.{i}.final_layer_norm.*          [D]          -> layers_{i}/mlp_norm/{scale,bias}
  model.decoder.layers.{i}.fc1.*, fc2.*                             -> layers_{i}/mlp/fc1, fc2
  model.decoder.final_layer_norm.*                     [D]          -> norm/{scale,bias}
  lm_head.weight                                       [V, D]       -> (tied: equal to embed_tokens)

transformers numbers a token's position by counting the unpadded tokens before it, then
reads row position + 2; mmjax's positions are that count (0 for the first real token), so
``position_offset=2`` reads the same row. OPT-350m's post-norm layout
(``do_layer_norm_before=False``) and its narrower word embeddings (``word_embed_proj_dim``
with project_in/out) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.decoder import DecoderConfig

OPT_POSITION_OFFSET = 2


def config_from_hf_opt(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from an HF ``OPTConfig`` (object or ``config.json`` dict)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  d = cfg["hidden_size"]
  checks = {"do_layer_norm_before": (cfg.get("do_layer_norm_before", True), True),
            "word_embed_proj_dim": (cfg.get("word_embed_proj_dim") or d, d),
            "_remove_final_layer_norm": (cfg.get("_remove_final_layer_norm", False), False),
            "layer_norm_elementwise_affine": (cfg.get("layer_norm_elementwise_affine", True), True),
            "enable_bias": (cfg.get("enable_bias", True), True)}
  bad = {k: got for k, (got, want) in checks.items() if got != want}
  if bad:
    raise ValueError(f"OPT config {bad} is not supported; expected "
                     + ", ".join(f"{k}={checks[k][1]!r}" for k in bad))
  act = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
  if cfg.get("activation_function", "relu") not in act:
    raise ValueError(f"activation_function={cfg.get('activation_function')!r}; expected one of {sorted(act)}")
  heads = cfg["num_attention_heads"]
  fields = dict(
      vocab_size=cfg["vocab_size"], width=d, depth=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
      head_dim=d // heads, mlp_dim=cfg["ffn_dim"], norm="layer", norm_eps=1e-5,
      mlp=act[cfg.get("activation_function", "relu")], mlp_bias=True, attention_bias=True, attention_out_bias=True,
      positions="learned", position_offset=OPT_POSITION_OFFSET,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
      max_length=int(cfg.get("max_position_embeddings", 2048)))
  fields.update(overrides)
  return DecoderConfig(**fields)


def opt_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig, *, prefix: str = "") -> dict:
  """``OPTForCausalLM`` state_dict -> ``Decoder(config)`` params (plain dict); one ValueError
  lists every missing, unexpected and mis-shaped key."""
  c = config
  if (c.norm, c.positions, c.attention_bias, c.attention_out_bias, c.mlp_bias, c.num_kv_heads) != \
      ("layer", "learned", True, True, True, c.num_heads) or c.mlp == "swiglu":
    raise ValueError(f"an OPT state_dict needs a DecoderConfig with norm='layer', positions='learned', a two-layer "
                     f"mlp, every bias and num_kv_heads == num_heads; got norm={c.norm!r}, positions={c.positions!r}, "
                     f"mlp={c.mlp!r}, attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias} "
                     "(config_from_hf_opt builds one)")
  d, h, k, f = c.width, c.num_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"an OPT decoder (width={d}, depth={c.depth}) from the keys under {prefix!r}")
  base = prefix + "model.decoder."

  def proj(key: str, heads_out: bool) -> dict:
    w, b = r.linear(key + ".weight", h * k if heads_out else d, d if heads_out else h * k), None
    if heads_out:
      b = r.get(key + ".bias", (h * k,))
      return {"kernel": None if w is None else w.reshape(d, h, k), "bias": None if b is None else b.reshape(h, k)}
    return {"kernel": None if w is None else w.reshape(h, k, d), "bias": r.get(key + ".bias", (d,))}

  params: dict[str, Any] = {
      "embed": {"embedding": r.get(base + "embed_tokens.weight", (c.vocab_size, d))},
      "pos_embed": {"embedding": r.get(base + "embed_positions.weight", (c.max_length + c.position_offset, d))}}
  for i in range(c.depth):
    p = f"{base}layers.{i}."
    params[f"layers_{i}"] = {
        "attn_norm": r.layer_norm(p + "self_attn_layer_norm.", d),
        "attn": {"query": proj(p + "self_attn.q_proj", True), "key": proj(p + "self_attn.k_proj", True),
                 "value": proj(p + "self_attn.v_proj", True), "out": proj(p + "self_attn.out_proj", False)},
        "mlp_norm": r.layer_norm(p + "final_layer_norm.", d),
        "mlp": {"fc1": {"kernel": r.linear(p + "fc1.weight", f, d), "bias": r.get(p + "fc1.bias", (f,))},
                "fc2": {"kernel": r.linear(p + "fc2.weight", d, f), "bias": r.get(p + "fc2.bias", (d,))}},
    }
  params["norm"] = r.layer_norm(base + "final_layer_norm.", d)
  head_key = prefix + "lm_head.weight"
  if c.tie_embeddings:
    r.tied_head(head_key, params["embed"]["embedding"])
  else:
    params["lm_head"] = {"kernel": r.linear(head_key, c.vocab_size, d)}
  r.raise_if_errors({key for key in sd if key.startswith(prefix) and key not in r.used})
  return params
