"""What a pip-installed mmjax holds: every subpackage, the configs (as `mmjax.configs`), and
`--config` names that resolve to them from any directory."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from mmjax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared_packages():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["tool"]["setuptools"]["packages"]


def test_every_package_directory_is_declared_in_pyproject():
  found = set()
  for top, prefix in (("mmjax", "mmjax"), ("configs", "mmjax.configs")):
    for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
      if any(f.endswith(".py") for f in files):
        assert "__init__.py" in files, f"{dirpath} holds Python files but no __init__.py"
        found.add(prefix if rel == "." else prefix + "." + rel.replace(os.sep, "."))
  assert sorted(found) == sorted(_declared_packages())


def test_the_wheel_holds_the_configs_and_every_module(tmp_path):
  # Built from a copy (setuptools writes build/ into the source tree), without build
  # isolation: setuptools comes with the test extra, and nothing is downloaded.
  source = tmp_path / "source"
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".venv312", "work", "build", "*.egg-info",
                                                               "__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
  assert "mmjax/configs/flamingo/tiny.py" in names and "mmjax/configs/flamingo/staged.py" in names
  assert "mmjax/kernels/attention/README.md" in names
  for dirpath, _, files in os.walk(os.path.join(ROOT, "mmjax")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
        assert rel in names, f"{rel} is missing from the wheel"

  # Installed (not editable) elsewhere and run from a directory with no configs/ in it.
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                  str(tmp_path / wheel)], check=True, capture_output=True, timeout=300)
  code = ("import mmjax.train.config as c, mmjax.train.cli as cli; "
          "print(c.__file__); print(c.load_config(cli.TINY).model.decoder.depth)")
  out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(target)), cwd=tmp_path,
                       check=True, capture_output=True, text=True, timeout=300).stdout.split()
  assert out[0].startswith(str(target)), out  # the installed copy, not this checkout
  assert int(out[1]) >= 1


def test_shipped_configs_resolve_by_name_and_by_repository_path_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/flamingo/tiny.py is not a file here
  shipped = os.path.join(config_lib.builtin_configs_dir(), "flamingo", "tiny.py")
  assert os.path.samefile(config_lib.resolve_config_path("flamingo/tiny"), shipped)
  assert os.path.samefile(config_lib.resolve_config_path("configs/flamingo/tiny.py"), shipped)
  assert config_lib.resolve_config_path("flamingo/tiny.py:arg") == shipped + ":arg"
  assert config_lib.builtin_configs() == ["blip2/tiny_stage1", "blip2/tiny_stage2", "clip/tiny", "flamingo/staged",
                                         "flamingo/tiny", "flamingo/tiny_interleaved", "instructblip/tiny",
                                         "llava/tiny_stage1", "llava/tiny_stage2", "lm/tiny", "lm/tiny_reading",
                                         "siglip/tiny"]
  config = config_lib.load_config("flamingo/staged", ["--config.train.num_steps=7"])
  assert config.train.num_steps == 7 and config.freeze.stages.startswith("0:")
  # siglip/tiny builds on clip/tiny by its own path, not the working directory.
  assert config_lib.load_config("siglip/tiny").model.loss == "sigmoid"


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("flamingo")
  with open("flamingo/tiny.py", "w") as f:
    f.write("import ml_collections\n\ndef get_config(arg=None):\n"
            "  return ml_collections.ConfigDict({'mine': True})\n")
  assert config_lib.resolve_config_path("flamingo/tiny.py") == "flamingo/tiny.py"
  assert config_lib.load_config("flamingo/tiny.py").mine


@pytest.mark.parametrize("value", ["flamingo/huge", "../flamingo/tiny", "", "configs/"])
def test_an_unknown_config_names_itself_and_the_shipped_ones(value, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"no such file.*blip2/tiny_stage1, blip2/tiny_stage2, clip/tiny, flamingo/staged, "
                                      r"flamingo/tiny, flamingo/tiny_interleaved, instructblip/tiny, llava/tiny_stage1, llava/tiny_stage2, lm/tiny, "
                                      r"lm/tiny_reading, siglip/tiny"):
    config_lib.resolve_config_path(value)
