"""Parity: tiny random Hugging Face LLaVA models (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``), saved with ``save_pretrained`` and imported with
``convert.llava_from_hf_directory``, give the logits of our ``Llava`` (float32, CPU, max
absolute difference <= 1e-4), and the importer's layouts and errors.

Pixels: our model takes channels-last floats in [0, 1] and normalises them with the imported
tower's mean and std; HF is given the same pixels normalised here with its image processors'
constants (OpenAI CLIP's, SigLIP's 0.5) and moved channels-first. So the test also checks
that the importer gives the tower its processor's normalisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.llava import anyres, convert, model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
image_utils = pytest.importorskip("transformers.image_utils")

pytestmark = pytest.mark.parity

TOL = 1e-4
VOCAB, IMAGE_TOKEN = 100, 99
SIDE, PATCH = 16, 4  # 4 x 4 patches per slot: P = 16, 17 with the CLS kept
CLIP_TINY = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, image_size=SIDE, patch_size=PATCH, hidden_act="quick_gelu")
SIGLIP_TINY = dict(CLIP_TINY, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
LLAMA_TINY = dict(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
MISTRAL_TINY = dict(LLAMA_TINY, model_type="mistral", rope_theta=1e6, sliding_window=None)
QWEN2_TINY_TIED = dict(LLAMA_TINY, model_type="qwen2", tie_word_embeddings=True)
PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # (height, width), as transformers reads them
NORMALISATION = {"clip_vision_model": (image_utils.OPENAI_CLIP_MEAN, image_utils.OPENAI_CLIP_STD),
                 "siglip_vision_model": (image_utils.IMAGENET_STANDARD_MEAN, image_utils.IMAGENET_STANDARD_STD)}


def _hf_model(model_class, config_class, seed: int, **fields):
  """A random HF model; every tower parameter, the LM's norms, every bias of the LM and the
  projector moved off their initial values so the import of each is seen."""
  torch.manual_seed(seed)
  hf = model_class(config_class(**fields)).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "vision_tower" in name or "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return hf


def _hf_pixels(slots: np.ndarray, vision_type: str) -> torch.Tensor:
  """[..., S, S, 3] pixels in [0, 1] -> HF's normalised [..., 3, S, S]."""
  mean, std = (np.asarray(v, np.float32) for v in NORMALISATION[vision_type])
  return torch.from_numpy(np.moveaxis((slots - mean) / std, -1, -3).copy())


def _rows(rng, samples, length: int):
  """(input_ids, feature_index) Int32[B, length]: each sample a list of parts, an int (that
  many random text tokens) or an index array (that many <image> positions and their index);
  text fills each row to length."""
  ids = np.full((len(samples), length), -1, np.int32)
  index = np.full((len(samples), length), model.TEXT, np.int32)
  for row, parts in enumerate(samples):
    at = 0
    for part in parts:
      if isinstance(part, int):
        ids[row, at:at + part] = rng.integers(0, IMAGE_TOKEN, part)
        at += part
      else:
        ids[row, at:at + len(part)] = IMAGE_TOKEN
        index[row, at:at + len(part)] = part
        at += len(part)
    ids[row, at:] = rng.integers(0, IMAGE_TOKEN, length - at)
  return ids, index


def _our_logits(config, params, images, ids, index) -> np.ndarray:
  logits, _ = jax.jit(model.Llava(config).apply)({"params": params}, jnp.asarray(images), jnp.asarray(ids),
                                                 jnp.asarray(index))
  return np.asarray(logits)


# name -> (vision_config, text_config, vision_feature_layer, vision_feature_select_strategy)
LLAVA_CASES = {
    "clip-penultimate-default": (CLIP_TINY, LLAMA_TINY, -2, "default"),
    "clip-layers-1-and-last-full": (CLIP_TINY, LLAMA_TINY, [1, -1], "full"),
    "clip-layers-0-and-penultimate-default-qwen2-tied": (CLIP_TINY, QWEN2_TINY_TIED, [0, -2], "default"),
    "siglip-penultimate-full": (SIGLIP_TINY, LLAMA_TINY, -2, "full"),
}


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_logits_equal_hf_with_two_images_in_one_sample(case, tmp_path):
  vision, text, layer, strategy = LLAVA_CASES[case]
  hf = _hf_model(transformers.LlavaForConditionalGeneration, transformers.LlavaConfig, seed=0,
                 vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                 vision_feature_layer=layer, vision_feature_select_strategy=strategy)
  hf.save_pretrained(tmp_path)
  config, params = convert.llava_from_hf_directory(tmp_path)
  assert config.vision_feature_layers == tuple(layer if isinstance(layer, list) else [layer])
  assert config.select_strategy == strategy
  assert config.decoder.tie_embeddings == config.decoder.attention_bias == (text is QWEN2_TINY_TIED)
  p = config.tokens_per_slot
  assert p == (SIDE // PATCH) ** 2 + (strategy == "full" and vision is CLIP_TINY)  # SigLIP has no CLS

  # Sample 0 holds two images, sample 1 one (its second slot is padding nothing points to).
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 2, SIDE, SIDE, 3)).astype(np.float32)
  images[1, 1] = 0.0
  slot = lambda s: np.arange(s * p, (s + 1) * p)  # noqa: E731
  ids, index = _rows(rng, [[3, slot(0), 2, slot(1), 3], [4, slot(0)]], length=2 * p + 10)
  np.testing.assert_array_equal(model.plain_feature_index(ids, IMAGE_TOKEN), index)

  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids).long(),
              pixel_values=_hf_pixels(np.concatenate([images[0], images[1, :1]]), vision["model_type"])).logits.numpy()
  got = _our_logits(config, params, images, ids, index)
  diff = float(np.max(np.abs(got - want)))
  print(f"{case}: max |logits - hf| = {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("layer", [-2, [0, -1]], ids=["penultimate", "layers-0-and-last"])
def test_llava_next_logits_equal_hf_for_images_of_different_aspect_ratios(layer, tmp_path):
  hf = _hf_model(transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextConfig, seed=2,
                 vision_config=CLIP_TINY, text_config=MISTRAL_TINY, image_token_index=IMAGE_TOKEN,
                 vision_feature_layer=layer, image_grid_pinpoints=PINPOINTS)
  hf.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: read through the index
  assert (tmp_path / "model.safetensors.index.json").exists()
  config, params = convert.llava_from_hf_directory(tmp_path)
  assert config.grid_pinpoints == ((16, 32), (32, 16), (32, 32)) and config.image_newline
  assert config.decoder.rope_theta == 1e6 and config.decoder.sliding_window == 0

  # (height, width): wide (a 2 x 2 grid, token rows cropped), wider still (1 x 2, nothing
  # cropped), tall (2 x 1, token columns cropped). Sample 0 holds the first two.
  sizes = [(30, 50), (20, 40), (40, 12)]
  slots = [anyres.num_slots(hw, PINPOINTS, SIDE) for hw in sizes]
  assert slots == [5, 3, 3]
  index = [anyres.feature_index(sizes[0], PINPOINTS, SIDE, PATCH, first_slot=0),
           anyres.feature_index(sizes[1], PINPOINTS, SIDE, PATCH, first_slot=slots[0]),
           anyres.feature_index(sizes[2], PINPOINTS, SIDE, PATCH, first_slot=0)]
  assert [len(i) for i in index] == [anyres.num_image_tokens(hw, PINPOINTS, SIDE, PATCH) for hw in sizes]
  rng = np.random.default_rng(3)
  pixels = [rng.uniform(size=(n, SIDE, SIDE, 3)).astype(np.float32) for n in slots]
  images = np.zeros((2, slots[0] + slots[1], SIDE, SIDE, 3), np.float32)
  images[0] = np.concatenate(pixels[:2])
  images[1, :slots[2]] = pixels[2]
  ids, feature_index = _rows(rng, [[3, index[0], 2, index[1], 3], [5, index[2]]],
                             length=len(index[0]) + len(index[1]) + 10)

  hf_pixels = np.zeros((3, max(slots), SIDE, SIDE, 3), np.float32)  # HF pads each image's slots
  for i, x in enumerate(pixels):
    hf_pixels[i, :len(x)] = x
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=_hf_pixels(hf_pixels, "clip_vision_model"),
              image_sizes=torch.tensor(sizes)).logits.numpy()
  got = _our_logits(config, params, images, ids, feature_index)
  diff = float(np.max(np.abs(got - want)))
  print(f"llava-next layer={layer}: max |logits - hf| = {diff:.2e}")
  assert diff <= TOL


def _llava_next_tiny():
  return _hf_model(transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextConfig, seed=4,
                   vision_config=CLIP_TINY, text_config=LLAMA_TINY, image_token_index=IMAGE_TOKEN,
                   image_grid_pinpoints=PINPOINTS)


def _renamed(state_dict, renames):
  out = {}
  for key, value in state_dict.items():
    for old, new in renames:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = value
  return out


# transformers 4.52..4.57 and < 4.52 saved the same weights under these names.
LAYOUTS = {
    "transformers-4.52": [("model.vision_tower.", "model.vision_tower.vision_model.")],
    "transformers-4.51": [("model.vision_tower.", "vision_tower.vision_model."),
                          ("model.multi_modal_projector.", "multi_modal_projector."),
                          ("model.language_model.", "language_model.model."),
                          ("lm_head.", "language_model.lm_head."), ("model.image_newline", "image_newline")],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_older_transformers_key_layouts_import_to_the_same_params(layout):
  hf = _llava_next_tiny()
  config = convert.llava_config_from_hf(hf.config)
  state_dict = hf.state_dict()
  want = convert.llava_from_state_dict(state_dict, config)
  old = _renamed(state_dict, LAYOUTS[layout])
  assert set(old) != set(state_dict)
  jax.tree.map(np.testing.assert_array_equal, convert.llava_from_state_dict(old, config), want)


def test_scanned_decoder_import_stacks_the_layers():
  hf = _llava_next_tiny()
  config = convert.llava_config_from_hf(hf.config, scan_layers=True)
  params = convert.llava_from_state_dict(hf.state_dict(), config)
  assert params["decoder"]["blocks"]["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (2, 48, 80)


def test_missing_unexpected_and_misshaped_keys_of_every_part_are_listed_in_one_error():
  hf = _llava_next_tiny()
  config = convert.llava_config_from_hf(hf.config)
  sd = dict(hf.state_dict())
  del sd["model.multi_modal_projector.linear_2.bias"]
  del sd["model.language_model.layers.1.mlp.up_proj.weight"]
  del sd["model.vision_tower.encoder.layers.2.layer_norm1.weight"]
  sd["model.image_newline"] = torch.zeros(47)
  sd["model.stray.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as err:
    convert.llava_from_state_dict(sd, config)
  message = str(err.value)
  for needle in ("model.multi_modal_projector.linear_2.bias", "model.layers.1.mlp.up_proj.weight",
                 "model.language_model.*", "model.vision_tower.encoder.layers.2.layer_norm1.weight",
                 "model.image_newline: shape (47,), expected (48,)", "model.stray.weight"):
    assert needle in message


def test_config_values_the_model_cannot_run_are_refused_by_name():
  base = dict(model_type="llava", vision_config=CLIP_TINY, text_config=LLAMA_TINY, image_token_index=IMAGE_TOKEN)
  refused = {
      "model_type='llava_onevision'": dict(base, model_type="llava_onevision"),
      "text_config.model_type='gemma'": dict(base, text_config=dict(LLAMA_TINY, model_type="gemma")),
      "vision_config.model_type='dinov2'": dict(base, vision_config=dict(CLIP_TINY, model_type="dinov2")),
      "projector_hidden_act='tanh'": dict(base, projector_hidden_act="tanh"),
      "vision_feature_layers has \\[5\\]": dict(base, vision_feature_layer=[5]),
      "select_strategy='default' drops the CLS token": dict(base, vision_config=SIGLIP_TINY),
      "image_token_id=100 is outside the vocabulary": dict(base, image_token_index=100),
  }
  for message, hf_config in refused.items():
    with pytest.raises(ValueError, match=message):
      convert.llava_config_from_hf(hf_config)


def test_a_config_json_without_sub_configs_takes_transformers_defaults():
  # The vocabulary must hold the <image> id (32000): LLaVA's checkpoints say 32064.
  config = convert.llava_config_from_hf({"model_type": "llava_next", "text_config": {"vocab_size": 32064}})
  hf = transformers.LlavaNextConfig()
  assert (config.vision.image_size, config.vision.width, config.vision.depth) == (336, 1024, 24)
  assert (config.decoder.width, config.decoder.depth, config.decoder.mlp_dim) == (4096, 32, 11008)
  assert config.grid_pinpoints == tuple(tuple(p) for p in hf.image_grid_pinpoints)
  assert (config.vision_feature_layers, config.image_token_id) == ((hf.vision_feature_layer,), hf.image_token_id)
