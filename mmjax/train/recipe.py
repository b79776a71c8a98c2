"""`mmjax recipe NAME`: a multi-run recipe, its runs trained in order, then the last evaluated.

  mmjax recipe flamingo-staged [--workdir-root work] [--config.x.y=value ...]

A recipe is a list of stages (the table `RECIPES`): each is one `mmjax train` of a shipped
config into `WORKDIR_ROOT/<stage name>`, starting from the work directories of earlier
stages (`init.from_workdir`, set here from the table so that `--workdir-root` moves them
all). Each stage resumes its work directory as `mmjax train` does, so a finished stage is a
no-op and an interrupted recipe goes on where it stopped. After the last stage, `mmjax
eval` of its work directory. An embedded dataset that is not built yet is built first (as
`mmjax demo` does), so that the recipe runs from a fresh clone.

A `--config.x.y=value` override goes to every stage whose config has the field `x.y` (an
override no stage has is an error): `--config.data.dir=D` reaches all three runs,
`--config.model.decoder.depth=2` the LM and the Flamingo, not the contrastive run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


@dataclasses.dataclass(frozen=True)
class Stage:
  # The stage's work directory under --workdir-root, and how later stages name it.
  name: str
  # A shipped config (`mmjax.train.config.resolve_config_path`).
  config: str
  # Names of earlier stages whose work directories become `init.from_workdir`, in order.
  starts_from: tuple[str, ...] = ()


RECIPES: dict[str, tuple[Stage, ...]] = {
    # The Flamingo recipe: a pretrained LM and a contrastively pretrained image tower, both
    # frozen under a Flamingo that trains only its resampler and cross-attention.
    "flamingo-staged": (
        Stage("lm-tiny", "configs/lm/tiny.py"),
        Stage("clip-tiny", "configs/clip/tiny.py"),
        Stage("flamingo-staged", "configs/flamingo/staged.py", starts_from=("lm-tiny", "clip-tiny")),
    ),
}


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def stage_commands(name: str, workdir_root: str, overrides: list[str]) -> list[list[str]]:
  """The `mmjax train` argument lists of recipe `name`'s stages, in order. ValueError for an
  unknown recipe or an override that no stage's config has."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
  stages = RECIPES[name]
  configs = [config_lib.load_config(s.config) for s in stages]
  fields = {}
  for o in overrides:
    if not o.startswith("--config.") or "=" not in o:
      raise ValueError(f"bad override {o!r}; expected --config.FIELD=VALUE")
    fields[o] = o[len("--config."):].split("=", 1)[0]
  unknown = [o for o, f in fields.items() if not any(_has_field(c, f) for c in configs)]
  if unknown:
    raise ValueError(f"overrides {unknown} name fields that no stage of recipe {name!r} has "
                     f"({', '.join(s.config for s in stages)})")
  workdir = lambda s: os.path.join(workdir_root, s)
  commands = []
  for stage, config in zip(stages, configs):
    argv = [f"--config={stage.config}", f"--workdir={workdir(stage.name)}"]
    argv += [o for o, f in fields.items() if _has_field(config, f)]
    if stage.starts_from:
      argv.append(f"--config.init.from_workdir={','.join(workdir(s) for s in stage.starts_from)}")
    commands.append(argv)
  return commands


def _build_missing_data(command: list[str]) -> None:
  """Builds the embedded dataset the first stage reads when its directory holds none."""
  from mmjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mmjax.families import common  # pylint: disable=g-import-not-at-top
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(command[0][len("--config="):], [a for a in command if a.startswith("--config.")])
  if str(config.data.name) != "embedded":
    return
  d = common.data_dir(config)
  try:
    data_lib.tokenizer_path(d)
  except (OSError, ValueError, KeyError):
    print(f"mmjax recipe: no dataset in {d}; building the embedded dataset there", flush=True)
    data_lib.build_embedded(d, log=lambda m: print(f"mmjax recipe:   {m}", flush=True))


def main(argv: list[str]) -> int:
  from mmjax.train import cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="mmjax recipe", description="train a recipe's runs in order (each resuming its "
                              "work directory), then evaluate the last; recipes: " + ", ".join(RECIPES))
  p.add_argument("name", choices=sorted(RECIPES))
  p.add_argument("--workdir-root", default="work", help="each stage trains into WORKDIR_ROOT/<stage>")
  p.add_argument("--no-eval", action="store_true", help="skip `mmjax eval` of the last stage")
  args, overrides = p.parse_known_args(argv)
  commands = stage_commands(args.name, args.workdir_root, overrides)
  _build_missing_data(commands[0])
  for i, command in enumerate(commands):
    print(f"mmjax recipe: stage {i + 1}/{len(commands)}: mmjax train {' '.join(command)}", flush=True)
    rc = cli.train_main(command)
    if rc:
      print(f"mmjax recipe: stage {i + 1} failed (exit {rc}); rerun the recipe to resume it", file=sys.stderr)
      return rc
  if args.no_eval:
    return 0
  last = os.path.join(args.workdir_root, RECIPES[args.name][-1].name)
  print(f"mmjax recipe: mmjax eval --workdir {last}", flush=True)
  return cli.eval_main([f"--workdir={last}"])
