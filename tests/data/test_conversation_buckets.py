"""Length buckets for LLaVA conversations: each batch is cut to the smallest bucket that holds
its longest sequence, dropping padding columns only, in the uncut pipeline's order, and the
pipeline's state still resumes exactly."""

import json
import re

import numpy as np
import pytest

from mmjax.data import builders
from mmjax.data.conversation import (SEQUENCE_KEYS, TEXT, ConversationBuilder, bucket_for, cut_to_bucket,
                                     make_conversation_pipeline)

T = 160
# Vicuna-v1 with its system line: the qa conversations take 122-128 tokens, the captions and
# interleaved ones 133-158, so batches of two land in every bucket.
BUCKETS = (124, 132, 140, 148, T)
MIXTURE = {"qa": 2, "captions": 1, "interleaved": 1}
BATCH_SIZE, NUM_BATCHES = 2, 24


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("buckets_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.fixture(scope="module")
def builder(small_data_dir):
  return ConversationBuilder(builders.load_tokenizer(small_data_dir), "vicuna_v1", T, 4, 16, 4)


def _pipeline(builder, data_dir, **kwargs):
  return make_conversation_pipeline(builder, data_dir, batch_size=BATCH_SIZE, mixture=MIXTURE, seed=3, **kwargs)


def _longest(batch) -> int:
  return int(np.max(np.count_nonzero(batch["segment_ids"] > 0, axis=1)))


def test_each_batch_is_the_uncut_batch_cut_to_the_smallest_bucket_that_holds_its_longest_sequence(
    builder, small_data_dir):
  cut, uncut = _pipeline(builder, small_data_dir, buckets=BUCKETS), _pipeline(builder, small_data_dir)
  pad = builder.tokenizer.pad_id
  padding = {"input_ids": pad, "targets": pad, "feature_index": TEXT, "loss_mask": 0, "segment_ids": 0,
             "positions": 0}
  seen = set()
  for _ in range(NUM_BATCHES):
    small, full = next(cut), next(uncut)
    bucket = small["input_ids"].shape[1]
    seen.add(bucket)
    assert bucket in BUCKETS
    longest = _longest(full)
    assert longest <= bucket  # the batch keeps its longest sequence
    assert BUCKETS.index(bucket) == 0 or BUCKETS[BUCKETS.index(bucket) - 1] < longest  # no smaller one fits
    assert set(small) == set(full)
    for key in SEQUENCE_KEYS:
      assert small[key].shape == (BATCH_SIZE, bucket)
      np.testing.assert_array_equal(small[key], full[key][:, :bucket], err_msg=key)
      assert np.all(full[key][:, bucket:] == padding[key]), f"{key} has a non-padding value past {bucket}"
    for key in ("images", "image_mask"):
      np.testing.assert_array_equal(small[key], full[key], err_msg=key)
  assert len(seen) >= 3, f"the batches went to buckets {sorted(seen)}; expected the data to reach at least three"


def test_a_sequence_as_long_as_a_bucket_stays_in_it_and_one_token_more_goes_to_the_next():
  def batch(length):
    segment_ids = np.zeros((2, T), np.int32)
    segment_ids[0, :length] = 1
    segment_ids[1, :3] = 1
    return {"segment_ids": segment_ids, "input_ids": segment_ids.copy(), "image_mask": np.ones((2, 4), bool)}

  assert [bucket_for(batch(n), BUCKETS) for n in (1, 124, 125, 132, 133, 148, 149, T)] == [
      124, 124, 132, 132, 140, 148, T, T]
  out = cut_to_bucket(batch(133), BUCKETS)
  assert out["segment_ids"].shape == out["input_ids"].shape == (2, 140)
  assert out["image_mask"].shape == (2, 4)


def test_a_restored_pipeline_gives_the_same_following_batches(builder, small_data_dir):
  first = _pipeline(builder, small_data_dir, buckets=BUCKETS)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # the checkpoint holds it as JSON
  expected = [next(first) for _ in range(6)]
  restored = _pipeline(builder, small_data_dir, buckets=BUCKETS)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(6)]):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert len({b["input_ids"].shape[1] for b in expected}) > 1  # the resumed batches vary in length


@pytest.mark.parametrize("buckets", [(160, 124), (124, 124, T), (124, 150), (124, 170), (1, T), (0,)])
def test_bucket_lists_not_ascending_to_text_length_are_refused(builder, small_data_dir, buckets):
  with pytest.raises(ValueError, match=re.escape(f"buckets={list(buckets)}")):
    _pipeline(builder, small_data_dir, buckets=buckets)


def test_buckets_with_packing_are_refused(builder, small_data_dir):
  with pytest.raises(ValueError, match=r"pack=True and buckets=\[124, 160\]"):
    _pipeline(builder, small_data_dir, buckets=(124, T), pack=True)
