"""Parity: tiny random Hugging Face BLIP-2 models (``Blip2ForConditionalGeneration`` with an
OPT or a LLaMA LM, ``Blip2ForImageTextRetrieval``, ``InstructBlipForConditionalGeneration``),
saved with ``save_pretrained`` and imported with ``convert.blip2_from_hf_directory``, give the
logits, ITM logits and ITC similarities of our ``Blip2`` (float32, CPU, max absolute
difference <= 1e-4) for a batch of three images with padded text; cached greedy generation
through the shared generator equals the full forward; the importer's errors name the keys
and fields.

Pixels: our model takes channels-last floats in [0, 1] and normalises them with the imported
tower's mean and std; HF is given the same pixels normalised here with BLIP-2's image
processor's constants (OpenAI CLIP's) and moved channels-first.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import infer
from mmjax.families.blip2 import convert, model, task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
image_utils = pytest.importorskip("transformers.image_utils")

pytestmark = pytest.mark.parity

TOL = 1e-4
SIDE, PATCH, QUERIES = 16, 4, 4
VOCAB, IMAGE_TOKEN, BOS, LM_PAD = 60, 59, 2, 1
QFORMER_VOCAB, QFORMER_PAD = 50, 0
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIDE,
              patch_size=PATCH)
# Three layers with cross-attention every two: layers 0 and 2 read the image.
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               vocab_size=QFORMER_VOCAB, max_position_embeddings=24, cross_attention_frequency=2)
OPT_TINY = dict(model_type="opt", vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=56, max_position_embeddings=64, word_embed_proj_dim=40, pad_token_id=LM_PAD)
LLAMA_TINY = dict(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
TEXT_CONFIGS = {"opt": OPT_TINY, "llama": LLAMA_TINY}


def _perturbed(hf_model, seed: int):
  """Every parameter moved off its initial value (HF starts the queries, biases and norms at
  constants and the tower at ~1e-10), so that the import of each one is seen."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return hf_model.eval()


def _blip2_generation(lm: str, seed: int = 0):
  config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT_CONFIGS[lm],
                                    num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
  return _perturbed(transformers.Blip2ForConditionalGeneration(config), seed)


def _instructblip(seed: int = 2):
  config = transformers.InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=LLAMA_TINY,
                                           num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
  return _perturbed(transformers.InstructBlipForConditionalGeneration(config), seed)


def _retrieval(seed: int = 1):
  config = transformers.Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=True),
                                    num_query_tokens=QUERIES, image_text_hidden_size=16)
  return _perturbed(transformers.Blip2ForImageTextRetrieval(config), seed)


def _images(rng, n: int) -> np.ndarray:
  return rng.uniform(size=(n, SIDE, SIDE, 3)).astype(np.float32)


def _hf_pixels(images: np.ndarray) -> torch.Tensor:
  """[B, S, S, 3] pixels in [0, 1] -> BLIP-2's normalised [B, 3, S, S]."""
  mean = np.asarray(image_utils.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(image_utils.OPENAI_CLIP_STD, np.float32)
  return torch.from_numpy(np.moveaxis((images - mean) / std, -1, 1).copy())


def _padded(rng, lengths, vocab: int, pad: int, first: int | None = None, avoid=()) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) Int32[B, max(lengths)]: random tokens (``first`` leading each row when
  given), right-padded with ``pad``."""
  t = max(lengths)
  ids = np.full((len(lengths), t), pad, np.int32)
  allowed = np.setdiff1d(np.arange(3, vocab), np.asarray(avoid + (pad,), np.int64))
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.choice(allowed, n)
    if first is not None:
      ids[row, 0] = first
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def _prompts(rng, text_lengths) -> tuple[np.ndarray, np.ndarray]:
  """LM inputs as the processors write them: Q placeholders, BOS, text; right-padded."""
  text, mask = _padded(rng, [n + 1 for n in text_lengths], VOCAB, LM_PAD, first=BOS, avoid=(IMAGE_TOKEN,))
  b = len(text_lengths)
  ids = np.concatenate([np.full((b, QUERIES), IMAGE_TOKEN, np.int32), text], axis=1)
  return ids, np.concatenate([np.ones((b, QUERIES), np.int32), mask], axis=1)


def _max_diff(got, want, mask=None) -> float:
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  if mask is not None:
    diff = diff[np.asarray(mask, bool)]
  return float(diff.max())


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_blip2_generation_logits_equal_hf_on_the_unpadded_positions(lm, tmp_path):
  hf = _blip2_generation(lm)
  hf.save_pretrained(tmp_path)
  config, params = convert.blip2_from_hf_directory(tmp_path)
  assert (config.heads, config.instruction, config.qformer.text_input) == ((), False, False)
  assert config.image_token_id == IMAGE_TOKEN and config.decoder.positions == ("learned" if lm == "opt" else "rope")

  rng = np.random.default_rng(10)
  images = _images(rng, 3)
  ids, mask = _prompts(rng, [5, 9, 2])
  with torch.no_grad():
    want = hf(pixel_values=_hf_pixels(images), input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  got, _ = jax.jit(model.Blip2(config).apply)({"params": params}, jnp.asarray(images), jnp.asarray(ids))
  diff = _max_diff(got, want, mask)
  print(f"Blip2ForConditionalGeneration ({lm}): max |logits - hf| = {diff:.2e}")
  assert diff <= TOL


def test_instructblip_logits_equal_hf_with_padded_instructions(tmp_path):
  hf = _instructblip()
  hf.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: read through the index
  assert (tmp_path / "model.safetensors.index.json").exists()
  config, params = convert.blip2_from_hf_directory(tmp_path)
  assert config.instruction and config.qformer.text_input and config.decoder.positions == "rope"

  rng = np.random.default_rng(11)
  images = _images(rng, 3)
  instruction, instruction_mask = _padded(rng, [6, 3, 8], QFORMER_VOCAB, QFORMER_PAD, first=3)
  ids, mask = _prompts(rng, [4, 7, 1])
  with torch.no_grad():
    want = hf(pixel_values=_hf_pixels(images), qformer_input_ids=torch.from_numpy(instruction).long(),
              qformer_attention_mask=torch.from_numpy(instruction_mask).long(),
              input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  got, _ = jax.jit(model.Blip2(config).apply)({"params": params}, jnp.asarray(images), jnp.asarray(ids),
                                              jnp.asarray(instruction), jnp.asarray(instruction_mask))
  diff = _max_diff(got, want, mask)
  print(f"InstructBlipForConditionalGeneration: max |logits - hf| = {diff:.2e}")
  assert diff <= TOL


def _itm(module, images, ids, mask):
  return module.match(module.image_features(images), ids, mask)


def _itc(module, images, ids, mask):
  """[images, texts]: the best query's cosine similarity with each text (what HF returns)."""
  return jnp.max(jnp.einsum("bqf,tf->bqt", module.encode_image(images), module.encode_text(ids, mask)), axis=1)


def test_retrieval_itm_logits_and_itc_similarities_equal_hf(tmp_path):
  hf = _retrieval()
  hf.save_pretrained(tmp_path)
  config, params = convert.blip2_from_hf_directory(tmp_path)
  assert config.heads == ("itc", "itm") and config.decoder is None and config.embed_dim == 16
  assert float(params["temperature"]) == pytest.approx(config.temperature)  # HF holds none

  rng = np.random.default_rng(12)
  images = _images(rng, 3)
  blip2 = model.Blip2(config)
  variables = {"params": params}
  # ITM: image i with text i, the texts padded.
  ids, mask = _padded(rng, [7, 3, 5], QFORMER_VOCAB, QFORMER_PAD, first=3)
  with torch.no_grad():
    want = hf(pixel_values=_hf_pixels(images), input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long(), use_image_text_matching_head=True).logits_per_image
  got = jax.jit(lambda v, *a: blip2.apply(v, *a, method=_itm))(variables, images, ids, mask)
  assert got.shape == (3, 2)
  itm = _max_diff(got, want.numpy())
  # ITC: every image against four padded texts.
  ids, mask = _padded(rng, [2, 8, 4, 6], QFORMER_VOCAB, QFORMER_PAD, first=3)
  with torch.no_grad():
    want = hf(pixel_values=_hf_pixels(images), input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long(), use_image_text_matching_head=False).logits_per_image
  got = jax.jit(lambda v, *a: blip2.apply(v, *a, method=_itc))(variables, images, ids, mask)
  assert got.shape == (3, 4)
  itc = _max_diff(got, want.numpy())
  print(f"Blip2ForImageTextRetrieval: max |ITM logits - hf| = {itm:.2e}, max |ITC similarities - hf| = {itc:.2e}")
  assert itm <= TOL and itc <= TOL


@pytest.mark.slow  # two models generate token by token both ways: about 30 s on 2 cores
@pytest.mark.parametrize("kind", ["blip2-opt", "instructblip"])
def test_cached_greedy_generation_equals_the_full_forward_token_for_token(kind):
  hf = _blip2_generation("opt") if kind == "blip2-opt" else _instructblip()
  config = convert.blip2_config_from_hf(hf.config, architecture=type(hf).__name__)
  params = convert.blip2_from_state_dict(hf.state_dict(), config)
  rng = np.random.default_rng(13)
  images = _images(rng, 3)
  ids, mask = _prompts(rng, [3, 6, 1])
  lengths = mask.sum(axis=1)
  inputs = {"images": images}
  if config.instruction:
    instruction, instruction_mask = _padded(rng, [4, 2, 5], QFORMER_VOCAB, QFORMER_PAD, first=3)
    inputs.update(instruction_ids=instruction, instruction_mask=instruction_mask)
  new = 6
  out = infer.Generator(task.decoding(config)).generate({"params": params}, inputs, ids, new,
                                                       prompt_lengths=lengths, pad_id=LM_PAD)
  assert out.tokens.shape == (3, new) and IMAGE_TOKEN not in out.tokens  # the placeholder is never sampled
  forward = jax.jit(model.Blip2(config).apply)
  for row in range(3):
    n = int(lengths[row])
    seq = np.concatenate([ids[row, :n], out.tokens[row]])[None]
    extra = [inputs[k][row:row + 1] for k in ("instruction_ids", "instruction_mask") if k in inputs]
    logits, _ = forward({"params": params}, images[row:row + 1], seq, *extra)
    # Each generated token is the argmax of the full forward at the position before it.
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[0, n - 1:n + new - 1], -1), out.tokens[row])


def _abstract_params(config):
  side = config.vision.image_size
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  blip2 = model.Blip2(config)
  if config.decoder is None:
    init = lambda key, *a: blip2.init(key, *a, method=model.Blip2.initialize)  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0), images, ids, ids)["params"]
  extra = (ids, ids) if config.instruction else ()
  return jax.eval_shape(blip2.init, jax.random.key(0), images, ids, *extra)["params"]


@pytest.mark.parametrize("kind", ["opt", "llama", "retrieval", "instructblip"])
def test_imported_params_have_exactly_the_models_tree_and_shapes(kind):
  hf = {"opt": lambda: _blip2_generation("opt"), "llama": lambda: _blip2_generation("llama"),
        "retrieval": _retrieval, "instructblip": _instructblip}[kind]()
  config = convert.blip2_config_from_hf(hf.config, architecture=type(hf).__name__)
  params = convert.blip2_from_state_dict(hf.state_dict(), config)
  want = jax.tree.map(lambda x: x.shape, nn.unbox(_abstract_params(config)))
  assert jax.tree.map(np.shape, params) == want
  assert sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)) == \
      sum(p.numel() for p in hf.parameters()) + ("temperature" in params)


def test_a_scanned_decoder_import_stacks_the_layers():
  hf = _blip2_generation("llama")
  config = convert.blip2_config_from_hf(hf.config, architecture="Blip2ForConditionalGeneration", scan_layers=True)
  params = convert.blip2_from_state_dict(hf.state_dict(), config)
  assert params["decoder"]["blocks"]["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (2, 48, 80)


def test_missing_unexpected_and_misshaped_keys_of_every_part_are_listed_in_one_error():
  hf = _instructblip()
  config = convert.blip2_config_from_hf(hf.config, architecture="InstructBlipForConditionalGeneration")
  sd = dict(hf.state_dict())
  del sd["vision_model.encoder.layers.1.self_attn.qkv.bias"]
  del sd["qformer.encoder.layer.2.crossattention.attention.key.weight"]
  del sd["language_model.model.layers.1.mlp.up_proj.weight"]
  sd["query_tokens"] = torch.zeros(1, QUERIES + 1, 32)
  sd["itm_head.weight"] = torch.zeros(2, 32)
  with pytest.raises(ValueError) as err:
    convert.blip2_from_state_dict(sd, config)
  message = str(err.value)
  for needle in ("vision_model.encoder.layers.1.self_attn.qkv.bias", "qformer.encoder.layer.2.crossattention."
                 "attention.key.weight", "language_model.model.layers.1.mlp.up_proj.weight",
                 "query_tokens: shape (1, 5, 32), expected (1, 4, 32)", "unexpected keys (1): itm_head.weight"):
    assert needle in message


def test_config_values_the_model_cannot_run_are_refused_by_name():
  base = dict(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"], vision_config=VISION,
              qformer_config=QFORMER, text_config=OPT_TINY, num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
  refused = {
      "model_type='llava'": dict(base, model_type="llava"),
      "architecture 'Blip2Model'": dict(base, architectures=["Blip2Model"]),
      "text_config.model_type='t5'": dict(base, text_config=dict(model_type="t5")),
      "vision_config.qkv_bias=False": dict(base, vision_config=dict(VISION, qkv_bias=False)),
      "image_token_index=None": dict(base, image_token_index=None),
      "image_token_index=60 is outside the LM's vocabulary": dict(base, image_token_index=VOCAB),
      "use_qformer_text_input=True in a Blip2ForConditionalGeneration": dict(
          base, qformer_config=dict(QFORMER, use_qformer_text_input=True)),
      "use_qformer_text_input=False in a Blip2ForImageTextRetrieval": dict(
          base, architectures=["Blip2ForImageTextRetrieval"]),
      "qformer_config.hidden_act='tanh'": dict(base, qformer_config=dict(QFORMER, hidden_act="tanh")),
  }
  for message, hf_config in refused.items():
    with pytest.raises(ValueError, match=message):
      convert.blip2_config_from_hf(hf_config)
  config = convert.blip2_config_from_hf(dict(base, architectures=["Blip2ForImageTextRetrieval"],
                                             qformer_config=dict(QFORMER, use_qformer_text_input=True)))
  with pytest.raises(ValueError, match="has 'itg'"):
    with_itg = convert.override(config, heads=("itc", "itg"), decoder_token_id=QFORMER_VOCAB - 1)
    convert.blip2_from_state_dict({}, with_itg)
  with pytest.raises(ValueError, match=r"unknown overrides \['image_size'\]"):
    convert.override(config, image_size=224)
