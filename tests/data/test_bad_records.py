"""Bad records that used to stop training: a dataset with no good record, image bombs, truncated images.

A dataset whose every record is bad is repeated forever, so dropping its records one by one
never ends: the pipeline gives up after `max_consecutive_bad_records` in a row. An image
whose header claims 30000 x 30000 pixels, or whose bytes stop half way, is a bad record (a
`ValueError` naming the file, from `preprocess.load_image_file`), never a PIL exception or
a 2.7 GB decode.
"""

import io
import json
import pickle
import struct
import threading
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

from mmjax.data import builders, pipeline, preprocess
from mmjax.data.preprocess import BadRecordError, ExampleBuilder, decode_image
from tests.data.test_bad_data import BUCKET, GOOD, _png


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
  """A 4 x 4 PNG whose header claims width x height (the CRC recomputed): a few dozen bytes."""
  png = bytearray(_png(size=4))
  # The IHDR chunk follows the 8-byte signature: length (4), "IHDR" (4), data (13), CRC (4);
  # the data starts with width and height, big-endian; the CRC covers "IHDR" and the data.
  assert png[12:16] == b"IHDR"
  png[16:24] = struct.pack(">II", width, height)
  png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))
  return bytes(png)


def _truncated_png() -> bytes:
  """A real 64 x 64 PNG of noise cut in half: the header reads, the pixels stop."""
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  data = buffer.getvalue()
  return data[:len(data) // 2]


BOMB, TRUNCATED = _bomb_png(), _truncated_png()


def _next_within(iterator, seconds: float):
  """next(iterator), failing the test if it runs longer than `seconds` (the bug was a hang).

  A hung thread cannot be stopped; it is a daemon, so it ends with the test session.
  """
  outcome = {}

  def run():
    try:
      outcome["value"] = next(iterator)
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    pytest.fail(f"next() still running after {seconds} s: the pipeline hangs")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


# ---------------------------------------------------------------- images

def test_the_crafted_bomb_is_tiny_but_claims_30000_by_30000_pixels():
  assert len(BOMB) < 200
  previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # read the header only
  try:
    with Image.open(io.BytesIO(BOMB)) as image:
      assert image.size == (30000, 30000)
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def test_load_image_file_reads_an_image_resized_to_the_given_size(tmp_path):
  path = tmp_path / "red.png"
  path.write_bytes(GOOD)
  pixels = preprocess.load_image_file(str(path), 8)
  assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
  np.testing.assert_array_equal(pixels[3, 3], [200, 30, 30])


def test_load_image_file_refuses_a_decompression_bomb_naming_the_file_and_the_size(tmp_path):
  path = tmp_path / "bomb.png"
  path.write_bytes(BOMB)
  with pytest.raises(ValueError, match=r"bomb\.png.*30000 x 30000.*limit") as error:
    preprocess.load_image_file(str(path), 8)
  assert f"{preprocess.MAX_IMAGE_PIXELS:,}" in str(error.value)


def test_load_image_file_refuses_a_truncated_image_naming_the_file(tmp_path):
  path = tmp_path / "half.png"
  path.write_bytes(TRUNCATED)
  with pytest.raises(ValueError, match=r"half\.png.*cannot be decoded"):
    preprocess.load_image_file(str(path), 8)


def test_load_image_file_refuses_a_missing_file_naming_it(tmp_path):
  path = tmp_path / "nowhere.png"
  with pytest.raises(ValueError, match=r"nowhere\.png.*cannot be read"):
    preprocess.load_image_file(str(path), 8)


def test_the_pixel_limit_is_mmjaxs_own_not_pils_global(monkeypatch):
  # Between mmjax's limit and PIL's: PIL alone would decode it (about 250 MB).
  width = int(preprocess.MAX_IMAGE_PIXELS ** 0.5) + 1
  assert width * width < Image.MAX_IMAGE_PIXELS
  with pytest.raises(preprocess.BadImageError, match=f"{width} x {width}"):
    decode_image(_bomb_png(width, width), 8)
  # With PIL's check switched off (some programs do), the bomb is still refused.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
  with pytest.raises(preprocess.BadImageError, match="30000 x 30000"):
    decode_image(BOMB, 8)


@pytest.mark.parametrize("data, reason", [(BOMB, "image_too_large"), (TRUNCATED, "corrupt_image"),
                                          (b"not an image", "corrupt_image"), (b"", "corrupt_image")],
                         ids=["bomb", "truncated", "garbage", "empty"])
def test_decode_image_raises_a_value_error_carrying_the_bad_record_reason(data, reason):
  with pytest.raises(preprocess.BadImageError) as error:
    decode_image(data, 8)
  assert isinstance(error.value, ValueError)
  assert error.value.reason == reason and reason in preprocess.BAD_REASONS


@pytest.mark.parametrize("image, reason", [(BOMB, "image_too_large"), (TRUNCATED, "corrupt_image")],
                         ids=["bomb", "truncated"])
def test_example_builder_maps_a_bad_image_to_its_reason(tokenizer, image, reason):
  record = {"id": "test/image", "text": "<image>a red square.", "images": [image]}
  assert ExampleBuilder(tokenizer, BUCKET, bad_data="skip")(record) == {
      "bad_record": reason, "record_id": "test/image"}
  with pytest.raises(BadRecordError, match=f"record 'test/image': {reason}: image 0"):
    ExampleBuilder(tokenizer, BUCKET, bad_data="raise")(record)


# ---------------------------------------------------------------- datasets

ALL_BAD = [  # every record bad, each for another reason
    {"images": ["bad.png"], "text": "<image>broken."},
    {"images": ["good.png"], "text": "<image>"},
    {"images": ["good.png"], "text": "no image token."},
]
IMAGES = [
    {"images": ["good.png"], "text": "<image>a red square."},
    {"images": ["bomb.png"], "text": "<image>a bomb."},
    {"images": ["half.png"], "text": "<image>half a picture."},
]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  """Datasets `allbad` (no good record) and `images` (a good image, a bomb, a truncated one)."""
  root = tmp_path_factory.mktemp("bad_records")
  images = root / "images"
  images.mkdir()
  for name, data in {"good.png": GOOD, "bad.png": b"not an image", "bomb.png": BOMB,
                     "half.png": TRUNCATED}.items():
    (images / name).write_bytes(data)
  target = str(root / "data")
  builders.build_embedded(target, size=20, image_size=8, seed=0)  # for its tokenizer
  for name, lines in {"allbad": ALL_BAD, "images": IMAGES}.items():
    jsonl = root / f"{name}.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    builders.import_jsonl(target, name, {"train": str(jsonl)}, str(images))
  return target


def _pipeline(data_dir, name, **kwargs):
  # Not shuffled: grain's index shuffle of a 3-record dataset takes 10 ms a record.
  args = dict(batch_size=1, bucket=BUCKET, mixture={name: 1.0}, shard_by_jax_process=False,
              with_record_ids=True, shuffle=False)
  return pipeline.make_pipeline(data_dir, **{**args, **kwargs})


def test_a_bomb_and_a_truncated_image_are_skipped_and_counted_under_their_reasons(bad_dir):
  p = _pipeline(bad_dir, "images", num_epochs=1)
  assert [str(b["record_id"][0]) for b in p] == ["images/train/1"]
  assert {k: v for k, v in p.bad_data_counts.items() if v} == {"image_too_large": 1, "corrupt_image": 1}


def test_a_bomb_or_a_truncated_image_raises_naming_the_record(bad_dir):
  expected = {"images/train/2": "image_too_large", "images/train/3": "corrupt_image"}
  source = builders.open_split(bad_dir, "images", "train")
  first_bad = next(r["id"].decode() for r in (source[i] for i in range(len(source)))
                   if r["id"].decode() in expected)
  p = _pipeline(bad_dir, "images", num_epochs=1, bad_data="raise")
  with pytest.raises(BadRecordError, match=f"record '{first_bad}': {expected[first_bad]}"):
    list(p)


def test_a_repeated_dataset_of_only_bad_records_raises_instead_of_hanging(bad_dir):
  p = _pipeline(bad_dir, "allbad")  # repeated forever, the default limit
  with pytest.raises(ValueError) as error:
    _next_within(p, 30)
  assert isinstance(error.value, preprocess.TooManyBadRecordsError)
  assert sum(p.bad_data_counts.values()) == pipeline.DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS


def test_the_error_names_the_datasets_the_count_the_reasons_and_the_config_field(bad_dir):
  p = _pipeline(bad_dir, "allbad", max_consecutive_bad_records=7)
  with pytest.raises(preprocess.TooManyBadRecordsError) as error:
    _next_within(p, 30)
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert "7 consecutive bad records" in message and "['allbad']" in message
  assert "'allbad/train/" in message  # the last bad record
  counts = {k: v for k, v in p.bad_data_counts.items() if v}
  assert sum(counts.values()) == 7 and set(counts) == {"corrupt_image", "empty_text",
                                                       "image_token_mismatch"}
  assert str(counts) in message
  assert "data.max_consecutive_bad_records" in message


def test_the_error_reaches_the_main_process_from_grain_workers(bad_dir):
  p = _pipeline(bad_dir, "allbad", max_consecutive_bad_records=5, num_workers=1)
  with pytest.raises(preprocess.TooManyBadRecordsError, match="5 consecutive bad records"):
    _next_within(p, 60)


def test_a_bad_record_raised_in_a_grain_worker_reaches_the_main_process_as_itself(bad_dir):
  # It used to arrive as "TypeError: BadRecordError.__init__() missing 2 required
  # positional arguments": an exception is rebuilt from its args, which held only the message.
  p = _pipeline(bad_dir, "images", num_epochs=1, bad_data="raise", num_workers=1)
  with pytest.raises(BadRecordError, match=r"record 'images/train/[23]': (image_too_large|corrupt_image)"):
    list(p)


@pytest.mark.parametrize("error", [
    BadRecordError("mine/train/7", "corrupt_image", "image 0 cannot be decoded"),
    preprocess.BadImageError("image_too_large", "image 0: the header claims 30000 x 30000"),
    preprocess.TooManyBadRecordsError(5, ["mine"], {"empty_text": 5}, "mine/train/7", "empty_text"),
], ids=lambda error: type(error).__name__)
def test_the_errors_survive_pickling_between_processes(error):
  copy = pickle.loads(pickle.dumps(error))
  assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(bad_dir, limit):
  with pytest.raises(ValueError, match=f"max_consecutive_bad_records={limit}; expected >= 1"):
    _pipeline(bad_dir, "allbad", max_consecutive_bad_records=limit)


# ---------------------------------------------------------------- the counter itself

def _markers(pattern: str) -> grain.IterDataset:
  """'g' a good example, 'b' a bad-record marker, in this order."""
  items = [{"record_id": f"mine/train/{i}", **({"bad_record": "empty_text"} if c == "b" else {"x": i})}
           for i, c in enumerate(pattern)]
  return grain.MapDataset.source(items).to_iter_dataset()


def test_a_good_record_resets_the_consecutive_count():
  dropped = pipeline._DropBadRecords(_markers("bbgbbgbbg"), 3, ["mine"])  # pylint: disable=protected-access
  assert [e["x"] for e in dropped] == [2, 5, 8]
  with pytest.raises(preprocess.TooManyBadRecordsError, match="3 consecutive"):
    list(pipeline._DropBadRecords(_markers("bbgbbbg"), 3, ["mine"]))  # pylint: disable=protected-access


def test_the_consecutive_count_is_part_of_the_state():
  iterator = iter(pipeline._DropBadRecords(_markers("bgbbg"), 3, ["mine"]))  # pylint: disable=protected-access
  assert next(iterator)["x"] == 1
  state = iterator.get_state()
  assert state["consecutive_bad_records"] == 0  # a good record was the last one
  # Restored with two bad records already counted, the next bad one is the third.
  resumed = iter(pipeline._DropBadRecords(_markers("bgbbg"), 3, ["mine"]))  # pylint: disable=protected-access
  resumed.set_state({**state, "consecutive_bad_records": 2})
  with pytest.raises(preprocess.TooManyBadRecordsError, match="3 consecutive"):
    next(resumed)
  # A state saved before the count existed resumes with none.
  old = iter(pipeline._DropBadRecords(_markers("bgbbg"), 3, ["mine"]))  # pylint: disable=protected-access
  old.set_state({k: v for k, v in state.items() if k != "consecutive_bad_records"})
  assert next(old)["x"] == 4
