"""`import mmjax` is the one import a user needs: the subpackages load on first use, and the
bare import loads no JAX (the `mmjax` command's --help stays fast)."""

import subprocess
import sys

import pytest

import mmjax


def test_the_zoo_and_the_config_loader_are_reached_from_the_top_level():
  config = mmjax.zoo.get("flamingo-tiny")
  assert config.decoder.depth == 4
  c = mmjax.load_config("flamingo/tiny", ["--config.train.num_steps=7"])
  assert c.train.num_steps == 7
  assert mmjax.data.Bucket(max_images=1, text_length=8, image_size=8).text_length == 8


def test_import_mmjax_loads_no_jax():
  code = "import sys, mmjax; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_name_says_what_there_is():
  with pytest.raises(AttributeError, match="no attribute 'nope'; expected one of"):
    mmjax.nope  # noqa: B018
