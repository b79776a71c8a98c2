"""Reading a benchmark's own files: JSON whose errors name the file, the record and the key
expected, and the image folder, checked whole before anything is evaluated.

Everything here reads; nothing writes. Paths may hold spaces and any unicode (they are
`str` throughout and never split or quoted).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence

# How many missing images, unknown ids or stray files an error lists before "...".
SHOWN = 5


def resolve(path: str) -> str:
  """`path` with `~` expanded, made absolute."""
  return os.path.abspath(os.path.expanduser(path))


def first_few(values: Sequence) -> str:
  """The first `SHOWN` values as reprs, then "..." when there are more."""
  shown = ", ".join(repr(v) for v in values[:SHOWN])
  return shown + (", ..." if len(values) > SHOWN else "")


def json_type(value) -> str:
  """The JSON name of a parsed value's type ("object", "array", ...)."""
  if isinstance(value, bool):
    return "boolean"
  for types, name in ((dict, "object"), (list, "array"), (str, "string"), ((int, float), "number")):
    if isinstance(value, types):
      return name
  return "null"


def existing_folder(path: str, role: str) -> str:
  """The absolute path of a folder that exists; ValueError naming `role` and the path otherwise."""
  folder = resolve(path)
  if not os.path.isdir(folder):
    raise ValueError(f"{role} folder {path!r} is not a directory")
  return folder


def read_json(path: str, role: str):
  """The parsed JSON of a file (UTF-8, a byte-order mark allowed); a missing file, bytes that
  are not UTF-8 and malformed JSON raise ValueError naming `role` and the path."""
  if not os.path.isfile(path):
    raise ValueError(f"{role} file {path!r} does not exist (or is not a file)")
  with open(path, "rb") as f:
    raw = f.read()
  body = raw.removeprefix(codecs.BOM_UTF8)
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    byte = len(raw) - len(body) + e.start + 1
    raise ValueError(f"{role} file {path!r} is not UTF-8 text ({e.reason} at byte {byte})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{role} file {path!r} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def top_level_list(document, key: str, path: str, role: str, form: str) -> list:
  """`document[key]`, a list; otherwise ValueError naming the file, the key and `form` (the
  published shape of the file, as a short JSON sketch)."""
  if not isinstance(document, dict):
    raise ValueError(f"{role} file {path!r} holds a JSON {json_type(document)} at top level; expected an "
                     f"object with the key {key!r}: {form}")
  if key not in document:
    raise ValueError(f"{role} file {path!r} has the top-level keys {sorted(document)}; expected the key "
                     f"{key!r}: {form}")
  if not isinstance(document[key], list):
    raise ValueError(f"{role} file {path!r}: {key!r} is a JSON {json_type(document[key])}; expected an array: "
                     f"{form}")
  return document[key]


_EXPECTED = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def field(record, key: str, where: str, *types: type):
  """`record[key]`, of one of `types` (a JSON boolean is never an integer); ValueError naming
  `where` (e.g. "FILE: questions[3]") and the key otherwise."""
  if not isinstance(record, dict):
    raise ValueError(f"{where} is a JSON {json_type(record)}; expected an object with {key!r}")
  if key not in record:
    raise ValueError(f"{where} has no {key!r} (its keys: {sorted(record)})")
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, types):
    expected = " or ".join(_EXPECTED[t] for t in types)
    shown = json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{where}: {key!r} is {shown[:60]}; expected {expected}")
  return value


def image_file(folder: str, pattern: str, image_id) -> str:
  """`folder` joined with `pattern.format(image_id=image_id)`; a pattern naming any other field,
  or a format the id does not take (`{image_id:012d}` of a string id), raises ValueError."""
  try:
    name = pattern.format(image_id=image_id)
  except (KeyError, IndexError):
    raise ValueError(f"image_pattern={pattern!r} may name only {{image_id}}") from None
  except ValueError as e:
    raise ValueError(f"image_pattern={pattern!r} cannot format image id {image_id!r} ({e})") from None
  return os.path.join(folder, name)


def check_images(paths: Iterable[str], folder: str, named_by: str) -> None:
  """Raises ValueError when any of `paths` (files under `folder`) is not a file, naming the
  first few (relative to the folder), how many are missing and the file that names them."""
  unique = list(dict.fromkeys(paths))
  missing = [p for p in unique if not os.path.isfile(p)]
  if missing:
    names = [os.path.relpath(p, folder) for p in missing]
    raise ValueError(f"{len(missing)} of the {len(unique)} images named by {named_by} are missing from {folder!r}: "
                     f"{first_few(names)}")


def check_same_ids(named: Iterable, expected: Iterable, named_where: str, expected_where: str, what: str) -> None:
  """Raises ValueError when the ids of two files differ, naming the first few on each side."""
  named, expected = list(named), list(expected)
  for ids, other, here, there in ((named, set(expected), named_where, expected_where),
                                  (expected, set(named), expected_where, named_where)):
    unknown = [i for i in ids if i not in other]
    if unknown:
      raise ValueError(f"{len(unknown)} {what} of {here} are not in {there}: {first_few(unknown)}; the two files "
                       "must hold the same ones (are they of the same split?)")
