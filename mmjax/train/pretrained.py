"""Starting a run from other runs' checkpoints (`config.init.from_workdir`): the Flamingo
recipe freezes a *pretrained* LM and a *pretrained* vision tower, so
`configs/flamingo/staged.py` starts from an `lm` run and a `contrastive` run
(`init.from_workdir = "work/lm-tiny,work/clip-tiny"`).

`init.from_workdir` names one work directory or several, comma-separated; each is adopted
in turn, in the order given, on the result of the one before. Each other work directory is
only read (its newest complete checkpoint, read-only, as `mmjax eval` reads); its family
says what its parameters are, this run's family where they go (`Task.adopt_params`). Each
must tokenize as this run does: the token ids of one mean nothing to the other otherwise
(a run that reads no text still copies its tokenizer, and is checked alike).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from mmjax import families
from mmjax.families.base import Task


def source(config: ml_collections.ConfigDict) -> str:
  """What `config.init.from_workdir` names (one work directory or several, comma-separated),
  or '' for none."""
  init = config.get("init", None)
  return str(init.get("from_workdir", "") or "") if init is not None else ""


def sources(config: ml_collections.ConfigDict) -> list[str]:
  """The work directories `config.init.from_workdir` names, in the order they are adopted."""
  return [s.strip() for s in source(config).split(",") if s.strip()]


def adopt(config: ml_collections.ConfigDict, task: Task, params: Any) -> Any:
  """`params` (a fresh init) with the pretrained parameters of each work directory of
  `config.init.from_workdir` in place, in turn; `params` unchanged when the config names
  none."""
  for src in sources(config):
    params = _adopt_one(config, task, params, src)
  return params


def _adopt_one(config: ml_collections.ConfigDict, task: Task, params: Any, src: str) -> Any:
  """`params` with the pretrained parameters of the one work directory `src` in place."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from mmjax.train import loop  # pylint: disable=g-import-not-at-top
  from mmjax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  family = families.of_config(config)
  if task.adopt_params is None:
    raise ValueError(f"config.init.from_workdir={src!r}, but family {family.name!r} takes no pretrained "
                     "parameters; expected an empty init.from_workdir")
  if not os.path.isdir(src):
    raise ValueError(f"config.init.from_workdir={src!r} is not a directory; expected a work directory "
                     "written by `mmjax train` (train that run first: the config's init.from_configs names "
                     "the configs that train its runs, and `mmjax recipe CONFIG` runs them in order; e.g. "
                     "`mmjax train --config configs/lm/tiny.py --workdir work/lm-tiny`)")
  other_config = config_lib.read_resolved(src)
  other_family = families.of_config(other_config)
  other_task = other_family.task(other_config, src)
  mine = (task.workdir_files or dict)()
  theirs = (other_task.workdir_files or dict)()
  for name in sorted(set(mine) & set(theirs)):
    if mine[name] != theirs[name]:
      raise ValueError(
          f"config.init.from_workdir={src!r} was trained with another {name} (sha256 "
          f"{workdir_lib.sha256(theirs[name])[:12]}) than this run's ({workdir_lib.sha256(mine[name])[:12]}); "
          "expected the same, since token ids mean nothing across tokenizers")
  step, other_params = loop.restore_params(other_config, src, other_task)
  logging.getLogger(__name__).info("starting from the %s parameters of %s (step %d)", other_family.name, src, step)
  return task.adopt_params(params, other_family.name, other_params)
