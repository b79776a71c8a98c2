"""`python -m tests.train.toy_run --workdir DIR [--config.x=v ...]`: trains the toy task in a subprocess.

Used by the resume, preemption and locking tests; prints `SUMMARY start_step step preempted`
at the end, or one line and exit status 2 for an expected error (a locked work directory).
`--stall-data-at=N` makes the data hang at batch N.
"""

import sys

from mmjax import errors
from mmjax.train import loop
from tests.train import toy


def main(argv):
  workdir = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")][0]
  config = toy.config(*[a for a in argv if a.startswith("--config.")])
  stall = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--stall-data-at=")]
  try:
    summary = loop.train(config, workdir, toy.task(config, stall_at=stall[0] if stall else None))
  except errors.MmjaxError as e:
    print(f"toy_run: {e}", file=sys.stderr, flush=True)
    return 2
  print("SUMMARY", summary["start_step"], summary["step"], summary["preempted"], flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
