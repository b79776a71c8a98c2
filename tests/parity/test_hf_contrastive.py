"""Parity of ContrastiveModel with transformers' CLIPModel and SiglipModel after importing them
(from a state_dict and from a save_pretrained directory): image and text embeddings and
logits_per_image on padded text; the importer's errors; and the caption ids of
``encode_texts`` against HF's CLIP and SigLIP tokenizers built from tiny local files.

Reference models are tiny, random (torch.manual_seed) and built from local configs; every
parameter is perturbed so LayerNorm scales and biases are not the trivial 1 and 0, and the
temperature and bias are set away from HF's initial values (CLIP 2.6592, SigLIP 0 and 0).
"""

from __future__ import annotations

import functools
import io
import json
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

from mmjax.families.contrastive import convert, model
from tests.parity.conftest import seed_torch, state_dict_to_numpy, to_numpy

pytestmark = pytest.mark.parity

TOL = 1e-4
BOS, EOS, PAD = 97, 98, 0
CLIP_SCALE = 3.1
SIGLIP_SCALE, SIGLIP_BIAS = 2.3, -3.7

CLIP_TINY = dict(
    projection_dim=24,
    text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                       patch_size=4, hidden_act="quick_gelu"))
# 18 px with 4 px patches: the convolution drops the last 2 pixels, as So400m/14 at 384 px does.
# The text head's width (projection_size) is the image embedding's: the vision width.
SIGLIP_TINY = dict(
    text_config=dict(vocab_size=99, hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=12, projection_size=32, pad_token_id=1, bos_token_id=BOS,
                     eos_token_id=EOS),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=18,
                       patch_size=4))


def _perturbed(model_cls, hf_config, **scalars):
  seed_torch(0)
  hf_model = model_cls(hf_config)
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    for name, value in scalars.items():
      getattr(hf_model, name).fill_(value)
  return hf_model.eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  hf_model = _perturbed(transformers.CLIPModel, transformers.CLIPConfig(**CLIP_TINY), logit_scale=CLIP_SCALE)
  path = tmp_path_factory.mktemp("clip")
  hf_model.save_pretrained(path)
  return hf_model, path


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  hf_model = _perturbed(transformers.SiglipModel, transformers.SiglipConfig(**SIGLIP_TINY), logit_scale=SIGLIP_SCALE,
                        logit_bias=SIGLIP_BIAS)
  path = tmp_path_factory.mktemp("siglip")
  hf_model.save_pretrained(path)
  return hf_model, path


def _images(size: int, batch: int = 3) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _pixel_values(images: np.ndarray, config: model.ContrastiveConfig) -> torch.Tensor:
  """What the HF image processor gives after resizing: rescaled to [0, 1], normalised, NCHW."""
  mean = np.asarray(config.vision.image_mean, np.float32)
  std = np.asarray(config.vision.image_std, np.float32)
  return torch.from_numpy(((images.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())


def _clip_text() -> tuple[np.ndarray, np.ndarray]:
  """Two texts as CLIP's tokenizer pads them (padding=True): BOS ... EOS, the shorter one
  right-padded and masked."""
  rng = np.random.default_rng(1)
  ids, mask = np.full((2, 10), PAD, np.int64), np.zeros((2, 10), np.int64)
  for row, n in enumerate((10, 6)):
    ids[row, :n] = [BOS, *rng.integers(3, 90, n - 2), EOS]
    mask[row, :n] = 1
  return ids, mask


def _siglip_text() -> tuple[np.ndarray, np.ndarray]:
  """Two texts padded to the fixed length 12 with the pad id (padding='max_length'), EOS-ended."""
  rng = np.random.default_rng(2)
  ids, mask = np.full((2, 12), 1, np.int64), np.zeros((2, 12), np.int64)
  for row, n in enumerate((12, 5)):
    ids[row, :n] = [*rng.integers(3, 90, n - 1), EOS]
    mask[row, :n] = 1
  return ids, mask


@functools.cache
def _apply_fn(config: model.ContrastiveConfig):
  return jax.jit(lambda params, images, ids, mask: model.ContrastiveModel(config).apply(
      {"params": params}, images, ids, mask))


def _ours(config, params, images, ids, mask) -> dict:
  out = _apply_fn(config)(params, jnp.asarray(images), jnp.asarray(ids, jnp.int32),
                          None if mask is None else jnp.asarray(mask, jnp.int32))
  return {"image_embeds": np.asarray(out["image_embeds"]), "text_embeds": np.asarray(out["text_embeds"]),
          "logits_per_image": np.asarray(model.logits(out))}


def _hf(hf_model, config, images, ids, mask) -> dict:
  inputs = dict(input_ids=torch.from_numpy(ids), pixel_values=_pixel_values(images, config))
  if mask is not None:
    inputs["attention_mask"] = torch.from_numpy(mask)
  with torch.no_grad():
    out = hf_model(**inputs)
  return {name: to_numpy(getattr(out, name)) for name in ("image_embeds", "text_embeds", "logits_per_image")}


def _max_differences(ours: dict, ref: dict) -> dict:
  for name in ref:
    assert ours[name].shape == ref[name].shape, (name, ours[name].shape, ref[name].shape)
  return {name: float(np.max(np.abs(ours[name] - ref[name]))) for name in ref}


def test_clip_model_matches_hf_on_right_padded_masked_text(clip):
  hf_model, _ = clip
  config = convert.config_from_hf_clip(hf_model.config)
  assert config.vision_projection_dim == 24 and config.loss == "softmax" and config.max_logit_scale == 0
  params = convert.clip_from_state_dict(state_dict_to_numpy(hf_model), config)
  assert float(params["logit_scale"]) == pytest.approx(CLIP_SCALE)
  images, (ids, mask) = _images(16), _clip_text()
  differences = _max_differences(_ours(config, params, images, ids, mask), _hf(hf_model, config, images, ids, mask))
  assert max(differences.values()) <= TOL, differences


@pytest.mark.parametrize("masked", [False, True], ids=["as_trained_no_mask", "with_the_tokenizers_mask"])
def test_siglip_model_matches_hf_on_text_padded_to_its_fixed_length(siglip, masked):
  hf_model, _ = siglip
  config = convert.config_from_hf_siglip(hf_model.config)
  assert config.vision_projection_dim == 0 and config.loss == "sigmoid" and config.text.projection_dim == 32
  params = convert.siglip_from_state_dict(state_dict_to_numpy(hf_model), config)
  assert "visual_projection" not in params
  assert float(params["logit_bias"]) == pytest.approx(SIGLIP_BIAS)
  images, (ids, mask) = _images(18), _siglip_text()
  mask = mask if masked else None
  differences = _max_differences(_ours(config, params, images, ids, mask), _hf(hf_model, config, images, ids, mask))
  assert max(differences.values()) <= TOL, differences


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_load_hf_contrastive_reads_a_save_pretrained_directory_at_parity(name, request):
  hf_model, path = request.getfixturevalue(name)
  config, params = convert.load_hf_contrastive(path)
  with open(path / "config.json") as f:
    expected = (convert.config_from_hf_clip if name == "clip" else convert.config_from_hf_siglip)(json.load(f))
  assert config == expected
  images, (ids, mask) = (_images(16), _clip_text()) if name == "clip" else (_images(18), _siglip_text())
  differences = _max_differences(_ours(config, params, images, ids, mask), _hf(hf_model, config, images, ids, mask))
  assert max(differences.values()) <= TOL, differences


def test_imported_tree_has_the_structure_and_shapes_of_init(clip, siglip):
  for (hf_model, path), image_size in ((clip, 16), (siglip, 18)):
    config, params = convert.load_hf_contrastive(path)
    init = jax.eval_shape(model.ContrastiveModel(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
                          jax.ShapeDtypeStruct((1, 4), jnp.int32))
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(init["params"]))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == expected


def test_dtype_casts_every_imported_array(clip):
  _, path = clip
  _, params = convert.load_hf_contrastive(path, dtype="bfloat16")
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_a_prefix_reads_the_model_inside_a_larger_state_dict(clip):
  hf_model, _ = clip
  config = convert.config_from_hf_clip(hf_model.config)
  direct = convert.clip_from_state_dict(state_dict_to_numpy(hf_model), config)
  sd = {f"encoder.clip.{k}": v for k, v in state_dict_to_numpy(hf_model).items()}
  sd["decoder.weight"] = np.zeros(3, np.float32)
  jax.tree.map(np.testing.assert_array_equal, convert.clip_from_state_dict(sd, config, prefix="encoder.clip."), direct)


def test_missing_unexpected_and_misshaped_keys_of_every_part_are_listed_in_one_error(siglip):
  hf_model, _ = siglip
  config = convert.config_from_hf_siglip(hf_model.config)
  sd = state_dict_to_numpy(hf_model)
  del sd["vision_model.encoder.layers.1.mlp.fc1.bias"]
  del sd["logit_bias"]
  sd["text_model.encoder.layers.7.mlp.fc1.bias"] = np.zeros(48, np.float32)
  sd["visual_projection.weight"] = np.zeros((32, 32), np.float32)  # SigLIP has none
  sd["logit_scale"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError) as err:
    convert.siglip_from_state_dict(sd, config)
  message = str(err.value)
  for key in ("vision_model.encoder.layers.1.mlp.fc1.bias", "text_model.encoder.layers.7.mlp.fc1.bias",
              "visual_projection.weight", "missing keys (1): logit_bias",
              "logit_scale: shape (2,), expected () or (1,)", "unexpected keys (1): visual_projection.weight"):
    assert key in message, (key, message)


def test_a_state_dict_without_the_towers_is_refused_naming_its_keys():
  with pytest.raises(ValueError, match=r"not a CLIPModel state_dict.*'decoder\.'"):
    convert.clip_from_state_dict({"decoder.weight": np.zeros(2)}, convert.config_from_hf_clip(CLIP_TINY))


def test_a_directory_of_another_model_type_is_refused_naming_it(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match=r"model_type='llama'; expected one of \('clip', 'siglip'\)"):
    convert.load_hf_contrastive(tmp_path)
  with pytest.raises(ValueError, match=r"model_type='llama'"):
    convert.load_hf_tokenizer(tmp_path)


# ------------------------------------------------------------------------------ captions

CAPTIONS = ["A photo of a CAT.", "two   dogs, & the cats!!", "photo",
            "a photo of a very long caption about two cats that the length cuts off", "Ünïcode café photo"]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map, on which CLIP's byte-level BPE is written."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
  """A CLIP tokenizer in CLIP's layout (each byte, each byte ending a word, merges, then the two
  special tokens last), written as vocab.json / merges.txt and saved by CLIPTokenizerFast."""
  chars = list(_bytes_to_unicode().values())
  vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
  merges = []
  for word in ("a", "photo", "of", "cat", "cats", "dog", "the", "two", "caption"):
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
      merges.append(f"{pieces[0]} {pieces[1]}")
      pieces = [pieces[0] + pieces[1], *pieces[2:]]
      vocab.setdefault(pieces[0], len(vocab))
  vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
  source = tmp_path_factory.mktemp("clip_vocab")
  (source / "vocab.json").write_text(json.dumps(vocab))
  (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  saved = tmp_path_factory.mktemp("clip_tokenizer")
  transformers.CLIPTokenizerFast.from_pretrained(source).save_pretrained(saved)
  return saved


@pytest.fixture(scope="module")
def siglip_tokenizer_dir(tmp_path_factory):
  """A SigLIP tokenizer: a unigram sentencepiece model with T5's special ids (pad 0, </s> 1,
  <unk> 2, no BOS), as google/siglip-* use, saved by SiglipTokenizer."""
  corpus = ["a photo of a cat", "a photo of two dogs", "the cat sat on the mat", "an image of a bird",
            "a picture of the sea", "dogs and cats are animals", "photograph of a red car"] * 20
  model_file = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model_file, vocab_size=60, model_type="unigram", pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  source = tmp_path_factory.mktemp("siglip_spm")
  (source / "spiece.model").write_bytes(model_file.getvalue())
  saved = tmp_path_factory.mktemp("siglip_tokenizer")
  transformers.SiglipTokenizer(vocab_file=str(source / "spiece.model")).save_pretrained(saved)
  return saved


@pytest.mark.parametrize("length", [6, 16])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encode_texts_gives_the_ids_and_mask_of_the_hf_tokenizer_padded_to_max_length(kind, length, request):
  directory = request.getfixturevalue(f"{kind}_tokenizer_dir")
  ours = convert.load_hf_tokenizer(directory)
  assert ours.kind == kind
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  expected = reference(CAPTIONS, padding="max_length", max_length=length, truncation=True)
  ids, mask = convert.encode_texts(ours, CAPTIONS, length)
  assert ids.dtype == np.int32 and ids.shape == (len(CAPTIONS), length)
  np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"]))


def test_clip_captions_begin_with_bos_end_with_eos_and_pad_with_eos(clip_tokenizer_dir):
  tokenizer = convert.load_hf_tokenizer(clip_tokenizer_dir)
  # CLIP's layout: <|startoftext|> and <|endoftext|> are the last two ids; HF pads with the latter.
  last = tokenizer.vocab_size - 1
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (last - 1, last, last)
  ids, mask = convert.encode_texts(tokenizer, ["A PHOTO", "a photo"], 5)
  np.testing.assert_array_equal(ids[0], ids[1])  # lowercased
  assert list(ids[0]) == [tokenizer.bos_id, *tokenizer.encode("a photo"), tokenizer.eos_id, tokenizer.eos_id]
  assert list(mask[0]) == [1, 1, 1, 1, 0]


def test_siglip_captions_have_no_bos_and_pad_with_eos(siglip_tokenizer_dir):
  tokenizer = convert.load_hf_tokenizer(siglip_tokenizer_dir)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, 1, 1)
  ids, mask = convert.encode_texts(tokenizer, "A photo, of a cat!", 12)
  assert list(ids[0, :int(mask.sum())]) == tokenizer.encode("a photo of a cat") + [1]
  assert set(ids[0, int(mask.sum()):]) == {1}


def test_the_caption_tokenizer_survives_pickling(siglip_tokenizer_dir):
  tokenizer = convert.load_hf_tokenizer(siglip_tokenizer_dir)
  copy = pickle.loads(pickle.dumps(tokenizer))
  np.testing.assert_array_equal(convert.encode_texts(copy, CAPTIONS, 9)[0],
                                convert.encode_texts(tokenizer, CAPTIONS, 9)[0])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_captions_through_our_tokenizer_and_model_match_hf_processor_and_model(kind, request, tmp_path):
  """One directory holding model and tokenizer, as the hub's do: HF's tokenizer + model against
  load_hf_tokenizer + encode_texts + load_hf_contrastive, on captions padded to 16."""
  reference = transformers.AutoTokenizer.from_pretrained(request.getfixturevalue(f"{kind}_tokenizer_dir"))
  special = dict(vocab_size=len(reference), max_position_embeddings=16, eos_token_id=reference.eos_token_id,
                 pad_token_id=reference.pad_token_id, bos_token_id=reference.bos_token_id or reference.eos_token_id)
  fields = CLIP_TINY if kind == "clip" else SIGLIP_TINY
  fields = dict(fields, text_config=dict(fields["text_config"], **special))
  if kind == "clip":
    hf_model = _perturbed(transformers.CLIPModel, transformers.CLIPConfig(**fields), logit_scale=CLIP_SCALE)
  else:
    hf_model = _perturbed(transformers.SiglipModel, transformers.SiglipConfig(**fields), logit_scale=SIGLIP_SCALE,
                          logit_bias=SIGLIP_BIAS)
  hf_model.save_pretrained(tmp_path)
  reference.save_pretrained(tmp_path)
  config, params = convert.load_hf_contrastive(tmp_path)
  ids, mask = convert.encode_texts(convert.load_hf_tokenizer(tmp_path), CAPTIONS, 16)
  images = _images(config.vision.image_size)
  inputs = reference(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
  ref = _hf(hf_model, config, images, inputs["input_ids"].astype(np.int64), inputs["attention_mask"].astype(np.int64))
  differences = _max_differences(_ours(config, params, images, ids, mask), ref)
  assert max(differences.values()) <= TOL, differences
