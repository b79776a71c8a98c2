"""The command line meets a user's mistakes and bad luck with one line and an exit status,
never a traceback (issue 13, defects 8, 10 and 11): bad config values, a read-only work
directory, an evaluation that could not write its results, image files that are bombs or
cut short, and `--help` on every verb."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import mmjax.cli
from mmjax.data import builders
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import evaluate
from tests.data.test_bad_records import _bomb_png, _truncated_png
from tests.train.test_checkpoint import ROOT, _env
from tests.train.test_workdir import _mount

SMALL = ["--config.data.batch_size=4", "--config.data.text_length=32", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.train.num_steps=2", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.log.tensorboard=False",
         "--config.model.decoder.depth=1", "--config.model.resampler.depth=1", "--config.model.vision.depth=1",
         "--config.mesh.num_devices=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cli_data"))
  builders.build_embedded(path, size=8, image_size=16, seed=0)
  return path


def _train_args(data_dir, workdir, *extra):
  return [f"--config={cli.TINY}", f"--workdir={workdir}", f"--config.data.dir={data_dir}", *SMALL, *extra]


def _one_line(err: str, prog: str) -> str:
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith(f"{prog}: ") and lines[0].count(f"{prog}:") == 1, err
  assert "Traceback" not in err
  return lines[0]


def test_a_bad_nan_policy_is_one_line_from_the_real_command_and_nothing_is_trained(data_dir, tmp_path):
  wd = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "mmjax.cli", "train",
                      *_train_args(data_dir, wd, "--config.train.nan_policy=bogus")],
                     env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  assert "mmjax train: train.nan_policy='bogus'; expected 'stop' or 'skip'" in r.stderr
  assert not (wd / "checkpoints").exists()


def test_an_unknown_dataset_in_the_mixture_is_one_line(data_dir, tmp_path, capsys):
  assert cli.train_main(_train_args(data_dir, tmp_path / "run", "--config.data.mixture=nope:1")) == 2
  line = _one_line(capsys.readouterr().err, "mmjax train")
  assert "'nope'" in line


def test_a_bad_override_is_printed_once_without_python_reprs(capsys, tmp_path):
  assert cli.train_main([f"--config={cli.TINY}", f"--workdir={tmp_path}", "--config.optimizer.lrr=1"]) == 2
  line = _one_line(capsys.readouterr().err, "mmjax train")
  assert "lrr" in line and "['" not in line


def test_train_into_a_read_only_work_directory_is_one_line_before_any_work(data_dir, tmp_path, capsys):
  os.makedirs(tmp_path / "src")
  with _mount("--bind", "-o", "ro", str(tmp_path / "src"), str(tmp_path / "ro")) as wd:
    assert cli.train_main(_train_args(data_dir, wd)) == 2
  line = _one_line(capsys.readouterr().err, "mmjax train")
  assert "is not writable (Read-only file system)" in line


def test_eval_that_cannot_write_its_results_says_so_before_evaluating(data_dir, tmp_path, capsys, monkeypatch):
  wd = str(tmp_path / "run")
  config_lib.write_resolved(config_lib.load_config(cli.TINY, [f"--config.data.dir={data_dir}", *SMALL]), wd)
  monkeypatch.setattr(evaluate, "load", lambda workdir: pytest.fail("evaluated before checking the output"))
  with _mount("--bind", "-o", "ro", wd, str(tmp_path / "ro")) as ro:
    assert cli.eval_main([f"--workdir={ro}"]) == 2
  line = _one_line(capsys.readouterr().err, "mmjax eval")
  assert "cannot write the results to" in line and "eval.json" in line and "nothing was evaluated" in line


@pytest.mark.parametrize("kind", ["bomb", "truncated", "missing"])
def test_generate_with_a_bad_image_file_is_one_line_naming_it(kind, data_dir, tmp_path, capsys):
  wd = str(tmp_path / "run")
  config_lib.write_resolved(config_lib.load_config(cli.TINY, [f"--config.data.dir={data_dir}", *SMALL]), wd)
  image = tmp_path / f"{kind}.png"
  if kind != "missing":
    image.write_bytes(_bomb_png() if kind == "bomb" else _truncated_png())
  code = cli.generate_main([f"--workdir={wd}", f"--image={image}", "--prompt=<image>Question: what? Answer:"])
  assert code == 2
  line = _one_line(capsys.readouterr().err, "mmjax generate")
  assert str(image) in line
  if kind == "bomb":
    assert "30000 x 30000" in line


@pytest.mark.parametrize("verb", sorted(mmjax.cli.COMMANDS))
def test_every_verb_answers_help(verb, capsys):
  try:
    code = mmjax.cli.main([verb, "--help"])
  except SystemExit as e:  # argparse's way of saying it printed the help
    code = e.code
  assert code == 0
  out = capsys.readouterr().out
  assert f"mmjax {verb}" in out


def test_train_help_with_a_config_lists_its_fields_and_the_work_directory_switches(capsys):
  assert mmjax.cli.main(["train", "--config=flamingo/tiny", "--help"]) == 0
  out = capsys.readouterr().out
  assert "optimizer.lr = 0.001" in out and "train.max_consecutive_skips = 5" in out
  assert "--restart" in out and "--allow-config-change" in out


def test_an_unexpected_error_keeps_its_traceback():
  class Bug(TypeError):
    pass

  def broken(argv):
    raise Bug("a bug")

  mmjax.cli.COMMANDS["broken"] = (broken, "")
  try:
    with pytest.raises(Bug):
      mmjax.cli.main(["broken"])
  finally:
    del mmjax.cli.COMMANDS["broken"]


@pytest.mark.slow  # retrains the tokenizer and trains twice: about 40 s on 2 cores
def test_retraining_the_data_directorys_tokenizer_leaves_a_trained_work_directory_working(data_dir, tmp_path,
                                                                                        capsys):
  # The data directory is this test's own: the import below changes its tokenizer.
  data = str(tmp_path / "data")
  subprocess.run(["cp", "-a", data_dir, data], check=True)
  wd = str(tmp_path / "run")
  assert cli.train_main(_train_args(data, wd)) == 0
  checkpoints = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  # `mmjax data import --retrain-tokenizer`: a new tokenizer for the whole data directory.
  (tmp_path / "images").mkdir()
  Image.new("RGB", (4, 4), (200, 30, 30)).save(tmp_path / "images" / "red.png")
  (tmp_path / "mine.jsonl").write_text(json.dumps({"images": ["red.png"], "text": "<image>zebras quaff jam."}))
  from mmjax.data import cli as data_cli
  assert data_cli.main(["import", "--data-dir", data, "--name", "mine", "--jsonl", str(tmp_path / "mine.jsonl"),
                        "--images", str(tmp_path / "images"), "--retrain-tokenizer"]) == 0
  assert builders.tokenizer_path(data) != os.path.join(data, "tokenizer.model")
  # Evaluation and resuming read the work directory's own copy: nothing is moved, no error.
  config, _, step, _ = evaluate.load(wd)
  assert step == 2
  capsys.readouterr()
  assert cli.train_main(_train_args(data, wd, "--config.train.num_steps=4")) == 0
  out = capsys.readouterr().out
  assert "started at 2" in out and "done at step 4" in out
  assert not os.path.exists(os.path.join(wd, "checkpoints_corrupt"))
  assert set(checkpoints) <= set(os.listdir(os.path.join(wd, "checkpoints"))) | {"2"}
  # Training into a new work directory takes the new tokenizer.
  assert cli.train_main(_train_args(data, str(tmp_path / "new"))) == 0
  with open(os.path.join(tmp_path, "new", "tokenizer.model"), "rb") as a, open(builders.tokenizer_path(data), "rb") as b:
    assert a.read() == b.read()
