"""`mmjax data build | show | import` from the command line entry point."""

import json
import time

import pytest
from PIL import Image

from mmjax import cli
from mmjax.data import builders, pipeline
from mmjax.data.preprocess import Bucket


def test_build_prints_where_it_wrote_and_reuses_on_a_second_call(tmp_path, capsys):
  args = ["data", "build", "--data-dir", str(tmp_path), "--size", "20", "--image-size", "16"]
  assert cli.main(args) == 0
  first = capsys.readouterr().out
  assert "embedded dataset built" in first and str(tmp_path) in first and "tokenizer" in first
  assert cli.main(args) == 0
  second = capsys.readouterr().out
  assert "embedded dataset reused" in second
  assert second.split("\n", 1)[1] == first.split("embedded dataset built", 1)[1].split("\n", 1)[1]


def test_build_uses_MMJAX_DATA_DIR_when_no_data_dir_is_given(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MMJAX_DATA_DIR", str(tmp_path / "env"))
  assert builders.default_data_dir() == str(tmp_path / "env")
  assert cli.main(["data", "build", "--size", "20", "--image-size", "16"]) == 0
  assert (tmp_path / "env" / builders.MANIFEST).exists()


def test_show_writes_a_png_grid_of_examples(data_dir, tmp_path, capsys):
  out = tmp_path / "grid.png"
  assert cli.main(["data", "show", "--data-dir", data_dir, "--split", "train", "--out", str(out),
                   "--rows", "6"]) == 0
  with Image.open(out) as image:
    assert image.format == "PNG"
    # 6 rows of 128-px images; the widest row holds up to 5 images, then the text column.
    assert image.size[1] == 6 * (128 + 6)
    assert image.size[0] >= 128 + 360
  assert str(out) in capsys.readouterr().out


def test_import_turns_jsonl_and_images_into_a_dataset_the_pipeline_reads(data_dir, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (20, 10), (0, 200, 0)).save(images / "green.jpg")
  records = [
      {"images": ["green.jpg"], "text": "<image>a green field.<|endofchunk|>"},
      {"image": "green.jpg", "id": "llava-1",
       "conversations": [{"from": "human", "value": "What colour is it?"},
                         {"from": "gpt", "value": "Green."}]},
  ]
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  target = tmp_path / "data"
  builders.build_embedded(str(target), size=20, image_size=16)
  assert cli.main(["data", "import", "--data-dir", str(target), "--name", "mine", "--jsonl",
                   f"train={tmp_path / 'train.jsonl'}", "--images", str(images)]) == 0
  source = builders.open_split(str(target), "mine", "train")
  texts = sorted(source[i]["text"].decode() for i in range(len(source)))
  assert texts == ["<image>User: What colour is it?\nAssistant: Green.<|endofchunk|>",
                   "<image>a green field.<|endofchunk|>"]
  batch = next(pipeline.make_pipeline(str(target), batch_size=2, bucket=Bucket(1, 32, 16),
                                      mixture={"mine": 1.0}, shard_by_jax_process=False))
  assert batch["images"].shape == (2, 1, 16, 16, 3)
  assert (batch["images"][:, 0, 8, 8, 1] > 150).all()  # the green jpg, resized to 16x16


@pytest.mark.slow
def test_the_default_build_finishes_in_under_two_minutes(tmp_path, capsys):
  start = time.time()
  assert cli.main(["data", "build", "--data-dir", str(tmp_path)]) == 0
  assert time.time() - start < 120
  assert "embedded dataset built" in capsys.readouterr().out
