"""The model families and their registry: one explicit dict, one line per family.

  family = mmjax.families.get("flamingo")          # or families.of_config(config)
  task = family.task(config, workdir)              # what the trainer trains
  family.components                                # what freeze.stages may name

A family is an addition: its own package under `mmjax/families/` plus its line here (see
`base.Family` for what it provides, docs/families.md for how to add one).
"""

from __future__ import annotations

import ml_collections

from mmjax.families.base import AbstractModel, Family, Task
from mmjax.families.blip2.family import FAMILY as _BLIP2
from mmjax.families.contrastive.family import FAMILY as _CONTRASTIVE
from mmjax.families.flamingo.family import FAMILY as _FLAMINGO
from mmjax.families.llava.family import FAMILY as _LLAVA
from mmjax.families.lm.family import FAMILY as _LM

REGISTRY: dict[str, Family] = {
    _FLAMINGO.name: _FLAMINGO,
    _LM.name: _LM,
    _CONTRASTIVE.name: _CONTRASTIVE,
    _LLAVA.name: _LLAVA,
    _BLIP2.name: _BLIP2,
}

# What `config.model.family` is when a config does not say (every config before families).
DEFAULT = "flamingo"
# The shipped config `mmjax demo` trains (with and without images) by default.
DEMO_CONFIG = "flamingo/tiny"


def names() -> list[str]:
  return sorted(REGISTRY)


def get(name: str) -> Family:
  """The family registered as `name`; ValueError listing the registered ones otherwise."""
  if name not in REGISTRY:
    raise ValueError(f"model family {name!r} is not registered; expected one of {names()}")
  return REGISTRY[name]


def of_config(config: ml_collections.ConfigDict) -> Family:
  """The family `config.model.family` names (`DEFAULT` when it names none)."""
  return get(str(config.model.get("family", DEFAULT)))


__all__ = ["AbstractModel", "DEFAULT", "Family", "REGISTRY", "Task", "get", "names", "of_config"]
