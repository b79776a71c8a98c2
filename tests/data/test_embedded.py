"""The embedded dataset: text that only the image answers, disjoint splits, reused builds."""

import collections
import hashlib
import time

import numpy as np
import pytest

from mmjax.data import builders, qa, scenes
from mmjax.data.preprocess import decode_image
from tests.data.conftest import IMAGE_SIZE, SIZE


def _all_records(data_dir, kind, split):
  source = builders.open_split(data_dir, kind, split)
  return [source[i] for i in range(len(source))]


def test_splits_have_the_sizes_the_knob_asks_for(data_dir):
  for kind in builders.KINDS:
    for split in builders.SPLITS:
      assert len(builders.open_split(data_dir, kind, split)) == builders.split_size(SIZE, split, kind)


def test_no_scene_and_no_image_repeats_across_splits(data_dir):
  keys, digests = {}, {}
  for split in builders.SPLITS:
    keys[split], digests[split] = set(), set()
    for kind in builders.KINDS:
      for record in _all_records(data_dir, kind, split):
        keys[split].update(k.decode() for k in record["scenes"])
        digests[split].update(hashlib.sha256(bytes(b)).hexdigest() for b in record["images"])
  for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
    assert not keys[a] & keys[b], (a, b)
    assert not digests[a] & digests[b], (a, b)


def test_every_record_has_one_image_per_image_token(data_dir):
  for kind in builders.KINDS:
    for record in _all_records(data_dir, kind, "validation"):
      text = record["text"].decode()
      assert text.count("<image>") == len(record["images"]) >= 1
      if kind == "interleaved":
        assert 2 <= len(record["images"]) <= 5
        assert text.count("<|endofchunk|>") == len(record["images"])


def test_drawn_pixels_have_the_colour_the_text_names():
  # What the text says is what is drawn: the centre of every shape has its named colour.
  rng = np.random.default_rng(3)
  for _ in range(200):
    scene = scenes.sample_scene(rng, 64)
    image = scenes.render(scene)
    for shape in scene.shapes:
      pixel = image[shape.y, shape.x].astype(np.int64)
      expected = np.asarray(scenes.COLOURS[shape.colour], np.int64)
      assert np.abs(pixel - expected).max() <= 2, (shape, pixel)


def test_answers_follow_from_the_scene():
  rng = np.random.default_rng(4)
  for _ in range(300):
    scene = scenes.sample_scene(rng, 64)
    for kind, question, answer in scenes.questions(scene):
      if kind == "count":
        assert answer == str(len(scene.shapes))
      elif kind == "leftmost":
        assert answer == min(scene.shapes, key=lambda s: s.x).colour
      elif kind == "rightmost":
        assert answer == max(scene.shapes, key=lambda s: s.x).colour
      elif kind == "colour":
        shape = question.split("the ")[1].rstrip("?")
        assert [s.colour for s in scene.shapes if s.shape == shape] == [answer]


def _text_only_accuracy(train, held_out):
  """The best a model reading only the question does: the most frequent training answer
  of the same question (of any question when it never appeared)."""
  per_question, overall = collections.defaultdict(collections.Counter), collections.Counter()
  for question, answer in train:
    per_question[question][answer] += 1
    overall[answer] += 1
  guess = lambda q: (per_question[q] or overall).most_common(1)[0][0]
  return np.mean([guess(q) == a for q, a in held_out])


def test_answers_cannot_be_predicted_from_the_question_text_alone(data_dir):
  train = [(r["question"], r["answer"]) for r in qa.qa_records(data_dir, "train")]
  val = [(r["question"], r["answer"]) for r in qa.qa_records(data_dir, "validation")]
  # Chance over the kinds' answers is about 0.28 (1/4, 1/4, 1/5, 1/3, 1/5, 1/5, 1/2);
  # the unbalanced questions of the documents (sample_question) would give about 0.37.
  assert _text_only_accuracy(train, val) < 0.33


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_balanced_questions_spread_each_kind_evenly_over_its_answers():
  rng = np.random.default_rng(0)
  drawn = [scenes.sample_balanced_question(rng, 64) for _ in range(7000)]
  by_kind = collections.defaultdict(collections.Counter)
  for scene, (kind, question, answer) in drawn:
    assert (kind, question, answer) in scenes.questions(scene)
    by_kind[kind][answer] += 1
  assert set(by_kind) == set(scenes.QUESTION_KINDS)
  for kind, counts in by_kind.items():
    n, expected = sum(counts.values()), 1 / len(scenes.ANSWERS[kind])
    assert set(counts) == set(scenes.ANSWERS[kind]), (kind, counts)
    # ~1000 per kind: a frequency's standard deviation is at most 0.016.
    assert all(abs(c / n - expected) < 0.06 for c in counts.values()), (kind, counts)
  pairs = [(q, a) for _, (_, q, a) in drawn]
  chance = np.mean([1 / len(scenes.ANSWERS[k]) for k in scenes.QUESTION_KINDS])
  assert _text_only_accuracy(pairs[:6000], pairs[6000:]) < chance + 0.05


def test_question_kind_names_the_kind_of_every_generated_question():
  rng = np.random.default_rng(2)
  for _ in range(200):
    for kind, question, _ in scenes.questions(scenes.sample_scene(rng, 64)):
      assert scenes.question_kind(question) == kind, question
  assert scenes.question_kind("what is this?") is None


def test_balanced_questions_respect_the_scenes_a_caller_refuses():
  rng = np.random.default_rng(1)
  refused = {scenes.sample_balanced_question(rng, 64)[0].key for _ in range(50)}
  rng = np.random.default_rng(1)
  for _ in range(50):
    scene, _ = scenes.sample_balanced_question(rng, 64, accept=lambda s: s.key not in refused)
    assert scene.key not in refused


def test_qa_records_give_images_question_and_answer_in_the_prompt_format(data_dir):
  record = next(qa.qa_records(data_dir, "validation"))
  assert record["images"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert record["images"].dtype == np.uint8
  stored = builders.open_split(data_dir, "qa", "validation")[0]
  assert stored["text"].decode() == qa.qa_prompt(record["question"], record["answer"])
  resized = next(qa.qa_records(data_dir, "validation", image_size=16))
  assert resized["images"].shape == (1, 16, 16, 3)
  prompt = qa.few_shot_prompt([("how many shapes are there?", "2")], record["question"])
  assert prompt == ("<image>Question: how many shapes are there? Answer: 2<|endofchunk|>"
                    f"<image>Question: {record['question']} Answer:")
  assert qa.exact_match(" 3<|endofchunk|><image>", "3")
  assert not qa.exact_match(" 4<|endofchunk|>", "3")


def test_a_second_build_reuses_the_first(data_dir):
  start = time.time()
  result = builders.build_embedded(data_dir, size=SIZE, image_size=IMAGE_SIZE, seed=0)
  assert result.reused and time.time() - start < 5
  assert all(p.startswith(data_dir) for p in result.datasets.values())


def test_the_same_seed_plans_the_same_records_and_another_seed_does_not():
  a = builders.plan.__wrapped__(20, 32, 7)
  b = builders.plan.__wrapped__(20, 32, 7)
  c = builders.plan.__wrapped__(20, 32, 8)
  text = lambda p: [r["text"] for k in sorted(p) for r in p[k]]
  assert text(a) == text(b) and text(a) != text(c)
  assert [s.key for s in a[("train", "qa")][0]["scenes"]] == [s.key for s in b[("train", "qa")][0]["scenes"]]


def test_stored_images_decode_to_the_rendered_pixels(data_dir):
  record = builders.open_split(data_dir, "captions", "train")[0]
  image = decode_image(bytes(record["images"][0]), None)
  assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  key = record["scenes"][0].decode()
  plan = builders.plan(SIZE, IMAGE_SIZE, 0)
  scene = next(r["scenes"][0] for r in plan[("train", "captions")] if r["scenes"][0].key == key)
  np.testing.assert_array_equal(image, scenes.render(scene))
