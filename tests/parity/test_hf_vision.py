"""Parity of VisionTransformer with HF CLIPVisionModel / SiglipVisionModel after importing their
saved safetensors, plus the converter's key handling (prefixes, dropped heads, error listing).

Reference models are tiny, random (torch.manual_seed) and built from local configs; every
parameter is perturbed so LayerNorm scales and biases are not the trivial 1 and 0.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_vision
from mmjax.models import vit
from tests.parity.conftest import seed_torch, state_dict_to_numpy, to_numpy

pytestmark = pytest.mark.parity

TOL = 1e-4

CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# 18 px with 4 px patches: the conv drops the last 2 pixels, as So400m/14 at 384 px does.
SIGLIP_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   image_size=18, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   vision_use_head=True)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _saved(model_cls, config_cls, kwargs, path):
  seed_torch(0)
  model = _perturb(model_cls(config_cls(**kwargs)))
  model.save_pretrained(path, safe_serialization=True)
  with open(path / "config.json") as f:
    hf_config = json.load(f)
  return model, hf_config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip")
  model, hf_config = _saved(transformers.CLIPVisionModel, transformers.CLIPVisionConfig, CLIP_TINY, path)
  return model, hf_config, path


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  path = tmp_path_factory.mktemp("siglip")
  model, hf_config = _saved(transformers.SiglipVisionModel, transformers.SiglipVisionConfig, SIGLIP_TINY, path)
  return model, hf_config, path


def _images(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _hf(model, images: np.ndarray):
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return to_numpy(out)


@functools.cache
def _features_fn(config: vit.ViTConfig):
  model = vit.VisionTransformer(config)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=vit.VisionTransformer.features))


def _ours(config: vit.ViTConfig, params, images: np.ndarray) -> dict:
  return _features_fn(config)(params, jnp.asarray(images))


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def test_clip_vision_matches_hf_after_safetensors_import(clip):
  model, hf_config, path = clip
  config = hf_vision.config_from_hf_clip(hf_config)
  params = hf_vision.load_clip_vision(path / "model.safetensors", config)
  images = _images(16)
  ref, ours = _hf(model, images), _ours(config, params, images)
  assert _maxdiff(ours["hidden_states"][-1], ref["last_hidden_state"]) <= TOL
  assert _maxdiff(ours["pooled"], ref["pooler_output"]) <= TOL
  assert _maxdiff(ours["hidden_states"][-2], ref["hidden_states"][-2]) <= TOL
  # OpenFlamingo's features: ln_post over every token (the tokens __call__ returns).
  with torch.no_grad():
    post = to_numpy(model.post_layernorm(torch.from_numpy(ref["last_hidden_state"])))
  assert _maxdiff(ours["tokens"], post) <= TOL


def test_clip_penultimate_layer_without_post_norm_gives_hf_hidden_states_minus_two(clip):
  model, hf_config, path = clip
  config = hf_vision.config_from_hf_clip(hf_config, output_layer=-2, post_norm=False)
  # post_layernorm is dropped on purpose: LLaVA-style features never use it.
  params = hf_vision.load_clip_vision(path, config)
  assert "post_norm" not in params
  images = _images(16)
  tokens = _ours(config, params, images)["tokens"]
  assert _maxdiff(tokens, _hf(model, images)["hidden_states"][-2]) <= TOL


def test_siglip_vision_matches_hf_after_safetensors_import(siglip):
  model, hf_config, path = siglip
  config = hf_vision.config_from_hf_siglip(hf_config)
  assert config.map_head and not config.class_token
  params = hf_vision.load_siglip_vision(path, config)
  images = _images(18)
  ref, ours = _hf(model, images), _ours(config, params, images)
  assert _maxdiff(ours["tokens"], ref["last_hidden_state"]) <= TOL
  assert _maxdiff(ours["pooled"], ref["pooler_output"]) <= TOL
  assert _maxdiff(ours["hidden_states"][-2], ref["hidden_states"][-2]) <= TOL


def test_siglip_head_keys_are_dropped_when_the_config_has_no_head(siglip):
  model, hf_config, path = siglip
  config = hf_vision.config_from_hf_siglip(hf_config, map_head=False)
  params = hf_vision.load_siglip_vision(path, config)
  assert "head" not in params
  images = _images(18)
  tokens = _ours(config, params, images)["tokens"]
  assert _maxdiff(tokens, _hf(model, images)["last_hidden_state"]) <= TOL


def test_converted_tree_has_the_structure_and_shapes_of_init(clip, siglip):
  for (_, hf_config, path), to_config, load in (
      (clip, hf_vision.config_from_hf_clip, hf_vision.load_clip_vision),
      (siglip, hf_vision.config_from_hf_siglip, hf_vision.load_siglip_vision)):
    config = to_config(hf_config)
    size = config.image_size
    init = jax.eval_shape(vit.VisionTransformer(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(init["params"]))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), load(path, config))
    assert got == expected


def test_vision_model_prefix_of_a_clip_model_checkpoint_is_found_and_text_keys_ignored(clip):
  model, hf_config, _ = clip
  config = hf_vision.config_from_hf_clip(hf_config)
  direct = hf_vision.clip_vision_from_state_dict(state_dict_to_numpy(model), config)
  sd = {f"vision_model.{k}": v for k, v in model.state_dict().items()}
  sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
  sd["visual_projection.weight"] = torch.zeros(4, 32)
  sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
  jax.tree.map(np.testing.assert_array_equal, hf_vision.clip_vision_from_state_dict(sd, config), direct)


def test_clip_wrapped_in_a_flamingo_vision_encoder_is_read_with_a_prefix(clip):
  model, hf_config, _ = clip

  class Encoder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.clip = model

  class Flamingo(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.vision_encoder = Encoder()
      self.perceiver = torch.nn.Linear(2, 2)

  config = hf_vision.config_from_hf_clip(hf_config)
  direct = hf_vision.clip_vision_from_state_dict(state_dict_to_numpy(model), config)
  sd = Flamingo().state_dict()
  got = hf_vision.clip_vision_from_state_dict(sd, config, prefix="vision_encoder.clip.")
  jax.tree.map(np.testing.assert_array_equal, got, direct)
  # The transformers-4 layout (a vision_model level below the prefix) is read the same way.
  sd4 = {k.replace("vision_encoder.clip.", "vision_encoder.clip.vision_model."): v for k, v in sd.items()}
  got4 = hf_vision.clip_vision_from_state_dict(sd4, config, prefix="vision_encoder.clip.")
  jax.tree.map(np.testing.assert_array_equal, got4, direct)


def test_missing_unexpected_and_misshaped_keys_are_listed_in_one_error(clip):
  model, hf_config, _ = clip
  config = hf_vision.config_from_hf_clip(hf_config)
  sd = state_dict_to_numpy(model)
  del sd["encoder.layers.1.mlp.fc1.bias"]
  sd["encoder.layers.7.mlp.fc1.bias"] = np.zeros(64, np.float32)
  sd["pre_layrnorm.weight"] = np.zeros(31, np.float32)
  with pytest.raises(ValueError) as err:
    hf_vision.clip_vision_from_state_dict(sd, config)
  message = str(err.value)
  assert "encoder.layers.1.mlp.fc1.bias" in message.split("unexpected")[0]  # missing
  assert "encoder.layers.7.mlp.fc1.bias" in message.split("unexpected")[1]  # unexpected
  assert "pre_layrnorm.weight: (31,), expected (32,)" in message


def test_a_config_of_another_size_is_rejected_with_every_mismatch(clip):
  model, hf_config, _ = clip
  config = hf_vision.config_from_hf_clip(hf_config, depth=2, image_size=20)
  with pytest.raises(ValueError, match=r"encoder\.layers\.2\..*position_embedding\.weight: \(17, 32\), expected \(26, 32\)"):
    hf_vision.clip_vision_from_state_dict(state_dict_to_numpy(model), config)


def test_a_config_with_a_convolutional_stem_is_refused(clip):
  model, hf_config, _ = clip
  config = hf_vision.config_from_hf_clip(hf_config, stem="conv")
  with pytest.raises(ValueError, match="config.stem='conv': .* expected 'patch'"):
    hf_vision.clip_vision_from_state_dict(state_dict_to_numpy(model), config)


def test_bfloat16_safetensors_are_read_as_float32(tmp_path, clip):
  model, hf_config, _ = clip
  bf16 = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_TINY))
  bf16.load_state_dict(model.state_dict())
  bf16.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
  params = hf_vision.load_clip_vision(tmp_path, hf_vision.config_from_hf_clip(hf_config))
  want = model.state_dict()["embeddings.position_embedding.weight"].to(torch.bfloat16).float().numpy()
  assert params["pos_embedding"].dtype == np.float32
  np.testing.assert_array_equal(params["pos_embedding"], want)


@pytest.mark.parametrize("preset,hf_cls,hf_config", [
    (vit.CLIP_VIT_L14, transformers.CLIPVisionModel, transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14)),
    (vit.SIGLIP_SO400M_14_384, transformers.SiglipVisionModel, transformers.SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14)),
])
def test_preset_parameter_count_equals_the_hf_model_on_the_meta_device(preset, hf_cls, hf_config):
  with torch.device("meta"):
    reference = hf_cls(hf_config)
  assert vit.count_params(preset) == sum(p.numel() for p in reference.parameters())
  to_config = hf_vision.config_from_hf_clip if preset.class_token else hf_vision.config_from_hf_siglip
  assert to_config(hf_config.to_dict()) == preset


@pytest.mark.parametrize("family,height,width", [("clip", 24, 20), ("siglip", 12, 12), ("siglip", 26, 30)])
def test_other_resolutions_match_hf_interpolate_pos_encoding(clip, siglip, family, height, width):
  model, hf_config, path = clip if family == "clip" else siglip
  if family == "clip":
    config = hf_vision.config_from_hf_clip(hf_config)
    params = hf_vision.load_clip_vision(path, config)
  else:
    config = hf_vision.config_from_hf_siglip(hf_config)
    params = hf_vision.load_siglip_vision(path, config)
  images = np.random.default_rng(2).normal(size=(2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    ref = to_numpy(model(torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True))
  ours = _ours(config, params, images)
  last = ours["hidden_states"][-1] if family == "clip" else ours["tokens"]
  assert _maxdiff(last, ref["last_hidden_state"]) <= TOL
  assert _maxdiff(ours["pooled"], ref["pooler_output"]) <= TOL


class _OpenClipBlock(torch.nn.Module):
  """open_clip's ResidualAttentionBlock (no layer scale), with its attribute names."""

  def __init__(self, d: int, heads: int, mlp: int):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(d)
    self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.ln_2 = torch.nn.LayerNorm(d)
    self.mlp = torch.nn.Sequential(collections.OrderedDict(
        c_fc=torch.nn.Linear(d, mlp), gelu=transformers.activations.QuickGELUActivation(),
        c_proj=torch.nn.Linear(mlp, d)))

  def forward(self, x):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class _OpenClipVisual(torch.nn.Module):
  """open_clip's VisionTransformer as OpenFlamingo calls it: visual(x) -> (pooled, tokens)."""

  def __init__(self, d=32, heads=4, mlp=64, depth=2, image=16, patch=4, out=24):
    super().__init__()
    grid = image // patch
    self.conv1 = torch.nn.Conv2d(3, d, patch, stride=patch, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(d))
    self.positional_embedding = torch.nn.Parameter(0.1 * torch.randn(grid * grid + 1, d))
    self.ln_pre = torch.nn.LayerNorm(d)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList([_OpenClipBlock(d, heads, mlp) for _ in range(depth)])
    self.ln_post = torch.nn.LayerNorm(d)
    self.proj = torch.nn.Parameter(torch.randn(d, out))

  def forward(self, x):
    x = self.conv1(x).flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    for block in self.transformer.resblocks:
      x = block(x)
    x = self.ln_post(x)
    return x[:, 0] @ self.proj, x[:, 1:]


def test_open_clip_vision_encoder_of_a_whole_open_flamingo_is_read_and_matches():
  seed_torch(0)
  visual = _perturb(_OpenClipVisual())
  holder = torch.nn.Module()
  holder.vision_encoder = visual  # open_flamingo's Flamingo keeps vision_encoder.visual here
  holder.perceiver = torch.nn.Linear(2, 2)
  config = dataclasses.replace(vit.VIT_TINY, image_size=16, width=32, mlp_dim=64, num_heads=4)
  sd = holder.state_dict()
  assert hf_vision.is_open_clip_layout(sd, "vision_encoder.")
  params = hf_vision.clip_vision_from_state_dict(sd, config, prefix="vision_encoder.")
  images = _images(16)
  with torch.no_grad():
    _, want = to_numpy(visual(torch.from_numpy(images.transpose(0, 3, 1, 2))))
  ours = _ours(config, params, images)
  assert _maxdiff(ours["tokens"][:, 1:], want) <= TOL
  del sd["vision_encoder.transformer.resblocks.1.attn.in_proj_bias"]
  with pytest.raises(ValueError, match=r"open_clip .*missing keys \['vision_encoder\.transformer\.resblocks\.1\.attn\.in_proj_bias'\]"):
    hf_vision.clip_vision_from_state_dict(sd, config, prefix="vision_encoder.")
