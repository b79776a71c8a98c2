"""The spec string of a task, as the command line takes it: `KIND:KEY=VALUE,KEY=VALUE,...`.

The keys are the fields of the kind's class. A value runs to the next comma followed by a
name and `=`, so it may hold other commas, spaces, `:` and any unicode.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

# A comma that starts the next option: one followed by a name and "=".
_OPTION_BOUNDARY = re.compile(r",(?=\s*[A-Za-z_]\w*=)")
SYNTAX = "KIND:KEY=VALUE,KEY=VALUE,..."


def split_spec(spec: str, kinds: Sequence[str]) -> tuple[str, dict[str, str]]:
  """(kind, {key: value}) of a spec; ValueError naming the spec and the piece that is not
  KEY=VALUE, an empty value or a key given twice. `kinds` are named where the kind is missing."""
  kind, colon, body = spec.partition(":")
  if not colon:
    raise ValueError(f"task spec {spec!r} has no ':'; expected {SYNTAX} with KIND one of {list(kinds)}")
  options = {}
  for piece in _OPTION_BOUNDARY.split(body) if body.strip() else []:
    key, equals, value = piece.partition("=")
    key = key.strip()
    if not equals or not key.isidentifier():
      raise ValueError(f"{piece!r} in task spec {spec!r} is not KEY=VALUE; expected {SYNTAX}")
    if not value:
      raise ValueError(f"{key}= is empty in task spec {spec!r}")
    if key in options:
      raise ValueError(f"{key}= is given twice in task spec {spec!r}")
    options[key] = value
  return kind.strip(), options


def with_options(task_class: type, options: dict[str, str], spec: str):
  """`task_class(**options)`, after checking that every key is a field and no required field
  is missing (ValueError naming the keys expected)."""
  fields = dataclasses.fields(task_class)
  accepted = [f.name + "=" for f in fields]
  required = [f.name + "=" for f in fields if f.default is dataclasses.MISSING]
  unknown = [key + "=" for key in options if key + "=" not in accepted]
  if unknown:
    raise ValueError(f"task kind {task_class.kind!r} takes no {', '.join(unknown)} (task spec {spec!r}); "
                     f"expected {', '.join(accepted)}")
  missing = [key for key in required if key[:-1] not in options]
  if missing:
    raise ValueError(f"task spec {spec!r} lacks {', '.join(missing)}; task kind {task_class.kind!r} needs "
                     f"{', '.join(required)}")
  return task_class(**options)


def task_spec(task) -> str:
  """The spec string of `task`, which `parse_task_spec` reads back to an equal task."""
  parts = []
  for f in dataclasses.fields(task):
    value = getattr(task, f.name)
    if value is None:
      continue
    if not value or _OPTION_BOUNDARY.search(value):
      raise ValueError(f"{f.name}={value!r} cannot be written in a task spec (an empty value, or a comma followed "
                       "by a name and '=', which would start another option)")
    parts.append(f"{f.name}={value}")
  return f"{task.kind}:{','.join(parts)}"
