"""`python -m tests.train.toy_run --workdir DIR [--config.x=v ...]`: trains the toy task in a subprocess.

Used by the resume and preemption tests; prints `SUMMARY start_step step preempted` at the end.
"""

import sys

from mmjax.train import loop
from tests.train import toy


def main(argv):
  workdir = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")][0]
  config = toy.config(*[a for a in argv if a.startswith("--config.")])
  summary = loop.train(config, workdir, toy.task(config))
  print("SUMMARY", summary["start_step"], summary["step"], summary["preempted"], flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
