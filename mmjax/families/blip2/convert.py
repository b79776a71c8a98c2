"""Weight import for the `blip2` family: Hugging Face's ``Blip2ForConditionalGeneration``
(BLIP-2 stage 2, OPT or LLaMA LM), ``Blip2ForImageTextRetrieval`` (stage 1's ITC and ITM
heads) and ``InstructBlipForConditionalGeneration`` (LLaMA / Vicuna LM) -> ``Blip2`` params.

Entry points:

  blip2_config_from_hf(hf_config, *, architecture=None, **overrides) -> Blip2Config
  blip2_from_state_dict(state_dict, config) -> params
  blip2_from_hf_directory(directory, *, dtype="float32", **overrides) -> (Blip2Config, params)

The LM is read by the shared importers (``mmjax.convert.hf_opt``, ``hf_llama``) from the keys
under ``language_model.``; this module reads the rest. Key layout (torch Linear weights are
[out, in] and become kernels [in, out], split into heads where ours has them):

  vision_model.embeddings.patch_embedding.{weight [E,3,p,p], bias}  -> vision/patch_embed
  vision_model.embeddings.class_embedding [1,1,E]                 -> vision/cls_token [E]
  vision_model.embeddings.position_embedding [1,P+1,E]            -> vision/pos_embedding [P+1, E]
  vision_model.encoder.layers.{i}.self_attn.qkv.{weight [3E,E], bias [3E]}
                                                                  -> vision/layers_{i}/attn/{query,key,value}
  vision_model.encoder.layers.{i}.self_attn.projection.*          -> vision/layers_{i}/attn/out
  vision_model.encoder.layers.{i}.{layer_norm1,layer_norm2,mlp.fc1,mlp.fc2}.*
                                                                  -> vision/layers_{i}/{norm1,norm2,mlp/fc1,mlp/fc2}
  vision_model.post_layernorm.*                                   -> vision/post_norm
  query_tokens [1,Q,W]                                            -> query_tokens [Q, W]
  qformer.layernorm.*  (InstructBLIP: qformer.embeddings.layernorm.*)
                                                                  -> qformer/layernorm
  embeddings.{word,position}_embeddings.weight  (InstructBLIP: qformer.embeddings.*; the
      retrieval model and InstructBLIP only)                      -> qformer/word_embeddings, position_embeddings
  qformer.encoder.layer.{i}.attention.{attention.{query,key,value}, output.{dense,LayerNorm}}.*
                                                                  -> qformer/layers_{i}/attention
  qformer.encoder.layer.{i}.crossattention.*  (layers 0, f, 2f, ...)
                                                                  -> qformer/layers_{i}/crossattention
  qformer.encoder.layer.{i}.{intermediate_query,output_query}.*   -> qformer/layers_{i}/ffn_query
  qformer.encoder.layer.{i}.{intermediate,output}.*  (text input) -> qformer/layers_{i}/ffn_text
  vision_projection.*, text_projection.*, itm_head.*  (retrieval) -> the same names
  language_projection.*                                           -> language_projection
  language_model.*                                                -> decoder (OPTForCausalLM or
                                                                     LlamaForCausalLM keys)

The EVA tower's fused ``qkv.bias`` is one parameter of 3E: LAVIS trains a query and a value
bias and Hugging Face's conversion writes zeros for the key third, but that third is a
parameter of the Hugging Face model, counted and saved. It is imported as the key bias of our
tower (which has biases on query, key and value), so the counts are equal and whatever the
checkpoint holds there is used (a bias shared by every key changes no attention weight).

The retrieval model has no ITC temperature (it returns raw cosine similarities; LAVIS's
``temp`` is dropped by the conversion): ``temperature`` is set to ``Blip2Config.temperature``.
No Hugging Face checkpoint holds the ITG head (``itg_*``): a config with "itg" in ``heads``
is refused by name.

config.json: ``model_type`` "blip-2" (``architectures[0]`` says generation or retrieval) or
"instructblip"; ``vision_config`` (Blip2VisionConfig's defaults: EVA ViT-g/14, 1408 wide, 39
layers, 224 px), ``qformer_config`` (BERT-base's shape, ``use_qformer_text_input``),
``text_config`` (model_type "opt", the default, or "llama"; Flan-T5 is refused),
``num_query_tokens``, ``image_text_hidden_size``, ``image_token_index``. Fields a config.json
omits take transformers' defaults, as transformers fills them. Pixels are normalised with
OpenAI CLIP's mean and std (BLIP-2's image processor; preprocessor_config.json is not read).

Missing, unexpected and mis-shaped keys of every part raise one ValueError listing them all.

Dimension letters: E the tower's width, P patches, Q queries, W the Q-Former's width, F the
ITC width, D the LM's width.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_llama, hf_lm, hf_opt
from mmjax.convert.state_dict import StateDictReader
from mmjax.families.blip2.model import Blip2Config
from mmjax.families.blip2.qformer import QFormerConfig
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import ViTConfig

# architectures[0] -> config.json's model_type.
ARCHITECTURES = {"Blip2ForConditionalGeneration": "blip-2", "Blip2ForImageTextRetrieval": "blip-2",
                 "InstructBlipForConditionalGeneration": "instructblip"}
RETRIEVAL = "Blip2ForImageTextRetrieval"

# transformers' Blip2VisionConfig / InstructBlipVisionConfig defaults (EVA ViT-g/14 as BLIP-2
# uses it: its last block dropped) and Blip2QFormerConfig / InstructBlipQFormerConfig's.
_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                        num_channels=3)
_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12,
                         pad_token_id=0, cross_attention_frequency=2, use_qformer_text_input=False,
                         position_embedding_type="absolute")
# transformers' OPTConfig / LlamaConfig defaults of the fields the LM importers read.
_TEXT_DEFAULTS = {
    "opt": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                max_position_embeddings=2048, activation_function="relu", do_layer_norm_before=True,
                enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
                  tie_word_embeddings=False),
}
_TEXT_CONFIGS = {"opt": hf_opt.config_from_hf_opt, "llama": hf_llama.config_from_hf_llama}
# transformers' ACT2FN names -> mmjax.layers.mlp.ACTIVATIONS.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}
# Buffers some checkpoints hold beside the parameters.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
_VISION = "vision_model."
_LM = "language_model."

# Overrides beside Blip2Config's own fields: the decoder's, and both towers'.
_DECODER_OVERRIDES = ("scan_layers", "remat", "max_length")
_EVERYWHERE_OVERRIDES = ("dtype", "attention_backend")


# ------------------------------------------------------------------------------ configs

def _with_defaults(hf_config: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> dict:
  part = hf_config.get(key) or {}
  part = part.to_dict() if hasattr(part, "to_dict") else dict(part)
  return {**defaults, **{k: v for k, v in part.items() if v is not None}}


def _activation(where: str, name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(f"{where}.hidden_act={name!r}; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _square(where: str, value: Any) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{where}={list(value)}; expected a square size (one int)")
    value = value[0]
  return int(value)


def _vision_config(hf_config: Mapping[str, Any]) -> ViTConfig:
  v = _with_defaults(hf_config, "vision_config", _VISION_DEFAULTS)
  if int(v["num_channels"]) != 3:
    raise ValueError(f"vision_config.num_channels={v['num_channels']}; expected 3 (RGB)")
  if not v["qkv_bias"]:
    raise ValueError("vision_config.qkv_bias=False; expected True (the EVA tower's query and value biases)")
  return ViTConfig(
      image_size=_square("vision_config.image_size", v["image_size"]),
      patch_size=_square("vision_config.patch_size", v["patch_size"]),
      width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
      mlp_dim=int(v["intermediate_size"]), class_token=True, posemb="learned", pre_norm=False, post_norm=True,
      post_norm_tokens=True, activation=_activation("vision_config", v["hidden_act"]), patch_bias=True,
      norm_eps=float(v["layer_norm_eps"])).validate()


def _qformer_config(hf_config: Mapping[str, Any], architecture: str, encoder_width: int) -> QFormerConfig:
  q = _with_defaults(hf_config, "qformer_config", _QFORMER_DEFAULTS)
  if q["position_embedding_type"] != "absolute":
    raise ValueError(f"qformer_config.position_embedding_type={q['position_embedding_type']!r}; expected 'absolute'")
  text_input = bool(q["use_qformer_text_input"])
  if architecture == RETRIEVAL and not text_input:
    raise ValueError("qformer_config.use_qformer_text_input=False in a Blip2ForImageTextRetrieval: its text passes "
                     "need the Q-Former's text feed-forwards; expected True")
  if architecture == "Blip2ForConditionalGeneration" and text_input:
    raise ValueError("qformer_config.use_qformer_text_input=True in a Blip2ForConditionalGeneration: its Q-Former "
                     "has text feed-forwards but no text embeddings, which Blip2 cannot hold; expected False")
  return QFormerConfig(
      width=int(q["hidden_size"]), depth=int(q["num_hidden_layers"]), num_heads=int(q["num_attention_heads"]),
      mlp_dim=int(q["intermediate_size"]), cross_attention_frequency=int(q["cross_attention_frequency"]),
      # transformers sets it to the tower's width whatever the config.json says.
      encoder_width=encoder_width, num_queries=int(hf_config.get("num_query_tokens") or 32),
      vocab_size=int(q["vocab_size"]), max_length=int(q["max_position_embeddings"]),
      activation=_activation("qformer_config", q["hidden_act"]), norm_eps=float(q["layer_norm_eps"]),
      # InstructBLIP's Q-Former layers always have the text feed-forwards.
      text_input=text_input or architecture == "InstructBlipForConditionalGeneration")


def _decoder_config(hf_config: Mapping[str, Any]) -> DecoderConfig:
  text = hf_config.get("text_config") or {}
  text = text.to_dict() if hasattr(text, "to_dict") else dict(text)
  model_type = text.get("model_type") or "opt"
  if model_type not in _TEXT_CONFIGS:
    raise ValueError(f"text_config.model_type={model_type!r}; expected one of {sorted(_TEXT_CONFIGS)} (decoder-only "
                     "LMs; BLIP-2's Flan-T5 variants are not supported)")
  text = _with_defaults(hf_config, "text_config", _TEXT_DEFAULTS[model_type])
  text["model_type"] = model_type
  return _TEXT_CONFIGS[model_type](text)


def _architecture(hf_config: Mapping[str, Any], architecture: str | None) -> str:
  model_type = hf_config.get("model_type")
  if model_type not in set(ARCHITECTURES.values()):
    raise ValueError(f"config.json model_type={model_type!r}; expected 'blip-2' or 'instructblip'")
  if architecture is None:
    architecture = (hf_config.get("architectures") or [None])[0]
    if architecture is None and model_type == "instructblip":
      architecture = "InstructBlipForConditionalGeneration"
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture {architecture!r} (config.json architectures={hf_config.get('architectures')}); "
                     f"expected one of {sorted(ARCHITECTURES)}")
  if ARCHITECTURES[architecture] != model_type:
    raise ValueError(f"architecture {architecture!r} is a model_type {ARCHITECTURES[architecture]!r} model, but "
                     f"config.json says model_type={model_type!r}")
  return architecture


def override(config: Blip2Config, **overrides) -> Blip2Config:
  """``config`` with fields replaced: Blip2Config's own, the decoder's ``scan_layers``,
  ``remat``, ``max_length``, and ``dtype``, ``attention_backend`` (tower and decoder).
  ValueError naming unknown ones."""
  top = {f.name for f in dataclasses.fields(Blip2Config)}
  unknown = sorted(set(overrides) - top - set(_DECODER_OVERRIDES) - set(_EVERYWHERE_OVERRIDES))
  if unknown:
    raise ValueError(f"unknown overrides {unknown}; expected fields of Blip2Config {sorted(top)} or "
                     f"{sorted(_DECODER_OVERRIDES + _EVERYWHERE_OVERRIDES)}")
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in top})
  decoder = {k: overrides[k] for k in _DECODER_OVERRIDES if k in overrides}
  everywhere = {k: overrides[k] for k in _EVERYWHERE_OVERRIDES if k in overrides}
  if decoder and config.decoder is None:
    raise ValueError(f"overrides {sorted(decoder)} are the decoder's, but this BLIP-2 has none (the stage-1 model)")
  if everywhere:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, **everywhere))
  if config.decoder is not None and (decoder or everywhere):
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, **decoder, **everywhere))
  return config.validate()


def blip2_config_from_hf(hf_config: Mapping[str, Any] | Any, *, architecture: str | None = None,
                         **overrides) -> Blip2Config:
  """The Blip2Config of a ``Blip2Config`` / ``InstructBlipConfig`` config.json dict (or
  config object). ``architecture``: one of ``ARCHITECTURES`` (default: config.json's
  ``architectures[0]``; a config object built in Python has none). ``overrides``: as
  ``override``'s.

  Raises ValueError naming the field for what ``Blip2`` cannot run: another model_type or
  architecture, a Flan-T5 LM, a tower without query/value biases or with other channels, an
  unknown activation, a stage-2 model without ``image_token_index`` (checkpoints converted
  before transformers 4.47 put no placeholders in the prompt), the Q-Former text input
  where the architecture has none or lacks it where the architecture needs it.
  """
  hf_config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  architecture = _architecture(hf_config, architecture)
  vision = _vision_config(hf_config)
  qformer = _qformer_config(hf_config, architecture, vision.width)
  image_token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
  fields = dict(vision=vision, qformer=qformer, embed_dim=int(hf_config.get("image_text_hidden_size") or 256),
                pad_token_id=int(_with_defaults(hf_config, "qformer_config", _QFORMER_DEFAULTS)["pad_token_id"] or 0))
  if architecture == RETRIEVAL:
    fields.update(heads=("itc", "itm"))
    if image_token is not None:
      fields.update(image_token_id=int(image_token))
  else:
    if image_token is None:
      raise ValueError(f"image_token_index=None in a {architecture}: the checkpoint predates transformers 4.47's "
                       "placeholders (the prompt's Q image tokens the query outputs replace); expected an id")
    decoder = _decoder_config(hf_config)
    if not 0 <= int(image_token) < decoder.vocab_size:
      raise ValueError(f"image_token_index={image_token} is outside the LM's vocabulary [0, {decoder.vocab_size})")
    fields.update(decoder=decoder, image_token_id=int(image_token),
                  instruction=architecture == "InstructBlipForConditionalGeneration")
  return override(Blip2Config(**fields), **overrides)


# ------------------------------------------------------------------------------ weights

def _reshape(x: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
  return None if x is None else x.reshape(shape)


def _dense(r: StateDictReader, key: str, d_out: int, d_in: int, *, out_heads: tuple[int, int] | None = None,
           in_heads: tuple[int, int] | None = None) -> dict:
  """A torch Linear ``key.{weight,bias}`` -> {kernel [in, out], bias [out]}, split into heads."""
  kernel = r.linear(key + ".weight", d_out, d_in)
  bias = r.get(key + ".bias", (d_out,))
  if out_heads:
    return {"kernel": _reshape(kernel, (d_in,) + out_heads), "bias": _reshape(bias, out_heads)}
  if in_heads:
    return {"kernel": _reshape(kernel, in_heads + (d_out,)), "bias": bias}
  return {"kernel": kernel, "bias": bias}


def _vision(r: StateDictReader, c: ViTConfig) -> dict:
  """The EVA tower (module docstring): fused qkv split into query, key, value."""
  d, f, p, n = c.width, c.mlp_dim, c.patch_size, c.num_tokens
  heads = (c.num_heads, d // c.num_heads)
  e = _VISION + "embeddings."
  patch = r.get(e + "patch_embedding.weight", (d, 3, p, p))
  params = {"patch_embed": {"kernel": None if patch is None else patch.transpose(2, 3, 1, 0),
                            "bias": r.get(e + "patch_embedding.bias", (d,))},
            "cls_token": _reshape(r.get(e + "class_embedding", (1, 1, d)), (d,)),
            "pos_embedding": _reshape(r.get(e + "position_embedding", (1, n, d)), (n, d))}
  for i in range(c.depth):
    t = f"{_VISION}encoder.layers.{i}."
    qkv = r.get(t + "self_attn.qkv.weight", (3 * d, d))
    qkv_bias = r.get(t + "self_attn.qkv.bias", (3 * d,))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
      rows = slice(j * d, (j + 1) * d)
      attn[name] = {"kernel": None if qkv is None else np.ascontiguousarray(qkv[rows].T).reshape((d,) + heads),
                    "bias": None if qkv_bias is None else qkv_bias[rows].reshape(heads)}
    attn["out"] = _dense(r, t + "self_attn.projection", d, d, in_heads=heads)
    params[f"layers_{i}"] = {"norm1": r.layer_norm(t + "layer_norm1.", d), "attn": attn,
                             "norm2": r.layer_norm(t + "layer_norm2.", d),
                             "mlp": {"fc1": _dense(r, t + "mlp.fc1", f, d), "fc2": _dense(r, t + "mlp.fc2", d, f)}}
  params["post_norm"] = r.layer_norm(_VISION + "post_layernorm.", d)
  return params


def _qformer_attention(r: StateDictReader, key: str, c: QFormerConfig, kv_width: int) -> dict:
  w, heads = c.width, (c.num_heads, c.head_dim)
  a = key + ".attention."
  return {"query": _dense(r, a + "query", w, w, out_heads=heads),
          "key": _dense(r, a + "key", w, kv_width, out_heads=heads),
          "value": _dense(r, a + "value", w, kv_width, out_heads=heads),
          "out": _dense(r, key + ".output.dense", w, w, in_heads=heads),
          "layernorm": r.layer_norm(key + ".output.LayerNorm.", w)}


def _feed_forward(r: StateDictReader, prefix: str, suffix: str, c: QFormerConfig) -> dict:
  return {"dense_in": _dense(r, f"{prefix}intermediate{suffix}.dense", c.mlp_dim, c.width),
          "dense_out": _dense(r, f"{prefix}output{suffix}.dense", c.width, c.mlp_dim),
          "layernorm": r.layer_norm(f"{prefix}output{suffix}.LayerNorm.", c.width)}


def _qformer(r: StateDictReader, c: QFormerConfig, instruct: bool) -> dict:
  """The Q-Former; its text embeddings live under ``qformer.embeddings.`` in InstructBLIP and
  under ``embeddings.`` in the retrieval model."""
  w = c.width
  params: dict[str, Any] = {}
  if c.text_input:
    e = "qformer.embeddings." if instruct else "embeddings."
    params["word_embeddings"] = {"embedding": r.get(e + "word_embeddings.weight", (c.vocab_size, w))}
    params["position_embeddings"] = r.get(e + "position_embeddings.weight", (c.max_length, w))
  params["layernorm"] = r.layer_norm("qformer.embeddings.layernorm." if instruct else "qformer.layernorm.", w)
  for i in range(c.depth):
    t = f"qformer.encoder.layer.{i}."
    layer = {"attention": _qformer_attention(r, t + "attention", c, w)}
    if c.has_cross_attention(i):
      layer["crossattention"] = _qformer_attention(r, t + "crossattention", c, c.encoder_width)
    layer["ffn_query"] = _feed_forward(r, t, "_query", c)
    if c.text_input:
      layer["ffn_text"] = _feed_forward(r, t, "", c)
    params[f"layers_{i}"] = layer
  return params


def _decoder(state_dict: Mapping[str, Any], c: DecoderConfig) -> dict:
  """The LM by its importer (the config says which: OPT has learned positions)."""
  if c.positions == "learned":
    params = hf_opt.opt_from_state_dict(state_dict, c, prefix=_LM)
  else:
    params = hf_llama.llama_from_state_dict(state_dict, c, prefix=_LM)
  return hf_lm.finish_params(params, c) if c.scan_layers else params


def _indented(part: str, err: ValueError) -> str:
  return f"  {part}: " + "\n    ".join(str(err).splitlines())


def _describe(c: Blip2Config) -> str:
  lm = "none" if c.decoder is None else f"width={c.decoder.width} depth={c.decoder.depth} vocab={c.decoder.vocab_size}"
  return (f"Blip2Config(vision width={c.vision.width} depth={c.vision.depth} image_size={c.vision.image_size}; "
          f"qformer width={c.qformer.width} depth={c.qformer.depth} queries={c.num_queries} "
          f"text_input={c.qformer.text_input}; heads={c.heads}; instruction={c.instruction}; decoder {lm})")


def blip2_from_state_dict(state_dict: Mapping[str, Any], config: Blip2Config) -> dict:
  """``Blip2(config)`` params from a ``Blip2ForConditionalGeneration``,
  ``Blip2ForImageTextRetrieval`` or ``InstructBlipForConditionalGeneration`` state_dict (torch
  tensors or numpy arrays; the config says which) as float32 numpy arrays; the decoder's layers
  stacked when ``config.decoder.scan_layers``. One ValueError lists every bad key."""
  config = config.validate()
  if "itg" in config.heads:
    raise ValueError(f"config.heads={config.heads} has 'itg', whose head (itg_transform, itg_layernorm, itg_bias) no "
                     "Hugging Face BLIP-2 checkpoint holds; expected heads from ('itc', 'itm')")
  if config.heads and config.decoder is not None:
    raise ValueError(f"config.heads={config.heads} with a decoder: Hugging Face has no BLIP-2 with both; expected "
                     "heads=() for a generation model, decoder=None for the retrieval model")
  q = config.qformer
  reader = StateDictReader(state_dict, "the tower, the queries, the Q-Former and the heads")
  params: dict[str, Any] = {"vision": _vision(reader, config.vision),
                            "query_tokens": _reshape(reader.get("query_tokens", (1, q.num_queries, q.width)),
                                                     (q.num_queries, q.width)),
                            "qformer": _qformer(reader, q, instruct=config.instruction)}
  if "itc" in config.heads:
    params["vision_projection"] = _dense(reader, "vision_projection", config.embed_dim, q.width)
    params["text_projection"] = _dense(reader, "text_projection", config.embed_dim, q.width)
    params["temperature"] = np.asarray(config.temperature, np.float32)
  if "itm" in config.heads:
    params["itm_head"] = _dense(reader, "itm_head", 2, q.width)
  errors = []
  if config.decoder is not None:
    params["language_projection"] = _dense(reader, "language_projection", config.decoder.width, q.width)
    try:
      params["decoder"] = _decoder(state_dict, config.decoder)
    except ValueError as err:
      errors.append(_indented(f"language model (under {_LM!r})", err))
  unexpected = sorted(key for key in state_dict if key not in reader.used and not key.startswith(_LM)
                      and not key.endswith(_IGNORED_SUFFIXES))
  try:
    reader.raise_if_errors(unexpected)
  except ValueError as err:
    errors.insert(0, _indented("tower, queries, Q-Former, projections", err))
  if errors:
    raise ValueError(f"cannot convert a BLIP-2 state_dict into {_describe(config)}:\n" + "\n".join(errors))
  return params


def _cast(tree: dict, dtype: np.dtype) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(dtype, copy=False) for k, v in tree.items()}


def blip2_from_hf_directory(directory: str | os.PathLike, *, dtype: str = "float32",
                            **overrides) -> tuple[Blip2Config, dict]:
  """(Blip2Config, ``Blip2`` params) of the model saved in ``directory`` by
  ``save_pretrained``: config.json and its weights (``mmjax.convert.hf_lm.open_state_dict``:
  safetensors or pytorch_model.bin, sharded or not, read one tensor at a time). ``dtype``: of
  the returned arrays; ``overrides``: as ``override``'s.

  Raises ValueError for what ``blip2_config_from_hf`` refuses, a missing config.json or
  weight file, or weights that disagree with config.json (one error listing every bad key).
  """
  directory = os.fspath(directory)
  config = blip2_config_from_hf(hf_lm.read_hf_config(directory), **overrides)
  np_dtype = np.dtype(jnp.dtype(dtype))  # jnp knows bfloat16
  if not jnp.issubdtype(np_dtype, jnp.floating):
    raise ValueError(f"dtype={dtype!r}; expected a float dtype (float32, bfloat16, float16)")
  try:
    params = blip2_from_state_dict(hf_lm.open_state_dict(directory), config)
  except ValueError as err:
    raise ValueError(f"{directory}: {err}") from err
  return config, _cast(params, np_dtype)


# {source name: importer} (`Family.importers`).
IMPORTERS = {"hf_blip2": blip2_from_state_dict, "hf": blip2_from_hf_directory}
