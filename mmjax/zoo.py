"""Named model presets of every family: ``mmjax.zoo.list()`` and ``mmjax.zoo.get(name, **overrides)``.

  config = mmjax.zoo.get("openflamingo-9b", scan_layers=True)   # a FlamingoConfig
  mmjax.zoo.family_of("llama-7b")                                # "lm"

Each family keeps its presets in its own package (``Family.presets``, at published sizes);
the zoo only looks them up, so a new family's presets appear here with its registry line.
``get``'s overrides are the family's (``Family.override``: the Flamingo family's take
``vocab_size``, ``max_length``, ``dtype``, ``scan_layers``, ..., or any field of its config).
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any

from mmjax import families


def _all() -> dict[str, tuple[families.Family, Any]]:
  out = {}
  for family in families.REGISTRY.values():
    for name, config in family.presets().items():
      if name in out:
        raise ValueError(f"preset {name!r} is defined by families {out[name][0].name!r} and {family.name!r}; "
                         "expected unique names")
      out[name] = (family, config)
  return out


def list(family: str | None = None) -> builtins.list[str]:  # pylint: disable=redefined-builtin
  """The preset names (of one family when ``family`` is given)."""
  if family is not None:
    return builtins.list(families.get(family).presets())
  return builtins.list(_all())


def family_of(name: str) -> str:
  """The family a preset belongs to."""
  return _lookup(name)[0].name


def _lookup(name: str):
  presets = _all()
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; expected one of {builtins.list(presets)}")
  return presets[name]


def get(name: str, **overrides) -> Any:
  """The preset ``name`` (its family's config class), with fields replaced by ``overrides``."""
  family, config = _lookup(name)
  if family.override is not None:
    return family.override(config, **overrides)
  return dataclasses.replace(config, **overrides)
