"""A small embedded dataset, built once per test session into a temporary directory."""

import pytest

from mmjax.data import builders

SIZE = 120        # training records per kind (validation/test: 20 each)
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mmjax_data"))
  builders.build_embedded(path, size=SIZE, image_size=IMAGE_SIZE, seed=0)
  return path


@pytest.fixture(scope="session")
def tokenizer(data_dir):
  return builders.load_tokenizer(data_dir)
