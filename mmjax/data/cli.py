"""`mmjax data build | show | import`: the embedded dataset, a look at it, your own data.

A bad input (a ValueError or OSError: a missing file, a bad JSONL line, a dataset that
already exists) is one line on stderr, `mmjax data <verb>: <what is wrong>`, and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from mmjax.data import builders
from mmjax.data.preprocess import BAD_DATA_POLICIES


_IMPORT_DESCRIPTION = """\
Each line of a JSONL file is one record, plain or LLaVA's form, with an optional "id":
  {"images": ["cat.jpg"], "text": "<image>A cat.<|endofchunk|>"}
  {"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"},
                                         {"from": "gpt", "value": "A cat."}]}
Every file is read before anything is written. At the end the records imported per
split, those skipped by reason (with the first FILE:LINE of each) and the images missing
are printed."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mmjax data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="verb", required=True)
  data_dir_help = "data directory (default: $MMJAX_DATA_DIR or ~/.cache/mmjax/data)"

  build = sub.add_parser("build", help="build (or reuse) the embedded dataset and its tokenizer")
  build.add_argument("--data-dir", default=None, help=data_dir_help)
  build.add_argument("--size", type=int, default=builders.DEFAULT_SIZE,
                     help="training records per kind (captions, qa; half as many documents)")
  build.add_argument("--image-size", type=int, default=builders.DEFAULT_IMAGE_SIZE,
                     help="stored image resolution in pixels")
  build.add_argument("--seed", type=int, default=0)
  build.add_argument("--vocab-size", type=int, default=builders.DEFAULT_VOCAB_SIZE)

  show = sub.add_parser("show", help="render a grid of examples with their text to a PNG")
  show.add_argument("--data-dir", default=None, help=data_dir_help)
  show.add_argument("--split", default="train")
  show.add_argument("--out", default="grid.png")
  show.add_argument("--rows", type=int, default=8)
  show.add_argument("--dataset", action="append", default=None,
                    help="dataset name (repeatable; default: all in the data dir)")

  imp = sub.add_parser("import", help="turn image files + JSONL records into a dataset",
                       description=_IMPORT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  imp.add_argument("--data-dir", default=None, help=data_dir_help)
  imp.add_argument("--name", required=True, help="dataset name to use in mixtures")
  imp.add_argument("--jsonl", action="append", required=True,
                   help="SPLIT=PATH (repeatable, one file per split), or PATH for the train split")
  imp.add_argument("--images", required=True,
                   help="folder the image paths are relative to; a path resolving outside it "
                        "(../, absolute, a symlink out) is a bad record")
  imp.add_argument("--bad-data", choices=BAD_DATA_POLICIES, default="skip",
                   help="a bad record (not UTF-8, not JSON, a wrong or missing field, a duplicate "
                        "id, an image outside --images): skip and count it (default, as the "
                        "pipeline's), or raise, stopping the import at its FILE:LINE before "
                        "anything is written. A missing image file stops a raise import; "
                        "skip keeps its record (with an empty image, for the pipeline's "
                        "bad-data policy to drop) and counts it under images missing")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace a dataset of the same name (refused without it); the old one "
                        "is removed only once the new one is complete")
  imp.add_argument("--retrain-tokenizer", action="store_true",
                   help="train a tokenizer on the imported training text into a new file and "
                        "switch the data directory to it (the old file is left as it is)")
  return parser


def _jsonl_by_split(items: list[str]) -> dict[str, str]:
  """`--jsonl` values -> {split: path}: `SPLIT=PATH`, or a bare PATH for train."""
  jsonl = {}
  for item in items:
    split, equals, path = item.partition("=")
    if not (equals and re.fullmatch(r"\w+", split)):
      split, path = "train", item
    if split in jsonl:
      raise ValueError(f"--jsonl names split {split!r} twice: {jsonl[split]} and {path}")
    jsonl[split] = path
  return jsonl


def _build(args) -> int:
  start = time.time()
  result = builders.build_embedded(args.data_dir, size=args.size, image_size=args.image_size,
                                   seed=args.seed, vocab_size=args.vocab_size,
                                   log=lambda m: print(m, flush=True))
  what = "reused" if result.reused else f"built in {time.time() - start:.1f}s"
  print(f"embedded dataset {what}: {result.data_dir}")
  for name, path in result.datasets.items():
    print(f"  {name:<12} {path}")
  print(f"  tokenizer    {result.tokenizer}")
  return 0


def _show(args) -> int:
  from mmjax.data import show  # imported here: only this verb draws
  width, height = show.render_grid(args.data_dir, args.split, args.out, rows=args.rows,
                                   names=tuple(args.dataset) if args.dataset else None)
  print(f"wrote {os.path.abspath(args.out)} ({width}x{height})")
  return 0


def _records(count: int) -> str:
  return f"{count} record" + ("" if count == 1 else "s")


def _import(args) -> int:
  result = builders.import_jsonl(args.data_dir, args.name, _jsonl_by_split(args.jsonl),
                                 args.images, retrain_tokenizer=args.retrain_tokenizer,
                                 bad_data=args.bad_data, overwrite=args.overwrite)
  print(f"imported {args.name}: {result.path}")
  for split, count in result.records.items():
    print(f"  {split}: {_records(count)}")
  print(f"  skipped: {_records(sum(result.skipped.values()))}")
  for reason, count in result.skipped.items():
    print(f"    {reason}: {count} (first at {result.first_skipped[reason]})")
  print(f"  images missing: {result.images_missing}" + (
      " (their records are kept with an empty image: the pipeline's bad-data policy skips "
      "or raises on them)" if result.images_missing else ""))
  print(f"  tokenizer: {result.tokenizer}"
        + (" (trained on this import)" if result.tokenizer_trained else " (kept)"))
  if result.replaced:
    print(f"  replaced {result.replaced} (removed)")
  return 0


def _one_line(error: Exception) -> str:
  """The message of an expected error on one line; an OSError without its `[Errno N]`."""
  if isinstance(error, OSError) and error.strerror:
    message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
  else:
    message = str(error)
  return message.replace("\n", " ")


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  verb = {"build": _build, "show": _show, "import": _import}[args.verb]
  try:
    return verb(args)
  except (ValueError, OSError) as error:
    print(f"mmjax data {args.verb}: {_one_line(error)}", file=sys.stderr)
    return 2
