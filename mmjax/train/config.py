"""Experiment configs: load `configs/**.py`, apply `--config.a.b=value` overrides, write the resolved config.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. The command line
is parsed with `ml_collections.config_flags` on a private `absl.flags.FlagValues`, so every
field of the config can be overridden with its own type checked (`--config.optimizer.lr=3e-4`)
and `--config=path.py:arg` passes `arg` to `get_config`.

`--config` takes a file, or the name of a config mmjax ships (`flamingo/tiny`, or its
repository path `configs/flamingo/tiny.py` from any directory): the repository's
`configs/` is installed as `mmjax.configs`, so a pip-installed mmjax (a TPU worker, a
Colab runtime) has them too. A file that exists always wins over a shipped name.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

RESOLVED_CONFIG = "config.json"


def builtin_configs_dir() -> str:
  """The directory of the configs mmjax ships (the repository's configs/, installed)."""
  return str(importlib.resources.files("mmjax.configs"))


def builtin_configs() -> list[str]:
  """Names of the shipped configs, e.g. ['flamingo/staged', 'flamingo/tiny']."""
  root = builtin_configs_dir()
  names = []
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py") and f != "__init__.py":
        names.append(os.path.relpath(os.path.join(dirpath, f[:-3]), root).replace(os.sep, "/"))
  return sorted(names)


def resolve_config_path(value: str) -> str:
  """`--config`'s value with its file made a real path.

  An existing file is returned as given; otherwise `flamingo/tiny`, `flamingo/tiny.py` or
  `configs/flamingo/tiny.py` names a shipped config. A `:arg` suffix is kept.
  """
  path, sep, arg = value.partition(":")
  if os.path.isfile(path):
    return value
  name = os.path.normpath(path).replace(os.sep, "/")
  name = name.removeprefix("configs/").removesuffix(".py")
  shipped = os.path.join(builtin_configs_dir(), *name.split("/")) + ".py"
  if name and not name.startswith("..") and os.path.isfile(shipped):
    return shipped + sep + arg
  raise ValueError(f"--config={value!r}: no such file, and not one of the configs mmjax ships "
                   f"({', '.join(builtin_configs())})")


def config_argument(argv: Sequence[str]) -> tuple[list[str], int | None]:
  """(argv with `--config V` written as `--config=V`, the index of that argument or None)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a == "--config" and i + 1 < len(out):
      out[i:i + 2] = [f"--config={out[i + 1]}"]
    if out[i].startswith("--config="):
      return out, i
  return out, None


def _resolve_config_flag(argv: Sequence[str]) -> list[str]:
  """argv with the value of `--config` passed through resolve_config_path."""
  out, i = config_argument(argv)
  if i is not None:
    out[i] = "--config=" + resolve_config_path(out[i][len("--config="):])
  return out


def _underscored(arg: str, extra: dict) -> str:
  """`--allow-config-change` as absl spells the flag (`--allow_config_change`), for `extra` flags."""
  name, sep, value = arg.partition("=")
  bare = name.lstrip("-").replace("-", "_")
  if name.startswith("--") and (bare in extra or (bare.startswith("no") and bare[2:] in extra)):
    return "--" + bare + sep + value
  return arg


class HelpRequested(Exception):
  """`-h`/`--help` was given: the text to print, and nothing else to do."""


def _usage(prog: str, extra: dict[str, tuple[str | bool | None, str]], config_value: str | None) -> str:
  dashed = {name: name.replace("_", "-") for name in extra}
  lines = [f"usage: {prog} [--config=FILE_OR_NAME] " + " ".join(f"[--{dashed[n]}]" for n in extra)
           + " [--config.x.y=VALUE ...]",
           "", "options:",
           f"  --config=FILE_OR_NAME   experiment config: a file, or a shipped name ({', '.join(builtin_configs())})"]
  for name, (default, help_) in extra.items():
    lines.append(f"  --{dashed[name]:<21} {help_}" + (f" (default: {default})" if default not in (None, False) else ""))
  lines.append("  --config.x.y=VALUE      override any field of the config, type-checked")
  if config_value is not None:
    fields = _flat_fields(load_config(config_value))
    lines += ["", f"fields of {config_value} (override with --config.FIELD=VALUE):"]
    lines += [f"  {k} = {v!r}" for k, v in fields]
  else:
    lines += ["", "give --config=... with --help to list every field of that config and its value"]
  return "\n".join(lines)


def _flat_fields(config, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _flat_fields(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def parse_flags(argv: Sequence[str], *, prog: str, extra: dict[str, tuple[str | bool | None, str]] | None = None,
                require_config: bool = True) -> tuple[ml_collections.ConfigDict | None, dict[str, object]]:
  """Parses `--config=FILE [--config.x.y=v ...] [--NAME=value ...]`.

  `extra` maps flag names to (default, help): string flags such as `--workdir`, or boolean
  switches when the default is a bool (`--restart`). Returns the resolved config (None when
  `--config` is absent and not required) and the values of the extra flags. Raises
  ValueError on an unknown flag or a bad override, and `HelpRequested` with the usage text
  for `-h`/`--help`.
  """
  extra = extra or {}
  if "-h" in argv or "--help" in argv:
    _, i = config_argument(argv)
    config_value = config_argument(argv)[0][i][len("--config="):] if i is not None else None
    raise HelpRequested(_usage(prog, extra, config_value))
  argv = [_underscored(a, extra) for a in argv]
  fv = flags.FlagValues()
  full = [prog, *_resolve_config_flag(argv)]
  config_flags.DEFINE_config_file("config", default=None, help_string="experiment config file", flag_values=fv,
                                  lock_config=True, sys_argv=full)
  for name, (default, help_) in extra.items():
    if isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_, flag_values=fv)
    else:
      flags.DEFINE_string(name, default, help_, flag_values=fv)
  try:
    fv(full)
  except (flags.Error, KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"bad command line: {e}") from None
  config = fv.config
  if config is None and require_config:
    raise ValueError(f"--config is required: a config file or one of {', '.join(builtin_configs())}")
  return config, {name: fv[name].value for name in extra}


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file with `--config.x=v` style overrides (for tests and notebooks)."""
  config, _ = parse_flags([f"--config={path}", *overrides], prog="load_config")
  return config


def write_resolved(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the config as JSON into `workdir` (what this run actually used); returns the path.

  Process 0 writes it; the other processes of a multi-process job only return the path.
  """
  path = os.path.join(workdir, RESOLVED_CONFIG)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return path
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


def read_resolved(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config a training run wrote into `workdir`."""
  path = os.path.join(workdir, RESOLVED_CONFIG)
  if not os.path.exists(path):
    raise ValueError(f"{workdir!r} has no {RESOLVED_CONFIG}; expected a work directory written by `mmjax train`")
  with open(path) as f:
    return from_dict(upgrade(json.load(f)))


def upgrade(recorded: dict) -> dict:
  """A config as an older mmjax recorded it, in today's layout: `model.family` set (the
  default one when absent) and its family's `upgrade_model` applied (e.g. Flamingo's
  cross-attention fields left DecoderConfig)."""
  from mmjax import families  # pylint: disable=g-import-not-at-top
  model = recorded.get("model")
  if not isinstance(model, dict):
    return recorded
  # Configs from before families name none: they are the default family's.
  family = families.get(str(model.get("family", families.DEFAULT)))
  model = {**model, "family": family.name}
  if family.upgrade_model is not None:
    model = family.upgrade_model(model)
  return {**recorded, "model": model}


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """ConfigDict from plain JSON data (lists become tuples, as config files write them)."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v
  return ml_collections.ConfigDict(fix(d))
