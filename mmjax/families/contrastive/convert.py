"""Weight and tokenizer import for the `contrastive` family: a Hugging Face ``CLIPModel`` or
``SiglipModel`` -> ``ContrastiveModel`` params, and its captions -> the ids its text tower reads.

Entry points:

  config_from_hf_clip(hf_config, **overrides) -> ContrastiveConfig
  config_from_hf_siglip(hf_config, **overrides) -> ContrastiveConfig
  clip_from_state_dict(state_dict, config, prefix=None) -> params
  siglip_from_state_dict(state_dict, config, prefix=None) -> params
  contrastive_from_hf_directory(directory, config, dtype="float32") -> params
  load_hf_contrastive(directory, dtype="float32", **overrides) -> (ContrastiveConfig, params)
  load_hf_tokenizer(directory) -> CaptionTokenizer
  encode_texts(tokenizer, texts, length) -> (ids Int32[B, T], mask Int32[B, T])

The towers are read by the shared importers (``mmjax.convert.hf_vision`` for
``vision_model.*``, ``mmjax.convert.hf_text`` for ``text_model.*`` with CLIP's
``text_projection`` or SigLIP's ``text_model.head``); this module adds what only the whole
model has: ``visual_projection.weight`` [E, Dv] -> ``visual_projection/kernel`` [Dv, E] (CLIP;
SigLIP's attention-pooling head output is the embedding), ``logit_scale`` (CLIP stores a
scalar, SigLIP a [1]) and SigLIP's ``logit_bias``. Missing, unexpected and mis-shaped keys of
all three parts raise one ValueError listing them.

Temperature: transformers' forward applies ``exp(logit_scale)`` with no clip (CLIP's training
clipped the parameter itself, at log 100, and SigLIP's did not clip), so the imported configs
set ``max_logit_scale=0``: a stored value even a rounding step above the clip would otherwise
move the logits. Pass ``max_logit_scale=math.log(100)`` as an override to fine-tune with it.

Captions: ``mmjax.data.Tokenizer`` cannot carry these tokenizers as HF runs them. Its
tokenizer.json backend adds ``<image>``, ``<|endofchunk|>`` and ``<pad>`` after CLIP's largest
id (49407), so its padding id 49408 indexes past CLIP's 49408-row embedding, and HF pads with
``<|endoftext|>``; and it refuses a sentencepiece model without BOS, which SigLIP's (T5's
``c4_en``: pad 0, EOS 1, unk 2) is. ``CaptionTokenizer`` runs the files with ``tokenizers`` and
``sentencepiece`` directly and ``encode_texts`` builds what the HF tokenizer returns for
``tokenizer(texts, padding="max_length", max_length=length, truncation=True)``:

  CLIP    [<|startoftext|> 49406] + BPE of the text (NFC, whitespace runs -> " ", lowercased:
          the tokenizer.json's own normaliser) cut to length - 2 + [<|endoftext|> 49407], padded
          with the pad token (``<|endoftext|>``, 49407) to length; mask 1 from BOS to EOS.
  SigLIP  sentencepiece pieces of the canonicalised text (lowercased unless
          ``do_lower_case`` is false, ``string.punctuation`` removed, whitespace runs -> " ",
          stripped: ``SiglipTokenizer.canonicalize_text``) cut to length - 1 + [</s> 1],
          padded with the pad token (``</s>``) to length; mask 1 up to and including EOS.

What does not match HF: a caption holding a special token's literal text (``<|endoftext|>``,
``</s>``, ``<unk>``) is split by HF into that one special id before normalisation, here it is
plain text; and OpenAI's original CLIP tokenizer (not HF's) also runs ``ftfy`` and HTML
unescaping, which neither does.

SigLIP was trained without an attention mask (big_vision pads to 64 and attends the pads);
transformers 5's ``SiglipTokenizer`` returns the mask and ``SiglipModel`` then hides the padded
keys. ``ContrastiveModel`` does either: pass the mask, or ``None`` to embed as trained.

Dimension letters: B batch, T text length, Dv vision width, E embedding width.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_lm, hf_text, hf_vision
from mmjax.convert.state_dict import StateDictReader, to_numpy
from mmjax.families.contrastive import presets
from mmjax.families.contrastive.model import ContrastiveConfig

MODEL_TYPES = ("clip", "siglip")
_VISION, _TEXT = "vision_model.", "text_model."
# Buffers older checkpoints hold beside the parameters.
_IGNORED_SUFFIXES = ("position_ids",)


# ------------------------------------------------------------------------------ configs

def config_from_hf_clip(hf_config: Any, **overrides) -> ContrastiveConfig:
  """ContrastiveConfig of a ``CLIPConfig`` (object or config.json dict).

  ``overrides``: ContrastiveConfig fields, or ``dtype`` / ``attention_backend`` for both towers.
  """
  whole = hf_text.config_dict(hf_config)
  text = hf_text.config_from_hf_clip_text(whole)
  config = ContrastiveConfig(
      vision=hf_vision.config_from_hf_clip(whole), text=text, vision_projection_dim=text.projection_dim,
      loss="softmax", logit_scale_init=float(whole.get("logit_scale_init_value", math.log(1 / 0.07))),
      max_logit_scale=0.0)
  return presets.override(config, **overrides).validate()


def config_from_hf_siglip(hf_config: Any, **overrides) -> ContrastiveConfig:
  """ContrastiveConfig of a ``SiglipConfig`` (object or config.json dict): no image projection
  (the attention-pooling head's output is the embedding), the sigmoid loss with its bias, and
  the paper's initial temperature and bias (log 10, -10; config.json holds neither)."""
  whole = hf_text.config_dict(hf_config)
  config = ContrastiveConfig(
      vision=hf_vision.config_from_hf_siglip(whole), text=hf_text.config_from_hf_siglip_text(whole),
      vision_projection_dim=0, loss="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
      max_logit_scale=0.0)
  if not config.vision.map_head:
    raise ValueError("vision_use_head=False: a SiglipModel's image embedding is its attention-pooling head's "
                     "output; expected vision_use_head true")
  return presets.override(config, **overrides).validate()


# ------------------------------------------------------------------------------ weights

def _scalar(reader: StateDictReader, key: str) -> np.ndarray | None:
  """A one-element tensor (CLIP's logit_scale has shape (), SigLIP's (1,)) -> float32 []."""
  if key not in reader.sd:
    reader.missing.append(key)
    return None
  reader.used.add(key)
  value = to_numpy(reader.sd[key])
  if value.shape not in ((), (1,)):
    reader.misshaped.append(f"{key}: shape {value.shape}, expected () or (1,)")
    return None
  return value.reshape(())


def _describe(config: ContrastiveConfig) -> str:
  v, t = config.vision, config.text
  return (f"ContrastiveConfig(vision width={v.width} depth={v.depth} image_size={v.image_size} "
          f"patch_size={v.patch_size}; text width={t.width} depth={t.depth} vocab_size={t.vocab_size}; "
          f"vision_projection_dim={config.vision_projection_dim}, loss={config.loss!r})")


def _indented(part: str, err: ValueError) -> str:
  return f"  {part}: " + "\n    ".join(str(err).splitlines())


def _convert(state_dict: Mapping[str, Any], config: ContrastiveConfig, prefix: str | None, kind: str) -> dict:
  config = config.validate()
  base = prefix or ""
  what = {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
  if not any(key.startswith((base + _VISION, base + _TEXT)) for key in state_dict):
    raise ValueError(f"not a {what} state_dict: no key starts with {base + _VISION!r} or {base + _TEXT!r}; its "
                     f"keys start with {sorted({key.split('.')[0] + '.' for key in state_dict})[:8]}")
  errors, params = [], {}
  # Each tower's importer raises its own one error; they are gathered into this one.
  vision_import = hf_vision.clip_vision_from_state_dict if kind == "clip" else hf_vision.siglip_vision_from_state_dict
  text_import = hf_text.clip_text_from_state_dict if kind == "clip" else hf_text.siglip_text_from_state_dict
  try:
    params["vision"] = vision_import(state_dict, config.vision, prefix=base + _VISION)
  except ValueError as err:
    errors.append(_indented("vision tower", err))
  try:
    params["text"] = text_import(state_dict, config.text, prefix=base)
  except ValueError as err:
    errors.append(_indented("text tower", err))

  reader = StateDictReader(state_dict, f"the keys beside the towers (under {base!r})")
  if config.vision_projection_dim:
    params["visual_projection"] = {"kernel": reader.linear(f"{base}visual_projection.weight",
                                                           config.vision_projection_dim, config.vision.width)}
  params["logit_scale"] = _scalar(reader, f"{base}logit_scale")
  if config.loss == "sigmoid":
    params["logit_bias"] = _scalar(reader, f"{base}logit_bias")
  claimed = reader.used | {f"{base}text_projection.weight"}  # read by the text importer
  unexpected = sorted(key for key in state_dict if key.startswith(base) and key not in claimed
                      and not key.startswith((base + _VISION, base + _TEXT)) and not key.endswith(_IGNORED_SUFFIXES))
  try:
    reader.raise_if_errors(unexpected)
  except ValueError as err:
    errors.append(_indented("head", err))
  if errors:
    raise ValueError(f"cannot convert a {what} state_dict" + (f" under {base!r}" if base else "")
                     + f" into {_describe(config)}:\n" + "\n".join(errors))
  return params


def clip_from_state_dict(state_dict: Mapping[str, Any], config: ContrastiveConfig, *,
                         prefix: str | None = None) -> dict:
  """``ContrastiveModel(config)`` params from a ``CLIPModel`` state_dict (torch tensors or
  numpy arrays; only keys under ``prefix`` are read), as float32 numpy arrays."""
  if config.loss != "softmax" or not config.vision_projection_dim:
    raise ValueError(f"a CLIPModel has an image projection and the softmax loss; got vision_projection_dim="
                     f"{config.vision_projection_dim}, loss={config.loss!r}")
  return _convert(state_dict, config, prefix, "clip")


def siglip_from_state_dict(state_dict: Mapping[str, Any], config: ContrastiveConfig, *,
                           prefix: str | None = None) -> dict:
  """``ContrastiveModel(config)`` params from a ``SiglipModel`` state_dict."""
  if config.loss != "sigmoid" or config.vision_projection_dim:
    raise ValueError(f"a SiglipModel has no image projection and the sigmoid loss; got vision_projection_dim="
                     f"{config.vision_projection_dim}, loss={config.loss!r}")
  return _convert(state_dict, config, prefix, "siglip")


_IMPORTERS = {"clip": (config_from_hf_clip, clip_from_state_dict),
              "siglip": (config_from_hf_siglip, siglip_from_state_dict)}


def _model_type(hf_config: Mapping[str, Any]) -> str:
  model_type = hf_config.get("model_type")
  if model_type not in _IMPORTERS:
    raise ValueError(f"config.json model_type={model_type!r}; expected one of {MODEL_TYPES} (a CLIPModel or "
                     "SiglipModel directory)")
  return model_type


def _cast(tree: dict, dtype: np.dtype) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(dtype, copy=False) for k, v in tree.items()}


def contrastive_from_hf_directory(directory: str | os.PathLike, config: ContrastiveConfig, *,
                                  dtype: str = "float32") -> dict:
  """``ContrastiveModel(config)`` params from the CLIPModel or SiglipModel saved in
  ``directory`` (its config.json's model_type picks the importer); the weights are read one
  tensor at a time (``mmjax.convert.hf_lm.open_state_dict``: safetensors or
  pytorch_model.bin, sharded or not) and cast to ``dtype``."""
  directory = os.fspath(directory)
  kind = _model_type(hf_lm.read_hf_config(directory))
  np_dtype = np.dtype(jnp.dtype(dtype))  # jnp knows bfloat16
  if not jnp.issubdtype(np_dtype, jnp.floating):
    raise ValueError(f"dtype={dtype!r}; expected a float dtype (float32, bfloat16, float16)")
  try:
    params = _IMPORTERS[kind][1](hf_lm.open_state_dict(directory), config)
  except ValueError as err:
    raise ValueError(f"{directory}: {err}") from err
  return _cast(params, np_dtype)


def load_hf_contrastive(directory: str | os.PathLike, dtype: str = "float32",
                        **overrides) -> tuple[ContrastiveConfig, dict]:
  """(ContrastiveConfig, ``ContrastiveModel`` params) of the CLIPModel or SiglipModel saved in
  ``directory`` by ``save_pretrained`` (config.json with model_type 'clip' or 'siglip', and its
  weights). ``dtype``: of the returned arrays; ``overrides``: as ``config_from_hf_clip``'s.

  Raises ValueError for another model_type (naming it), a missing config.json or weight file,
  or weights that disagree with config.json (one error listing every bad key).
  """
  hf_config = hf_lm.read_hf_config(directory)
  config = _IMPORTERS[_model_type(hf_config)][0](hf_config, **overrides)
  return config, contrastive_from_hf_directory(directory, config, dtype=dtype)


# ------------------------------------------------------------------------------ captions

def _token_name(value: Any) -> str | None:
  """A tokenizer_config.json token entry: a string or an AddedToken dict {"content": ...}."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


class CaptionTokenizer:
  """The tokenizer of an HF CLIP or SigLIP directory, run as HF's processor runs it.

  ``kind`` is 'clip' (``tokenizer.json``, via ``tokenizers``) or 'siglip' (``spiece.model``,
  via ``sentencepiece``); ``encode`` gives one caption's ids without BOS, EOS or padding;
  ``encode_texts`` the padded batch. Picklable (it keeps the file's bytes).
  """

  def __init__(self, kind: str, content: bytes, *, bos_token: str | None, eos_token: str, pad_token: str,
               lowercase: bool = True):
    if kind not in MODEL_TYPES:
      raise ValueError(f"kind={kind!r}; expected one of {MODEL_TYPES}")
    self.kind, self._content, self.lowercase = kind, bytes(content), bool(lowercase)
    self._names = (bos_token, eos_token, pad_token)
    if kind == "clip":
      import tokenizers  # pylint: disable=g-import-not-at-top
      self._tok = tokenizers.Tokenizer.from_str(self._content.decode("utf-8"))
      self._tok.no_padding()
      self._tok.no_truncation()
      to_id, self.vocab_size = self._tok.token_to_id, self._tok.get_vocab_size(with_added_tokens=True)
    else:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      self._sp = spm.SentencePieceProcessor(model_proto=self._content)
      self.vocab_size = self._sp.get_piece_size()
      to_id = self._piece_id
    ids = {}
    for field, name in zip(("bos_id", "eos_id", "pad_id"), self._names):
      if name is None:
        ids[field] = None
        continue
      token = to_id(name)
      if token is None:
        raise ValueError(f"the {kind} tokenizer has no {name!r} ({field[:-3]} token) in its vocabulary")
      ids[field] = int(token)
    self.bos_id, self.eos_id, self.pad_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]

  def _piece_id(self, piece: str) -> int | None:
    """sentencepiece's id of ``piece``, None when absent (piece_to_id answers unk then)."""
    token = self._sp.piece_to_id(piece)
    return None if token == self._sp.unk_id() and piece != self._sp.id_to_piece(token) else token

  def canonicalize(self, text: str) -> str:
    """SigLIP's ``canonicalize_text``: lowercase (if ``lowercase``), no ``string.punctuation``,
    whitespace runs as one space, stripped. CLIP's normaliser lives in its tokenizer.json."""
    if self.lowercase:
      text = text.lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()

  def encode(self, text: str) -> list[int]:
    """One caption's ids, no special tokens (see the module docstring for the rules)."""
    if self.kind == "clip":
      return list(self._tok.encode(text, add_special_tokens=False).ids)
    return list(self._sp.encode(self.canonicalize(text)))

  def __getstate__(self):
    return {"kind": self.kind, "content": self._content, "names": self._names, "lowercase": self.lowercase}

  def __setstate__(self, state):
    bos, eos, pad = state["names"]
    self.__init__(state["kind"], state["content"], bos_token=bos, eos_token=eos, pad_token=pad,
                  lowercase=state["lowercase"])


def load_hf_tokenizer(directory: str | os.PathLike) -> CaptionTokenizer:
  """The caption tokenizer of an HF CLIP or SigLIP directory: ``tokenizer.json`` (CLIP) or
  ``spiece.model`` (SigLIP), with the special tokens ``tokenizer_config.json`` names (HF's
  defaults when it is absent: CLIP bos ``<|startoftext|>``, eos and pad ``<|endoftext|>``;
  SigLIP eos and pad ``</s>``, no bos). A config.json beside them must say model_type 'clip'
  or 'siglip', and picks the file; without one the file present does."""
  directory = os.fspath(directory)
  kind = None
  if os.path.isfile(os.path.join(directory, "config.json")):
    kind = _model_type(hf_lm.read_hf_config(directory))
  settings: dict = {}
  if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
      settings = json.load(f)
  name = lambda key, default: _token_name(settings.get(key)) or default  # noqa: E731
  spiece, tokenizer_json = os.path.join(directory, "spiece.model"), os.path.join(directory, "tokenizer.json")
  if kind in ("siglip", None) and os.path.isfile(spiece):
    with open(spiece, "rb") as f:
      content = f.read()
    return CaptionTokenizer("siglip", content, bos_token=None, eos_token=name("eos_token", "</s>"),
                            pad_token=name("pad_token", "</s>"), lowercase=settings.get("do_lower_case", True))
  if kind in ("clip", None) and os.path.isfile(tokenizer_json):
    with open(tokenizer_json, "rb") as f:
      content = f.read()
    return CaptionTokenizer("clip", content, bos_token=name("bos_token", "<|startoftext|>"),
                            eos_token=name("eos_token", "<|endoftext|>"), pad_token=name("pad_token", "<|endoftext|>"))
  wanted = {"clip": "tokenizer.json", "siglip": "spiece.model", None: "spiece.model (SigLIP) or tokenizer.json (CLIP)"}
  raise ValueError(f"{directory} holds no {wanted[kind]}" + (f" (config.json: model_type={kind!r})" if kind else ""))


def encode_texts(tokenizer: CaptionTokenizer, texts: Iterable[str] | str,
                 length: int) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> (ids Int32[B, T], mask Int32[B, T]) with T = ``length``, as HF's
  ``tokenizer(texts, padding="max_length", max_length=length, truncation=True)`` returns them
  (the module docstring gives the layout of each kind). ``length``: the text tower's
  ``max_length`` (CLIP 77, SigLIP 64) or less."""
  texts = [texts] if isinstance(texts, str) else list(texts)
  specials: Sequence[int] = ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
  room = length - len(specials) - 1
  if room < 1:
    raise ValueError(f"length={length} leaves no room for text beside the {len(specials) + 1} special tokens")
  ids = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for row, text in enumerate(texts):
    tokens = [*specials, *tokenizer.encode(text)[:room], tokenizer.eos_id]
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask
