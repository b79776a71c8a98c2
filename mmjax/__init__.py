"""mmjax: multimodal large language models in JAX/Flax.

The public face, so that a user writes one import:

  import mmjax
  config = mmjax.zoo.get("openflamingo-9b")          # named presets of every family
  family = mmjax.families.get("flamingo")             # a model family: its task, presets, generation
  it = mmjax.data.make_pipeline(split="train", ...)   # the embedded dataset, your own data
  config = mmjax.load_config("flamingo/tiny", ["--config.train.num_steps=100"])

Subpackages (`zoo`, `families`, `data`, `models`, `infer`, `convert`, `sharding`, `train`) load on first
use, so `import mmjax` stays cheap (it imports no JAX) and the `mmjax` command starts fast.
"""

__version__ = "0.1.0"

__all__ = ["convert", "data", "families", "infer", "load_config", "models", "sharding", "train", "zoo"]


_SUBPACKAGES = ("convert", "data", "families", "infer", "models", "sharding", "train", "zoo")


def __getattr__(name: str):
  # PEP 562: a subpackage is imported the first time it is read (a fixed list, not a
  # user's string: `from mmjax import zoo` here would recurse into this function).
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _SUBPACKAGES:
    return importlib.import_module(f"mmjax.{name}")
  if name == "load_config":
    return importlib.import_module("mmjax.train.config").load_config
  raise AttributeError(f"module 'mmjax' has no attribute {name!r}; expected one of {__all__}")


def __dir__():
  return sorted(__all__ + ["__version__"])
