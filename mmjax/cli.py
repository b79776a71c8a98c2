"""The `mmjax` command: `mmjax train | eval | recipe | generate | plot | data | bench | compile | launch | demo`.

Each verb lives beside the code it drives and exposes ``main(argv) -> int``; this file
only routes to it, importing the verb's module when it is used so that `mmjax --help`
stays fast. Expected failures (`mmjax.errors.expected_error`) print one line `mmjax VERB: message`
and exit 2 (1 for a stopped training); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from mmjax import errors


def _data(argv):
  from mmjax.data import cli
  return cli.main(argv)


def _train(argv):
  # Join a multi-process job (`mmjax launch local|tpu`) before anything touches a device;
  # a no-op for a single process.
  from mmjax.scale import distributed
  distributed.maybe_initialize()
  from mmjax.train import cli
  return cli.train_main(argv)


def _eval(argv):
  from mmjax.train import cli
  return cli.eval_main(argv)


def _recipe(argv):
  from mmjax.scale import distributed
  distributed.maybe_initialize()
  from mmjax.train import recipe
  return recipe.main(argv)


def _generate(argv):
  from mmjax.train import cli
  return cli.generate_main(argv)


def _plot(argv):
  from mmjax.train import cli
  return cli.plot_main(argv)


def _demo(argv):
  from mmjax.train import cli
  return cli.demo_main(argv)


def _bench(argv):
  from mmjax import bench
  return bench.main(argv)


def _compile(argv):
  from mmjax.scale import compile_cli
  return compile_cli.main(argv)


def _launch(argv):
  from mmjax.scale import launch_cli
  return launch_cli.main(argv)


COMMANDS = {
    "train": (_train, "train a model from a config into a work directory (resumes if one is there)"),
    "eval": (_eval, "validation loss and question-answering accuracy of a work directory"),
    "recipe": (_recipe, "train a multi-run recipe's runs in order (mmjax recipe CONFIG: the runs its init.from_configs names, then itself), then eval"),
    "generate": (_generate, "answer a prompt with images from a trained work directory"),
    "plot": (_plot, "draw loss curves and gate values of a work directory"),
    "demo": (_demo, "build the data, train the demo model, and show what it learned"),
    "data": (_data, "build or show the embedded dataset; import your own data"),
    "bench": (_bench, "benchmarks (attention kernels, train step)"),
    "compile": (_compile, "compile the train step ahead of time for a TPU topology"),
    "launch": (_launch, "start training on several local processes or a Cloud TPU"),
}


def _usage() -> str:
  lines = ["usage: mmjax <command> [options]", "", "commands:"]
  lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"mmjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  try:
    return COMMANDS[name][0](rest) or 0
  except KeyboardInterrupt:
    print(f"mmjax {name}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 -- sorted below: expected ones are one line
    if not errors.expected_error(e):
      raise
    print(f"mmjax {name}: {errors.describe_error(e)}", file=sys.stderr)
    return 1 if type(e).__name__ == "TrainingDiverged" else 2


if __name__ == "__main__":
  sys.exit(main())
