"""MosaicGPT state_dicts (``architectures: ["MosaicGPT"]``: mosaicml/mpt-1b-redpajama-200b and
anas-awadalla/mpt-1b-redpajama-200b, OpenFlamingo-3B's LM) -> ``Decoder`` params.

MosaicGPT is the April 2023 predecessor of MPT: the HF repo's custom code (``mosaic_gpt.py``,
``gpt_blocks.py``, ``attention.py``, uploaded 2023-04-19 with transformers 4.27.4) is the
mosaicml/examples ``examples/llm/src/models`` code of that week (read at commit f037b514,
2023-04-14). Its names are not transformers' ``MptForCausalLM``'s (``mmjax.convert.hf_mpt``):

  transformer.wte.weight                   [V, D]    -> embed/embedding (tied: logits = x @ wte.T)
  transformer.wpe.weight                   [S, D]    -> pos_embed/embedding (only with alibi false)
  transformer.blocks.{i}.ln_1.weight       [D]       -> layers_{i}/attn_norm/scale
  transformer.blocks.{i}.attn.Wqkv.weight  [3*D, D]  -> layers_{i}/attn/{query,key,value}/kernel [D, H, K]
  transformer.blocks.{i}.attn.q_ln.weight  [D]       -> layers_{i}/attn/query_norm/scale (attn_qk_ln)
  transformer.blocks.{i}.attn.k_ln.weight  [D]       -> layers_{i}/attn/key_norm/scale (attn_qk_ln)
  transformer.blocks.{i}.attn.out_proj.weight [D, D] -> layers_{i}/attn/out/kernel [H, K, D]
  transformer.blocks.{i}.ln_2.weight       [D]       -> layers_{i}/mlp_norm/scale
  transformer.blocks.{i}.mlp.mlp_up.weight [F, D]    -> layers_{i}/mlp/fc1/kernel [D, F]
  transformer.blocks.{i}.mlp.mlp_down.weight [D, F]  -> layers_{i}/mlp/fc2/kernel [F, D]
  transformer.ln_f.weight                  [D]       -> norm/scale

(each with a ``.bias`` when ``no_bias`` is false; ``no_bias: true`` removes the bias of every
module, the LayerNorms' included). What the source computes, and why the decoder fields below
reproduce it exactly:

- ``GPTBlock``: x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP is
  ``mlp_down(GELU(approximate='none')(mlp_up(x)))`` of width ``mlp_ratio * d_model``:
  ``mlp="gelu"``. ``LPLayerNorm`` (``low_precision_layernorm``) is ``nn.LayerNorm`` (eps 1e-5)
  run under autocast: in float32 the same numbers.
- ``Wqkv(x).chunk(3, dim=2)`` gives q, k, v of D columns each, then ``(h d)`` head-major:
  the same split as MPT's. ``attn_clip_qkv`` clamps the fused projection: ``clip_qkv``.
  ``softmax_scale`` null is 1/sqrt(D/H), the decoder's.
- ALiBi: ``alibi_bias`` adds ``(s - S + 1) * 2^-(h * alibi_bias_max / H)`` (h = 1..H) for key
  s of S, which differs from mmjax's ``slope_h * (s - t)`` by a per-row constant softmax
  ignores. Those slopes are ALiBi's for any H; for a power-of-two H they equal mmjax's
  ``alibi_slopes``, which interleaves the slopes of the next power of two otherwise (as
  later MPT code does): other head counts are refused by name.
- Logits: ``F.linear(ln_f(x), wte.weight)``, tied; ``logit_scale`` null.

- ``attn_qk_ln`` (MPT-1B sets it): ``q_ln``/``k_ln`` are LayerNorms (weight [D], no bias
  with ``no_bias``) over the whole D-wide query and key, after the clamp and before the heads
  split: ``qk_norm="width"`` (over all H*K at once, in the same head-major order; a per-head
  norm, Persimmon's ``"head"``, has other statistics).

Refused by name (``config_from_mosaic_gpt``): ``prefix_lm``, ``attn_uses_sequence_id``,
``logit_scale``, ``softmax_scale``, ``embedding_fraction`` != 1, and ALiBi over a head count
that is not a power of two.

Dimension letters: V vocabulary, S max length, D width, H heads, K head dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.convert.state_dict import StateDictReader, to_numpy
from mmjax.models.decoder import DecoderConfig


def config_from_mosaic_gpt(hf_config: Mapping[str, Any] | Any, **overrides) -> DecoderConfig:
  """A ``DecoderConfig`` from a MosaicGPT ``config.json`` dict (or config object); the options
  the decoder cannot express are refused by name (module docstring)."""
  cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  unsupported = {
      "prefix_lm": (bool(cfg.get("prefix_lm", False)), False),
      "attn_uses_sequence_id": (bool(cfg.get("attn_uses_sequence_id", False)), False),
      "logit_scale": (cfg.get("logit_scale"), None),
      "softmax_scale": (cfg.get("softmax_scale"), None),
      "embedding_fraction": (float(cfg.get("embedding_fraction", 1.0)), 1.0),
  }
  bad = {k: got for k, (got, want) in unsupported.items() if got != want}
  if bad:
    raise ValueError(f"MosaicGPT config {bad} is not supported; expected "
                     + ", ".join(f"{k}={unsupported[k][1]!r}" for k in bad))
  d, heads = int(cfg["d_model"]), int(cfg["n_heads"])
  alibi = bool(cfg.get("alibi", False))
  if alibi and heads & (heads - 1):
    raise ValueError(f"MosaicGPT with alibi and n_heads={heads}: its slopes 2^-(h*bias_max/H) differ from "
                     "mmjax's interleaved ones unless n_heads is a power of two; expected a power of two")
  bias = not bool(cfg.get("no_bias", False))
  fields = dict(
      vocab_size=int(cfg["vocab_size"]), width=d, depth=int(cfg["n_layers"]), num_heads=heads,
      num_kv_heads=heads, head_dim=d // heads, mlp_dim=int(cfg.get("mlp_ratio", 4)) * d,
      norm="layer", norm_bias=bias, norm_eps=1e-5, mlp="gelu", mlp_bias=bias, attention_bias=bias,
      attention_out_bias=bias, positions="alibi" if alibi else "learned",
      qk_norm="width" if cfg.get("attn_qk_ln") else "none",
      alibi_bias_max=float(cfg.get("alibi_bias_max", 8)), clip_qkv=float(cfg.get("attn_clip_qkv") or 0.0),
      tie_embeddings=True, max_length=int(cfg.get("max_seq_len", 2048)))
  fields.update(overrides)
  return DecoderConfig(**fields)


def _split_heads(w: np.ndarray | None, b: np.ndarray | None, h: int, k: int, d: int) -> dict:
  """Fused kernel [D, 3*H*K] (and bias [3*H*K]), q then k then v -> query/key/value params."""
  out = {}
  for j, name in enumerate(("query", "key", "value")):
    entry: dict[str, Any] = {"kernel": None if w is None else
                             np.ascontiguousarray(w[:, j * h * k:(j + 1) * h * k].reshape(d, h, k))}
    if b is not None:
      entry["bias"] = np.ascontiguousarray(b[j * h * k:(j + 1) * h * k].reshape(h, k))
    out[name] = entry
  return out


def mosaic_gpt_from_state_dict(sd: Mapping[str, Any], config: DecoderConfig, *, prefix: str = "") -> dict:
  """MosaicGPT state_dict -> ``Decoder(config)`` params (plain dict); one ValueError lists every
  missing, unexpected and mis-shaped key."""
  c = config
  bias = c.attention_bias
  if (c.norm, c.mlp, c.tie_embeddings, c.num_kv_heads) != ("layer", "gelu", True, c.num_heads) or \
      c.positions not in ("alibi", "learned") or len({bias, c.attention_out_bias, c.mlp_bias, c.norm_bias}) != 1 \
      or c.qk_norm not in ("none", "width"):
    raise ValueError(f"a MosaicGPT state_dict needs a DecoderConfig with norm='layer', mlp='gelu', tied embeddings, "
                     f"num_kv_heads == num_heads, positions 'alibi' or 'learned' and all biases or none; got norm={c.norm!r}, "
                     f"mlp={c.mlp!r}, tie_embeddings={c.tie_embeddings}, positions={c.positions!r}, attention_bias="
                     f"{c.attention_bias}, attention_out_bias={c.attention_out_bias}, mlp_bias={c.mlp_bias}, "
                     f"norm_bias={c.norm_bias}, qk_norm={c.qk_norm!r} ('none' or 'width') (config_from_mosaic_gpt builds one)")
  d, h, k, f = c.width, c.num_heads, c.head_dim, c.mlp_dim
  r = StateDictReader(sd, f"a MosaicGPT decoder (width={d}, depth={c.depth}) from the keys under {prefix!r}")
  base = prefix + "transformer."
  norm = (lambda p: r.layer_norm(p, d)) if bias else (lambda p: {"scale": r.get(p + "weight", (d,))})
  opt = (lambda key, shape: r.get(key, shape)) if bias else (lambda key, shape: None)
  params: dict[str, Any] = {"embed": {"embedding": r.get(base + "wte.weight", (c.vocab_size, d))}}
  if c.positions == "learned":
    params["pos_embed"] = {"embedding": r.get(base + "wpe.weight", (c.max_length + c.position_offset, d))}
  for i in range(c.depth):
    p = f"{base}blocks.{i}."
    attn = _split_heads(r.linear(p + "attn.Wqkv.weight", 3 * h * k, d), opt(p + "attn.Wqkv.bias", (3 * h * k,)),
                        h, k, d)
    out = r.linear(p + "attn.out_proj.weight", d, h * k)
    attn["out"] = {"kernel": None if out is None else out.reshape(h, k, d)}
    if c.qk_norm == "width":
      attn["query_norm"], attn["key_norm"] = norm(p + "attn.q_ln."), norm(p + "attn.k_ln.")
    fc1 = {"kernel": r.linear(p + "mlp.mlp_up.weight", f, d)}
    fc2 = {"kernel": r.linear(p + "mlp.mlp_down.weight", d, f)}
    if bias:
      attn["out"]["bias"] = r.get(p + "attn.out_proj.bias", (d,))
      fc1["bias"], fc2["bias"] = r.get(p + "mlp.mlp_up.bias", (f,)), r.get(p + "mlp.mlp_down.bias", (d,))
    params[f"layers_{i}"] = {"attn_norm": norm(p + "ln_1."), "attn": attn, "mlp_norm": norm(p + "ln_2."),
                             "mlp": {"fc1": fc1, "fc2": fc2}}
  params["norm"] = norm(base + "ln_f.")
  # A state_dict saved with a tied lm_head alias (e.g. by a wrapper) holds the same tensor.
  head_key = prefix + "lm_head.weight"
  if head_key in sd:
    r.used.add(head_key)
    emb = params["embed"]["embedding"]
    if emb is not None and not np.array_equal(to_numpy(sd[head_key]), emb):
      r.misshaped.append(f"{head_key}: differs from transformer.wte.weight, but MosaicGPT ties them")
  r.raise_if_errors({key for key in sd if key.startswith(prefix) and key not in r.used})
  return params
