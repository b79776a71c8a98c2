"""`mmjax bench step` end to end on tiny shapes: the trainer's step of a Flamingo config beside
open_flamingo's (alternating rounds), and of a non-Flamingo config alone. The result files
hold one run each, their rates agree with the round times (samples/s x s/step = the batch),
the ratio is mmjax's samples/s over the original's per round, and bad --compare values are
refused naming the value."""

import importlib.util
import json

import pytest

from mmjax import bench
from mmjax.data import builders

BATCH = 2
# 16 px images of patch 8 (4 tokens), depth-1 towers, 32 tokens: compiles stay short.
SMALL = ["--config.data.image_size=16", "--config.model.vision.image_size=16", "--config.data.text_length=32",
         f"--config.data.batch_size={BATCH}", "--config.mesh.num_devices=1"]
FLAMINGO_SMALL = [*SMALL, "--config.model.vision.depth=1", "--config.model.decoder.depth=2",
                  "--config.model.vision.stem=patch", "--config.freeze.stages=0:resampler,xattn"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  builders.build_embedded(str(path), size=40, image_size=16, seed=0)
  return str(path)


def _assert_consistent(arm: dict, rounds: int, steps: int):
  assert len(arm["rounds"]) == len(arm["round_seconds"]) == rounds
  for r, seconds in zip(arm["rounds"], arm["round_seconds"]):
    assert seconds > 0 and r["seconds_per_step"] == pytest.approx(seconds / steps)
    assert r["samples_per_s"] * r["seconds_per_step"] == pytest.approx(BATCH)
    assert r["tokens_per_s"] > r["samples_per_s"] > 0
  for key in ("seconds_per_step", "samples_per_s", "tokens_per_s"):
    assert 0 < arm[key]["min"] <= arm[key]["median"] <= arm[key]["max"]
  assert arm["compile_s"] > 0


@pytest.mark.slow  # 80 s on 2 shared cores (a compile, and torch builds and counts the model)
@pytest.mark.parity
def test_bench_step_times_flamingo_beside_open_flamingo_in_alternating_rounds(tmp_path, data_dir):
  pytest.importorskip("torch")
  if importlib.util.find_spec("open_flamingo") is None:  # importing it needs open_clip: the bench stubs that
    pytest.skip("open_flamingo is not installed (the parity extra)")
  out = tmp_path / "step"
  assert bench.main(["step", "--config", "configs/flamingo/tiny.py", "--compare", "open_flamingo",
                     "--data-dir", data_dir, "--rounds", "2", "--steps", "2", "--out", str(out),
                     *FLAMINGO_SMALL]) == 0
  run, = json.loads(out.with_suffix(".json").read_text())["runs"]
  meta, mmjax_arm, original = run["meta"], run["mmjax"], run["original"]
  assert meta["family"] == "flamingo" and meta["batch"] == BATCH and meta["torch"]
  assert len(meta["load_before"]) == 3 and len(meta["load_after"]) == 3 and "cores" in meta["machine"]
  _assert_consistent(mmjax_arm, 2, 2)
  _assert_consistent(original, 2, 2)
  assert mmjax_arm["xla_flops"] > 0 and mmjax_arm["model_flops"] > 0 and mmjax_arm["mfu"] is None  # CPU: no peak
  assert mmjax_arm["temp_bytes"] > 0 and mmjax_arm["argument_bytes"] > 0
  assert original["flops"] > 0 and original["trainable_parameters"] > 0 and original["threads"] >= 1
  # The tiny preset's resampler is not open_flamingo's fixed one: the difference is reported.
  assert any(d.startswith("resampler.depth=2") for d in original["differences"])
  assert run["ratio"]["rounds"] == pytest.approx(
      [m["samples_per_s"] / o["samples_per_s"] for m, o in zip(mmjax_arm["rounds"], original["rounds"])])
  markdown = out.with_suffix(".md").read_text()
  assert "| mmjax |" in markdown and "| open_flamingo |" in markdown and "mmjax / open_flamingo" in markdown


@pytest.mark.slow  # 50 s on 2 shared cores (two runs, each a compile)
def test_bench_step_times_a_non_flamingo_config_and_appends_runs_by_config(tmp_path, data_dir):
  out = tmp_path / "step"
  args = ["step", "--config", "configs/lm/tiny.py", "--data-dir", data_dir, "--rounds", "2", "--steps", "2",
          "--out", str(out), *SMALL[2:]]
  assert bench.main(args) == 0
  assert bench.main([*args, "--append", "--config.optimizer.lr=1e-4"]) == 0
  runs = json.loads(out.with_suffix(".json").read_text())["runs"]
  assert [r["meta"]["overrides"][-1] for r in runs] == [SMALL[-1], "--config.optimizer.lr=1e-4"]
  for run in runs:
    assert run["meta"]["family"] == "lm" and "original" not in run
    _assert_consistent(run["mmjax"], 2, 2)
    assert run["mmjax"]["xla_flops"] > 0 and run["mmjax"]["model_flops"] > 0
  assert out.with_suffix(".md").read_text().count("| mmjax |") == 2


def test_an_unknown_compare_value_is_refused_naming_it():
  with pytest.raises(ValueError, match="--compare='pytorch_flamingo'.*open_flamingo"):
    bench.main(["step", "--config", "configs/flamingo/tiny.py", "--compare", "pytorch_flamingo"])


def test_compare_on_a_family_without_that_original_is_refused_naming_the_family():
  with pytest.raises(ValueError, match="--compare='open_flamingo'.*'lm' family"):
    bench.main(["step", "--config", "configs/lm/tiny.py", "--compare", "open_flamingo"])
