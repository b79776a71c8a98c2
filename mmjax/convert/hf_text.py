"""HF ``CLIPTextModel(WithProjection)`` / ``SiglipTextModel`` weights -> ``TextTower`` params.

Entry points (params are plain nested dicts of float32 numpy arrays with the structure of
``nn.unbox(TextTower(config).init(...)["params"])``):

  clip_text_from_state_dict(state_dict, config, prefix=None)
  siglip_text_from_state_dict(state_dict, config, prefix=None)
  config_from_hf_clip_text(hf_config, **overrides) -> TextTowerConfig
  config_from_hf_siglip_text(hf_config, **overrides) -> TextTowerConfig

Key layouts, below ``prefix`` ("" when None): the tower's keys (``embeddings.*``,
``encoder.layers.*``, ``final_layer_norm.*``; SigLIP's ``head.*``) either bare (what
transformers 5 saves for ``CLIPTextModel`` / ``SiglipTextModel``) or under ``text_model.``
(``CLIPModel``, ``CLIPTextModelWithProjection``, ``SiglipModel``, and transformers 4's text
models); the ``text_model.`` level is found on its own. CLIP's ``text_projection.weight`` sits
beside ``text_model.``, directly under the prefix. Keys outside the tower (the vision tower,
``visual_projection``, ``logit_scale``) are ignored; keys inside it the config does not
explain raise, with the missing and mis-shaped ones, one ValueError listing them all. The
``embeddings.position_ids`` buffer older checkpoints hold is dropped.

torch layouts: Linear weight [out, in] -> kernel [in, out] (q/k/v: [D, H, K], out: [H, K, D]);
Embedding weight [V, D] -> embedding; LayerNorm weight -> scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.convert.state_dict import StateDictReader
from mmjax.models.text_tower import TextTowerConfig

_TEXT_MODEL = "text_model."
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def resolve_prefix(keys, prefix: str | None) -> str:
  """The prefix under which the tower's own keys live (see the module docstring)."""
  base = prefix or ""
  if any(key.startswith(base + _TEXT_MODEL) for key in keys):
    return base + _TEXT_MODEL
  return base


def _tower(reader: StateDictReader, config: TextTowerConfig, p: str) -> dict:
  """The params every text tower has, read from keys under ``p``."""
  cfg = config.validate()
  d, f, h = cfg.width, cfg.mlp_dim, cfg.num_heads
  k = d // h

  def linear(name: str, d_in: int, d_out: int, out_shape=None, in_shape=None) -> dict:
    kernel = reader.linear(f"{name}.weight", d_out, d_in)
    bias = reader.get(f"{name}.bias", (d_out,))
    return {"kernel": None if kernel is None else kernel.reshape((in_shape or (d_in,)) + (out_shape or (d_out,))),
            "bias": None if bias is None else bias.reshape(out_shape or (d_out,))}

  params: dict = {
      "token_embed": {"embedding": reader.get(f"{p}embeddings.token_embedding.weight", (cfg.vocab_size, d))},
      "pos_embedding": reader.get(f"{p}embeddings.position_embedding.weight", (cfg.max_length, d)),
  }
  for i in range(cfg.depth):
    t = f"{p}encoder.layers.{i}."
    attn = {name: linear(f"{t}self_attn.{torch_name}", d, d, out_shape=(h, k))
            for torch_name, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))}
    attn["out"] = linear(f"{t}self_attn.out_proj", d, d, in_shape=(h, k))
    params[f"layers_{i}"] = {
        "norm1": reader.layer_norm(f"{t}layer_norm1.", d),
        "attn": attn,
        "norm2": reader.layer_norm(f"{t}layer_norm2.", d),
        "mlp": {"fc1": linear(f"{t}mlp.fc1", d, f), "fc2": linear(f"{t}mlp.fc2", f, d)},
    }
  params["final_norm"] = reader.layer_norm(f"{p}final_layer_norm.", d)
  return params


def _finish(reader: StateDictReader, params: dict, state_dict: Mapping[str, Any], base: str,
            tower: str) -> dict:
  """Raises the one error (unexpected keys: those under ``tower`` that nothing read), else
  returns params."""
  unexpected = [key for key in state_dict if key.startswith(tower) and key not in reader.used
                and not key.endswith(_IGNORED_SUFFIXES)]
  if not any(key.startswith(base) for key in state_dict):
    reader.what += (f" (no key starts with {base!r}; the keys start with "
                    f"{sorted({key.split('.')[0] + '.' for key in state_dict})[:8]})")
  reader.raise_if_errors(unexpected)
  return params


def clip_text_from_state_dict(state_dict: Mapping[str, Any], config: TextTowerConfig, *,
                              prefix: str | None = None) -> dict:
  """Params from a ``CLIPTextModelWithProjection`` / ``CLIPModel`` state_dict (``CLIPTextModel``
  with ``config.projection_dim=None``); see the module docstring."""
  if config.projection_bias or not config.causal or config.pooling != "eos":
    raise ValueError(f"CLIP text configs are causal, pool the end-of-text token and project without "
                     f"bias; got causal={config.causal}, pooling={config.pooling!r}, "
                     f"projection_bias={config.projection_bias}")
  base = prefix or ""
  tower = resolve_prefix(state_dict.keys(), prefix)
  reader = StateDictReader(state_dict, f"a CLIP text state_dict under {tower!r} into {_describe(config)}")
  params = _tower(reader, config, tower)
  if config.projection_dim is not None:
    params["projection"] = {"kernel": reader.linear(f"{base}text_projection.weight", config.projection_dim,
                                                    config.width)}
  return _finish(reader, params, state_dict, base, tower)


def siglip_text_from_state_dict(state_dict: Mapping[str, Any], config: TextTowerConfig, *,
                                prefix: str | None = None) -> dict:
  """Params from a ``SiglipTextModel`` / ``SiglipModel`` state_dict (``head`` is the projection)."""
  if config.causal or config.pooling != "last" or config.projection_dim is None or not config.projection_bias:
    raise ValueError(f"SigLIP text configs attend bidirectionally, pool the last position and end in a "
                     f"head with bias; got causal={config.causal}, pooling={config.pooling!r}, "
                     f"projection_dim={config.projection_dim}, projection_bias={config.projection_bias}")
  base = prefix or ""
  tower = resolve_prefix(state_dict.keys(), prefix)
  reader = StateDictReader(state_dict, f"a SigLIP text state_dict under {tower!r} into {_describe(config)}")
  params = _tower(reader, config, tower)
  kernel = reader.linear(f"{tower}head.weight", config.projection_dim, config.width)
  bias = reader.get(f"{tower}head.bias", (config.projection_dim,))
  params["projection"] = {"kernel": kernel, "bias": bias}
  return _finish(reader, params, state_dict, base, tower)


def _describe(config: TextTowerConfig) -> str:
  return (f"TextTowerConfig(vocab_size={config.vocab_size}, width={config.width}, depth={config.depth}, "
          f"max_length={config.max_length}, projection_dim={config.projection_dim})")


# ------------------------------------------------------------------------------ configs

_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

# Defaults of transformers' CLIPTextConfig / SiglipTextConfig, for keys a config.json omits.
_CLIP_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_SIGLIP_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6, projection_size=None)


def config_dict(hf_config: Any) -> dict:
  """A config.json dict, or a transformers config object, as a dict."""
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  if hasattr(hf_config, "to_dict"):
    return hf_config.to_dict()
  raise ValueError(f"hf_config is a {type(hf_config).__name__}, expected a config.json dict or a "
                   "transformers config")


def _text_part(hf_config: Any) -> tuple[dict, dict]:
  """(the text config, the whole config): a CLIPConfig / SiglipConfig nests it in text_config."""
  whole = config_dict(hf_config)
  text = whole.get("text_config")
  return (config_dict(text) if text is not None else whole), whole


def _common_fields(t: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
  get = lambda name: t[name] if t.get(name) is not None else defaults[name]  # noqa: E731
  act = get("hidden_act")
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"hidden_act={act!r}, expected one of {sorted(_HF_ACTIVATIONS)}")
  return dict(vocab_size=get("vocab_size"), width=get("hidden_size"), depth=get("num_hidden_layers"),
              num_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"),
              max_length=get("max_position_embeddings"), activation=_HF_ACTIVATIONS[act],
              norm_eps=float(get("layer_norm_eps")))


def config_from_hf_clip_text(hf_config: Any, **overrides) -> TextTowerConfig:
  """TextTowerConfig from a ``CLIPTextConfig`` (object or config.json dict) or a ``CLIPConfig``.

  A CLIPModel projects to its top-level ``projection_dim``, which wins over the text part's.
  ``eos_token_id == 2`` (OpenAI's original configs) pools the highest id, as HF does.
  ``overrides`` set other fields, e.g. ``projection_dim=None`` for a bare CLIPTextModel.
  """
  text, whole = _text_part(hf_config)
  fields = _common_fields(text, _CLIP_DEFAULTS)
  projection = whole.get("projection_dim") if "text_config" in whole else None
  if projection is None:
    projection = text.get("projection_dim") or _CLIP_DEFAULTS["projection_dim"]
  eos = text.get("eos_token_id", _CLIP_DEFAULTS["eos_token_id"])
  fields.update(causal=True, pooling="eos", eos_token_id=None if eos == 2 else eos,
                projection_dim=projection, projection_bias=False)
  return TextTowerConfig(**{**fields, **overrides}).validate()


def config_from_hf_siglip_text(hf_config: Any, **overrides) -> TextTowerConfig:
  """TextTowerConfig from a ``SiglipTextConfig`` (object or config.json dict) or a ``SiglipConfig``."""
  text, _ = _text_part(hf_config)
  fields = _common_fields(text, _SIGLIP_DEFAULTS)
  fields.update(causal=False, pooling="last", eos_token_id=None,
                projection_dim=text.get("projection_size") or fields["width"], projection_bias=True)
  return TextTowerConfig(**{**fields, **overrides}).validate()

