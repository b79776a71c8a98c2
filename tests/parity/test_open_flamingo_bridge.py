"""Parity of the Perceiver Resampler and GatedXAttnDense with open_flamingo's torch modules.

The references (``open_flamingo.src.helpers``) are built with random weights from tiny local
configs; their state_dicts go through ``mmjax.families.flamingo.convert_bridge``; outputs are compared in
float32 on CPU (max abs diff <= 1e-4).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.families.flamingo import convert_bridge as convert
from mmjax.models.gated_xattn import GatedXAttnConfig, GatedXAttnDense
from mmjax.models.perceiver import PerceiverConfig, PerceiverResampler
from tests.parity.conftest import import_open_flamingo, seed_torch, to_numpy

pytestmark = pytest.mark.parity

TOL = 1e-4
MEDIA_TOKEN = 7


def _same_tree_structure(params, module, *args, **kwargs):
  init = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("depth,frames,media_time", [(1, False, False), (2, True, True), (3, True, False)])
def test_perceiver_matches_open_flamingo(depth, frames, media_time):
  of = import_open_flamingo()
  seed_torch(depth)
  d, heads, head_dim, latents = 32, 4, 8, 6
  max_frames, max_media = (3 if frames else None), (4 if media_time else None)
  ref = of.helpers.PerceiverResampler(
      dim=d, depth=depth, dim_head=head_dim, heads=heads, num_latents=latents,
      max_num_media=max_media, max_num_frames=max_frames, ff_mult=2).eval()
  # LayerNorms start at (1, 0): make them random so a transposed/renamed norm shows.
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  b, n, f, p = 2, 3, (2 if frames else 1), 5
  x = torch.randn(b, n, f, p, d)
  with torch.no_grad():
    want = to_numpy(ref(x))

  config = PerceiverConfig(width=d, depth=depth, num_heads=heads, head_dim=head_dim,
                           num_latents=latents, ff_mult=2, max_num_frames=max_frames,
                           max_num_media=max_media)
  sd = {"perceiver." + k: v for k, v in ref.state_dict().items()}
  params = convert.perceiver_from_state_dict(sd, config)
  model = PerceiverResampler(config)
  _same_tree_structure(params, model, jnp.zeros((b, n, f, p, d), jnp.float32))
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(to_numpy(x))))
  assert got.shape == (b, n, latents, d)
  np.testing.assert_array_less(np.abs(got - want).max(), TOL)


def _ids_with_images(t: int) -> np.ndarray:
  """[2, T] ids: text before the first image, several <image> tokens per sample."""
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 50, size=(2, t))
  ids[0, [3, 7, 12]] = MEDIA_TOKEN       # 3 images, tokens 0..2 before the first
  ids[1, [0, 9]] = MEDIA_TOKEN           # 2 images, the first at position 0
  return ids


@pytest.mark.parametrize("only_immediate", [True, False])
def test_gated_xattn_matches_open_flamingo(only_immediate):
  of = import_open_flamingo()
  seed_torch(1)
  d, dm, heads, head_dim, n_img, n_lat, t = 32, 24, 4, 8, 3, 5, 16
  kwargs = dict(dim=d, dim_visual=dm, dim_head=head_dim, heads=heads, ff_mult=2)
  ref = of.helpers.GatedCrossAttentionBlock(only_attend_immediate_media=only_immediate, **kwargs).eval()
  with torch.no_grad():
    ref.attn_gate.fill_(0.7)
    ref.ff_gate.fill_(-0.4)
    for name, p in ref.named_parameters():
      if "norm" in name or "ff.0" in name:
        p.add_(0.1 * torch.randn_like(p))
  ids = _ids_with_images(t)
  media_locations = torch.from_numpy(ids == MEDIA_TOKEN)
  x = torch.randn(2, t, d)
  media = torch.randn(2, n_img, n_lat, dm)
  with torch.no_grad():
    want = to_numpy(ref(x, media, media_locations=media_locations))

  config = GatedXAttnConfig(width=d, media_width=dm, num_heads=heads, head_dim=head_dim, ff_mult=2,
                            only_attend_immediate_media=only_immediate)
  sd = {f"lang_encoder.gated_cross_attn_layers.1.{k}": v for k, v in ref.state_dict().items()}
  params = convert.gated_xattn_from_state_dict(sd, config, "lang_encoder.gated_cross_attn_layers.1.")
  model = GatedXAttnDense(config)
  image_index = jnp.cumsum(jnp.asarray(ids == MEDIA_TOKEN, jnp.int32), axis=1)
  # Our image_index is the reference's text_time.
  np.testing.assert_array_equal(np.asarray(image_index), media_locations.cumsum(-1).numpy())
  xj, mj = jnp.asarray(to_numpy(x)), jnp.asarray(to_numpy(media))
  _same_tree_structure(params, model, xj, image_index, media=mj)
  got = np.asarray(jax.jit(model.apply)({"params": params}, xj, image_index, media=mj))

  before_first = np.asarray(image_index) == 0
  assert before_first.sum() == 3
  if only_immediate:
    np.testing.assert_array_less(np.abs(got - want).max(), TOL)
  else:
    # The reference gives text before the first image a uniform average over all latents
    # (a fully masked row of its softmax); mmjax gives zero, as with only_attend_immediate_media
    # (the reference zeroes those rows there). Everything else matches.
    np.testing.assert_array_less(np.abs(got - want)[~before_first].max(), TOL)
    ref_immediate = of.helpers.GatedCrossAttentionBlock(only_attend_immediate_media=True, **kwargs).eval()
    ref_immediate.load_state_dict(ref.state_dict())
    with torch.no_grad():
      want_zeroed = to_numpy(ref_immediate(x, media, media_locations=media_locations))
    np.testing.assert_array_less(np.abs(got - want_zeroed)[before_first].max(), TOL)
    assert np.abs(got - want)[before_first].max() > 1e-3  # the reference really differs there

  # Cached media keys/values (generation) give the same output.
  kv = jax.jit(lambda p, m: model.apply(p, m, method=GatedXAttnDense.compute_media_kv))({"params": params}, mj)
  got_kv = np.asarray(jax.jit(model.apply)({"params": params}, xj, image_index, media_kv=kv))
  np.testing.assert_allclose(got_kv, got, atol=1e-6, rtol=0)


def test_gated_xattn_with_cached_media_matches_reference_use_cached_media():
  of = import_open_flamingo()
  seed_torch(2)
  d, dm, heads, head_dim = 16, 8, 2, 4
  ref = of.helpers.GatedCrossAttentionBlock(dim=d, dim_visual=dm, dim_head=head_dim, heads=heads).eval()
  with torch.no_grad():
    ref.attn_gate.fill_(0.5)
    ref.ff_gate.fill_(0.3)
  ids = _ids_with_images(16)
  media_locations = torch.from_numpy(ids == MEDIA_TOKEN)
  x_new = torch.randn(2, 3, d)  # three decode-step tokens after the prompt
  media = torch.randn(2, 3, 4, dm)
  with torch.no_grad():
    want = to_numpy(ref(x_new, media, media_locations=media_locations, use_cached_media=True))
  config = GatedXAttnConfig(width=d, media_width=dm, num_heads=heads, head_dim=head_dim)
  params = convert.gated_xattn_from_state_dict(ref.state_dict(), config, "")
  # New tokens see the images of the whole prompt: image_index = number of images so far.
  count = (ids == MEDIA_TOKEN).sum(axis=1)
  image_index = jnp.asarray(np.repeat(count[:, None], 3, axis=1), jnp.int32)
  got = np.asarray(jax.jit(GatedXAttnDense(config).apply)(
      {"params": params}, jnp.asarray(to_numpy(x_new)), image_index, media=jnp.asarray(to_numpy(media))))
  np.testing.assert_array_less(np.abs(got - want).max(), TOL)


def _tiny_flamingo(of, cross_attn_every_n_layers=2):
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
  lm = transformers.LlamaForCausalLM(cfg)
  of.utils.extend_instance(lm, of.flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")

  class Vision(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.visual = torch.nn.Linear(3, 16)

  return of.flamingo.Flamingo(Vision(), lm, eoc_token_id=1, media_token_id=2, vis_dim=16,
                              cross_attn_every_n_layers=cross_attn_every_n_layers)


def test_converters_read_a_whole_flamingo_state_dict():
  of = import_open_flamingo()
  seed_torch(3)
  model = _tiny_flamingo(of)
  sd = model.state_dict()
  used: set[str] = set()
  # open_flamingo's Flamingo builds PerceiverResampler(dim=vis_dim) with its defaults.
  pconfig = PerceiverConfig(width=16, depth=6, num_heads=8, head_dim=64, num_latents=64)
  resampler = convert.perceiver_from_state_dict(sd, pconfig, used=used)
  xconfig = GatedXAttnConfig(width=32, media_width=16, num_heads=8, head_dim=64)
  xattn = convert.gated_xattn_layers_from_state_dict(sd, xconfig, (1, 3), used=used)
  assert sorted(xattn) == ["xattn_1", "xattn_3"]
  np.testing.assert_array_equal(
      xattn["xattn_3"]["attn"]["to_q"]["kernel"].reshape(32, 512),
      to_numpy(sd["lang_encoder.gated_cross_attn_layers.3.attn.to_q.weight"]).T)
  np.testing.assert_array_equal(resampler["latents"], to_numpy(sd["perceiver.latents"]))
  # Every perceiver and cross-attention key, aliases included, is claimed; nothing else.
  claimed = {k for k in sd if k.startswith("perceiver.") or "gated_cross_attn_layer" in k}
  assert used == claimed
  # The alias alone (a checkpoint without lang_encoder.gated_cross_attn_layers.*) also works.
  alias_only = {k: v for k, v in sd.items() if not k.startswith(convert.GATED_XATTN_PREFIX)}
  xattn_alias = convert.gated_xattn_layers_from_state_dict(alias_only, xconfig, (1, 3))
  for a, b in zip(jax.tree.leaves(xattn), jax.tree.leaves(xattn_alias)):
    np.testing.assert_array_equal(a, b)


def test_converter_lists_every_missing_unexpected_and_misshaped_key():
  of = import_open_flamingo()
  seed_torch(4)
  ref = of.helpers.PerceiverResampler(dim=16, depth=2, dim_head=4, heads=2, num_latents=3,
                                      max_num_frames=2)
  sd = {"perceiver." + k: v for k, v in ref.state_dict().items()}
  del sd["perceiver.layers.1.0.to_q.weight"]
  del sd["perceiver.norm.bias"]
  sd["perceiver.layers.0.1.1.weight"] = torch.zeros(5, 16)
  sd["perceiver.extra"] = torch.zeros(1)
  config = PerceiverConfig(width=16, depth=2, num_heads=2, head_dim=4, num_latents=3, ff_mult=4)
  with pytest.raises(ValueError) as err:
    convert.perceiver_from_state_dict(sd, config)  # also: frame_embs not in the config
  msg = str(err.value)
  for key in ("perceiver.layers.1.0.to_q.weight", "perceiver.norm.bias",  # missing
              "perceiver.extra", "perceiver.frame_embs",                 # unexpected
              "perceiver.layers.0.1.1.weight: shape (5, 16), expected (64, 16)"):
    assert key in msg
  # Fewer layers in the state_dict than in the config: missing; a layer too many: unexpected.
  xsd = {f"lang_encoder.gated_cross_attn_layers.{i}.{k}": v
         for i in (1, 3, 5)
         for k, v in of.helpers.GatedCrossAttentionBlock(dim=8, dim_visual=4, dim_head=2, heads=2).state_dict().items()}
  xconfig = GatedXAttnConfig(width=8, media_width=4, num_heads=2, head_dim=2)
  with pytest.raises(ValueError, match=r"(?s)missing keys.*gated_cross_attn_layers\.7\.attn\.to_q.*"
                                       r"unexpected keys.*gated_cross_attn_layers\.5\.ff_gate"):
    convert.gated_xattn_layers_from_state_dict(xsd, xconfig, (1, 3, 7))
