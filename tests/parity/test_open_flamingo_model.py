"""Parity: a whole OpenFlamingo ``Flamingo`` (tiny CLIP vision tower, its PerceiverResampler,
a tiny LlamaForCausalLM with gated cross-attention every 2nd layer) gives the logits of our
``Flamingo`` after converting its state_dict, for an interleaved batch with two images."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.families.flamingo import convert as flamingo_convert
from mmjax.convert import hf_llama, hf_vision
from mmjax.families.flamingo.model import Flamingo, FlamingoConfig
from mmjax.models.perceiver import PerceiverConfig
from tests.parity.conftest import import_open_flamingo

pytestmark = pytest.mark.parity

VOCAB, MEDIA, EOC = 61, 59, 60


class _Visual(transformers.CLIPVisionModel):
  """open_clip's ``visual(x)`` contract: (pooled, patch tokens after ln_post, CLS dropped)."""

  def forward(self, pixel_values):  # pylint: disable=arguments-differ
    hidden = super().forward(pixel_values=pixel_values).last_hidden_state
    hidden = self.post_layernorm(hidden)
    return hidden[:, 0], hidden[:, 1:]


class _VisionEncoder(torch.nn.Module):
  def __init__(self, config):
    super().__init__()
    self.visual = _Visual(config)


def _reference(only_immediate: bool = True):
  of = import_open_flamingo()
  torch.manual_seed(0)
  clip_config = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=28, patch_size=7)
  lm_config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
      rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
  lm = transformers.LlamaForCausalLM(lm_config)
  of.utils.extend_instance(lm, of.flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")
  model = of.flamingo.Flamingo(
      _VisionEncoder(clip_config), lm, eoc_token_id=EOC, media_token_id=MEDIA, vis_dim=32,
      cross_attn_every_n_layers=2)
  with torch.no_grad():  # gates start at 0; open them so the cross-attention counts
    for name, p in model.named_parameters():
      if name.endswith(("attn_gate", "ff_gate")):
        p.copy_(torch.tensor([0.5]) + 0.3 * torch.randn(1))
  model.eval()
  config = FlamingoConfig(
      vision=hf_vision.config_from_hf_clip(clip_config.to_dict()),
      resampler=PerceiverConfig(width=32, depth=6, num_heads=8, head_dim=64, num_latents=64),
      decoder=hf_llama.config_from_hf_llama(lm_config),
      cross_attn_every_n_layers=2,
      media_token_id=MEDIA, end_of_chunk_token_id=EOC)
  return model, config


@pytest.fixture(scope="module")
def reference():
  return _reference()


def _batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 2, 28, 28, 3)).astype(np.uint8)
  ids = rng.integers(1, 59, size=(2, 12)).astype(np.int32)
  # Example 0: text, <image>, text, <|endofchunk|>, <image>, text.
  ids[0, 2], ids[0, 6], ids[0, 5] = MEDIA, MEDIA, EOC
  # Example 1 starts with its first image; the second comes late.
  ids[1, 0], ids[1, 9], ids[1, 8] = MEDIA, MEDIA, EOC
  return images, ids


def _torch_logits(model, config, images, ids):
  mean = np.asarray(config.vision.image_mean, np.float32)
  std = np.asarray(config.vision.image_std, np.float32)
  pixels = (images.astype(np.float32) / 255.0 - mean) / std  # [B, N, H, W, 3]
  vision_x = torch.from_numpy(pixels.transpose(0, 1, 4, 2, 3)[:, :, None].copy())
  with torch.no_grad():
    return model(vision_x, torch.from_numpy(ids).long(),
                 attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


def test_flamingo_logits_equal_open_flamingo_for_an_interleaved_batch_with_two_images(reference):
  model, config = reference
  images, ids = _batch()
  want = _torch_logits(model, config, images, ids)
  params = flamingo_convert.flamingo_from_state_dict(model.state_dict(), config)
  got = jax.jit(Flamingo(config).apply)({"params": params}, jnp.asarray(images), jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - open_flamingo| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # The images matter: other images change the logits after the first <image> only.
  other = jax.jit(Flamingo(config).apply)({"params": params}, jnp.asarray(255 - images), jnp.asarray(ids))
  changed = np.abs(np.asarray(other) - np.asarray(got)).max(axis=-1) > 1e-3
  assert not changed[0, :2].any() and changed[0, 2:].all() and changed[1].all()


def test_converted_tree_matches_init_and_stray_keys_are_reported(reference):
  model, config = reference
  images, ids = _batch()
  sd = dict(model.state_dict())
  params = flamingo_convert.flamingo_from_state_dict(sd, config)
  shapes = jax.eval_shape(Flamingo(config).init, jax.random.key(0), images, ids)
  want = jax.tree.map(lambda x: x.shape, nn.unbox(shapes)["params"])
  assert jax.tree.map(lambda x: x.shape, params) == want
  sd["lang_encoder.model.extra.weight"] = torch.zeros(3)
  sd["stray.bias"] = torch.zeros(3)
  with pytest.raises(ValueError, match="lang_encoder.model.extra.weight"):
    flamingo_convert.flamingo_from_state_dict(sd, config)
  del sd["lang_encoder.model.extra.weight"]
  with pytest.raises(ValueError, match="stray.bias"):
    flamingo_convert.flamingo_from_state_dict(sd, config)


class _OpenClipBlock(torch.nn.Module):
  """open_clip's ResidualAttentionBlock (OpenAI weights: QuickGELU, no layer scale)."""

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(d)
    self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.ln_2 = torch.nn.LayerNorm(d)
    self.mlp = torch.nn.Sequential()
    self.mlp.add_module("c_fc", torch.nn.Linear(d, mlp))
    self.mlp.add_module("gelu", _QuickGELU())
    self.mlp.add_module("c_proj", torch.nn.Linear(mlp, d))

  def forward(self, x):
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class _QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class _OpenClipVisual(torch.nn.Module):
  """The module layout and forward of open_clip's VisionTransformer with output_tokens=True."""

  def __init__(self, d=32, layers=2, heads=4, mlp=64, patch=7, image=28, embed=24):
    super().__init__()
    grid = image // patch
    self.conv1 = torch.nn.Conv2d(3, d, patch, patch, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(d) * d**-0.5)
    self.positional_embedding = torch.nn.Parameter(torch.randn(grid * grid + 1, d) * d**-0.5)
    self.ln_pre = torch.nn.LayerNorm(d)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList([_OpenClipBlock(d, heads, mlp) for _ in range(layers)])
    self.ln_post = torch.nn.LayerNorm(d)
    self.proj = torch.nn.Parameter(torch.randn(d, embed) * d**-0.5)

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    for block in self.transformer.resblocks:
      x = block(x)
    x = self.ln_post(x)
    return x[:, 0] @ self.proj, x[:, 1:]


def test_open_clip_vision_keys_import_and_give_the_same_patch_tokens():
  from mmjax.models.vit import VisionTransformer
  torch.manual_seed(1)
  visual = _OpenClipVisual().eval()
  with torch.no_grad():  # LayerNorms start at identity: perturb them so their import shows
    for name, p in visual.named_parameters():
      if "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {"vision_encoder." + k: v for k, v in visual.state_dict().items()}
  hf_sd = flamingo_convert.open_clip_visual_to_hf(sd, "vision_encoder.")
  config = hf_vision.config_from_hf_clip(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=28, patch_size=7))
  params = hf_vision.clip_vision_from_state_dict(hf_sd, config, prefix="vision_encoder.")
  pixels = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = visual(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))[1].numpy()
  got = VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels))[:, 1:]
  assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-4


def test_a_bridge_only_checkpoint_with_separate_vision_and_lm_state_dicts_gives_the_same_params(reference):
  """Released checkpoint.pt files hold the trained parts only; the towers come from HF files."""
  model, config = reference
  sd = model.state_dict()
  bridge = {k: v for k, v in sd.items()
            if k.startswith("perceiver.") or k.startswith("lang_encoder.gated_cross_attn_layers.")}
  vision = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
  lm = {k[len("lang_encoder."):].replace(".decoder_layer.", "."): v for k, v in sd.items()
        if k.startswith("lang_encoder.") and "gated_cross_attn" not in k
        and "old_decoder_blocks" not in k}
  assert "model.layers.0.self_attn.q_proj.weight" in lm
  split = flamingo_convert.flamingo_from_state_dict(bridge, config, vision_state_dict=vision,
                                                    lm_state_dict=lm)
  whole = flamingo_convert.flamingo_from_state_dict(sd, config)
  jax.tree.map(np.testing.assert_array_equal, split, whole)
