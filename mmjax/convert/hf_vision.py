"""HF ``CLIPVisionModel`` / ``SiglipVisionModel`` weights -> ``VisionTransformer`` params.

Entry points (all return plain nested dicts of float32 numpy arrays with the structure of
``nn.unbox(VisionTransformer(config).init(...)["params"])``):

  clip_vision_from_state_dict(state_dict, config, prefix=None)
  siglip_vision_from_state_dict(state_dict, config, prefix=None)
  load_clip_vision(paths, config, prefix=None)     # .safetensors file(s) or a directory
  load_siglip_vision(paths, config, prefix=None)
  config_from_hf_clip(config_json_dict, **overrides) -> ViTConfig
  config_from_hf_siglip(config_json_dict, **overrides) -> ViTConfig

Key layouts accepted, below ``prefix``: the bare keys transformers 5 saves for a vision model
(``embeddings.*``, ``encoder.layers.*``, ...), and the same keys under ``vision_model.`` (what
transformers 4 saved, and what ``CLIPModel``/``SiglipModel`` and ``*WithProjection`` save).
With ``prefix=None`` the ``vision_model.`` level is found on its own; with a prefix (say
``"vision_encoder.clip."`` for a CLIPVisionModel held as an attribute of an OpenFlamingo
vision encoder) only keys under it are read and a ``vision_model.`` level below it is also
found on its own. Keys outside the chosen prefix (text tower, projections, the rest of a
Flamingo) are ignored; keys inside it that the config does not explain raise, together with
missing and mis-shaped ones, one ValueError listing them all. Deliberately dropped: the
``embeddings.position_ids`` buffer older checkpoints hold, ``post_layernorm.*`` when
``config.post_norm`` is False (LLaVA-style penultimate features) and ``head.*`` when
``config.map_head`` is False.

The open_clip layout (``conv1``, ``transformer.resblocks.{i}``, ``ln_post``, ...: the
``vision_encoder.*`` of a whole OpenFlamingo model) is recognised by its ``conv1.weight`` and
read as well, by the same functions.

torch layouts: Linear weight [out, in] -> kernel [in, out] (q/k/v: [D, h, K], out: [h, K, D]);
Conv2d weight [D, C, p, p] -> kernel [p, p, C, D]; LayerNorm weight -> scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mmjax.convert.state_dict import to_numpy
from mmjax.models.vit import ViTConfig

_VISION_MODEL = "vision_model."
# Buffers some checkpoints hold that carry no parameter.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One torch key: where it goes in the param tree, its torch shape, and the layout change."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray]


def _linear_entries(torch_name: str, path: tuple[str, ...], d_in: int, d_out: int,
                    out_shape: tuple[int, ...] | None = None,
                    in_shape: tuple[int, ...] | None = None) -> dict[str, _Entry]:
  """A torch Linear ``torch_name.{weight,bias}`` -> ``path/{kernel,bias}``."""
  kernel_shape = (in_shape or (d_in,)) + (out_shape or (d_out,))
  return {
      f"{torch_name}.weight": _Entry(path + ("kernel",), (d_out, d_in),
                                     lambda w: w.T.reshape(kernel_shape)),
      f"{torch_name}.bias": _Entry(path + ("bias",), (d_out,),
                                   lambda b: b.reshape(out_shape or (d_out,))),
  }


def _norm_entries(torch_name: str, path: tuple[str, ...], d: int) -> dict[str, _Entry]:
  ident = lambda x: x  # noqa: E731
  return {f"{torch_name}.weight": _Entry(path + ("scale",), (d,), ident),
          f"{torch_name}.bias": _Entry(path + ("bias",), (d,), ident)}


def _packed_qkv_entries(torch_name: str, path: tuple[str, ...], d: int, h: int, k: int) -> dict[str, _Entry]:
  """torch.nn.MultiheadAttention's in_proj_{weight [3D, D], bias [3D]} -> query/key/value."""
  # Each torch key feeds three params: "*" in the path stands for the names of the dict
  # that convert returns.
  def split_weight(w):
    return {n: w[i * d:(i + 1) * d].T.reshape(d, h, k) for i, n in enumerate(("query", "key", "value"))}
  def split_bias(b):
    return {n: b[i * d:(i + 1) * d].reshape(h, k) for i, n in enumerate(("query", "key", "value"))}
  return {
      f"{torch_name}.in_proj_weight": _Entry(path + ("*", "kernel"), (3 * d, d), split_weight),
      f"{torch_name}.in_proj_bias": _Entry(path + ("*", "bias"), (3 * d,), split_bias),
  }


def _expected(config: ViTConfig) -> dict[str, _Entry]:
  """Every torch key (below the vision prefix) the config needs, with its destination."""
  cfg = config.validate()
  if cfg.posemb != "learned":
    raise ValueError(f"config.posemb={cfg.posemb!r}: HF CLIP/SigLIP checkpoints hold learned "
                     "position embeddings, expected 'learned'")
  d, p, f = cfg.width, cfg.patch_size, cfg.mlp_dim
  h, k = cfg.num_heads, cfg.width // cfg.num_heads
  ident = lambda x: x  # noqa: E731
  e: dict[str, _Entry] = {
      "embeddings.patch_embedding.weight": _Entry(
          ("patch_embed", "kernel"), (d, 3, p, p), lambda w: w.transpose(2, 3, 1, 0)),
      "embeddings.position_embedding.weight": _Entry(("pos_embedding",), (cfg.num_tokens, d), ident),
  }
  if cfg.patch_bias:
    e["embeddings.patch_embedding.bias"] = _Entry(("patch_embed", "bias"), (d,), ident)
  if cfg.class_token:
    e["embeddings.class_embedding"] = _Entry(("cls_token",), (d,), ident)
  if cfg.pre_norm:
    e.update(_norm_entries("pre_layrnorm", ("pre_norm",), d))
  for i in range(cfg.depth):
    t, m = f"encoder.layers.{i}", (f"layers_{i}",)
    e.update(_norm_entries(f"{t}.layer_norm1", m + ("norm1",), d))
    e.update(_norm_entries(f"{t}.layer_norm2", m + ("norm2",), d))
    for tn, mn in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      e.update(_linear_entries(f"{t}.self_attn.{tn}", m + ("attn", mn), d, d, out_shape=(h, k)))
    e.update(_linear_entries(f"{t}.self_attn.out_proj", m + ("attn", "out"), d, d, in_shape=(h, k)))
    e.update(_linear_entries(f"{t}.mlp.fc1", m + ("mlp", "fc1"), d, f))
    e.update(_linear_entries(f"{t}.mlp.fc2", m + ("mlp", "fc2"), f, d))
  if cfg.post_norm:
    e.update(_norm_entries("post_layernorm", ("post_norm",), d))
  if cfg.map_head:
    e["head.probe"] = _Entry(("head", "probe"), (1, 1, d), lambda x: x.reshape(1, d))
    e.update(_packed_qkv_entries("head.attention", ("head",), d, h, k))
    e.update(_linear_entries("head.attention.out_proj", ("head", "out"), d, d, in_shape=(h, k)))
    e.update(_norm_entries("head.layernorm", ("head", "norm"), d))
    e.update(_linear_entries("head.mlp.fc1", ("head", "mlp", "fc1"), d, f))
    e.update(_linear_entries("head.mlp.fc2", ("head", "mlp", "fc2"), f, d))
  return e


def _expected_open_clip(config: ViTConfig) -> dict[str, _Entry]:
  """The same map for open_clip's ``VisionTransformer`` (OpenFlamingo's ``vision_encoder``).

  conv1 / class_embedding / positional_embedding / ln_pre / transformer.resblocks.{i}
  {ln_1, attn (packed in_proj), ln_2, mlp.c_fc, mlp.c_proj} / ln_post; ``proj`` (the
  contrastive projection of the pooled token) is not part of the tower and is dropped.
  """
  cfg = config.validate()
  if cfg.posemb != "learned" or not cfg.class_token or not cfg.pre_norm or cfg.map_head:
    raise ValueError("open_clip ViTs have a CLS token, learned position embeddings, ln_pre and "
                     f"no MAP head; got class_token={cfg.class_token}, posemb={cfg.posemb!r}, "
                     f"pre_norm={cfg.pre_norm}, map_head={cfg.map_head}")
  d, p, f = cfg.width, cfg.patch_size, cfg.mlp_dim
  h, k = cfg.num_heads, cfg.width // cfg.num_heads
  ident = lambda x: x  # noqa: E731
  e: dict[str, _Entry] = {
      "conv1.weight": _Entry(("patch_embed", "kernel"), (d, 3, p, p), lambda w: w.transpose(2, 3, 1, 0)),
      "class_embedding": _Entry(("cls_token",), (d,), ident),
      "positional_embedding": _Entry(("pos_embedding",), (cfg.num_tokens, d), ident),
  }
  if cfg.patch_bias:
    e["conv1.bias"] = _Entry(("patch_embed", "bias"), (d,), ident)
  e.update(_norm_entries("ln_pre", ("pre_norm",), d))
  for i in range(cfg.depth):
    t, m = f"transformer.resblocks.{i}", (f"layers_{i}",)
    e.update(_norm_entries(f"{t}.ln_1", m + ("norm1",), d))
    e.update(_norm_entries(f"{t}.ln_2", m + ("norm2",), d))
    e.update(_packed_qkv_entries(f"{t}.attn", m + ("attn",), d, h, k))
    e.update(_linear_entries(f"{t}.attn.out_proj", m + ("attn", "out"), d, d, in_shape=(h, k)))
    e.update(_linear_entries(f"{t}.mlp.c_fc", m + ("mlp", "fc1"), d, f))
    e.update(_linear_entries(f"{t}.mlp.c_proj", m + ("mlp", "fc2"), f, d))
  if cfg.post_norm:
    e.update(_norm_entries("ln_post", ("post_norm",), d))
  return e


def _dropped(key: str, config: ViTConfig) -> bool:
  """Keys a checkpoint may hold that this config deliberately does without."""
  return (key.endswith(_IGNORED_SUFFIXES)
          or key == "proj"  # open_clip's contrastive projection
          or (not config.post_norm and key.startswith(("post_layernorm.", "ln_post.")))
          or (not config.map_head and key.startswith("head.")))


def is_open_clip_layout(keys: Iterable[str], prefix: str = "") -> bool:
  """Whether the vision keys under prefix follow open_clip (``conv1.weight``) rather than HF."""
  keys = set(keys)
  return prefix + "conv1.weight" in keys and prefix + "embeddings.patch_embedding.weight" not in keys


def resolve_prefix(keys: Iterable[str], prefix: str | None) -> str:
  """The prefix under which the vision keys live (see the module docstring)."""
  keys = list(keys)
  base = prefix or ""
  if any(key.startswith(base + _VISION_MODEL) for key in keys):
    return base + _VISION_MODEL
  return base


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def vit_from_state_dict(state_dict: Mapping[str, Any], config: ViTConfig, *,
                        prefix: str | None = None) -> dict:
  """Params of ``VisionTransformer(config)`` from an HF CLIP or SigLIP vision state_dict.

  An open_clip ``VisionTransformer`` state_dict (what a whole OpenFlamingo model holds under
  ``vision_encoder.``) is recognised by its ``conv1.weight`` and read with that layout.
  """
  if config.stem != "patch":
    raise ValueError(f"config.stem={config.stem!r}: CLIP and SigLIP checkpoints have a "
                     "patch-embedding stem, expected 'patch'")
  full_prefix = resolve_prefix(state_dict.keys(), prefix)
  present = {key[len(full_prefix):]: key for key in state_dict if key.startswith(full_prefix)}
  open_clip = is_open_clip_layout(present)
  expected = _expected_open_clip(config) if open_clip else _expected(config)
  missing = sorted(full_prefix + key for key in expected if key not in present)
  unexpected = sorted(full_key for key, full_key in present.items()
                      if key not in expected and not _dropped(key, config))
  misshaped = []
  params: dict = {}
  for key, entry in expected.items():
    if key not in present:
      continue
    value = to_numpy(state_dict[present[key]])
    if tuple(value.shape) != entry.shape:
      misshaped.append(f"{present[key]}: {tuple(value.shape)}, expected {entry.shape}")
      continue
    converted = entry.convert(value)
    if "*" in entry.path:  # a packed torch tensor feeding several params
      for name, part in converted.items():
        _set(params, entry.path[:-2] + (name, entry.path[-1]), part)
    else:
      _set(params, entry.path, converted)
  if missing or unexpected or misshaped:
    if not present:
      hint = (f"no key starts with {full_prefix!r}; the state_dict's keys start with "
              f"{sorted({k.split('.')[0] + '.' for k in state_dict})[:8]}")
    else:
      hint = ""
    raise ValueError(
        f"{'open_clip' if open_clip else 'HF'} vision state_dict does not match the ViT config "
        f"(width={config.width}, depth={config.depth}, image_size={config.image_size}, "
        f"patch_size={config.patch_size}): "
        f"missing keys {missing}; unexpected keys {unexpected}; mis-shaped keys {misshaped}"
        + (f"; {hint}" if hint else ""))
  return params


def clip_vision_from_state_dict(state_dict: Mapping[str, Any], config: ViTConfig, *,
                                prefix: str | None = None) -> dict:
  """Params from a ``CLIPVisionModel`` (or ``CLIPModel``) state_dict; see the module docstring."""
  if not config.class_token or config.map_head:
    raise ValueError(f"CLIP vision configs have a CLS token and no pooling head, got "
                     f"class_token={config.class_token}, map_head={config.map_head}")
  return vit_from_state_dict(state_dict, config, prefix=prefix)


def siglip_vision_from_state_dict(state_dict: Mapping[str, Any], config: ViTConfig, *,
                                  prefix: str | None = None) -> dict:
  """Params from a ``SiglipVisionModel`` (or ``SiglipModel``) state_dict."""
  if config.class_token or config.pre_norm:
    raise ValueError(f"SigLIP vision configs have no CLS token and no pre-norm, got "
                     f"class_token={config.class_token}, pre_norm={config.pre_norm}")
  return vit_from_state_dict(state_dict, config, prefix=prefix)


# ------------------------------------------------------------------------------ files

def safetensors_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  """A file, a directory of ``*.safetensors`` shards, or a list of files -> sorted file list."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files: list[str] = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not shards:
        raise ValueError(f"directory {path!r} holds no .safetensors file")
      files += [os.path.join(path, f) for f in shards]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise ValueError(f"{path!r} is neither a .safetensors file nor a directory")
  return files


def _read_raw(path: str, key: str) -> np.ndarray:
  """One tensor read from the file's header offsets: for dtypes numpy lacks (bfloat16)."""
  import ml_dtypes  # ships with jax
  dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2}
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    info = json.loads(f.read(n))[key]
    start, end = info["data_offsets"]
    f.seek(8 + n + start)
    data = f.read(end - start)
  if info["dtype"] not in dtypes:
    raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which cannot be read")
  return np.frombuffer(data, dtype=dtypes[info["dtype"]]).reshape(info["shape"]).astype(np.float32)


def read_safetensors(paths, keep: Callable[[str], bool] = lambda key: True) -> dict[str, np.ndarray]:
  """The tensors of one or several ``.safetensors`` files whose key passes ``keep``."""
  from safetensors import safe_open

  state_dict: dict[str, np.ndarray] = {}
  for path in safetensors_paths(paths):
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        if not keep(key):
          continue
        try:
          state_dict[key] = f.get_tensor(key)
        except TypeError:  # numpy has no bfloat16
          state_dict[key] = _read_raw(path, key)
  return state_dict


def _load(paths, config: ViTConfig, prefix: str | None, convert) -> dict:
  from safetensors import safe_open

  keys = []
  for path in safetensors_paths(paths):
    with safe_open(path, framework="numpy") as f:
      keys += list(f.keys())
  full_prefix = resolve_prefix(keys, prefix)
  # Read only the vision tower's tensors (a CLIPModel file also holds the text tower).
  state_dict = read_safetensors(paths, lambda key: key.startswith(full_prefix))
  if not state_dict:
    raise ValueError(f"no tensor of {paths!r} has a key starting with {full_prefix!r}")
  return convert(state_dict, config, prefix=full_prefix)


def load_clip_vision(paths, config: ViTConfig, *, prefix: str | None = None) -> dict:
  """Params from ``CLIPVisionModel``/``CLIPModel`` ``.safetensors`` file(s) or their directory."""
  return _load(paths, config, prefix, clip_vision_from_state_dict)


def load_siglip_vision(paths, config: ViTConfig, *, prefix: str | None = None) -> dict:
  """Params from ``SiglipVisionModel``/``SiglipModel`` ``.safetensors`` file(s) or their directory."""
  return _load(paths, config, prefix, siglip_vision_from_state_dict)


# ------------------------------------------------------------------------------ configs

_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def _vision_dict(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
  """The vision part of a ``config.json`` dict (a full CLIPConfig nests it)."""
  return hf_config.get("vision_config", hf_config)


def _common_fields(v: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
  get = lambda name: v.get(name, defaults[name])  # noqa: E731
  if get("num_channels") != 3:
    raise ValueError(f"num_channels={get('num_channels')}, expected 3 (RGB)")
  act = get("hidden_act")
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"hidden_act={act!r}, expected one of {sorted(_HF_ACTIVATIONS)}")
  return dict(
      image_size=get("image_size"), patch_size=get("patch_size"), width=get("hidden_size"),
      depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
      mlp_dim=get("intermediate_size"), activation=_HF_ACTIVATIONS[act],
      norm_eps=float(get("layer_norm_eps")))


# Defaults of transformers' CLIPVisionConfig / SiglipVisionConfig, for keys a config.json omits.
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)


def config_from_hf_clip(hf_config: Mapping[str, Any], **overrides) -> ViTConfig:
  """ViTConfig from a CLIP ``config.json`` dict (CLIPVisionConfig, or CLIPConfig's vision part).

  ``overrides`` set other fields, e.g. ``output_layer=-2`` (LLaVA) or ``dtype="bfloat16"``.
  Image mean/std are OpenAI CLIP's (they live in preprocessor_config.json, not here).
  """
  fields = _common_fields(_vision_dict(hf_config), _CLIP_DEFAULTS)
  fields.update(class_token=True, posemb="learned", pre_norm=True, post_norm=True,
                patch_bias=False, map_head=False)
  return ViTConfig(**{**fields, **overrides}).validate()


def config_from_hf_siglip(hf_config: Mapping[str, Any], **overrides) -> ViTConfig:
  """ViTConfig from a SigLIP ``config.json`` dict (SiglipVisionConfig, or SiglipConfig's part)."""
  v = _vision_dict(hf_config)
  fields = _common_fields(v, _SIGLIP_DEFAULTS)
  fields.update(class_token=False, posemb="learned", pre_norm=False, post_norm=True,
                patch_bias=True, map_head=bool(v.get("vision_use_head", True)),
                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
  return ViTConfig(**{**fields, **overrides}).validate()
