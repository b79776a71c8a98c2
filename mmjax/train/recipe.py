"""`mmjax recipe CONFIG`: a config's pretraining runs trained in order, then the config, then eval.

  mmjax recipe flamingo/staged [--workdir-root work] [--no-eval] [--config.x.y=value ...]

A config that starts from other runs names their work directories in `init.from_workdir`
and, in `init.from_configs`, the configs that train them (comma-separated, in the same
order). The recipe trains each of those configs into `WORKDIR_ROOT/<basename of its work
directory>`, then CONFIG into `WORKDIR_ROOT/<its folder>-<its name>` (flamingo/staged:
work/flamingo-staged) starting from them (`init.from_workdir` is set to where they went, so
`--workdir-root` moves them all). Each stage resumes its work directory as `mmjax train`
does, so a finished stage is a no-op and an interrupted recipe goes on where it stopped.
After the last stage, `mmjax eval` of its work directory. An embedded dataset that is not
built yet is built first (as `mmjax demo` does), so that the recipe runs from a fresh clone.
The stages are the config's data, so a new recipe is a new config, never an edit here.

Each stage is an `mmjax train` process of its own, its output relayed line by line behind
`[<stage>]`. A stage starts once the stages it starts from have finished; `--jobs N` trains
up to N stages that do not depend on each other side by side (BLIP-2's reading LM beside the
CLIP tower and stage 1), for a machine with cores to spare: on 2 cores it gains nothing (two
`lm/tiny_reading` trainings side by side ran at 2200-3200 tokens/s each, one alone at 6300-
6600), so the default is 1. SIGTERM or Ctrl-C reaches every running stage as SIGTERM: each
saves its last step and exits, no further stage starts (a stage stopped that way exits 0,
and before, the next stage started from its unfinished run), and a rerun resumes them. A
stage that fails stops the others the same way.

A `--config.x.y=value` override goes to every stage whose config has the field `x.y` (an
override no stage has is an error): `--config.data.dir=D` reaches every run,
`--config.model.decoder.depth=2` the runs that have a decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time


@dataclasses.dataclass(frozen=True)
class Stage:
  # The stage's work directory under --workdir-root.
  name: str
  # The config it trains (a shipped name or a path: `mmjax.train.config.resolve_config_path`).
  config: str
  # Names of earlier stages whose work directories become `init.from_workdir`, in order.
  starts_from: tuple[str, ...] = ()


def _split(value) -> list[str]:
  return [v.strip() for v in str(value or "").split(",") if v.strip()]


def stages(config_name: str, overrides: list[str] = ()) -> tuple[Stage, ...]:
  """The stages of the recipe of `config_name` (with `overrides`): its `init.from_configs`
  runs, then itself. ValueError when it names none, or not one config per
  `init.from_workdir` entry."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(config_name, list(overrides))
  init = config.get("init", None) or {}
  workdirs, configs = _split(init.get("from_workdir", "")), _split(init.get("from_configs", ""))
  if not configs:
    raise ValueError(f"config {config_name!r} names no runs to start from (init.from_configs is empty); expected a "
                     "config that starts from pretrained runs (train any other with `mmjax train`)")
  if len(configs) != len(workdirs):
    raise ValueError(f"config {config_name!r} names {len(workdirs)} work directories in init.from_workdir "
                     f"({workdirs}) but {len(configs)} configs in init.from_configs ({configs}); expected one "
                     "config per work directory, in the same order")
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  path = os.path.normpath(config_lib.resolve_config_path(config_name).split(":")[0])
  own = f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"
  if len(set(names + [own])) != len(names) + 1:
    raise ValueError(f"the runs of config {config_name!r} would share work directories ({names + [own]}); "
                     "expected distinct names")
  out: list[Stage] = []
  for name, other in zip(names, configs):
    out += _pretraining(name, other, seen=(config_name,))
  out.append(Stage(own, config_name, tuple(names)))
  return _dedup(out, config_name)


def _pretraining(name: str, config_name: str, seen: tuple[str, ...]) -> list[Stage]:
  """The stages that train `config_name` into work directory `name`: its own pretraining
  runs first when it names some (LLaVA's stage 2 starts from stage 1, which starts from an
  `lm` and a `contrastive` run), then itself."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  if config_name in seen:
    raise ValueError(f"the recipe's configs start from each other in a cycle: {' -> '.join(seen + (config_name,))}")
  init = config_lib.load_config(config_name).get("init", None) or {}
  if not _split(init.get("from_configs", "")):
    return [Stage(name, config_name)]
  inner = list(stages(config_name))
  for stage in inner:
    if stage.config in seen:
      raise ValueError(f"the recipe's configs start from each other in a cycle: {' -> '.join(seen + (stage.config,))}")
  return inner[:-1] + [dataclasses.replace(inner[-1], name=name)]


def _dedup(recipe: list[Stage], config_name: str) -> tuple[Stage, ...]:
  """Each work directory trained once (the first time it is needed); ValueError when two
  different configs would train the same one."""
  out: dict[str, Stage] = {}
  for stage in recipe:
    if stage.name in out and out[stage.name].config != stage.config:
      raise ValueError(f"the recipe of {config_name!r} trains work directory {stage.name!r} with two configs "
                       f"({out[stage.name].config!r} and {stage.config!r}); expected one")
    out.setdefault(stage.name, stage)
  return tuple(out.values())


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def stage_commands(config_name: str, workdir_root: str, overrides: list[str]) -> list[list[str]]:
  """The `mmjax train` argument lists of the recipe of `config_name`, in order. ValueError
  for a config with no recipe, or an override that no stage's config has."""
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  recipe = stages(config_name)
  configs = [config_lib.load_config(s.config) for s in recipe]
  fields = {}
  for o in overrides:
    if not o.startswith("--config.") or "=" not in o:
      raise ValueError(f"bad override {o!r}; expected --config.FIELD=VALUE")
    fields[o] = o[len("--config."):].split("=", 1)[0]
  unknown = [o for o, f in fields.items() if not any(_has_field(c, f) for c in configs)]
  if unknown:
    raise ValueError(f"overrides {unknown} name fields that no stage of the recipe of {config_name!r} has "
                     f"({', '.join(s.config for s in recipe)})")
  workdir = lambda s: os.path.join(workdir_root, s)
  commands = []
  for stage, config in zip(recipe, configs):
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


# What `mmjax train` prints when SIGTERM stopped it (mmjax.train.cli.train_main): exit 0, but
# the run is not finished, so the stages that start from it must not start.
_PREEMPTED = "mmjax train: preempted"


def _launch(argv: list[str]) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # A session of its own: Ctrl-C in a terminal reaches the recipe, which turns it into
  # SIGTERM for each stage (a saved step) rather than a KeyboardInterrupt inside one.
  return subprocess.Popen([sys.executable, "-m", "mmjax", "train", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", env=env, start_new_session=True)


class _Running:
  """One stage's process and the thread relaying its output behind `[<stage>]`."""

  def __init__(self, name: str, process, lock: threading.Lock):
    self.name, self.process, self.preempted, self.signalled = name, process, False, False
    self.relay = threading.Thread(target=self._relay, args=(lock,), daemon=True)
    self.relay.start()

  def _relay(self, lock):
    for line in self.process.stdout:
      line = line.rstrip("\n")
      self.preempted |= line.startswith(_PREEMPTED)
      with lock:
        print(f"[{self.name}] {line}", flush=True)

  def finish(self) -> int:
    rc = self.process.wait()
    self.relay.join()
    return rc


def run_stages(recipe: tuple[Stage, ...], commands: list[list[str]], jobs: int, launch=_launch,
               poll_s: float = 0.2) -> int:
  """Trains `commands` (one per stage of `recipe`), each once the stages it starts from have
  finished, at most `jobs` at a time. 0 when all finished; else the first failing exit status,
  or 128 + the signal when SIGTERM / SIGINT (forwarded to the running stages as SIGTERM) or a
  stage's own preemption stopped the recipe."""
  if jobs < 1:
    raise ValueError(f"jobs={jobs}; expected at least 1")
  lock = threading.Lock()
  waiting = list(range(len(recipe)))
  running: dict[int, _Running] = {}
  finished: set[str] = set()
  stop = {"signal": 0, "rc": 0}

  def terminate_all():
    # Once per stage: a second SIGTERM after its loop ends would meet the default handler.
    for r in list(running.values()):
      if not r.signalled and r.process.poll() is None:
        r.signalled = True
        try:
          r.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
          pass

  def on_signal(signum, frame):
    stop["signal"] = stop["signal"] or signum
    terminate_all()

  handlers = {}
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGTERM, signal.SIGINT):
      handlers[s] = signal.signal(s, on_signal)
  try:
    while waiting or running:
      stopping = stop["signal"] or stop["rc"]
      for i in list(waiting):
        if stopping or len(running) >= jobs:
          break
        if all(name in finished for name in recipe[i].starts_from):
          waiting.remove(i)
          with lock:
            print(f"mmjax recipe: stage {i + 1}/{len(recipe)} ({recipe[i].name}): mmjax train "
                  f"{' '.join(commands[i])}", flush=True)
          running[i] = _Running(recipe[i].name, launch(commands[i]), lock)
      if stopping:
        if not running:
          break
        terminate_all()  # a stage launched as the signal arrived
      done = [i for i, r in running.items() if r.process.poll() is not None]
      if not done:
        time.sleep(poll_s)
        continue
      for i in done:
        r = running.pop(i)
        rc = r.finish()
        if rc and not r.signalled:
          with lock:
            print(f"mmjax recipe: stage {i + 1} ({r.name}) failed (exit {rc}); stopping the others; rerun the "
                  "recipe to resume", file=sys.stderr, flush=True)
          stop["rc"] = stop["rc"] or rc
          terminate_all()
        elif r.preempted or r.signalled:
          stop["signal"] = stop["signal"] or signal.SIGTERM
          terminate_all()
        else:
          finished.add(r.name)
  finally:
    for s, h in handlers.items():
      signal.signal(s, h)
  if stop["rc"]:
    return stop["rc"]
  if stop["signal"]:
    print(f"mmjax recipe: stopped by {signal.Signals(stop['signal']).name}; the running stages saved their last "
          f"step ({len(finished)}/{len(recipe)} stages finished); rerun the recipe to resume", file=sys.stderr,
          flush=True)
    return 128 + stop["signal"]
  return 0


def main(argv: list[str]) -> int:
  from mmjax.train import cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="mmjax recipe", description="train the runs a config starts from (its "
                              "init.from_configs), then the config, each resuming its work directory; then "
                              "evaluate the last")
  p.add_argument("config", help="a config whose init.from_configs names the runs it starts from")
  p.add_argument("--workdir-root", default="work", help="each stage trains into WORKDIR_ROOT/<stage>")
  p.add_argument("--jobs", type=int, default=1, help="stages trained side by side when they do not depend on "
                 "each other (an accelerator's devices belong to one process: keep 1 there)")
  p.add_argument("--no-eval", action="store_true", help="skip `mmjax eval` of the last stage")
  args, overrides = p.parse_known_args(argv)
  if args.jobs < 1:
    print(f"mmjax recipe: --jobs={args.jobs}; expected a positive number of stages", file=sys.stderr)
    return 2
  try:
    recipe = stages(args.config)
    commands = stage_commands(args.config, args.workdir_root, overrides)
  except ValueError as e:
    print(f"mmjax recipe: {e}", file=sys.stderr)
    return 2
  _build_missing_data(commands[0])
  rc = run_stages(recipe, commands, args.jobs)
  if rc or args.no_eval:
    return rc
  last = commands[-1][1][len("--workdir="):]
  print(f"mmjax recipe: mmjax eval --workdir {last}", flush=True)
  return cli.eval_main([f"--workdir={last}"])
