"""lm/tiny_reading's data: the embedded records with each `<image>` replaced by its scene's
left-to-right caption (`DescribingBuilder`), the scenes read back from the keys the records
store (`Scene.from_key`), and the reading evaluation's plumbing. What the LM learns from it is
measured in configs/lm/tiny_reading.py and docs/blip2.md."""

import jax
import numpy as np
import pytest

from mmjax import data as data_lib
from mmjax.data import builders, scenes
from mmjax.families.lm import task as lm_task
from mmjax.train import config as config_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("reading_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


def _records(data_dir, name):
  source = builders.open_split(data_dir, name, "train")
  return [source[i] for i in range(len(source))]


def test_scene_keys_read_back_to_the_same_scene_and_bad_keys_are_named():
  rng = np.random.default_rng(0)
  for _ in range(500):
    scene = scenes.sample_scene(rng, int(rng.choice([16, 32, 64])))
    assert scenes.Scene.from_key(scene.key) == scene
  for bad in ("64|1,2,3|4,5,6", "x", "64|1,2,3|4,5,6|zred1,2,3", "64|1,2,3|4,5,6|cred1,2", "64|1,2,3|4,5,6|corange1,2,3"):
    with pytest.raises(ValueError, match="scene key"):
      scenes.Scene.from_key(bad)


def test_every_image_becomes_its_scenes_caption_with_the_question_encoded_as_after_an_image(data_dir):
  tok = builders.load_tokenizer(data_dir)
  bucket = data_lib.Bucket(max_images=0, text_length=128)
  builder = lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0)
  for record in _records(data_dir, "qa") + _records(data_dir, "interleaved")[:10]:
    text = record["text"].decode()
    pieces = text.split(data_lib.IMAGE_TOKEN)
    expected = [tok.bos_id] + tok.encode(pieces[0])
    for key, piece in zip(record["scenes"], pieces[1:]):
      expected += tok.encode(scenes.left_to_right(scenes.Scene.from_key(key.decode()))) + tok.encode(piece)
    expected = (expected + [tok.eos_id])[:128]
    got = builder(record)["input_ids"]
    np.testing.assert_array_equal(got[:len(expected)], expected)
    assert (got[len(expected):] == tok.pad_id).all()
  # A question's ids after the caption are its ids in an image bucket (after the <image>).
  record = _records(data_dir, "qa")[0]
  question_ids = tok.encode(record["text"].decode().split(data_lib.IMAGE_TOKEN)[1])
  ids = builder(record)["input_ids"].tolist()
  assert any(ids[i:i + len(question_ids)] == question_ids for i in range(len(ids)))


def test_no_description_is_the_plain_text_example_and_a_share_is_drawn_per_record_and_seed(data_dir):
  tok = builders.load_tokenizer(data_dir)
  bucket = data_lib.Bucket(max_images=0, text_length=64)
  plain = data_lib.ExampleBuilder(tok, bucket)
  none = lm_task.DescribingBuilder(tok, bucket, 0.0, seed=0)
  records = _records(data_dir, "qa") + _records(data_dir, "captions")
  for record in records:
    a, b = plain(record), none(record)
    for key in ("input_ids", "targets", "loss_mask"):
      np.testing.assert_array_equal(a[key], b[key])
  half = lm_task.DescribingBuilder(tok, bucket, 0.5, seed=0)
  described = [not np.array_equal(half(r)["input_ids"], plain(r)["input_ids"]) for r in records]
  assert 0.25 < np.mean(described) < 0.75, np.mean(described)
  # The same record gives the same example every time (every epoch, after a resume) ...
  assert all(np.array_equal(half(r)["input_ids"], half(r)["input_ids"]) for r in records)
  # ... and another seed draws other records.
  other = lm_task.DescribingBuilder(tok, bucket, 0.5, seed=1)
  assert described != [not np.array_equal(other(r)["input_ids"], plain(r)["input_ids"]) for r in records]


def test_bad_probabilities_and_records_without_scenes_are_refused_by_name(data_dir):
  tok = builders.load_tokenizer(data_dir)
  bucket = data_lib.Bucket(max_images=0, text_length=64)
  for p in (-0.1, 1.5):
    with pytest.raises(ValueError, match=rf"describe_images={p}; expected a probability"):
      lm_task.DescribingBuilder(tok, bucket, p, seed=0)
  record = dict(_records(data_dir, "qa")[0], scenes=[])
  with pytest.raises(ValueError, match=r"record qa/train/\d+: data.describe_images=1.0 needs the scene of every image"):
    lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0)(record)


def test_the_reading_evaluation_asks_each_question_with_and_without_its_caption(data_dir):
  config = config_lib.load_config("lm/tiny_reading", [f"--config.data.dir={data_dir}", "--config.model.decoder.depth=1"])
  task = lm_task.lm_task(config)
  params = jax.jit(task.init_params)(jax.random.key(0))
  res = lm_task.reading_accuracy(config, lm_task.model_config(config, task.tokenizer.vocab_size), task.tokenizer,
                                 params, limit=6, batch=4)
  source = builders.open_split(data_dir, "qa", "validation")
  kinds = {scenes.question_kind(source[i]["question"].decode()) for i in range(min(6, len(source)))}
  for name in ("described", "bare"):
    assert res[f"reading_qa_{name}"] * min(6, len(source)) == pytest.approx(
        round(res[f"reading_qa_{name}"] * min(6, len(source))))
    assert set(res[f"reading_qa_{name}_by_kind"]) == kinds


def test_more_questions_ask_other_questions_of_the_same_scene_with_their_answers(data_dir):
  tok = builders.load_tokenizer(data_dir)
  bucket = data_lib.Bucket(max_images=0, text_length=256)
  builder = lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0, more_questions=3)
  checked = 0
  for record in _records(data_dir, "qa"):
    scene = scenes.Scene.from_key(record["scenes"][0].decode())
    text = tok.decode([i for i in builder(record)["input_ids"].tolist() if i not in (tok.pad_id, tok.bos_id, tok.eos_id)])
    chunks = [c for c in text.split(data_lib.END_OF_CHUNK_TOKEN) if c]
    asked = [c.split("Question: ")[1] for c in chunks]
    assert asked[0] == f"{record['question'].decode()} Answer: {record['answer'].decode()}"
    truths = {f"{q} Answer: {a}" for _, q, a in scenes.questions(scene)}
    assert set(asked) <= truths  # every extra answer is the scene's
    assert len(set(asked)) == len(asked) == min(4, len(truths))  # none twice, as many as there are
    checked += 1
  assert checked >= 5
  with pytest.raises(ValueError, match="more_questions=-1; expected >= 0"):
    lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0, more_questions=-1)
  # Captions (no question) get none.
  caption = _records(data_dir, "captions")[0]
  assert "Question" not in tok.decode(builder(caption)["input_ids"].tolist())


def test_without_caption_loss_exactly_the_captions_tokens_leave_the_loss(data_dir):
  tok = builders.load_tokenizer(data_dir)
  bucket = data_lib.Bucket(max_images=0, text_length=64)
  with_loss = lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0, more_questions=2)
  without = lm_task.DescribingBuilder(tok, bucket, 1.0, seed=0, more_questions=2, caption_loss=False)
  for record in _records(data_dir, "qa"):
    a, b = with_loss(record), without(record)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    caption = tok.encode(scenes.left_to_right(scenes.Scene.from_key(record["scenes"][0].decode())))
    start = len(tok.encode(record["text"].decode().split(data_lib.IMAGE_TOKEN)[0]))  # the caption's first target
    np.testing.assert_array_equal(a["targets"][start:start + len(caption)], caption)
    dropped = np.flatnonzero(a["loss_mask"] != b["loss_mask"])
    np.testing.assert_array_equal(dropped, np.arange(start, start + len(caption)))
    assert (b["loss_mask"][dropped] == 0).all() and b["loss_mask"].sum() > 0
