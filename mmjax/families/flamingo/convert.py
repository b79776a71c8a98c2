"""A whole OpenFlamingo ``Flamingo`` state_dict -> ``Flamingo`` params.

The state_dict of ``open_flamingo.src.flamingo.Flamingo`` over a LLaMA-architecture HF LM
holds (torch layouts; see each converter's docstring):

- ``vision_encoder.*``: the vision tower (``Flamingo.vision_encoder = vision_encoder.visual``),
  read by ``mmjax.convert.hf_vision.clip_vision_from_state_dict`` under that prefix. Two
  layouts are accepted: HF ``CLIPVisionModel`` keys, and open_clip's ``VisionTransformer``
  keys (what OpenFlamingo releases hold: ``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_*,
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``), renamed by
  :func:`open_clip_visual_to_hf` (``proj``, the pooled projection Flamingo never uses, is
  dropped).
- ``perceiver.*`` and ``lang_encoder.gated_cross_attn_layers.{i}.*``: the bridge, read by
  ``mmjax.families.flamingo.convert_bridge``.
- ``lang_encoder.*``: the LM. After ``FlamingoLMMixin.init_flamingo`` each decoder layer is
  wrapped in a ``FlamingoLayer``, so layer i's weights appear as
  ``lang_encoder.model.layers.{i}.decoder_layer.*`` and again, the same tensors, as
  ``lang_encoder.old_decoder_blocks.{i}.*``; the cross-attention blocks appear again as
  ``lang_encoder.model.layers.{i}.gated_cross_attn_layer.*``. Either spelling is read (plain
  ``lang_encoder.model.layers.{i}.*`` too, for an LM state_dict saved before wrapping); the
  aliases count as consumed.

Released OpenFlamingo ``checkpoint.pt`` files hold only the trained parts; give the frozen
towers' state_dicts separately (``vision_state_dict``: an HF CLIP vision state_dict, keys as
``hf_vision`` accepts with no prefix; ``lm_state_dict``: an HF ``LlamaForCausalLM``
state_dict) and they are read from there instead (keys of those parts in ``sd`` are then
ignored).

Missing, unexpected or mis-shaped keys raise one ``ValueError`` per part, listing them all;
keys under none of the known prefixes are unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mmjax.convert import hf_llama, hf_vision
from mmjax.convert.state_dict import to_numpy
from mmjax.families.flamingo import convert_bridge as of_convert
from mmjax.families.flamingo.model import FlamingoConfig, stack_layers, xattn_config, xattn_layer_indices

VISION_PREFIX = "vision_encoder."
LM_PREFIX = "lang_encoder."

_WRAPPED_LAYER = re.compile(r"^(?P<pre>.*?)model\.layers\.(?P<i>\d+)\.decoder_layer\.(?P<rest>.*)$")
_OLD_BLOCK = re.compile(r"^(?P<pre>.*?)old_decoder_blocks\.(?P<i>\d+)\.(?P<rest>.*)$")


def _unwrap_lm_keys(sd: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """LM keys under ``prefix`` with FlamingoLayer wrapping undone: (state_dict, aliases).

  ``aliases`` maps each canonical key (``{prefix}model.layers.{i}.X``) to the original keys
  it stands for, so that consumed canonical keys mark all their spellings used.
  """
  out: dict[str, Any] = {}
  aliases: dict[str, list[str]] = {}
  # Wrapped keys first, then old_decoder_blocks (the same tensors) only where missing.
  ordered = sorted((k for k in sd if k.startswith(prefix)),
                   key=lambda k: 1 if _OLD_BLOCK.match(k[len(prefix):]) else 0)
  for key in ordered:
    rest = key[len(prefix):]
    if ".gated_cross_attn_layer." in rest or rest.startswith("gated_cross_attn_layers."):
      continue  # the bridge converter's
    m = _WRAPPED_LAYER.match(rest) or _OLD_BLOCK.match(rest)
    canonical = f"{prefix}{m['pre']}model.layers.{m['i']}.{m['rest']}" if m else key
    aliases.setdefault(canonical, []).append(key)
    out.setdefault(canonical, sd[key])
  return out, aliases


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
) -> dict:
  """OpenFlamingo state_dict (torch tensors or numpy arrays) -> ``Flamingo(config)`` params.

  Returns a plain dict {"vision", "resampler", "decoder"} with the tree structure of
  ``nn.unbox(Flamingo(config).init(...)["params"])`` (the decoder's layers stacked when
  ``config.decoder.scan_layers``, see ``mmjax.models.scan_layout``).
  """
  consumed: set[str] = set()
  if VISION_PREFIX + "conv1.weight" in sd:  # open_clip layout
    original = [k for k in sd if k.startswith(VISION_PREFIX)]
    sd = open_clip_visual_to_hf(sd, VISION_PREFIX)
    consumed.update(original)
  if vision_state_dict is not None and "conv1.weight" in vision_state_dict:
    vision_state_dict = open_clip_visual_to_hf(vision_state_dict)

  if vision_state_dict is None:
    vision = hf_vision.clip_vision_from_state_dict(sd, config.vision, prefix=VISION_PREFIX)
    consumed |= {k for k in sd if k.startswith(VISION_PREFIX)}  # it raises on any it cannot explain
  else:
    vision = hf_vision.clip_vision_from_state_dict(vision_state_dict, config.vision)
    consumed |= {k for k in sd if k.startswith(VISION_PREFIX)}  # superseded, ignored

  resampler = of_convert.perceiver_from_state_dict(sd, config.resampler, used=consumed)

  indices = xattn_layer_indices(config)
  xattn = {}
  if indices:
    xattn = of_convert.gated_xattn_layers_from_state_dict(
        sd, xattn_config(config), layer_indices=indices,
        decoder_layers_prefix=LM_PREFIX + "model.layers.", used=consumed)

  if lm_state_dict is None:
    lm_sd, aliases = _unwrap_lm_keys(sd, LM_PREFIX)
    lm_prefix = LM_PREFIX
  else:
    lm_sd, aliases = _unwrap_lm_keys(lm_state_dict, "")
    lm_prefix = ""
  lm_used: set[str] = set()
  lm = hf_llama.llama_from_state_dict(lm_sd, config.decoder, prefix=lm_prefix, used=lm_used)
  if lm_state_dict is None:
    for key in lm_used:
      consumed.update(aliases.get(key, [key]))
  else:  # superseded, ignored (the bridge's keys among them were consumed above)
    consumed |= {k for k in sd if k.startswith(LM_PREFIX) and "gated_cross_attn_layer" not in k}

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
