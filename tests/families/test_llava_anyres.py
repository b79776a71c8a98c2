"""`mmjax.families.llava.anyres` against Hugging Face's LLaVA-NeXT: the chosen grid resolution, the
number of `<image>` tokens, the order of `pack_image_features`, and the tiles of the image
processor; and the errors for images and pinpoints it cannot use."""

import itertools
import types

import numpy as np
import pytest

from mmjax.families.llava import anyres

V16 = dict(pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], tile_size=336, patch_size=14)
TINY = dict(pinpoints=[[32, 64], [64, 32], [64, 64]], tile_size=32, patch_size=4)
GEOMETRIES = {"llava-v1.6": V16, "tiny": TINY}

# Tall, wide, square, tiny and huge sides; every pair is tried as (height, width).
SIDES = {"llava-v1.6": [1, 2, 3, 7, 17, 18, 27, 100, 333, 336, 337, 500, 640, 672, 1000, 1024, 2000, 4032, 10000],
         "tiny": [1, 2, 3, 5, 9, 16, 31, 32, 33, 47, 64, 65, 100, 129, 500]}


def size_pairs(name):
  return list(itertools.product(SIDES[name], repeat=2))


def hf_processor_token_count(transformers, geometry, image_hw):
  """(tokens, grid tokens): what LlavaNextProcessor expands one `<image>` to, for a LLaVA-v1.6-style
  processor config (num_additional_image_tokens=1, vision_feature_select_strategy="default"),
  and how many of them are unpadded grid tokens (neither base nor newline). No tokenizer needed."""
  processor_class = transformers.LlavaNextProcessor
  processor = types.SimpleNamespace(
      image_processor=types.SimpleNamespace(image_grid_pinpoints=geometry["pinpoints"]),
      patch_size=geometry["patch_size"], num_additional_image_tokens=1)
  grid_tokens = []

  def unpadded_features(*args):
    features, newlines = processor_class._get_unpadded_features(processor, *args)
    grid_tokens.append(features)
    return features, newlines

  processor._get_unpadded_features = unpadded_features
  side = geometry["tile_size"]
  return processor_class._get_number_of_features(processor, *image_hw, side, side) - 1, grid_tokens[0]


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_num_image_tokens_equals_what_the_hf_processor_expands_image_to(name):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  geometry = GEOMETRIES[name]
  refused = []
  for image_hw in size_pairs(name):
    expected, grid_tokens = hf_processor_token_count(transformers, geometry, image_hw)
    try:
      count = anyres.num_image_tokens(image_hw, **geometry)
    except ValueError:
      # Refused only where HF keeps no grid token of the image (just its base, and newlines).
      assert grid_tokens == 0, image_hw
      refused.append(image_hw)
      continue
    assert count == expected, image_hw
    assert len(anyres.feature_index(image_hw, **geometry)) == count
  # Only images more than 8 times as long as wide (or the other way) are refused.
  assert refused and all(max(image_hw) > 8 * min(image_hw) for image_hw in refused)


def tiny_hf_model(transformers, geometry):
  """A LlavaNextModel with random weights: a 1-layer CLIP tower and a 1-layer LLaMA."""
  vision = transformers.CLIPVisionConfig(
      image_size=geometry["tile_size"], patch_size=geometry["patch_size"], hidden_size=8, intermediate_size=16,
      num_hidden_layers=1, num_attention_heads=2)
  text = transformers.LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
  config = transformers.LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                        image_grid_pinpoints=geometry["pinpoints"], image_token_index=63)
  return transformers.LlavaNextModel(config).eval()


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_feature_index_gathers_what_pack_image_features_packs(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  geometry = GEOMETRIES[name]
  if name == "tiny":
    hf_model = tiny_hf_model(transformers, geometry)
  else:  # pack_image_features reads only the config: no need to build the 7B-shaped model
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=336, patch_size=14),
        image_grid_pinpoints=geometry["pinpoints"])
    hf_model = types.SimpleNamespace(config=config)
  scale = geometry["tile_size"] // 32
  # One sample, images of different aspect ratios (wide, tall, square, very wide, odd sizes).
  image_sizes = [(h * scale, w * scale) for h, w in [(20, 50), (70, 23), (40, 40), (5, 64), (33, 17), (90, 91)]]
  per_slot, width = anyres.tokens_per_slot(geometry["tile_size"], geometry["patch_size"]), 3
  rng = np.random.default_rng(0)
  features = [rng.standard_normal((anyres.num_slots(hw, geometry["pinpoints"], geometry["tile_size"]), per_slot,
                                   width)).astype(np.float32) for hw in image_sizes]
  newline = rng.standard_normal(width).astype(np.float32)

  packed, lengths = transformers.LlavaNextModel.pack_image_features(
      hf_model, [torch.from_numpy(f) for f in features], torch.tensor(image_sizes), "default",
      image_newline=torch.from_numpy(newline))
  expected = torch.cat(packed).numpy()

  index, first_slot = [], 0
  for hw, image_features in zip(image_sizes, features):
    index.append(anyres.feature_index(hw, **geometry, first_slot=first_slot))
    first_slot += len(image_features)
  index = np.concatenate(index)
  assert index.dtype == np.int32
  assert [len(i) for i in np.split(index, np.cumsum(lengths.numpy())[:-1])] == lengths.tolist()
  table = np.concatenate([np.concatenate(features).reshape(-1, width), newline[None]])
  gathered = table[np.where(index == anyres.NEWLINE, len(table) - 1, index)]
  np.testing.assert_array_equal(gathered, expected)
  # Every tower token of a base slot is used, once; grid tokens at most once.
  used = index[index != anyres.NEWLINE]
  assert len(np.unique(used)) == len(used)


@pytest.mark.parity
@pytest.mark.parametrize("name, image_hw", [("tiny", (20, 50)), ("tiny", (70, 23)), ("tiny", (27, 18)),
                                            # HF's float ceil fits 18x27 to 336x505, not 336x504.
                                            ("llava-v1.6", (18, 27)), ("llava-v1.6", (700, 300))])
def test_tiles_equal_the_hf_image_processor_before_normalisation(name, image_hw):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  geometry = GEOMETRIES[name]
  side = geometry["tile_size"]
  processor = transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": side}, crop_size={"height": side, "width": side},
      image_grid_pinpoints=geometry["pinpoints"], do_rescale=False, do_normalize=False)
  image = np.random.default_rng(1).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
  expected = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)

  slots = anyres.tiles(image, geometry["pinpoints"], side)
  assert slots.dtype == np.uint8
  assert slots.shape == (anyres.num_slots(image_hw, geometry["pinpoints"], side), side, side, 3)
  np.testing.assert_array_equal(slots, expected)


def test_tiles_pad_with_black_around_the_centred_image():
  image = np.full((10, 40, 3), 200, np.uint8)
  slots = anyres.tiles(image, TINY["pinpoints"], 32)
  assert slots.shape == (3, 32, 32, 3)  # the base, then a 1x2 grid: the best resolution is 32x64
  canvas = np.concatenate([slots[1], slots[2]], axis=1)
  rows = np.flatnonzero(canvas[:, :, 0].max(axis=1))
  # 10x40 fits 32x64 as 16x64 (ceil(10 * 64 / 40)); 8 rows of padding above, 8 below.
  assert (rows[0], rows[-1]) == (8, 23)
  assert (slots[0] == 200).all()


def test_plain_feature_index_lists_one_slots_tokens():
  np.testing.assert_array_equal(anyres.plain_feature_index(2, 4), [8, 9, 10, 11])
  assert anyres.plain_feature_index(0, 576).dtype == np.int32


def test_an_odd_token_padding_keeps_one_padding_row():
  # Both images get the 32x64 resolution: a 1x2 grid of 8x8 tokens, 8x16 in all. 20x50 holds
  # 16 * 20 // 50 = 6 content rows, cropped 1 from each end: 6 rows. 20x60 holds
  # 16 * 20 // 60 = 5, but (8 - 5) // 2 = 1 row is cropped from each end: 6 rows again.
  assert anyres.num_image_tokens((20, 50), **TINY) == 64 + 6 * (16 + 1)
  assert anyres.num_image_tokens((20, 60), **TINY) == 64 + 6 * (16 + 1)
  # The first grid token is row 1, column 0 of the first tile (slot 1): 1 * 64 + 1 * 8 + 0.
  assert anyres.feature_index((20, 60), **TINY)[64] == 72


@pytest.mark.parametrize("image_hw, match", [
    ((0, 10), "image size 0x10"), ((10, -1), "image size 10x-1"), ((3,), "should be \\(height, width\\)")])
def test_non_positive_image_sizes_are_refused(image_hw, match):
  with pytest.raises(ValueError, match=match):
    anyres.num_image_tokens(image_hw, **V16)


def test_an_image_with_no_unpadded_row_is_refused():
  with pytest.raises(ValueError, match="image 3x500 .* too small .* keep 0x48"):
    anyres.feature_index((3, 500), **V16)
  with pytest.raises(ValueError, match="image 500x3 .* too small"):
    anyres.num_image_tokens((500, 3), **V16)


def test_pinpoints_that_are_not_multiples_of_the_tile_size_are_refused():
  with pytest.raises(ValueError, match="pinpoint 336x600 .* multiples of tile_size=336"):
    anyres.grid_shape((100, 100), [[336, 672], [336, 600]], 336)
  with pytest.raises(ValueError, match="pinpoints is empty"):
    anyres.grid_shape((100, 100), [], 336)


def test_tiles_refuse_images_that_are_not_uint8_rgb():
  with pytest.raises(ValueError, match="float32 \\(8, 8, 3\\): expected a uint8 \\[H, W, 3\\]"):
    anyres.tiles(np.zeros((8, 8, 3), np.float32), TINY["pinpoints"], 32)
  with pytest.raises(ValueError, match="uint8 \\(8, 8\\)"):
    anyres.tiles(np.zeros((8, 8), np.uint8), TINY["pinpoints"], 32)
