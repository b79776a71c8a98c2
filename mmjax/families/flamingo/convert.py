"""A whole OpenFlamingo ``Flamingo`` state_dict -> ``Flamingo`` params, over any LM
architecture the LM importers know; and ``load_open_flamingo``, which imports a released
OpenFlamingo ``checkpoint.pt`` with the LM directory and the CLIP weights it was trained over.

The state_dict of ``open_flamingo.src.flamingo.Flamingo`` holds (torch layouts; see each
converter's docstring):

- ``vision_encoder.*``: the vision tower (``Flamingo.vision_encoder = vision_encoder.visual``),
  read by ``mmjax.convert.hf_vision.clip_vision_from_state_dict`` under that prefix. Two
  layouts are accepted: HF ``CLIPVisionModel`` keys, and open_clip's ``VisionTransformer``
  keys (what OpenFlamingo holds: ``conv1``, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``), renamed by :func:`open_clip_visual_to_hf`
  (``proj``, the pooled projection Flamingo never uses, is dropped).
- ``perceiver.*`` and ``lang_encoder.gated_cross_attn_layers.{i}.*``: the bridge, read by
  ``mmjax.families.flamingo.convert_bridge``.
- ``lang_encoder.*``: the LM, in its own architecture's names (``LM_LAYOUTS``: the importer of
  ``config.json``'s ``architectures[0]`` and the attribute holding its decoder layers, as
  open_flamingo's ``_infer_decoder_layers_attr_name`` names it: ``model.layers`` for LLaMA,
  ``gpt_neox.layers`` for GPT-NeoX, ``transformer.blocks`` for MPT and MosaicGPT). After
  ``FlamingoLMMixin.init_flamingo`` each decoder layer is wrapped in a ``FlamingoLayer``, so
  layer i's weights appear as ``lang_encoder.<layers>.{i}.decoder_layer.*`` and again, the
  same tensors, as ``lang_encoder.old_decoder_blocks.{i}.*``; the cross-attention blocks
  appear again as ``lang_encoder.<layers>.{i}.gated_cross_attn_layer.*``. Either spelling is
  read (plain ``lang_encoder.<layers>.{i}.*`` too, for an LM state_dict saved before
  wrapping); the aliases count as consumed.

Released OpenFlamingo ``checkpoint.pt`` files hold only what training kept
(``open_flamingo/train/train_utils.py: filter_state_dict_to_trainable``): ``perceiver.*``, the
cross-attention blocks under their wrapped name only (``lang_encoder.<layers>.{i}.
gated_cross_attn_layer.*``), and the LM's embedding tables, resized to the tokenizer plus
``<|endofchunk|>``, ``<image>`` and ``<PAD>``. Give the frozen towers' state_dicts separately
(``vision_state_dict``: CLIP vision keys, HF or open_clip, no prefix; ``lm_state_dict``: the
LM as published, in its architecture's names): the checkpoint's own ``lang_encoder.*``
tensors win over the LM's (its embeddings are the trained ones); the LM's tables with more
rows than ``config.decoder.vocab_size`` keep their first rows, as open_flamingo's
``resize_token_embeddings`` does; the checkpoint's ``vision_encoder.*`` keys, if any, are
ignored in favour of ``vision_state_dict``.

Missing, unexpected or mis-shaped keys raise one ``ValueError`` per part, listing them all;
keys under none of the known prefixes are unexpected.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_lm, hf_mpt, hf_vision, mosaic_gpt
from mmjax.convert.state_dict import LazyStateDict, SafetensorsFile, TorchFile, to_numpy
from mmjax.families.flamingo import convert_bridge as of_convert
from mmjax.families.flamingo import presets as presets_lib
from mmjax.families.flamingo.model import FlamingoConfig, stack_layers, xattn_config, xattn_layer_indices
from mmjax.models.decoder import DecoderConfig

VISION_PREFIX = "vision_encoder."
LM_PREFIX = "lang_encoder."


class LmLayout(NamedTuple):
  """How one LM architecture sits inside an OpenFlamingo state_dict."""
  # (config.json dict, **DecoderConfig overrides) -> DecoderConfig
  config: Callable[..., DecoderConfig]
  # (state_dict in the architecture's own names, DecoderConfig) -> unrolled Decoder params;
  # one ValueError lists every missing, unexpected and mis-shaped key
  convert: Callable[[Mapping[str, Any], DecoderConfig], dict]
  # open_flamingo's decoder_layers_attr_name: where the decoder layers live
  decoder_layers: str
  # The tensors with one row per token (resize_token_embeddings resizes them)
  vocab_keys: tuple[str, ...]
  # Other spellings of one tensor -> the one used here (GPT-NeoX's output table is embed_out
  # in its releases and in transformers 4, lm_head in what transformers 5 writes)
  renames: Mapping[str, str] = {}


# decoder_layers_attr_name -> the vocabulary tables of that family of layouts.
_VOCAB_KEYS = {
    "model.layers": ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"),
    "gpt_neox.layers": ("gpt_neox.embed_in.weight", "embed_out.weight", "lm_head.weight"),
    "transformer.blocks": ("transformer.wte.weight", "lm_head.weight"),
    "model.decoder.layers": ("model.decoder.embed_tokens.weight", "lm_head.weight"),
}

# config.json architectures[0] -> open_flamingo's decoder_layers_attr_name for it.
_DECODER_LAYERS = {
    "LlamaForCausalLM": "model.layers", "Qwen2ForCausalLM": "model.layers", "MistralForCausalLM": "model.layers",
    "StableLmForCausalLM": "model.layers", "PhiForCausalLM": "model.layers", "PersimmonForCausalLM": "model.layers",
    "GPTNeoXForCausalLM": "gpt_neox.layers", "OPTForCausalLM": "model.decoder.layers",
    "MptForCausalLM": "transformer.blocks", "MPTForCausalLM": "transformer.blocks", "MosaicGPT": "transformer.blocks",
}

# Importers beyond the HF registry's: MosaicGPT (OpenFlamingo-3B's MPT-1B) and MPT in both
# spellings (transformers' MptForCausalLM; llm-foundry's MPTForCausalLM, anas-awadalla/mpt-7b's
# config.json, the same key layout).
_EXTRA_IMPORTERS = {
    "MosaicGPT": hf_lm.Importer(mosaic_gpt.config_from_mosaic_gpt, mosaic_gpt.mosaic_gpt_from_state_dict),
    "MptForCausalLM": hf_lm.Importer(hf_mpt.config_from_hf_mpt, hf_mpt.mpt_from_state_dict),
    "MPTForCausalLM": hf_lm.Importer(hf_mpt.config_from_hf_mpt, hf_mpt.mpt_from_state_dict),
}


def lm_layout(architecture: str) -> LmLayout:
  """The ``LmLayout`` of a ``config.json`` ``architectures[0]``."""
  importers = {**_EXTRA_IMPORTERS, **hf_lm.ARCHITECTURES}
  known = sorted(set(importers) & set(_DECODER_LAYERS))
  if architecture not in known:
    raise ValueError(f"LM architecture {architecture!r} is not supported inside an OpenFlamingo model; expected "
                     f"one of {known}")
  importer, layers = importers[architecture], _DECODER_LAYERS[architecture]
  renames = {"embed_out.weight": "lm_head.weight"} if layers == "gpt_neox.layers" else {}
  return LmLayout(importer.config, importer.convert, layers, _VOCAB_KEYS[layers], renames)


class _View(Mapping):
  """A read-only state_dict whose keys stand for keys of other mappings, read only when
  indexed (a ``LazyStateDict`` source stays lazy): ``sources[key] = (mapping, original key,
  rows)``; ``rows`` keeps the tensor's first rows (None: all)."""

  def __init__(self, sources: dict[str, tuple[Mapping[str, Any], str, int | None]]):
    self._sources = sources

  def __getitem__(self, key: str) -> Any:
    mapping, original, rows = self._sources[key]
    value = mapping[original]
    return value if rows is None else value[:rows]

  def __contains__(self, key: object) -> bool:
    return key in self._sources

  def __iter__(self) -> Iterator[str]:
    return iter(self._sources)

  def __len__(self) -> int:
    return len(self._sources)


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
  return tuple(sd.shape(key)) if hasattr(sd, "shape") else tuple(sd[key].shape)


def _unwrap_lm_keys(sd: Mapping[str, Any], prefix: str, decoder_layers: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """LM keys under ``prefix`` with FlamingoLayer wrapping undone: ({canonical key without
  prefix: original key}, {canonical: every original key it stands for}). Cross-attention keys
  are left to the bridge converter."""
  layers = re.escape(decoder_layers)
  wrapped = re.compile(rf"^{layers}\.(?P<i>\d+)\.decoder_layer\.(?P<rest>.*)$")
  old_block = re.compile(r"^old_decoder_blocks\.(?P<i>\d+)\.(?P<rest>.*)$")
  out: dict[str, str] = {}
  aliases: dict[str, list[str]] = {}
  # Wrapped keys first, then old_decoder_blocks (the same tensors) only where missing.
  ordered = sorted((k for k in sd if k.startswith(prefix)), key=lambda k: 1 if old_block.match(k[len(prefix):]) else 0)
  for key in ordered:
    rest = key[len(prefix):]
    if ".gated_cross_attn_layer." in rest or rest.startswith("gated_cross_attn_layers."):
      continue  # the bridge converter's
    m = wrapped.match(rest) or old_block.match(rest)
    canonical = f"{decoder_layers}.{m['i']}.{m['rest']}" if m else rest
    aliases.setdefault(canonical, []).append(key)
    out.setdefault(canonical, key)
  return out, aliases


def _lm_view(sd: Mapping[str, Any], lm_state_dict: Mapping[str, Any] | None, layout: LmLayout,
             vocab_size: int) -> tuple[_View, dict[str, list[str]]]:
  """The LM's state_dict in its own names: the LM's keys (first ``vocab_size`` rows of its
  vocabulary tables), overridden by the Flamingo state_dict's ``lang_encoder.*`` keys; and
  the aliases of the latter."""
  name = lambda canonical: layout.renames.get(canonical, canonical)  # noqa: E731
  sources: dict[str, tuple[Mapping[str, Any], str, int | None]] = {}
  if lm_state_dict is not None:
    plain, _ = _unwrap_lm_keys(lm_state_dict, "", layout.decoder_layers)
    for canonical, key in plain.items():
      rows = vocab_size if canonical in layout.vocab_keys and _shape(lm_state_dict, key)[0] > vocab_size else None
      sources[name(canonical)] = (lm_state_dict, key, rows)
  own, aliases = _unwrap_lm_keys(sd, LM_PREFIX, layout.decoder_layers)
  sources.update({name(canonical): (sd, key, None) for canonical, key in own.items()})
  return _View(sources), {name(canonical): keys for canonical, keys in aliases.items()}


def open_clip_visual_to_hf(sd: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """open_clip ``VisionTransformer`` keys under ``prefix`` -> HF ``CLIPVisionModel`` keys.

  ``attn.in_proj_weight`` [3D, D] (torch ``nn.MultiheadAttention``: queries, keys, values
  stacked) is split into ``q_proj``/``k_proj``/``v_proj``. Keys outside ``prefix`` are
  returned unchanged; keys inside it that are not open_clip's stay as they are, so the
  vision converter reports them.
  """
  top = {"conv1.weight": "embeddings.patch_embedding.weight",
         "class_embedding": "embeddings.class_embedding",
         "positional_embedding": "embeddings.position_embedding.weight"}
  blocks = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
            "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
  block_key = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")
  out: dict[str, Any] = {}
  for key, value in sd.items():
    if not key.startswith(prefix):
      out[key] = value
      continue
    rest = key[len(prefix):]
    if rest == "proj":
      continue
    if rest in top:
      out[prefix + top[rest]] = value
    elif rest.startswith(("ln_pre.", "ln_post.")):
      name = "pre_layrnorm." if rest.startswith("ln_pre.") else "post_layernorm."
      out[prefix + name + rest.split(".", 1)[1]] = value
    elif m := block_key.match(rest):
      layer, name = f"{prefix}encoder.layers.{m[1]}.", m[2]
      if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        suffix = name.rsplit("_", 1)[1]
        q, k, v = np_split3(value)
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
          out[f"{layer}self_attn.{part}.{suffix}"] = tensor
        continue
      for old, new in blocks.items():
        if name.startswith(old):
          out[layer + new + name[len(old):]] = value
          break
      else:
        out[key] = value
    else:
      out[key] = value
  return out


def np_split3(value: Any):
  """Three equal parts along the first axis (a torch tensor or an array)."""
  value = to_numpy(value)
  n = value.shape[0] // 3
  return value[:n], value[n:2 * n], value[2 * n:]


def flamingo_from_state_dict(
    sd: Mapping[str, Any],
    config: FlamingoConfig,
    *,
    vision_state_dict: Mapping[str, Any] | None = None,
    lm_state_dict: Mapping[str, Any] | None = None,
    lm_architecture: str = "LlamaForCausalLM",
) -> dict:
  """OpenFlamingo state_dict (torch tensors or numpy arrays) -> ``Flamingo(config)`` params.

  ``lm_architecture`` (``config.json``'s ``architectures[0]``) says how the LM's keys are
  named and where its layers are (``lm_layout``); ``vision_state_dict`` and
  ``lm_state_dict`` supply the towers a released checkpoint leaves out (module docstring).

  Returns a plain dict {"vision", "resampler", "decoder"} with the tree structure of
  ``nn.unbox(Flamingo(config).init(...)["params"])`` (the decoder's layers stacked when
  ``config.decoder.scan_layers``, see ``mmjax.models.scan_layout``).
  """
  layout = lm_layout(lm_architecture)
  consumed: set[str] = set()
  if VISION_PREFIX + "conv1.weight" in sd and vision_state_dict is None:  # open_clip layout
    original = [k for k in sd if k.startswith(VISION_PREFIX)]
    renamed = open_clip_visual_to_hf({k: sd[k] for k in original}, VISION_PREFIX)
    sd = _View({**{k: (sd, k, None) for k in sd if not k.startswith(VISION_PREFIX)},
                **{k: (renamed, k, None) for k in renamed}})
    consumed.update(original)
  if vision_state_dict is not None and "conv1.weight" in vision_state_dict:
    vision_state_dict = open_clip_visual_to_hf(vision_state_dict)

  if vision_state_dict is None:
    vision = hf_vision.clip_vision_from_state_dict(sd, config.vision, prefix=VISION_PREFIX)
  else:
    vision = hf_vision.clip_vision_from_state_dict(vision_state_dict, config.vision)
  consumed |= {k for k in sd if k.startswith(VISION_PREFIX)}  # read (it raises on any it cannot explain) or superseded

  resampler = of_convert.perceiver_from_state_dict(sd, config.resampler, used=consumed)

  indices = xattn_layer_indices(config)
  xattn = {}
  if indices:
    xattn = of_convert.gated_xattn_layers_from_state_dict(
        sd, xattn_config(config), layer_indices=indices,
        decoder_layers_prefix=f"{LM_PREFIX}{layout.decoder_layers}.", used=consumed)

  lm_sd, aliases = _lm_view(sd, lm_state_dict, layout, config.decoder.vocab_size)
  try:
    lm = layout.convert(lm_sd, config.decoder)  # raises on any key it cannot explain
  except ValueError as err:  # name the keys the state_dict gave as it spells them
    spelled = {canonical: keys[0] for canonical, keys in aliases.items()}
    raise ValueError(re.sub(r"[\w.]+", lambda m: spelled.get(m[0], m[0]), str(err))
                     + f" (the LM's own key names; those of the Flamingo state_dict under {LM_PREFIX!r})") from None
  for keys in aliases.values():
    consumed.update(keys)

  unexpected = sorted(k for k in sd if k not in consumed)
  if unexpected:
    raise ValueError(
        f"cannot convert an OpenFlamingo state_dict: unexpected keys ({len(unexpected)}), not"
        f" under {VISION_PREFIX!r}, 'perceiver.' or {LM_PREFIX!r} or not explained there: "
        + ", ".join(unexpected))
  decoder = {**lm, **xattn}
  if config.decoder.scan_layers:
    decoder = stack_layers(decoder, config)
  return {"vision": vision, "resampler": resampler, "decoder": decoder}


def _open_weights(path: str | os.PathLike) -> LazyStateDict:
  """A ``.safetensors`` file, or a ``torch.save`` state_dict read with
  ``torch.load(weights_only=True)`` only, as a lazily read state_dict."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is not a file; expected a .safetensors file or a torch.save state_dict")
  return LazyStateDict([SafetensorsFile(path) if path.endswith(".safetensors") else TorchFile(path)])


def _vision_view(weights: Mapping[str, Any]) -> Mapping[str, Any]:
  """The vision tower's keys of CLIP weights: a whole open_clip CLIP (``visual.*``, the text
  tower's keys dropped), a bare open_clip visual tower, or HF CLIP keys (left as they are)."""
  if "visual.conv1.weight" in weights:
    return _View({k[len("visual."):]: (weights, k, None) for k in weights if k.startswith("visual.")})
  return weights


def load_open_flamingo(
    checkpoint_pt: str | os.PathLike,
    lm_dir: str | os.PathLike,
    vision_weights: str | os.PathLike | Mapping[str, Any],
    preset: str | FlamingoConfig = "openflamingo-9b",
    *,
    scan_layers: bool = False,
    dtype: str = "float32",
) -> tuple[FlamingoConfig, dict]:
  """(FlamingoConfig, ``Flamingo`` params) of a released OpenFlamingo model.

  Args:
    checkpoint_pt: the model's ``checkpoint.pt`` (HF openflamingo/OpenFlamingo-*), a flat
      state_dict opened only with ``torch.load(weights_only=True, mmap=True)``.
    lm_dir: the LM it was trained over, as published (config.json + weights, e.g.
      anas-awadalla/mpt-7b, togethercomputer/RedPajama-INCITE-Base-3B-v1); its
      ``architectures[0]`` picks the importer (``lm_layout``).
    vision_weights: open_clip ViT-L/14 "openai" weights as a state_dict file
      (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``: the whole CLIP's
      ``visual.*`` keys are read), HF CLIP vision weights, or such a state_dict itself.
    preset: a preset name (``openflamingo-3b``, ``-4b``, ``-9b``) or a ``FlamingoConfig``:
      the vision tower (its tokens before ln_post, as trained), resampler, cross-attention
      interval and special ids; the decoder is read from ``lm_dir``'s config.json, with the
      vocabulary of the checkpoint's embedding table (else the preset's).
    scan_layers: stack the decoder's layers for ``DecoderConfig.scan_layers``.
    dtype: of the returned arrays.

  Raises:
    ValueError: an unsupported LM architecture or option (MPT-1B's attn_qk_ln among them,
      see ``mmjax.convert.mosaic_gpt``), a file that is not a plain state_dict, or keys
      that do not fit the config (one error listing every one).
  """
  config = presets_lib.presets()[preset] if isinstance(preset, str) and preset in presets_lib.presets() else preset
  if not isinstance(config, FlamingoConfig):
    raise ValueError(f"preset={preset!r}; expected a FlamingoConfig or one of {sorted(presets_lib.presets())}")
  hf_config = hf_lm.read_hf_config(lm_dir)
  architecture = (hf_config.get("architectures") or [None])[0]
  layout = lm_layout(architecture)
  checkpoint = _open_weights(checkpoint_pt)
  embedding = LM_PREFIX + layout.vocab_keys[0]
  vocab = checkpoint.shape(embedding)[0] if embedding in checkpoint else config.decoder.vocab_size
  decoder = layout.config(hf_config, vocab_size=vocab, scan_layers=scan_layers)
  config = dataclasses.replace(config, decoder=decoder)
  for field in ("media_token_id", "end_of_chunk_token_id"):
    if not 0 <= getattr(config, field) < vocab:
      raise ValueError(f"{field}={getattr(config, field)} is outside the vocabulary [0, {vocab}) of {checkpoint_pt}")
  vision = vision_weights if isinstance(vision_weights, Mapping) else _open_weights(vision_weights)
  params = flamingo_from_state_dict(checkpoint, config, vision_state_dict=_vision_view(vision),
                                    lm_state_dict=hf_lm.open_state_dict(lm_dir), lm_architecture=architecture)
  target = np.dtype(jnp.dtype(dtype))
  return config, _cast(params, target)


def _cast(tree: dict, dtype: np.dtype) -> dict:
  return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dtype, copy=False)
          for k, v in tree.items()}
