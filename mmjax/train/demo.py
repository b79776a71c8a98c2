"""`mmjax demo`: build the embedded dataset, train flamingo/tiny with and without images,
and print what it learned (QA accuracy both ways, CIDEr, a few generated answers).

The run with blanked images (`--config.data.blank_images=True`) is the control: the
answers of the embedded dataset's questions are balanced (every answer of a question about
equally frequent), so they can only be answered above chance by looking, and the accuracy
with images should be at least twice the accuracy without. Both runs resume if their work
directories hold checkpoints, so a second `make demo` only evaluates.
"""

from __future__ import annotations

import json
import logging
import os
import time

from mmjax.train import config as config_lib


def run(workdir: str, *, config_path: str, data_dir: str | None, overrides: list[str], with_blank: bool,
        data_size: int | None = None, data_image_size: int | None = None) -> int:
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  from mmjax import data as data_lib
  from mmjax.data import scenes
  from mmjax.train import evaluate
  from mmjax.train import loop
  from mmjax.train import plot
  from mmjax import families

  import jax
  # The blanked run compiles exactly the programs of the first one: keep them on disk.
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(workdir, "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  t0 = time.time()
  data_dir = os.path.abspath(data_dir or data_lib.default_data_dir())
  print(f"[demo] dataset: {data_dir}", flush=True)
  sizes = {k: v for k, v in (("size", data_size), ("image_size", data_image_size)) if v is not None}
  built = data_lib.build_embedded(data_dir, log=lambda m: print(f"[demo]   {m}", flush=True), **sizes)
  print(f"[demo] dataset {'reused' if built.reused else 'built'} ({time.time() - t0:.0f}s)", flush=True)
  runs = [("images", [])] + ([("blank", ["--config.data.blank_images=True"])] if with_blank else [])
  results = {}
  for name, extra in runs:
    config = config_lib.load_config(config_path, [f"--config.data.dir={data_dir}", *overrides, *extra])
    wd = os.path.join(workdir, name)
    t = time.time()
    print(f"[demo] training {config_path} ({name}) for {config.train.num_steps} steps into {wd}", flush=True)
    task = families.of_config(config).task(config, None)
    summary = loop.train(config, wd, task)
    train_s = time.time() - t
    params = summary["state"].params
    res = evaluate.evaluate(wd, loaded=(config, task, summary["step"], params), with_cider=(name == "images"))
    res["train_seconds"] = train_s
    results[name] = res
    print(f"[demo] {name}: trained in {train_s:.0f}s; val loss {res['val_loss']:.3f}; "
          f"QA accuracy {res['qa_zero_shot']:.1%} zero-shot", flush=True)
  plot.plot(os.path.join(workdir, "images"), os.path.join(workdir, "curves.png"))
  main = results["images"]
  k = int(config.eval.few_shot_k)
  print(f"\n=== what {config_path} learned (validation split of the embedded dataset) ===")
  print(f"QA exact match, with images:      {main['qa_zero_shot']:.1%} zero-shot"
        + (f", {main[f'qa_{k}_shot']:.1%} {k}-shot" if f"qa_{k}_shot" in main else ""))
  if "blank" in results:
    blank = results["blank"]["qa_zero_shot"]
    ratio = main["qa_zero_shot"] / blank if blank > 0 else float("inf")
    print(f"QA exact match, images blanked:   {blank:.1%} zero-shot  (with images: {ratio:.1f}x)")
  print(f"caption CIDEr-D, with images:     {main['cider']:.3f}")
  print("\nby kind of question (zero-shot; chance: one answer of the kind's, every answer of a "
        "question equally frequent):")
  blank_by_kind = results["blank"]["qa_zero_shot_by_kind"] if "blank" in results else {}
  for kind, acc in main["qa_zero_shot_by_kind"].items():
    answers = scenes.ANSWERS.get(kind)
    chance = f"chance {1 / len(answers):.0%}" if answers else ""
    blank_text = f"   blanked {blank_by_kind[kind]:6.1%}" if kind in blank_by_kind else ""
    print(f"  {kind:<12} with images {acc:6.1%}{blank_text}   {chance}")
  print("\nsome answers (with images):")
  for row in main["examples"][:6]:
    mark = "ok " if row["correct"] else "no "
    print(f"  {mark} Q: {row['question']:<48} A: {row['prediction']:<8} (truth: {row['answer']})")
  total = time.time() - t0
  print(f"\n[demo] done in {total:.0f}s; curves: {os.path.join(workdir, 'curves.png')}")
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump({"seconds": total, "results": results}, f, indent=2)
  return 0
