"""Bad data: each case is skipped and counted, or raised naming the record, by configuration."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmjax.data import builders, pipeline
from mmjax.data.preprocess import BadRecordError, Bucket, ExampleBuilder

BUCKET = Bucket(max_images=2, text_length=16, image_size=8)


def _png(colour=(200, 30, 30), size=12):
  buffer = io.BytesIO()
  Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
  return buffer.getvalue()


GOOD = _png()
LONG = " ".join(["a red circle"] * 20)
# (record text, images, the reason it is bad)
BAD_CASES = {
    "corrupt_image": ("<image>a red square.", [b"\x89PNG not really"]),
    "unreadable_image": ("<image>a red square.", [b""]),
    "too_many_images": ("<image><image><image>three red squares.", [GOOD] * 3),
    "empty_text": ("<image><|endofchunk|>", [GOOD]),
    "text_too_long": ("<image>" + LONG, [GOOD]),
    "image_token_without_image": ("<image>a red square and <image>", [GOOD]),
    "image_without_image_token": ("a red square.", [GOOD]),
}
REASON = {"unreadable_image": "corrupt_image", "image_token_without_image": "image_token_mismatch",
          "image_without_image_token": "image_token_mismatch"}


def _record(case):
  text, images = BAD_CASES[case]
  return {"id": f"test/{case}", "text": text, "images": images}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_is_skipped_with_its_reason_when_the_policy_is_skip(tokenizer, case):
  out = ExampleBuilder(tokenizer, BUCKET, bad_data="skip")(_record(case))
  assert out == {"bad_record": REASON.get(case, case), "record_id": f"test/{case}"}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_an_error_naming_it_when_the_policy_is_raise(tokenizer, case):
  with pytest.raises(BadRecordError, match=f"record 'test/{case}': {REASON.get(case, case)}"):
    ExampleBuilder(tokenizer, BUCKET, bad_data="raise")(_record(case))


def test_long_text_is_cut_at_the_last_chunk_boundary_that_fits(tokenizer):
  text = "<image>a red square.<|endofchunk|><image>" + LONG
  example = ExampleBuilder(tokenizer, BUCKET, bad_data="raise")(
      {"id": "x", "text": text, "images": [GOOD, _png((0, 0, 255))]})
  assert tokenizer.decode(example["input_ids"]) == "<image>a red square.<|endofchunk|>"
  np.testing.assert_array_equal(example["image_mask"], [True, False])
  assert not example["images"][1].any()  # the image after the cut is dropped with its text
  np.testing.assert_array_equal(example["images"][0, 0, 0], [200, 30, 30])


def test_too_many_images_are_cut_at_a_chunk_boundary_when_asked(tokenizer):
  text = "<image>one.<|endofchunk|><image>two.<|endofchunk|><image>three.<|endofchunk|>"
  example = ExampleBuilder(tokenizer, Bucket(2, 32, 8), truncate_images=True)(
      {"id": "x", "text": text, "images": [GOOD] * 3})
  assert tokenizer.decode(example["input_ids"]) == "<image>one.<|endofchunk|><image>two.<|endofchunk|>"
  assert example["image_mask"].all()


def test_unknown_policy_is_refused(tokenizer):
  with pytest.raises(ValueError, match="bad_data='ignore'"):
    ExampleBuilder(tokenizer, BUCKET, bad_data="ignore")


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory, data_dir):
  """An imported dataset: 2 good records (plain and LLaVA form) among the bad ones."""
  root = tmp_path_factory.mktemp("messy")
  (root / "images").mkdir()
  (root / "images" / "good.png").write_bytes(GOOD)
  (root / "images" / "bad.png").write_bytes(b"not an image")
  lines = [
      {"images": ["good.png"], "text": "<image>a red square."},
      {"image": "good.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                              {"from": "gpt", "value": "A red square."}]},
      {"images": ["bad.png"], "text": "<image>broken."},
      {"images": ["missing.png"], "text": "<image>gone."},
      {"images": ["good.png"] * 3, "text": "<image><image><image>three."},
      {"images": ["good.png"], "text": "<image>"},
      {"images": ["good.png"], "text": "<image>" + LONG},
      {"images": ["good.png"], "text": "no image token."},
  ]
  jsonl = root / "records.jsonl"
  jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  # Imported beside the embedded dataset, so the embedded tokenizer is kept.
  target = str(root / "data")
  builders.build_embedded(target, size=20, image_size=8, seed=0)
  builders.import_jsonl(target, "messy", {"train": str(jsonl)}, str(root / "images"))
  return target


def _one_pass(data_dir, bad_data):
  return pipeline.make_pipeline(data_dir, batch_size=1, bucket=BUCKET, mixture={"messy": 1.0},
                                num_epochs=1, shuffle=False, bad_data=bad_data,
                                with_record_ids=True, shard_by_jax_process=False)


def test_pipeline_skips_and_counts_every_bad_record_of_an_epoch(messy_dir):
  p = _one_pass(messy_dir, "skip")
  kept = sorted(str(b["record_id"][0]) for b in p)
  assert kept == ["messy/train/1", "messy/train/2"]
  assert p.bad_data_counts == {"corrupt_image": 2, "image_too_large": 0, "too_many_images": 1,
                               "empty_text": 1, "text_too_long": 1, "image_token_mismatch": 1, "not_a_pair": 0,
                               "no_answer": 0, "image_too_small": 0}
  assert p.get_state()["bad_data_counts"] == p.bad_data_counts


def test_pipeline_raises_naming_the_first_bad_record_of_an_epoch(messy_dir):
  # ids are line numbers; tfds stores records in its own (hashed) order.
  expected = {"messy/train/3": "corrupt_image", "messy/train/4": "corrupt_image",
              "messy/train/5": "too_many_images", "messy/train/6": "empty_text",
              "messy/train/7": "text_too_long", "messy/train/8": "image_token_mismatch"}
  source = builders.open_split(messy_dir, "messy", "train")
  first_bad = next(r["id"].decode() for r in (source[i] for i in range(len(source)))
                   if r["id"].decode() in expected)
  p = _one_pass(messy_dir, "raise")
  with pytest.raises(BadRecordError, match=f"record '{first_bad}': {expected[first_bad]}"):
    list(p)
