"""`MmjaxError`: an expected failure whose message says everything a user needs.

The `mmjax` command prints such an error as one line and exits non-zero, with no
traceback; so it does for `ValueError`s raised by mmjax's own checks of its input and for
`OSError`s (a missing file, a read-only or full disk). Anything else is a bug and keeps
its traceback. A leaf module: every package may import it.
"""

import os
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class MmjaxError(Exception):
  """An expected failure (a locked work directory, a changed config, a full disk...)."""


def expected_error(e: BaseException) -> bool:
  """Whether `e` is a failure to report in one line (see the module docstring)."""
  if isinstance(e, (MmjaxError, OSError)):
    return True
  if isinstance(e, ValueError) and e.__traceback__ is not None:
    raised_in = traceback.extract_tb(e.__traceback__)[-1].filename
    return os.path.abspath(raised_in).startswith(_PACKAGE_DIR + os.sep)
  return False


def describe_error(e: BaseException) -> str:
  """The message of an expected error, without Python's decorations (`[Errno 2]`, reprs)."""
  if isinstance(e, OSError) and e.strerror and not isinstance(e, MmjaxError):
    where = f": {e.filename}" if e.filename and str(e.filename) not in e.strerror else ""
    return f"{e.strerror}{where}"
  return str(e) or type(e).__name__
