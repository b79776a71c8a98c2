"""`python -m mmjax ...`: the `mmjax` command, for environments without the console script."""

import sys

from mmjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
