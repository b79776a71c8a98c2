"""A data directory written by two processes, or with a damaged manifest: writers take turns
(`builders.writing`), and a manifest that cannot be read is reported and never replaced
(it lists every dataset of the directory: replacing it with an empty one lost them all)."""

import logging
import os
import threading

import pytest

from mmjax.data import builders
from tests.data.test_import import GOOD_RECORDS, _write_jsonl, images  # noqa: F401 -- a fixture


def _import(data, name, jsonl, image_dir):
  return builders.import_jsonl(str(data), name, {"train": str(jsonl)}, str(image_dir))


@pytest.mark.parametrize("damage", [b"{\"datasets\": {\"pets\": \"image_text_fold", b"\xff\xfe", b"[]"])
def test_an_unreadable_manifest_is_reported_and_left_as_it_is(tmp_path, images, damage):  # noqa: F811
  data = tmp_path / "data"
  data.mkdir()
  (data / builders.MANIFEST).write_bytes(damage)
  jsonl = _write_jsonl(tmp_path / "a.jsonl", GOOD_RECORDS)
  with pytest.raises(ValueError, match=f"manifest {data / builders.MANIFEST} is unreadable .* left as it is"):
    _import(data, "mine", jsonl, images)
  with pytest.raises(ValueError, match="is unreadable"):
    builders.build_embedded(str(data), size=2, image_size=8)
  assert (data / builders.MANIFEST).read_bytes() == damage


def test_a_second_writer_waits_for_the_first_and_both_datasets_are_kept(tmp_path, images, caplog):  # noqa: F811
  data = tmp_path / "data"
  _import(data, "first", _write_jsonl(tmp_path / "a.jsonl", GOOD_RECORDS), images)
  second = _write_jsonl(tmp_path / "b.jsonl", GOOD_RECORDS)
  done = threading.Event()
  errors = []

  def run():
    try:
      _import(data, "second", second, images)
    except Exception as e:  # noqa: BLE001 -- reported below
      errors.append(e)
    done.set()

  with caplog.at_level(logging.WARNING, logger="mmjax.data.builders"):
    with builders.writing(str(data)):  # another process's import, holding the directory
      worker = threading.Thread(target=run)
      worker.start()
      assert not done.wait(2.0), errors
      assert sorted(builders.read_manifest(str(data))["datasets"]) == ["first"]
    assert done.wait(120.0)
  worker.join()
  assert not errors, errors
  assert sorted(builders.read_manifest(str(data))["datasets"]) == ["first", "second"]
  assert f"waiting for pid {os.getpid()} on host" in caplog.text
  # The lock file names nobody once released.
  assert (data / builders.DATA_LOCK).read_bytes() == b""
