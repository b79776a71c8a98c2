"""`mmjax data import`: image paths stay inside --images, an existing dataset is replaced only
when asked (and safely), and bad input is one line naming FILE:LINE, skipped and counted or
raised, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mmjax.data import builders, cli

RED, BLUE = (200, 30, 30), (30, 30, 200)
GOOD_RECORDS = [{"images": ["red.png"], "text": "<image>a red square."},
                {"images": ["blue.png"], "text": "<image>a blue square."}]


@pytest.fixture
def images(tmp_path):
  """A folder of two 4x4 PNGs, red.png and blue.png."""
  folder = tmp_path / "images"
  folder.mkdir()
  Image.new("RGB", (4, 4), RED).save(folder / "red.png")
  Image.new("RGB", (4, 4), BLUE).save(folder / "blue.png")
  return folder


@pytest.fixture
def data(tmp_path):
  """An empty data directory: the first import trains its tokenizer."""
  return tmp_path / "data"


def _write_jsonl(path, lines):
  """Writes one line per item: a dict or list as JSON, bytes as they are."""
  path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode()
                              for line in lines) + b"\n")
  return path


def _import(data, name, jsonl, images, *options):
  return cli.main(["import", "--data-dir", str(data), "--name", name, "--jsonl",
                   f"train={jsonl}", "--images", str(images), *options])


def _texts(data, name, split="train"):
  source = builders.open_split(str(data), name, split)
  return sorted(source[i]["text"].decode() for i in range(len(source)))


def _folder(data, name):
  return os.path.join(data, builders.read_manifest(str(data))["datasets"][name])


# ---------------------------------------------------------------- image paths stay inside --images

@pytest.fixture
def escaping_jsonl(tmp_path, images):
  """Line 1 is fine; lines 2-4 reach outside --images (../, an absolute path, a symlink);
  line 5 is a symlink to a file inside the folder, which is fine."""
  outside = tmp_path / "outside"
  outside.mkdir()
  Image.new("RGB", (4, 4), (0, 255, 0)).save(outside / "secret.png")
  os.symlink(outside / "secret.png", images / "escape.png")
  os.symlink(images / "red.png", images / "alias.png")
  return _write_jsonl(tmp_path / "train.jsonl", [
      {"images": ["red.png"], "text": "<image>red."},
      {"images": ["../outside/secret.png"], "text": "<image>dot-dot."},
      {"images": [str(outside / "secret.png")], "text": "<image>absolute."},
      {"images": ["escape.png"], "text": "<image>symlink out."},
      {"images": ["alias.png"], "text": "<image>symlink in."},
  ])


def test_images_outside_the_image_folder_are_refused_and_counted(data, images, escaping_jsonl,
                                                                  capsys):
  assert _import(data, "mine", escaping_jsonl, images) == 0
  assert _texts(data, "mine") == ["<image>red.", "<image>symlink in."]
  source = builders.open_split(str(data), "mine", "train")
  red = (images / "red.png").read_bytes()
  assert all(list(source[i]["images"]) == [red] for i in range(len(source)))
  out = capsys.readouterr().out
  assert "train: 2 records" in out
  assert f"image outside --images: 3 (first at {escaping_jsonl}:2: " in out


def test_an_image_outside_the_folder_stops_a_raise_import_naming_file_and_line(
    data, images, escaping_jsonl, capsys):
  assert _import(data, "mine", escaping_jsonl, images, "--bad-data", "raise") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mmjax data import: {escaping_jsonl}:2: image outside --images")
  assert err.count("\n") == 1
  assert not (data / builders.MANIFEST).exists()


# ---------------------------------------------------------------- importing again under a name

@pytest.fixture
def first_and_second(tmp_path):
  """Two JSONL files with different records: 2 in the first, 1 in the second."""
  first = _write_jsonl(tmp_path / "first.jsonl", GOOD_RECORDS)
  second = _write_jsonl(tmp_path / "second.jsonl",
                        [{"images": ["blue.png"], "text": "<image>the second file."}])
  return first, second


def test_a_second_import_under_the_same_name_is_refused_naming_the_dataset(
    data, images, first_and_second, capsys):
  first, second = first_and_second
  assert _import(data, "mine", first, images) == 0
  folder = _folder(data, "mine")
  capsys.readouterr()
  assert _import(data, "mine", second, images) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mmjax data import: dataset 'mine' already exists in {data}: {folder} "
                        "(train: 2 records)")
  assert "--overwrite" in err and "--name" in err and err.count("\n") == 1
  assert _texts(data, "mine") == ["<image>a blue square.", "<image>a red square."]


def test_overwrite_replaces_the_dataset_and_removes_the_old_folder(data, images, first_and_second,
                                                                   capsys):
  first, second = first_and_second
  assert _import(data, "mine", first, images) == 0
  old_folder = _folder(data, "mine")
  assert _import(data, "mine", second, images, "--overwrite") == 0
  assert _texts(data, "mine") == ["<image>the second file."]
  assert _folder(data, "mine") != old_folder
  assert not os.path.exists(old_folder)
  assert f"replaced {old_folder}" in capsys.readouterr().out


def _dataset_folders(data):
  root = data / "image_text_folder"
  return sorted(os.listdir(root)) if root.exists() else []


def test_a_failed_overwrite_leaves_the_old_dataset_and_the_manifest_intact(
    data, images, first_and_second, tmp_path, monkeypatch):
  first, second = first_and_second
  assert _import(data, "mine", first, images) == 0
  manifest = (data / builders.MANIFEST).read_bytes()
  folders = _dataset_folders(data)

  bad = _write_jsonl(tmp_path / "bad.jsonl", [GOOD_RECORDS[0], b"{not json"])
  assert _import(data, "mine", bad, images, "--overwrite", "--bad-data", "raise") == 2
  assert (data / builders.MANIFEST).read_bytes() == manifest

  # A process interrupted while tfds writes the new dataset.
  generate = builders.ImageTextFolder._generate_examples

  def interrupted(self, *args, **kwargs):
    yield from generate(self, *args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(builders.ImageTextFolder, "_generate_examples", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _import(data, "mine", second, images, "--overwrite")
  assert (data / builders.MANIFEST).read_bytes() == manifest
  assert _dataset_folders(data) == folders
  assert _texts(data, "mine") == ["<image>a blue square.", "<image>a red square."]


def test_retrain_tokenizer_writes_a_new_file_and_leaves_the_old_one_untouched(
    data, images, first_and_second):
  first, second = first_and_second
  assert _import(data, "mine", first, images) == 0
  old_tokenizer = builders.tokenizer_path(str(data))
  with open(old_tokenizer, "rb") as f:
    old_bytes = f.read()
  assert _import(data, "mine", second, images, "--overwrite", "--retrain-tokenizer") == 0
  new_tokenizer = builders.tokenizer_path(str(data))
  assert new_tokenizer != old_tokenizer
  with open(old_tokenizer, "rb") as f:
    assert f.read() == old_bytes
  assert builders.load_tokenizer(str(data)).encode("the second file.")


# ---------------------------------------------------------------- bad input: FILE:LINE

# Line 1 and 3 of each file are good; line 2 is bad: (line 2, start of the error after FILE:2:,
# the reason it is counted under).
BAD_LINES = {
    "invalid_json": (b'{"images": ["red.png"], "text": "<image>cut', "invalid JSON",
                     "invalid JSON"),
    "not_utf8": ('{"images": ["red.png"], "text": "<image>caf\xe9"}'.encode("latin-1"),
                 "not UTF-8", "not UTF-8"),
    "text_not_a_string": ({"images": ["red.png"], "text": 5}, "wrong type: 'text' is int",
                          "wrong type"),
    "images_not_a_list": ({"images": "red.png", "text": "<image>red."},
                          "wrong type: 'images' is str", "wrong type"),
    "record_not_an_object": ([1, 2], "wrong type: the record is list", "wrong type"),
    "no_text": ({"images": ["red.png"]}, "missing field", "missing field"),
    "unknown_role": ({"image": "red.png", "conversations": [{"from": "system", "value": "hi"}]},
                     "wrong value: conversation turn 1 is from 'system'", "wrong value"),
    "duplicate_id": ({"id": "x", "images": ["blue.png"], "text": "<image>again."},
                     "duplicate id 'x', first at {jsonl}:1", "duplicate id"),
}


def _file_with_bad_line_2(tmp_path, case):
  line = BAD_LINES[case][0]
  return _write_jsonl(tmp_path / f"{case}.jsonl", [
      {"id": "x", "images": ["red.png"], "text": "<image>red."}, line,
      {"images": ["blue.png"], "text": "<image>blue."}])


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_record_stops_a_raise_import_with_one_line_naming_file_and_line(
    data, images, tmp_path, capsys, case):
  jsonl = _file_with_bad_line_2(tmp_path, case)
  assert _import(data, "mine", jsonl, images, "--bad-data", "raise") == 2
  err = capsys.readouterr().err
  message = BAD_LINES[case][1].format(jsonl=jsonl)
  assert err.startswith(f"mmjax data import: {jsonl}:2: {message}"), err
  assert err.count("\n") == 1
  assert not (data / builders.MANIFEST).exists()
  assert _dataset_folders(data) == []


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_record_is_skipped_and_counted_by_reason(data, images, tmp_path, capsys, case):
  jsonl = _file_with_bad_line_2(tmp_path, case)
  assert _import(data, "mine", jsonl, images) == 0  # skip is the default
  assert _texts(data, "mine") == ["<image>blue.", "<image>red."]
  out = capsys.readouterr().out
  assert "train: 2 records" in out
  assert f"skipped: 1 record\n    {BAD_LINES[case][2]}: 1 (first at {jsonl}:2: " in out


def test_a_missing_image_is_counted_and_kept_for_the_pipeline_to_drop(data, images, tmp_path,
                                                                       capsys):
  jsonl = _write_jsonl(tmp_path / "train.jsonl",
                       GOOD_RECORDS + [{"images": ["gone.png"], "text": "<image>gone."}])
  assert _import(data, "mine", jsonl, images) == 0
  assert "train: 3 records" in capsys.readouterr().out.replace("images missing: 1", "")
  source = builders.open_split(str(data), "mine", "train")
  gone = next(source[i] for i in range(3) if source[i]["text"] == b"<image>gone.")
  assert list(gone["images"]) == [b""]  # the pipeline counts it as corrupt_image


def test_a_missing_image_stops_a_raise_import_naming_file_and_line(data, images, tmp_path, capsys):
  jsonl = _write_jsonl(tmp_path / "train.jsonl",
                       GOOD_RECORDS + [{"images": ["gone.png"], "text": "<image>gone."}])
  assert _import(data, "mine", jsonl, images, "--bad-data", "raise") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mmjax data import: {jsonl}:3: images missing: 'gone.png'")


@pytest.mark.parametrize("bad_data", ["skip", "raise"])
def test_an_empty_file_is_an_error_in_both_modes(data, images, tmp_path, capsys, bad_data):
  jsonl = tmp_path / "empty.jsonl"
  jsonl.write_text("\n")
  assert _import(data, "mine", jsonl, images, "--bad-data", bad_data) == 2
  err = capsys.readouterr().err
  assert err == f"mmjax data import: no usable records in {jsonl} (it is empty)\n"
  assert not (data / builders.MANIFEST).exists()


def test_a_file_of_only_bad_records_is_an_error_when_skipping(data, images, tmp_path, capsys):
  jsonl = _write_jsonl(tmp_path / "bad.jsonl", [b"{", b"[", {"text": 1}])
  assert _import(data, "mine", jsonl, images) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mmjax data import: no usable records in {jsonl} (3 skipped: "
                        f"invalid JSON 2, first at {jsonl}:1: ")
  assert "wrong type 1" in err and err.count("\n") == 1


def test_a_split_named_twice_is_refused(data, images, first_and_second, capsys):
  first, second = first_and_second
  assert cli.main(["import", "--data-dir", str(data), "--name", "mine", "--jsonl", str(first),
                   "--jsonl", f"train={second}", "--images", str(images)]) == 2
  assert capsys.readouterr().err.startswith("mmjax data import: --jsonl names split 'train' twice")


@pytest.mark.parametrize("what", ["jsonl", "images"])
def test_a_missing_input_is_one_line_naming_it(data, images, first_and_second, tmp_path, capsys,
                                               what):
  jsonl, folder = first_and_second[0], images
  if what == "jsonl":
    jsonl = tmp_path / "nowhere.jsonl"
  else:
    folder = tmp_path / "nowhere"
  assert _import(data, "mine", jsonl, folder) == 2
  err = capsys.readouterr().err
  assert err.startswith("mmjax data import: ") and str(tmp_path / "nowhere") in err
  assert err.count("\n") == 1


def test_build_and_show_report_errors_in_one_line(tmp_path, capsys):
  assert cli.main(["build", "--data-dir", str(tmp_path), "--size", "0"]) == 2
  assert capsys.readouterr().err.startswith("mmjax data build: size=0")
  assert cli.main(["show", "--data-dir", str(tmp_path / "empty")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mmjax data show: no dataset in '{tmp_path / 'empty'}'")
  assert err.count("\n") == 1


def test_the_mmjax_command_reports_a_bad_file_without_a_traceback(data, images, tmp_path):
  jsonl = _file_with_bad_line_2(tmp_path, "invalid_json")
  result = subprocess.run(
      [sys.executable, "-m", "mmjax.cli", "data", "import", "--data-dir", str(data), "--name",
       "mine", "--jsonl", str(jsonl), "--images", str(images), "--bad-data", "raise"],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.splitlines()[-1].startswith(f"mmjax data import: {jsonl}:2: invalid JSON")
