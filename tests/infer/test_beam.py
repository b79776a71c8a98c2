"""Beam search: one beam is greedy decoding; two and three beams keep the hypotheses a plain
beam search over full-forward log-probabilities keeps, and enough beams find the exhaustive
best under the length penalty; banned ids are never chosen; the scanned layout (batch on the
second axis) changes nothing; one compilation per bucket; bad inputs are errors naming the
value."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.flamingo.generation import decoding as flamingo_decoding
from mmjax.families.flamingo.model import insert
from mmjax.families.lm import model as lm
from mmjax.families.lm import task as lm_task
from mmjax.infer import BeamSearch, Decoding, Generator, beam_search
from mmjax.infer.beam import ABSENT_BEAM_SCORE
from mmjax.models.decoder import DecoderConfig
from mmjax.models.scan_layout import stack_layers
from tests.infer.util import micro_config, random_params

VOCAB = 6
EOS = 1
LM = lm.LMConfig(DecoderConfig(vocab_size=VOCAB, width=16, depth=2, num_heads=2, num_kv_heads=1, head_dim=8,
                               mlp_dim=32, max_length=32))
PROMPTS = np.array([[3, 1, 4, 1, 5], [0, 5, 3, 0, 0]], np.int32)
PROMPT_LENGTHS = np.array([5, 3], np.int32)


@pytest.fixture(scope="module")
def lm_params():
  """Every leaf drawn at random: next-token distributions flat enough (most likely token at
  0.25-0.5) for beams to part from greedy decoding, and eos within reach."""
  shapes = nn.unbox(jax.eval_shape(lm.LanguageModel(LM).init, jax.random.key(0), jnp.asarray(PROMPTS)))
  rng = np.random.default_rng(0)
  def draw(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def lm_search():
  return BeamSearch(lm_task.decoding(LM))


@pytest.fixture(scope="module")
def next_log_probs(lm_params):
  """(example, continuation tuple) -> float64[V]: the full (uncached) forward pass's
  log-probabilities of the token after prompt + continuation."""
  forward = jax.jit(lambda ids: lm.LanguageModel(LM).apply(lm_params, ids)[0])

  @functools.cache
  def log_probs(example, continuation):
    seq = list(PROMPTS[example, :PROMPT_LENGTHS[example]]) + list(continuation)
    ids = np.zeros((1, 16), np.int32)  # one padded length, one compile: causal attention keeps
    ids[0, :len(seq)] = seq            # the padding out of the logits read
    logits = np.asarray(forward(ids), np.float64)[0, len(seq) - 1]
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  return log_probs


def reference_beam_search(log_probs, num_beams, max_new, eos, length_penalty, early_stopping=False):
  """transformers' beam search for one example written plainly, over a function from a
  continuation tuple to the next token's log-probabilities: the finished hypotheses
  [(score, tokens)], best first."""
  running = [(0.0, ())] + [(ABSENT_BEAM_SCORE, ())] * (num_beams - 1)
  finished = []  # (score, tokens), best first, at most num_beams
  for step in range(max_new):
    candidates = [(total + lp, seq + (token,)) for total, seq in running for token, lp in enumerate(log_probs(seq))]
    candidates = sorted(candidates, key=lambda c: -c[0])[:2 * num_beams]
    last = step == max_new - 1
    for total, seq in candidates[:num_beams]:
      if seq[-1] == eos or last:
        finished.append((total / len(seq) ** length_penalty, seq))
    finished = sorted(finished, key=lambda h: -h[0])[:num_beams]
    if last:
      break
    running = [c for c in candidates if c[1][-1] != eos][:num_beams]
    if len(finished) == num_beams:
      length = max_new if early_stopping == "never" and length_penalty > 0 else step + 1
      if early_stopping is True or running[0][0] / length ** length_penalty <= finished[-1][0]:
        break  # no running beam can do better: the finished hypotheses are final
  return finished


def exhaustive_best(log_probs, max_new, eos, length_penalty):
  """(score, tokens) of the best of every continuation (each ends at eos or max_new)."""
  best = (-np.inf, ())
  def walk(seq, total):
    nonlocal best
    if seq and (seq[-1] == eos or len(seq) == max_new):
      best = max(best, (total / len(seq) ** length_penalty, seq), key=lambda h: h[0])
      return
    for token, lp in enumerate(log_probs(seq)):
      walk(seq + (token,), total + lp)
  walk((), 0.0)
  return best


def _as_tuples(out):
  return [tuple(out.tokens[b, :out.lengths[b]].tolist()) for b in range(len(out.lengths))]


def test_one_beam_gives_the_greedy_tokens_of_an_lm(lm_params, lm_search):
  greedy = Generator(lm_task.decoding(LM)).generate(lm_params, None, PROMPTS, 6, prompt_lengths=PROMPT_LENGTHS,
                                                    eos_token_id=EOS)
  got = lm_search.search(lm_params, None, PROMPTS, 6, num_beams=1, prompt_lengths=PROMPT_LENGTHS, eos_token_id=EOS)
  assert got.tokens.tolist() == greedy.tokens.tolist()
  assert got.lengths.tolist() == greedy.lengths.tolist()
  assert (greedy.lengths < 6).any()  # an example stopped at eos


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (3, 1.0, False), (3, 0.0, False), (3, -1.0, False), (3, 2.0, False), (3, 1.0, True),
    # Here False stops example 1 before its 6th token and "never" does not: they keep different hypotheses.
    (2, 2.0, False), (2, 2.0, "never")])
def test_beams_keep_the_hypotheses_a_plain_beam_search_over_full_forward_passes_keeps(
    lm_params, lm_search, next_log_probs, num_beams, length_penalty, early_stopping):
  """All the finished hypotheses, not only the best: the others descend from beams that
  changed rows, so they check the cache gather."""
  got = lm_search.search(lm_params, None, PROMPTS, 6, num_beams=num_beams, length_penalty=length_penalty,
                         early_stopping=early_stopping, prompt_lengths=PROMPT_LENGTHS, eos_token_id=EOS)
  for b in range(len(PROMPTS)):
    want = reference_beam_search(functools.partial(next_log_probs, b), num_beams, 6, EOS, length_penalty,
                                 early_stopping)
    assert [tuple(got.finished_tokens[b, i, :n].tolist()) for i, n in enumerate(got.finished_lengths[b])] \
        == [tokens for _, tokens in want], b
    np.testing.assert_allclose(got.finished_scores[b], [score for score, _ in want], rtol=1e-5)
    assert (got.finished_tokens[b, 0] == got.tokens[b]).all() and got.scores[b] == got.finished_scores[b, 0]
    assert (got.tokens[b, got.lengths[b]:] == 0).all()  # pad_id after the hypothesis


def test_three_beams_find_what_greedy_decoding_misses(lm_params, lm_search, next_log_probs):
  """The case above is not trivial: for length_penalty 1 the beams' answer beats greedy's."""
  greedy = Generator(lm_task.decoding(LM)).generate(lm_params, None, PROMPTS, 4, prompt_lengths=PROMPT_LENGTHS,
                                                    eos_token_id=EOS)
  beams = lm_search.search(lm_params, None, PROMPTS, 4, num_beams=3, prompt_lengths=PROMPT_LENGTHS, eos_token_id=EOS)
  def score(b, seq):
    return sum(next_log_probs(b, seq[:i])[t] for i, t in enumerate(seq)) / len(seq)
  differ = [b for b in range(2) if _as_tuples(beams)[b] != _as_tuples(greedy)[b]]
  assert differ
  for b in differ:
    assert score(b, _as_tuples(beams)[b]) > score(b, _as_tuples(greedy)[b])


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -1.0])
def test_more_beams_than_continuations_give_the_exhaustive_best(lm_params, lm_search, next_log_probs,
                                                                length_penalty):
  # 6**3 beams keep every continuation of 3 tokens: the search is exhaustive.
  got = lm_search.search(lm_params, None, PROMPTS, 3, num_beams=VOCAB ** 3, length_penalty=length_penalty,
                         prompt_lengths=PROMPT_LENGTHS, eos_token_id=EOS)
  for b in range(len(PROMPTS)):
    score, tokens = exhaustive_best(functools.partial(next_log_probs, b), 3, EOS, length_penalty)
    assert _as_tuples(got)[b] == tokens, b
    np.testing.assert_allclose(got.scores[b], score, rtol=1e-5)


def test_banned_ids_are_never_chosen(lm_params, next_log_probs):
  banned = dataclasses.replace(lm_task.decoding(LM), banned_ids=(0,))  # the token example 0's greedy path repeats
  got = BeamSearch(banned).search(lm_params, None, PROMPTS, 6, num_beams=3, prompt_lengths=PROMPT_LENGTHS,
                                  eos_token_id=EOS, pad_id=5)
  for b in range(len(PROMPTS)):
    def log_probs(seq, b=b):
      return np.where(np.arange(VOCAB) == 0, -np.inf, next_log_probs(b, seq))
    want = reference_beam_search(log_probs, 3, 6, EOS, 1.0)
    hypotheses = [tuple(got.finished_tokens[b, i, :n].tolist()) for i, n in enumerate(got.finished_lengths[b])]
    assert hypotheses == [tokens for _, tokens in want], b
    assert all(0 not in tokens for tokens in hypotheses)


def test_the_beam_step_compiles_once_per_bucket_however_many_tokens(lm_params):
  search = BeamSearch(lm_task.decoding(LM), prompt_buckets=(8,), length_buckets=(16, 32))
  for max_new in (3, 7):  # both in cache bucket 16
    search.search(lm_params, None, PROMPTS, max_new, num_beams=2, prompt_lengths=PROMPT_LENGTHS)
  assert search.trace_counts == {"beam_prefill": 1, "beam_step": 1}
  if hasattr(search.beam_step, "_cache_size"):  # jax's own count of compiled executables
    assert search.prefill_step._cache_size() == 1 and search.beam_step._cache_size() == 1
  search.search(lm_params, None, PROMPTS, 14, num_beams=2, prompt_lengths=PROMPT_LENGTHS)  # cache bucket 32
  assert search.trace_counts == {"beam_prefill": 2, "beam_step": 2}


def _flamingo_prompts(config):
  """Two prompts of different lengths; the second has one real image and one padding image."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(2, 2, 16, 16, 3)).astype(np.uint8)
  ids = rng.integers(6, 64, size=(2, 9)).astype(np.int32)
  ids[0, [1, 5]] = config.media_token_id
  ids[1, 0] = config.media_token_id
  return {"images": images, "image_mask": np.array([[True, True], [True, False]])}, ids, np.array([9, 6], np.int32)


def test_one_beam_gives_the_greedy_tokens_of_flamingo_with_images():
  config = micro_config()
  params = random_params(config)
  inputs, ids, lengths = _flamingo_prompts(config)
  generator = Generator(flamingo_decoding(config))
  eos = int(generator.generate(params, inputs, ids, 6, prompt_lengths=lengths).tokens[0, 3])  # example 0 stops there
  greedy = generator.generate(params, inputs, ids, 6, prompt_lengths=lengths, eos_token_id=eos)
  got = beam_search(flamingo_decoding(config), params, inputs, ids, 6, num_beams=1, prompt_lengths=lengths,
                    eos_token_id=eos)
  assert got.tokens.tolist() == greedy.tokens.tolist() and got.lengths.tolist() == greedy.lengths.tolist()
  assert got.lengths[0] <= 4


def test_the_scanned_layout_whose_cache_keeps_the_batch_second_gives_the_same_hypotheses(lm_params, lm_search):
  scanned = lm.LMConfig(dataclasses.replace(LM.decoder, scan_layers=True))
  search = BeamSearch(lm_task.decoding(scanned))
  kw = dict(num_beams=3, prompt_lengths=PROMPT_LENGTHS, eos_token_id=EOS)
  got = search.search(stack_layers(lm_params, LM.decoder.depth), None, PROMPTS, 6, **kw)
  want = lm_search.search(lm_params, None, PROMPTS, 6, **kw)
  assert got.finished_tokens.tolist() == want.finished_tokens.tolist()
  np.testing.assert_allclose(got.finished_scores, want.finished_scores, rtol=1e-5)
  # {"blocks": {"layers_0": {"key", "value": [blocks, B, S, G, K]}}}
  assert search.batch_axes(stack_layers(lm_params, LM.decoder.depth), {}, 16, 16).cache == (1, 1)


def test_flamingo_media_keys_values_keep_the_batch_second_in_the_scanned_layout():
  config, scanned = micro_config(), micro_config(scan_layers=True)
  params = stack_layers(random_params(config), config.decoder.depth, insert(config))
  inputs, _, _ = _flamingo_prompts(config)
  axes = BeamSearch(flamingo_decoding(scanned)).batch_axes(params, jax.tree.map(jnp.asarray, inputs), 16, 32)
  # context: {"image_index": [B], "media_kv": {"blocks": {...: [blocks, B, N, L, ...]}}}
  assert axes.context[0] == 0 and set(axes.context[1:]) == {1} and set(axes.cache) == {1}


@pytest.mark.slow  # 10 s: two Flamingo compilations
def test_scanned_flamingo_gives_the_beams_of_the_unrolled_one():
  config, scanned = micro_config(), micro_config(scan_layers=True)
  params = random_params(config)
  inputs, ids, lengths = _flamingo_prompts(config)
  want = beam_search(flamingo_decoding(config), params, inputs, ids, 5, num_beams=3, prompt_lengths=lengths)
  got = beam_search(flamingo_decoding(scanned), stack_layers(params, config.decoder.depth, insert(config)), inputs,
                    ids, 5, num_beams=3, prompt_lengths=lengths)
  assert got.finished_tokens.tolist() == want.finished_tokens.tolist()
  np.testing.assert_allclose(got.finished_scores, want.finished_scores, rtol=1e-4)


def test_beam_search_rejects_bad_arguments_naming_the_value(lm_params, lm_search):
  kw = dict(prompt_lengths=PROMPT_LENGTHS)
  for num_beams in (0, 2.5, True):
    with pytest.raises(ValueError, match=f"num_beams={num_beams!r}; expected an int >= 1"):
      lm_search.search(lm_params, None, PROMPTS, 3, num_beams=num_beams, **kw)
  for penalty in (float("nan"), float("inf"), "1"):
    with pytest.raises(ValueError, match="length_penalty=.*; expected a finite number"):
      lm_search.search(lm_params, None, PROMPTS, 3, num_beams=2, length_penalty=penalty, **kw)
  with pytest.raises(ValueError, match="early_stopping='soon'; expected one of"):
    lm_search.search(lm_params, None, PROMPTS, 3, num_beams=2, early_stopping="soon", **kw)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    lm_search.search(lm_params, None, PROMPTS, 0, num_beams=2, **kw)
  with pytest.raises(ValueError, match="exceeds the configured maximum 32"):
    lm_search.search(lm_params, None, PROMPTS, 30, num_beams=2, **kw)
  with pytest.raises(ValueError, match="an lm model takes no inputs"):  # the family's own check
    lm_search.search(lm_params, {"images": np.zeros((2, 1))}, PROMPTS, 3, num_beams=2, **kw)
  with pytest.raises(ValueError, match=r"inputs\['images'\] has shape \(1, 4\); expected the batch \(2 prompts\)"):
    lm_search.search(lm_params, {"images": np.zeros((1, 4))}, PROMPTS, 3, num_beams=2, **kw)


def test_a_context_leaf_without_one_batch_axis_is_an_error_naming_it():
  """Beams are gathered along a batch axis: a leaf that folds the batch into another axis has none."""
  def prefill(params, inputs, ids, positions, lengths, cache):
    return jnp.zeros(ids.shape + (VOCAB,)), cache, {"media": jnp.zeros((ids.shape[0] * 3, 4))}
  folded = Decoding(max_length=32, init_cache=lambda b, n: {"key": jnp.zeros((b, n))}, prefill=prefill,
                    step=lambda *args: None)
  with pytest.raises(ValueError, match=r"context\['media'\] has shape \(3, 4\) at batch 1 and \(6, 4\) at batch 2"):
    BeamSearch(folded).search({}, None, PROMPTS, 3, num_beams=2)
