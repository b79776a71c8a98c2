"""`mmjax eval --task SPEC --shots 0,4,8 [--rices]`: a benchmark task asked of any family
that can answer it, scored by the benchmark's metric (`mmjax.evaluation.benchmark`): vqa and
captioning, zero- and few-shot, by a model that reads images and generates text; retrieval
and zero-shot classification by one that embeds images and texts in one space
(`Task.embed_images`, `Task.embed_texts`: the contrastive family).

For each task and shot count k: each query's prompt is k solved examples from the task's
support set, then the query, written by the kind's prompt template
(`mmjax.evaluation.prompts`; the config's `eval.prompts` replaces the defaults). The k
examples are drawn at random (`--seeds N` runs, seeds 0..N-1, averaged, the spread
reported) or chosen by RICES (`--rices`: the support images nearest the query's by the
embedding of `--rices-tower WORKDIR`, a contrastive run's tower, or this run's own; the most
similar last; embeddings cached under WORKDIR/eval/rices-cache). The answers are generated
greedily or by beam search (`--num-beams`), in batches split over the mesh's batch axes
(the run's `config.mesh`, on `--num-devices` devices), and scored.

Results: `WORKDIR/eval/<task>-<k>shot[-rices|-random].json` holding the config, the
checkpoint step, the metric's options, the decoding, the prompt template, and per seed the
chosen example ids and every query's generated text and score; a markdown table is printed.
The work directory is read only (checkpoints read-only); the one thing written is each
results file, whole (a temporary file renamed over it), and the RICES cache; whether they
can be written is checked before any time is spent.

A family that cannot answer a task is refused before the model is loaded, naming the family
and the task: vqa or captioning of a model that does not generate text about images,
retrieval or classification of one that does not embed, or few-shot prompts the family's
renderer refuses (a prompt that takes one image).

Dimension letters: B batch, N images per prompt, S image side, T prompt length.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import families
from mmjax import filelock
from mmjax import infer
from mmjax import sharding as sh
from mmjax.data import END_OF_CHUNK_TOKEN
from mmjax.data.preprocess import load_image_file
from mmjax.evaluation import benchmark
from mmjax.evaluation import prompts as prompts_lib
from mmjax.evaluation import rices
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import workdir as workdir_lib

RESULTS_DIR = "eval"
RICES_CACHE = "rices-cache"
SELECTIONS = ("random", "rices")
ZERO_SHOT = "zero-shot"
# Zero-shot with solved examples' text before the query, their images left out (OpenFlamingo's
# zero-shot protocol: two such examples, drawn at random).
TEXT_ONLY = "text-only"
# Tokens generated per answer when neither the flag nor the config says: OpenFlamingo's VQA
# length, and room for the longest embedded caption (22 tokens).
DEFAULT_MAX_NEW_TOKENS = {"vqa": 5, "captioning": 24}


@dataclasses.dataclass(frozen=True)
class Options:
  """How `run` evaluates (the `mmjax eval` flags)."""
  shots: tuple[int, ...] = (0,)
  # "random" or "rices": how the k in-context examples are chosen
  selection: str = "random"
  # random selection: runs with seeds 0..seeds-1, averaged
  seeds: int = 1
  # RICES: the work directory whose image tower embeds (None: the evaluated run's own tower)
  rices_tower: str | None = None
  # RICES: where support embeddings are cached (None: WORKDIR/eval/rices-cache)
  rices_cache: str | None = None
  # 1: greedy; more: beam search with this many beams and length penalty
  num_beams: int = 1
  length_penalty: float = 0.0
  # the VQA answer post-processing (mmjax.evaluation.vqa.POSTPROCESS_OPTIONS)
  postprocess: str = benchmark.DEFAULT_POSTPROCESS
  # queries per task (0: all)
  limit: int = 0
  # prompts per generation batch (rounded up to a multiple of the batch's device split)
  batch_size: int = 32
  # devices of the mesh (0: the config's `mesh.num_devices`, 0 there meaning every device)
  num_devices: int = 0
  # tokens per answer (0: eval.max_new_tokens for vqa, else DEFAULT_MAX_NEW_TOKENS)
  max_new_tokens: int = 0
  # (kind, template) pairs replacing the config's `eval.prompts` and the defaults
  prompts: tuple[tuple[str, str], ...] = ()
  # zero-shot: this many random support examples' text (no image) before each query
  # (OpenFlamingo's zero-shot protocol uses 2); 0: none
  text_only_examples: int = 0

  def __post_init__(self):
    if not self.shots or any(k < 0 for k in self.shots):
      raise ValueError(f"shots={list(self.shots)}; expected one or more counts >= 0")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection={self.selection!r}; expected one of {SELECTIONS}")
    if self.text_only_examples < 0:
      raise ValueError(f"text_only_examples={self.text_only_examples}; expected >= 0")
    if self.seeds < 1 or self.num_beams < 1 or self.batch_size < 1 or self.limit < 0 or self.num_devices < 0:
      raise ValueError(f"seeds={self.seeds}, num_beams={self.num_beams}, batch_size={self.batch_size}, "
                       f"limit={self.limit}, num_devices={self.num_devices}; expected seeds, num_beams and "
                       "batch_size >= 1, limit and num_devices >= 0")
    if self.rices_tower is not None and self.selection != "rices":
      raise ValueError("a RICES tower was named but the selection is random; add --rices")


def results_name(task_name: str, shots: int, selection: str) -> str:
  """`<task>-<shots>shot[-rices|-random|-text-only].json` (plain zero-shot has no suffix)."""
  return f"{task_name}-{shots}shot" + (f"-{selection}" if selection != ZERO_SHOT else "") + ".json"


# ------------------------------------------------------------------------------ generation

def _batch_split(mesh, rules) -> int:
  """How many ways a batch's leading axis is split (the product of its mesh axes)."""
  spec = sh.batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _place_params(task: families.Task, params, mesh, rules):
  """The parameters on the mesh: split as the config's rules split them, or replicated for a
  family without logical axes."""
  replicated = NamedSharding(mesh, PartitionSpec())
  if task.boxed_params is None:
    return jax.device_put(params, replicated)
  shardings = sh.param_shardings(task.boxed_params(jax.random.key(0)), mesh, rules)
  by_path = {sh.key_names(path): s for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.device_put(x, by_path.get(sh.key_names(path), replicated)), params)


def image_size(config: ml_collections.ConfigDict, task: families.Task) -> int | None:
  """The side images are loaded at: the data's, or their own when the family renders prompts."""
  return None if task.render_prompt is not None else int(config.data.image_size)


@dataclasses.dataclass
class Request:
  """One prompt: its text (`<image>` where each image goes) and its images, in order."""
  text: str
  images: list[np.ndarray]


# (id of a Decoding, beam search or not) -> (that Decoding, its Generator or BeamSearch): one
# set of compilations per model across evaluations in one process (a family memoises its
# Decoding per model config), as `mmjax.infer.generate` keeps one Generator.
_DECODERS: dict[tuple[int, bool], tuple[Any, Any]] = {}


def _decoder(decoding, *, beam: bool):
  key = (id(decoding), beam)
  if key not in _DECODERS or _DECODERS[key][0] is not decoding:
    if beam:
      from mmjax.infer import beam as beam_lib  # pylint: disable=g-import-not-at-top
      _DECODERS[key] = (decoding, beam_lib.BeamSearch(decoding))
    else:
      _DECODERS[key] = (decoding, infer.Generator(decoding))
  return _DECODERS[key][1]


def render(task: families.Task, request: Request) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
  """({name: array without the batch axis}, prompt ids Int[T], the id that ends an answer):
  by the family's renderer, or tokenized as training text starts (BOS first) with the images
  stacked [N, S, S, 3]; ValueError when the family refuses the prompt."""
  if task.render_prompt is not None:
    inputs, ids, stop = task.render_prompt(request.text, request.images)
    return {k: np.asarray(v)[0] for k, v in inputs.items()}, np.asarray(ids, np.int32), int(stop)
  n = request.text.count(prompts_lib.IMAGE_TOKEN)
  if n != len(request.images) or not n:
    raise ValueError(f"the prompt has {n} <image> placeholders but {len(request.images)} images were given; "
                     "expected one image (at least) per <image>")
  tok = task.tokenizer
  return ({"images": np.stack(request.images).astype(np.uint8)}, np.asarray(tok.encode_prompt(request.text), np.int32),
          int(tok.end_of_chunk_id))


def pad_with_last(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`array` grown to `shape` by repeating its last entry along each axis that is shorter: a
  family's per-position input (LLaVA's `feature_index`) stays a text position after the
  prompt, an extra image slot, which no token reads, repeats the last image; no family's
  padding value is assumed (a 0 there would name image 0)."""
  return np.pad(array, [(0, s - d) for d, s in zip(array.shape, shape)], mode="edge")


class Answerer:
  """Generates the continuation of prompts with images for any family whose Task has a
  `decoding` and reads images: rendered by the family (`Task.render_prompt`) or, without a
  renderer, tokenized as training text starts (BOS first) with the images stacked; batched,
  each batch split over the mesh's batch axes; greedy or beam search."""

  def __init__(self, config: ml_collections.ConfigDict, task: families.Task, params, *, num_devices: int = 0,
               batch_size: int = 32, num_beams: int = 1, length_penalty: float = 0.0):
    self.config, self.task = config, task
    mesh_config = ml_collections.ConfigDict(config.to_dict())
    if num_devices:
      mesh_config.mesh.num_devices = num_devices
    self.mesh, self.rules, _ = loop.mesh_from_config(mesh_config)
    self.split = _batch_split(self.mesh, self.rules)
    self.batch_size = -(-batch_size // self.split) * self.split
    self.params = {"params": _place_params(task, params, self.mesh, self.rules)}
    self.num_beams, self.length_penalty = num_beams, length_penalty
    self._decoder = _decoder(task.decoding, beam=num_beams > 1)

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def answer(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
    """The decoded continuation of each request, cut at the end-of-chunk token."""
    rendered = [render(self.task, r) for r in requests]
    if not rendered:
      return []
    tok = self.task.tokenizer
    longest = max(len(ids) for _, ids, _ in rendered)
    shapes = {k: tuple(np.max([r[0][k].shape for r in rendered], axis=0)) for k in rendered[0][0]}
    dtypes = {k: rendered[0][0][k].dtype for k in rendered[0][0]}
    stops = {stop for _, _, stop in rendered}
    if len(stops) != 1:
      raise ValueError(f"the rendered prompts end their answers with different ids {sorted(stops)}; expected one")
    stop = stops.pop()
    # One batch shape for every batch: the batch size, or all requests rounded up to the split.
    b = min(self.batch_size, -(-len(rendered) // self.split) * self.split)
    batch_sharding = sh.batch_sharding(self.mesh, self.rules)
    out = []
    for start in range(0, len(rendered), b):
      chunk = rendered[start:start + b]
      rows = [chunk[min(i, len(chunk) - 1)] for i in range(b)]  # the last repeated to fill the batch
      ids = np.full((b, longest), tok.pad_id, np.int32)
      lengths = np.zeros((b,), np.int32)
      inputs = {k: np.zeros((b, *shapes[k]), dtypes[k]) for k in shapes}
      for i, (row_inputs, row_ids, _) in enumerate(rows):
        ids[i, :len(row_ids)] = row_ids
        lengths[i] = len(row_ids)
        for k, v in row_inputs.items():
          inputs[k][i] = pad_with_last(v, shapes[k])
      if bool(self.config.data.get("blank_images", False)) and "images" in inputs:
        inputs["images"] = np.zeros_like(inputs["images"])
      inputs = {k: jax.device_put(v, batch_sharding) for k, v in inputs.items()}
      if self.num_beams > 1:
        result = self._decoder.search(self.params, inputs, ids, max_new_tokens, num_beams=self.num_beams,
                                      length_penalty=self.length_penalty, prompt_lengths=lengths,
                                      eos_token_id=stop, pad_id=tok.pad_id)
      else:
        result = self._decoder.generate(self.params, inputs, ids, max_new_tokens, prompt_lengths=lengths,
                                        eos_token_id=stop, pad_id=tok.pad_id)
      tokens, counts = np.asarray(result.tokens), np.asarray(result.lengths)
      for i in range(len(chunk)):
        text = tok.decode([int(t) for t in tokens[i, :counts[i]]])
        out.append(text.split(END_OF_CHUNK_TOKEN)[0].strip())
    return out


# ------------------------------------------------------------------------------ checks

def check_answerable(family: str, task: families.Task, eval_task: benchmark.EvalTask) -> None:
  """Raises ValueError naming the family and the task when the family's model cannot answer
  it: by generating text about images (vqa, captioning) or by embedding images and texts
  (retrieval, classification)."""
  if eval_task.kind in benchmark.EMBEDDING_KINDS:
    if task.embed_images is None or task.embed_texts is None:
      raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} ({eval_task.kind}): its model does "
                       "not embed images and texts in one space (Task.embed_images, Task.embed_texts); expected a "
                       "work directory of a family that does, such as a contrastive one")
    return
  if task.decoding is None or not (task.takes_images or task.render_prompt is not None):
    what = "does not generate text" if task.decoding is None else "does not read images"
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} ({eval_task.kind}): its model "
                     f"{what}; expected a work directory of a family whose model reads images and generates text")


def check_shots(eval_task: benchmark.EvalTask, shots: int, support_size: int) -> None:
  if shots > support_size:
    raise ValueError(f"--shots {shots} asks for {shots} in-context examples per query, but the support set of "
                     f"task {eval_task.name!r} holds {support_size}; expected at most {support_size}")


def _check_prompt(family: str, task: families.Task, eval_task: benchmark.EvalTask, shots: int,
                  request: Request, max_new_tokens: int) -> None:
  """Renders one prompt with `shots` examples (the first support examples stand in for the
  chosen ones); the family's refusal, or a prompt with its answer longer than the model
  takes, becomes an error naming the family, the task and the shots."""
  try:
    _, ids, _ = render(task, request)
  except ValueError as e:
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} with {shots} shots: it refuses a "
                     f"prompt with {len(request.images)} images ({e})") from None
  longest = int(task.decoding.max_length)
  if len(ids) + max_new_tokens > longest:
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} with {shots} shots: a prompt of "
                     f"{len(ids)} tokens (its {len(request.images)} images included) + {max_new_tokens} new tokens "
                     f"exceeds the {longest} its model takes; ask fewer shots")


# ------------------------------------------------------------------------------ one evaluation

@dataclasses.dataclass
class _Loaded:
  """The queries and support set of one task (images are read when a prompt is built)."""
  task: benchmark.EvalTask
  queries: list[benchmark.Item]
  support: list[benchmark.Item] | None


def _requests(template: prompts_lib.PromptTemplate, loaded: _Loaded, chosen: list[list[int]],
              image_of, first: int = 0, text_only: bool = False) -> list[Request]:
  """The prompts of queries first, first + 1, ...: chosen[j] holds query (first + j)'s examples
  (with `text_only`, their text without its `<image>`s, and no image of theirs)."""
  out = []
  for q, indices in enumerate(chosen, start=first):
    shots = "".join(template.example(**loaded.support[i].fields) for i in indices)
    if text_only:
      shots = shots.replace(prompts_lib.IMAGE_TOKEN, "")
    images = [] if text_only else [image_of("support", i) for i in indices]
    out.append(Request(shots + template.query(**loaded.queries[q].fields), images + [image_of("query", q)]))
  return out


def _spread(values: list[float]) -> dict[str, float]:
  a = np.asarray(values, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min()),
          "max": float(a.max())}


def _max_new_tokens(config, kind: str, options: Options) -> int:
  if options.max_new_tokens:
    return options.max_new_tokens
  if kind == "vqa" and int(config.eval.get("max_new_tokens", 0) or 0):
    return int(config.eval.max_new_tokens)
  return DEFAULT_MAX_NEW_TOKENS[kind]


def _tower(config, params, options: Options):
  """(ImageTower, its image side, what it is) for RICES."""
  where, tower_config, tower_params, step = "the evaluated run", config, params, None
  if options.rices_tower is not None:
    where = options.rices_tower
    tower_config = config_lib.read_resolved(where)
    tower_task = families.of_config(tower_config).task(tower_config, where)
    step, tower_params = loop.restore_params(tower_config, where, tower_task)
  model = families.of_config(tower_config).abstract(tower_config).config
  vision = getattr(model, "vision", None)
  if vision is None or "vision" not in tower_params:
    raise ValueError(f"RICES needs an image tower; {where} ({families.of_config(tower_config).name}) has none: name "
                     "a contrastive run with --rices-tower WORKDIR")
  tower = rices.image_tower(vision, tower_params)
  return tower, int(vision.image_size), {"workdir": where, "family": families.of_config(tower_config).name,
                                         "step": step, "identity": str(tower.identity)}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(t: benchmark.EvalTask, shots: int, selection: str, family: str, workdir: str, step: int,
            config: ml_collections.ConfigDict) -> dict:
  return {"task": t.name, "kind": t.kind, "spec": t.spec, "shots": shots, "selection": selection, "family": family,
          "workdir": os.path.abspath(workdir), "step": step, "date": _now(), "config": config.to_dict()}


def _write(out_dir: str, res: dict) -> dict:
  path = os.path.join(out_dir, results_name(res["task"], res["shots"], res["selection"]))
  filelock.atomic_write(path, json.dumps(res, indent=1, ensure_ascii=False, default=str).encode())
  return {**res, "path": path}


def _load_data(eval_tasks, task: families.Task, options: Options) -> dict[str, Any]:
  """Per task name: its `_Loaded` (a generated kind) or its loaded files (an embedding kind);
  every file and image checked, and the shots against each support set."""
  data = {}
  for t in eval_tasks:
    if t.kind in benchmark.EMBEDDING_KINDS:
      data[t.name] = t.query.load()
      continue
    queries = t.queries(task.data_dir)
    queries = queries[:options.limit] if options.limit else queries
    needs_support = max(options.shots) or (0 in options.shots and options.text_only_examples)
    support = t.support_items(task.data_dir) if needs_support else None
    for k in (*options.shots, options.text_only_examples if 0 in options.shots else 0):
      check_shots(t, k, len(support) if support is not None else 0)
    data[t.name] = _Loaded(t, queries, support)
  return data


def run(workdir: str, specs: Sequence[str], options: Options = Options(), *, printer=print) -> list[dict]:
  """Evaluates each task at each shot count (module docstring); returns the results written."""
  if not os.path.isdir(workdir):
    raise ValueError(f"work directory {workdir!r} does not exist; expected one written by `mmjax train`")
  if not specs:
    raise ValueError("no task to evaluate: give --task SPEC (e.g. --task vqa:embedded) or set config.eval.tasks")
  eval_tasks = [benchmark.parse_eval_task(s) for s in specs]
  names = [t.name for t in eval_tasks]
  if len(set(names)) != len(names):
    raise ValueError(f"tasks {names} share a name, and so their results files; give each a name=NAME")
  out_dir = os.path.join(workdir, RESULTS_DIR)
  rices_cache = os.path.join(out_dir, RICES_CACHE)
  _check_writable(out_dir)
  config = config_lib.read_resolved(workdir)
  family = families.of_config(config)
  task = family.task(config, workdir)
  for t in eval_tasks:
    check_answerable(family.name, task, t)
  overrides = {**dict(config.eval.get("prompts", None) or {}), **dict(options.prompts)}
  templates = {t.name: prompts_lib.template_for(t.kind, overrides) for t in eval_tasks
               if t.kind in benchmark.GENERATED_KINDS}
  data = _load_data(eval_tasks, task, options)
  side = image_size(config, task)
  for t in eval_tasks:  # the family's refusal of a few-shot prompt, before the model is loaded
    for k in options.shots if t.kind in benchmark.GENERATED_KINDS else ():
      if k:
        loaded = data[t.name]
        request = _requests(templates[t.name], loaded, [list(range(k))], _image_reader(loaded, side))[0]
        _check_prompt(family.name, task, t, k, request, _max_new_tokens(config, t.kind, options))
  step, params = loop.restore_params(config, workdir, task)
  results = []
  answerer, tower = None, None
  for t in eval_tasks:
    if t.kind in benchmark.EMBEDDING_KINDS:
      if any(options.shots):
        printer(f"task {t.name!r} ({t.kind}) is zero-shot only: evaluated once, without in-context examples")
      started = time.time()
      res = _header(t, 0, ZERO_SHOT, family.name, workdir, step, config)
      res.update(_embedding_scores(task, params, t.kind, data[t.name], side, options.limit))
      res["seconds"] = round(time.time() - started, 1)
      results.append(_write(out_dir, res))
      continue
    answerer = answerer or Answerer(config, task, params, num_devices=options.num_devices,
                                    batch_size=options.batch_size, num_beams=options.num_beams,
                                    length_penalty=options.length_penalty)
    for k in options.shots:
      started = time.time()
      selection = options.selection if k else TEXT_ONLY if options.text_only_examples else ZERO_SHOT
      if selection == "rices":
        tower = tower or _tower(config, params, options)
      res = _header(t, k, selection, family.name, workdir, step, config)
      res.update(_few_shot(answerer, data[t.name], templates[t.name], k, selection, tower, side, options,
                           _max_new_tokens(config, t.kind, options), options.rices_cache or rices_cache))
      res["seconds"] = round(time.time() - started, 1)
      results.append(_write(out_dir, res))
  printer(markdown_table(results))
  return results


def _few_shot(answerer: Answerer, loaded: _Loaded, template: prompts_lib.PromptTemplate, k: int, selection: str,
              tower, side: int | None, options: Options, max_new_tokens: int, rices_cache: str) -> dict:
  """The results fields of one task at k shots: each run's (seed's) answers and scores."""
  n = len(loaded.queries)
  text_only = selection == TEXT_ONLY
  if selection == "rices":
    draws = [(None, _rices_choice(tower, loaded, k, rices_cache))]
  elif selection in ("random", TEXT_ONLY):
    m = options.text_only_examples if text_only else k
    draws = [(seed, rices.random_examples(list(range(n)), len(loaded.support), m, seed=seed))
             for seed in range(options.seeds)]
  else:
    draws = [(None, [[] for _ in range(n)])]
  image_of = _image_reader(loaded, side)
  runs = []
  for seed, chosen in draws:
    generations = []
    for first in range(0, n, WAVE):  # one wave's prompts and images in memory at a time
      generations += answerer.answer(
          _requests(template, loaded, chosen[first:first + WAVE], image_of, first, text_only), max_new_tokens)
    scores, metric, rows = benchmark.score(loaded.task.kind, loaded.queries, generations,
                                           postprocess=options.postprocess)
    for row, indices in zip(rows, chosen):
      row["shots"] = [loaded.support[i].item_id for i in indices]
    runs.append({"seed": seed, "scores": scores, "examples": rows})
  return {
      "queries": n, "support": len(loaded.support) if loaded.support is not None else 0,
      "metric": metric, "prompt_template": template.text,
      "decoding": {"method": "beam search" if options.num_beams > 1 else "greedy", "num_beams": options.num_beams,
                   "length_penalty": options.length_penalty, "max_new_tokens": max_new_tokens},
      "devices": answerer.num_devices, "batch_split": answerer.split,
      "rices_tower": tower[2] if selection == "rices" else None,
      "seeds": [r["seed"] for r in runs] if selection in ("random", TEXT_ONLY) else None,
      "text_only_examples": options.text_only_examples if text_only else 0,
      "scores": {name: _spread([r["scores"][name] for r in runs]) for name in runs[0]["scores"]},
      "runs": runs,
  }


def _rices_choice(tower, loaded: _Loaded, k: int, cache_dir: str) -> list[list[int]]:
  """Per query, the k support indices RICES chooses (the most similar last)."""
  embedder, side, _ = tower
  # The support set is named by its items (ids and image files or bytes' digest) and side.
  selector = rices.RICES(embedder, benchmark.Images(loaded.support, side), cache_dir=cache_dir,
                         support_key=f"{loaded.task.kind}|{len(loaded.support)}|{side}|{_items_digest(loaded.support)}")
  return selector.select(benchmark.Images(loaded.queries, side), k)


# Queries whose prompts (and images) are built at once; a wave of prompts of another length
# bucket or image count compiles once more.
WAVE = 1024
# Support images kept decoded (random and RICES examples repeat across queries).
SUPPORT_IMAGES_KEPT = 4096
# Images embedded per call of Task.embed_images (a benchmark's images are never all in memory).
EMBED_CHUNK = 512


def _embed_image_files(task: families.Task, params, paths: Sequence[str], side: int) -> np.ndarray:
  out = []
  for start in range(0, len(paths), EMBED_CHUNK):
    images = np.stack([load_image_file(p, side) for p in paths[start:start + EMBED_CHUNK]])
    out.append(np.asarray(task.embed_images(params, images)))
  return np.concatenate(out)


def _embedding_scores(task: families.Task, params, kind: str, data, side: int, limit: int) -> dict:
  """The results fields of a retrieval or classification task, by the family's embeddings."""
  if kind == "retrieval":
    data = benchmark.limited_retrieval(data, limit)
    scores, metric, rows = benchmark.retrieval_scores(
        data, _embed_image_files(task, params, data.image_paths, side),
        np.asarray(task.embed_texts(params, list(data.captions))))
    count = len(data.image_paths)
  else:
    examples = data.examples[:limit] if limit else data.examples
    prompts = [p for per_class in data.prompts() for p in per_class]
    scores, metric, rows = benchmark.classification_scores(
        data, examples, _embed_image_files(task, params, [e.image_path for e in examples], side),
        np.asarray(task.embed_texts(params, prompts)))
    count = len(examples)
  return {"queries": count, "metric": metric, "scores": {name: _spread([v]) for name, v in scores.items()},
          "runs": [{"seed": None, "scores": scores, "examples": rows}]}


def _image_reader(loaded: _Loaded, image_size: int | None):
  """(which, index) -> image: a query's read when asked, a support example's kept (the most
  recent SUPPORT_IMAGES_KEPT)."""

  @functools.lru_cache(maxsize=SUPPORT_IMAGES_KEPT)
  def support_image(i: int) -> np.ndarray:
    return benchmark.load_image(loaded.support[i], image_size)

  def image_of(which: str, i: int) -> np.ndarray:
    return support_image(i) if which == "support" else benchmark.load_image(loaded.queries[i], image_size)
  return image_of


def _items_digest(items: Sequence[benchmark.Item]) -> str:
  """SHA-256 of the items' ids and images (a file's path, or the bytes' own digest)."""
  h = hashlib.sha256()
  for item in items:
    image = hashlib.sha256(item.image).hexdigest() if isinstance(item.image, bytes) else item.image
    h.update(f"{item.item_id}\0{image}\0".encode())
  return h.hexdigest()


def _is_percent(score_name: str) -> bool:
  return score_name in ("accuracy", "chance") or "_R@" in score_name


def markdown_table(results: Sequence[dict]) -> str:
  """One row per results file: task, shots, selection, each score (mean ± std over seeds)."""
  lines = ["| task | shots | selection | score | queries | family | step |", "|---|---|---|---|---|---|---|"]
  for r in results:
    cells = []
    for name, s in r["scores"].items():
      digits = 2 if _is_percent(name) else 3
      shown = f"{s['mean']:.{digits}f}"
      if len(r["runs"]) > 1:
        shown += f" ± {s['std']:.{digits}f}"
      cells.append(f"{name} {shown}")
    seeds = f" ({len(r['runs'])} seeds)" if len(r["runs"]) > 1 else ""
    lines.append(f"| {r['task']} | {r['shots']} | {r['selection']}{seeds} | {'; '.join(cells)} | {r['queries']} | "
                 f"{r['family']} | {r['step']} |")
  return "\n".join(lines)


def _check_writable(out_dir: str) -> None:
  try:
    workdir_lib.ensure_writable(out_dir)
  except OSError as e:
    reason = os.strerror(e.errno) if e.errno else e.strerror
    raise OSError(e.errno, f"cannot write the results to {out_dir} ({reason}); nothing was evaluated. Make the work "
                  "directory writable, or copy it somewhere writable and evaluate the copy") from None


def tasks_of_config(config: ml_collections.ConfigDict) -> list[str]:
  """`config.eval.tasks`: a list of specs, or one string of specs separated by ';'."""
  value = config.eval.get("tasks", None) if "eval" in config else None
  if not value:
    return []
  if isinstance(value, str):
    return [s.strip() for s in value.split(";") if s.strip()]
  return [str(s) for s in value]


def parse_prompt(value: str) -> tuple[str, str]:
  """"KIND=TEMPLATE" -> (kind, template), the template checked; ValueError naming the value otherwise."""
  kind, equals, text = value.partition("=")
  if not equals:
    raise ValueError(f"--prompt {value!r}; expected KIND=TEMPLATE, e.g. 'vqa=<image>Question: {{question}} "
                     "Answer: {{answer}}<|endofchunk|>'")
  return kind.strip(), prompts_lib.PromptTemplate(kind.strip(), text).text


def parse_shots(value: str) -> tuple[int, ...]:
  """"0,4,8" -> (0, 4, 8); ValueError naming the value otherwise."""
  try:
    shots = tuple(int(s) for s in str(value).split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--shots {value!r}; expected comma-separated counts such as 0,4,8") from None
  if not shots or any(k < 0 for k in shots):
    raise ValueError(f"--shots {value!r}; expected comma-separated counts >= 0 such as 0,4,8")
  return shots


__all__ = ["Answerer", "Options", "Request", "check_answerable", "markdown_table", "parse_shots", "render",
           "results_name", "run", "tasks_of_config"]
