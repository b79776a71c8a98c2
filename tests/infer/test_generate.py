"""Cached generation: exact tokens of full forward passes, one compilation per bucket,
sampling methods, bad inputs and few-shot prompt assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.infer import Generator, Sampling, generate, prompt, sample
from mmjax.families.flamingo.generation import decoding
from mmjax.families.flamingo.model import Flamingo
from tests.infer.util import micro_config, random_params

CONFIG = micro_config()
DECODING = decoding(CONFIG)
MEDIA = CONFIG.media_token_id


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


def _prompts():
  """Two prompts of different lengths; the second has one real image and one padding image."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(2, 2, 16, 16, 3)).astype(np.uint8)
  ids = rng.integers(6, 64, size=(2, 9)).astype(np.int32)
  ids[0, [1, 5]] = MEDIA          # text, <image>, text, <image>, text
  ids[1, 0] = MEDIA               # <image>, text (6 tokens, then padding)
  lengths = np.array([9, 6], np.int32)
  image_mask = np.array([[True, True], [True, False]])
  return images, ids, lengths, image_mask


def _greedy_by_full_forward(params, images, ids, lengths, image_mask, steps):
  """Step-by-step greedy decoding, each token from a full forward pass (no cache).

  Each pass runs over the sequence so far, right-padded to one fixed length so that it
  compiles once: the logits at the last real token do not depend on the padding after it
  (causal attention).
  """
  forward = jax.jit(Flamingo(CONFIG).apply)
  b = ids.shape[0]
  seqs = np.zeros((b, ids.shape[1] + steps), np.int32)
  seqs[:, : ids.shape[1]] = ids
  lengths = lengths.copy()
  for b_ in range(b):
    seqs[b_, lengths[b_]:] = 0
  out = np.zeros((b, steps), np.int32)
  for step in range(steps):
    logits = np.asarray(forward(params, images, seqs, image_mask=image_mask))
    last = logits[np.arange(b), lengths - 1].copy()
    last[:, MEDIA] = -np.inf  # generation never samples <image>
    out[:, step] = np.argmax(last, axis=-1)
    seqs[np.arange(b), lengths] = out[:, step]
    lengths = lengths + 1
  return out


def test_greedy_cached_generation_gives_the_tokens_of_step_by_step_full_forward_passes(params):
  images, ids, lengths, image_mask = _prompts()
  steps = 6
  got = Generator(DECODING).generate(params, {"images": images, "image_mask": image_mask}, ids, steps,
                                     prompt_lengths=lengths)
  want = _greedy_by_full_forward(params, images, ids, lengths, image_mask, steps)
  assert got.tokens.tolist() == want.tolist()
  assert got.lengths.tolist() == [steps, steps]


@pytest.mark.slow  # 13-14 s: out of the default tier, which must stay under 20 min on 2 cores
def test_prefill_and_decode_compile_once_per_bucket_however_many_tokens_are_generated(params):
  """And whatever the sampling method: its settings are traced inputs."""
  images, ids, lengths, image_mask = _prompts()
  gen = Generator(DECODING, prompt_buckets=(16, 32), length_buckets=(32, 64))
  samplings = ["greedy", Sampling("top_k", top_k=3), Sampling("top_p", top_p=0.5, temperature=0.7)]
  for max_new, sampling in zip((2, 5, 11), samplings):  # prompt bucket 16, cache bucket 32
    gen.generate(params, {"images": images, "image_mask": image_mask}, ids, max_new, sampling=sampling,
                 rng=jax.random.key(0), prompt_lengths=lengths)
  assert gen.trace_counts == {"prefill": 1, "decode": 1}
  if hasattr(gen.decode_step, "_cache_size"):  # jax's own count of compiled executables
    assert gen.prefill_step._cache_size() == 1 and gen.decode_step._cache_size() == 1

  long_ids = np.concatenate([ids, np.full((2, 12), 7, np.int32)], axis=1)  # 21 -> bucket 32
  for max_new in (12, 20):  # totals 33 and 41: cache bucket 64 both times
    gen.generate(params, {"images": images, "image_mask": image_mask}, long_ids, max_new,
                 prompt_lengths=lengths + 12)
  assert gen.trace_counts == {"prefill": 2, "decode": 2}
  if hasattr(gen.decode_step, "_cache_size"):
    assert gen.prefill_step._cache_size() == 2 and gen.decode_step._cache_size() == 2


def test_generation_stops_each_example_at_eos_and_pads_after_it(params):
  images, ids, lengths, image_mask = _prompts()
  inputs = {"images": images, "image_mask": image_mask}
  free = generate(DECODING, params, inputs, ids, 6, prompt_lengths=lengths)
  eos = int(free.tokens[0, 1])
  out = generate(DECODING, params, inputs, ids, 6, prompt_lengths=lengths, eos_token_id=eos, pad_id=0)
  stop = list(free.tokens[0]).index(eos)
  assert out.tokens[0, : stop + 1].tolist() == free.tokens[0, : stop + 1].tolist()
  assert (out.tokens[0, stop + 1:] == 0).all() and out.lengths[0] == stop + 1


def test_sampling_methods_keep_to_their_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512, jnp.float32))
  rng = jax.random.key(0)
  assert (np.asarray(sample(logits, rng, Sampling("greedy"))) == 0).all()
  top_k = np.asarray(sample(logits, rng, Sampling("top_k", top_k=2)))
  assert set(top_k.tolist()) == {0, 1}
  top_p = np.asarray(sample(logits, rng, Sampling("top_p", top_p=0.7)))  # 0.5 + 0.3 reach it
  assert set(top_p.tolist()) == {0, 1}
  hot = np.asarray(sample(logits, rng, Sampling("temperature", temperature=1.0)))
  freq = np.bincount(hot, minlength=4) / len(hot)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.07)
  with pytest.raises(ValueError, match="top_p"):
    Sampling("top_p", top_p=0.0)


def test_sampled_generation_is_reproducible_from_its_key_and_top_k_1_is_greedy(params):
  images, ids, lengths, image_mask = _prompts()
  kw = dict(prompt_lengths=lengths)
  images = {"images": images, "image_mask": image_mask}
  a = generate(DECODING, params, images, ids, 5, Sampling("top_p", top_p=0.95), jax.random.key(3), **kw)
  b = generate(DECODING, params, images, ids, 5, Sampling("top_p", top_p=0.95), jax.random.key(3), **kw)
  assert (a.tokens == b.tokens).all() and (a.tokens != MEDIA).all()
  greedy = generate(DECODING, params, images, ids, 5, **kw)
  top1 = generate(DECODING, params, images, ids, 5, Sampling("top_k", top_k=1), jax.random.key(0), **kw)
  assert (greedy.tokens == top1.tokens).all()


def test_generate_rejects_bad_inputs_naming_the_value(params):
  images, ids, lengths, image_mask = _prompts()
  inputs = {"images": images, "image_mask": image_mask}
  with pytest.raises(ValueError, match="exceeds the configured maximum 64"):
    generate(DECODING, params, inputs, ids, 60, prompt_lengths=lengths)
  with pytest.raises(ValueError, match="example 1 has 2 images but 1 <image> tokens"):
    generate(DECODING, params, {"images": images}, ids, 3, prompt_lengths=lengths)
  with pytest.raises(ValueError, match="needs rng"):
    generate(DECODING, params, inputs, ids, 3, "temperature", prompt_lengths=lengths)
  with pytest.raises(ValueError, match="needs inputs\\['images'\\]"):
    generate(DECODING, params, None, ids, 3, prompt_lengths=lengths)


def test_few_shot_prompts_interleave_images_and_text():
  rng = np.random.default_rng(0)
  cat, dog, query = (rng.integers(0, 256, (16, 16, 3)).astype(np.uint8) for _ in range(3))
  encode = lambda text: [10 + len(word) for word in text.split()]  # noqa: E731
  images, ids = prompt.few_shot([(cat, "a cat"), (dog, "a big dog")], query, "a", CONFIG, encode,
                                bos_id=1)
  eoc = CONFIG.end_of_chunk_token_id
  assert ids.tolist() == [1, MEDIA, 11, 13, eoc, MEDIA, 11, 13, 13, eoc, MEDIA, 11]
  assert (images == np.stack([cat, dog, query])).all()
  batch = prompt.batch([(images, ids), (images[:1], ids[:4])])
  assert batch["prompt_lengths"].tolist() == [12, 4]
  assert batch["image_mask"].tolist() == [[True] * 3, [True, False, False]]
