"""`mmjax data build | show | import`: the embedded dataset, a look at it, your own data."""

from __future__ import annotations

import argparse
import os
import time

from mmjax.data import builders


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mmjax data", description=__doc__)
  sub = parser.add_subparsers(dest="verb", required=True)
  data_dir_help = f"data directory (default: $MMJAX_DATA_DIR or ~/.cache/mmjax/data)"

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

  imp = sub.add_parser("import", help="turn image files + JSONL records into a dataset")
  imp.add_argument("--data-dir", default=None, help=data_dir_help)
  imp.add_argument("--name", required=True, help="dataset name to use in mixtures")
  imp.add_argument("--jsonl", action="append", required=True,
                   help="SPLIT=PATH (repeatable), or PATH for the train split")
  imp.add_argument("--images", required=True, help="folder the image paths are relative to")
  imp.add_argument("--retrain-tokenizer", action="store_true")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.verb == "build":
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
  if args.verb == "show":
    width, height = __import__("mmjax.data.show", fromlist=["render_grid"]).render_grid(
        args.data_dir, args.split, args.out, rows=args.rows,
        names=tuple(args.dataset) if args.dataset else None)
    print(f"wrote {os.path.abspath(args.out)} ({width}x{height})")
    return 0
  jsonl = {}
  for item in args.jsonl:
    split, _, path = item.rpartition("=")
    jsonl[split or "train"] = path
  path = builders.import_jsonl(args.data_dir, args.name, jsonl, args.images,
                               retrain_tokenizer=args.retrain_tokenizer)
  print(f"imported {args.name} ({', '.join(jsonl)}): {path}")
  return 0
