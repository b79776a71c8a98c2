"""Text-only buckets (max_images=0): the batch a plain language model trains on.

The same records as the image pipeline, in the same order, with only input_ids, targets and
loss_mask; `<image>` tokens are dropped, no image is decoded, and the image pipeline's own
batches do not change.
"""

import json

import numpy as np
import pytest

from mmjax.data import builders, pipeline, preprocess
from mmjax.data.preprocess import BadRecordError, Bucket, ExampleBuilder

TEXT_BUCKET = Bucket(max_images=0, text_length=24, image_size=16)
CONTRACT = {
    "input_ids": (np.int32, (4, 24)),
    "targets": (np.int32, (4, 24)),
    "loss_mask": (np.float32, (4, 24)),
}
# Room for every record of the embedded dataset (at most 5 images, 97 text ids), so the
# image pipeline skips and cuts nothing and both modes read the same records.
ROOMY_TEXT_LENGTH = 100


def _make(data_dir, **kwargs):
  args = dict(data_dir=data_dir, batch_size=4, bucket=TEXT_BUCKET, seed=0)
  return pipeline.make_pipeline(**{**args, **kwargs})


def _take(p, n):
  return [next(p) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _text(record) -> str:
  text = record["text"]
  return text.decode() if isinstance(text, bytes) else text


class _Untouchable:
  """A record's images that fail on any use: proof that text mode never reads them."""

  def __getattr__(self, name):
    raise AssertionError(f"text-only mode touched the record's images ({name})")

  def __iter__(self):
    raise AssertionError("text-only mode iterated over the record's images")

  def __len__(self):
    raise AssertionError("text-only mode counted the record's images")


def test_a_bucket_with_no_image_slots_is_text_only_and_a_negative_count_is_refused():
  assert Bucket(max_images=0, text_length=8).text_only
  assert not Bucket(max_images=1, text_length=8).text_only
  with pytest.raises(ValueError, match=r"max_images=-1.*expected max_images >= 0 \(0: text only\)"):
    Bucket(max_images=-1, text_length=8)


def test_text_only_batches_hold_just_ids_targets_and_loss_mask(data_dir):
  p = _make(data_dir, bucket=(0, 24, 16))  # a plain tuple works too
  for batch in _take(p, 30):
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == CONTRACT


def test_text_only_batches_keep_the_sequence_contract_with_no_image_token(data_dir, tokenizer):
  chunk_ends = 0
  for batch in _take(_make(data_dir), 30):
    ids, targets, loss_mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
    assert not (ids == tokenizer.image_id).any()
    assert not (targets == tokenizer.image_id).any()
    assert (ids[:, 0] == tokenizer.bos_id).all()
    np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
    assert (targets[:, -1] == tokenizer.pad_id).all()
    # Every target under the loss is the next input token, and every real next token is
    # under the loss.
    np.testing.assert_array_equal(loss_mask, (targets != tokenizer.pad_id).astype(np.float32))
    learned = loss_mask[:, :-1] == 1
    np.testing.assert_array_equal(targets[:, :-1][learned], ids[:, 1:][learned])
    chunk_ends += int((ids == tokenizer.end_of_chunk_id).sum())
  assert chunk_ends > 0  # <|endofchunk|> stays, as text


def test_no_image_is_decoded_in_text_only_mode(data_dir, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("decode_image was called for a text-only bucket")

  monkeypatch.setattr(preprocess, "decode_image", refuse)
  monkeypatch.setattr(preprocess, "_decode", refuse)
  batches = _take(_make(data_dir, bad_data="raise"), 10)
  assert len(batches) == 10
  with pytest.raises(AssertionError, match="decode_image was called"):
    next(_make(data_dir, bucket=Bucket(1, 24, 16)))  # the patch does reach the image mode


def test_a_record_s_image_tokens_are_dropped_and_its_images_never_touched(tokenizer):
  text = "<image>a red square.<|endofchunk|><image>a blue circle."
  example = ExampleBuilder(tokenizer, Bucket(0, 32), bad_data="raise")(
      {"id": "x", "text": text, "images": _Untouchable()})
  kept = [i for i in tokenizer.encode(text) if i != tokenizer.image_id]
  expected = [tokenizer.bos_id] + kept + [tokenizer.eos_id]
  np.testing.assert_array_equal(example["input_ids"][:len(expected)], expected)
  assert (example["input_ids"][len(expected):] == tokenizer.pad_id).all()
  assert tokenizer.decode(example["input_ids"]) == "a red square.<|endofchunk|>a blue circle."


def test_a_count_of_image_tokens_unlike_the_images_is_not_bad_in_text_only_mode(tokenizer):
  builder = ExampleBuilder(tokenizer, Bucket(0, 32), bad_data="raise")
  for text, images in [("<image>a red square and <image>", [b"png"]), ("a red square.", [b"png"])]:
    example = builder({"id": "x", "text": text, "images": images})
    assert tokenizer.decode(example["input_ids"]) == text.replace("<image>", "")


def test_text_with_nothing_but_image_and_chunk_tokens_is_empty_text(tokenizer):
  record = {"id": "test/empty", "text": "<image><|endofchunk|><image>", "images": [b"x", b"y"]}
  skipped = ExampleBuilder(tokenizer, Bucket(0, 16), bad_data="skip")(record)
  assert skipped == {"bad_record": "empty_text", "record_id": "test/empty"}
  with pytest.raises(BadRecordError, match="record 'test/empty': empty_text"):
    ExampleBuilder(tokenizer, Bucket(0, 16), bad_data="raise")(record)


def test_long_text_is_cut_at_t_and_loses_its_eos_while_text_that_fits_keeps_it(tokenizer):
  text = "<image>" + " ".join(["a red circle"] * 20) + "<|endofchunk|><image>and more."
  ids = [tokenizer.bos_id] + [i for i in tokenizer.encode(text) if i != tokenizer.image_id]
  t_max = 16
  example = ExampleBuilder(tokenizer, Bucket(0, t_max), bad_data="raise")(
      {"id": "x", "text": text, "images": []})
  np.testing.assert_array_equal(example["input_ids"], ids[:t_max])  # no chunk boundary needed
  assert tokenizer.eos_id not in example["input_ids"]
  np.testing.assert_array_equal(example["targets"][:-1], ids[1:t_max])
  assert example["targets"][-1] == tokenizer.pad_id and example["loss_mask"][-1] == 0
  # With exactly room for BOS, the text and EOS, nothing is cut.
  whole = ExampleBuilder(tokenizer, Bucket(0, len(ids) + 1))({"id": "y", "text": text})
  np.testing.assert_array_equal(whole["input_ids"], ids + [tokenizer.eos_id])
  assert whole["loss_mask"].sum() == len(ids)


def test_restoring_the_state_after_k_batches_continues_exactly(data_dir):
  k, more = 5, 4
  uninterrupted = _take(_make(data_dir), k + more)
  first = _make(data_dir)
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # the state survives a JSON checkpoint
  resumed = _make(data_dir)
  resumed.set_state(state)
  _assert_same(uninterrupted[k:], _take(resumed, more))
  assert resumed.bad_data_counts == first.bad_data_counts


def test_text_only_batches_are_the_image_batches_without_images(data_dir, tokenizer):
  """Same seed, same mixture: the same records, in the same rows, minus the images."""
  image_p = _make(data_dir, bucket=Bucket(5, ROOMY_TEXT_LENGTH, 16), with_record_ids=True)
  text_p = _make(data_dir, bucket=Bucket(0, ROOMY_TEXT_LENGTH, 16), with_record_ids=True)
  for image_batch, text_batch in zip(_take(image_p, 15), _take(text_p, 15)):
    np.testing.assert_array_equal(image_batch["record_id"], text_batch["record_id"])
    for row, image_ids in enumerate(image_batch["input_ids"]):
      kept = image_ids[image_ids != tokenizer.image_id]
      expected = np.full((ROOMY_TEXT_LENGTH,), tokenizer.pad_id, np.int32)
      expected[:len(kept)] = kept
      np.testing.assert_array_equal(text_batch["input_ids"][row], expected)
  assert sum(image_p.bad_data_counts.values()) == sum(text_p.bad_data_counts.values()) == 0


def _reference_image_example(record, tokenizer, bucket):
  """The image-mode example of a record that fits the bucket, as documented in preprocess."""
  n_max, t_max, size = bucket.max_images, bucket.text_length, bucket.image_size
  ids = [tokenizer.bos_id] + tokenizer.encode(_text(record)) + [tokenizer.eos_id]
  assert len(ids) <= t_max and len(record["images"]) <= n_max  # no cut: chosen to fit
  input_ids = np.full((t_max,), tokenizer.pad_id, np.int32)
  input_ids[:len(ids)] = ids
  targets = np.full((t_max,), tokenizer.pad_id, np.int32)
  targets[:len(ids) - 1] = ids[1:]
  images = np.zeros((n_max, size, size, 3), np.uint8)
  for k, data in enumerate(record["images"]):
    images[k] = preprocess.decode_image(bytes(data), size)
  return {
      "images": images,
      "image_mask": np.arange(n_max) < len(record["images"]),
      "input_ids": input_ids,
      "image_index": np.cumsum(input_ids == tokenizer.image_id).astype(np.int32),
      "targets": targets,
      "loss_mask": ((targets != tokenizer.pad_id)
                    & (targets != tokenizer.image_id)).astype(np.float32),
  }


def test_image_batches_are_still_the_documented_image_examples(data_dir, tokenizer):
  bucket = Bucket(5, ROOMY_TEXT_LENGTH, 16)
  records = {}
  for name in builders.dataset_names(data_dir):
    source = builders.open_split(data_dir, name, "train")
    for i in range(len(source)):
      records[source[i]["id"].decode()] = source[i]
  batches = _take(_make(data_dir, bucket=bucket, with_record_ids=True), 8)
  for batch in batches:
    for row, record_id in enumerate(batch["record_id"]):
      expected = _reference_image_example(records[str(record_id)], tokenizer, bucket)
      assert set(batch) == set(expected) | {"record_id"}
      for key, value in expected.items():
        assert batch[key][row].dtype == value.dtype, key
        np.testing.assert_array_equal(batch[key][row], value, err_msg=f"{record_id}: {key}")
