"""`mmjax eval --task SPEC --shots 0,4,8 [--rices]`: a benchmark task asked of any family
whose model reads images and generates text, zero- and few-shot, scored by the benchmark's
metric (`mmjax.evaluation.benchmark`).

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
and the task: a model that does not generate text about images, a task kind answered
otherwise (retrieval, classification), or few-shot prompts the family's renderer refuses
(a prompt template that takes one image).

Dimension letters: B batch, N images per prompt, S image side, T prompt length.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import families
from mmjax import filelock
from mmjax import infer
from mmjax import sharding as sh
from mmjax.data import END_OF_CHUNK_TOKEN
from mmjax.evaluation import benchmark
from mmjax.evaluation import prompts as prompts_lib
from mmjax.evaluation import rices
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import workdir as workdir_lib

RESULTS_DIR = "eval"
RICES_CACHE = "rices-cache"
SELECTIONS = ("random", "rices")
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

  def __post_init__(self):
    if not self.shots or any(k < 0 for k in self.shots):
      raise ValueError(f"shots={list(self.shots)}; expected one or more counts >= 0")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection={self.selection!r}; expected one of {SELECTIONS}")
    if self.seeds < 1 or self.num_beams < 1 or self.batch_size < 1 or self.limit < 0 or self.num_devices < 0:
      raise ValueError(f"seeds={self.seeds}, num_beams={self.num_beams}, batch_size={self.batch_size}, "
                       f"limit={self.limit}, num_devices={self.num_devices}; expected seeds, num_beams and "
                       "batch_size >= 1, limit and num_devices >= 0")
    if self.rices_tower is not None and self.selection != "rices":
      raise ValueError("a RICES tower was named but the selection is random; add --rices")


def results_name(task_name: str, shots: int, selection: str) -> str:
  """`<task>-<shots>shot[-rices|-random].json` (zero-shot has no selection)."""
  return f"{task_name}-{shots}shot" + (f"-{selection}" if shots else "") + ".json"


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
    if num_beams > 1:
      from mmjax.infer import beam  # pylint: disable=g-import-not-at-top
      self._search = beam.BeamSearch(task.decoding)
    else:
      self._generator = infer.Generator(task.decoding)

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
          inputs[k][(i, *(slice(0, s) for s in v.shape))] = v
      if bool(self.config.data.get("blank_images", False)) and "images" in inputs:
        inputs["images"] = np.zeros_like(inputs["images"])
      inputs = {k: jax.device_put(v, batch_sharding) for k, v in inputs.items()}
      if self.num_beams > 1:
        result = self._search.search(self.params, inputs, ids, max_new_tokens, num_beams=self.num_beams,
                                     length_penalty=self.length_penalty, prompt_lengths=lengths,
                                     eos_token_id=stop, pad_id=tok.pad_id)
      else:
        result = self._generator.generate(self.params, inputs, ids, max_new_tokens, prompt_lengths=lengths,
                                          eos_token_id=stop, pad_id=tok.pad_id)
      tokens, counts = np.asarray(result.tokens), np.asarray(result.lengths)
      for i in range(len(chunk)):
        text = tok.decode([int(t) for t in tokens[i, :counts[i]]])
        out.append(text.split(END_OF_CHUNK_TOKEN)[0].strip())
    return out


# ------------------------------------------------------------------------------ checks

def check_answerable(family: str, task: families.Task, eval_task: benchmark.EvalTask) -> None:
  """Raises ValueError naming the family and the task when the family's model cannot answer
  it by generating text about images."""
  if eval_task.kind not in benchmark.GENERATED_KINDS:
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r}: `mmjax eval --task` answers the "
                     f"kinds {list(benchmark.GENERATED_KINDS)} by generating text, and {eval_task.kind!r} is not "
                     "one of them")
  if task.decoding is None or not (task.takes_images or task.render_prompt is not None):
    what = "does not generate text" if task.decoding is None else "does not read images"
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} ({eval_task.kind}): its model "
                     f"{what}; expected a work directory of a family whose model reads images and generates text")


def check_shots(eval_task: benchmark.EvalTask, shots: int, support_size: int) -> None:
  if shots > support_size:
    raise ValueError(f"--shots {shots} asks for {shots} in-context examples per query, but the support set of "
                     f"task {eval_task.name!r} holds {support_size}; expected at most {support_size}")


def _check_prompt(family: str, task: families.Task, eval_task: benchmark.EvalTask, shots: int,
                  request: Request) -> None:
  """Renders one prompt with `shots` examples; the family's refusal becomes an error naming both."""
  try:
    render(task, request)
  except ValueError as e:
    raise ValueError(f"family {family!r} cannot answer task {eval_task.name!r} with {shots} shots: it refuses a "
                     f"prompt with {len(request.images)} images ({e})") from None


# ------------------------------------------------------------------------------ one evaluation

@dataclasses.dataclass
class _Loaded:
  """The queries and support set of one task, their images read once."""
  task: benchmark.EvalTask
  queries: list[benchmark.Item]
  support: list[benchmark.Item] | None


def _requests(template: prompts_lib.PromptTemplate, loaded: _Loaded, chosen: list[list[int]],
              image_of) -> list[Request]:
  out = []
  for q, indices in enumerate(chosen):
    shots = [loaded.support[i] for i in indices]
    text = template.prompt([s.fields for s in shots], loaded.queries[q].fields)
    out.append(Request(text, [image_of("support", i) for i in indices] + [image_of("query", q)]))
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
  cache_dir = options.rices_cache or os.path.join(out_dir, RICES_CACHE)
  _check_writable(out_dir)
  config = config_lib.read_resolved(workdir)
  family = families.of_config(config)
  task = family.task(config, workdir)
  for t in eval_tasks:
    check_answerable(family.name, task, t)
  overrides = dict(config.eval.get("prompts", None) or {})
  templates = {t.name: prompts_lib.template_for(t.kind, overrides) for t in eval_tasks}
  data = []
  most = max(options.shots)
  for t in eval_tasks:
    queries = t.queries(task.data_dir)
    queries = queries[:options.limit] if options.limit else queries
    support = t.support_items(task.data_dir) if most else None
    for k in options.shots:
      check_shots(t, k, len(support) if support is not None else 0)
    data.append(_Loaded(t, queries, support))

  side = image_size(config, task)
  for loaded in data:  # the family's refusal of a few-shot prompt, before the model is loaded
    for k in options.shots:
      if k:
        request = _requests(templates[loaded.task.name], loaded, [list(range(k))], _image_reader(loaded, side))[0]
        _check_prompt(family.name, task, loaded.task, k, request)
  step, params = loop.restore_params(config, workdir, task)
  answerer = Answerer(config, task, params, num_devices=options.num_devices, batch_size=options.batch_size,
                      num_beams=options.num_beams, length_penalty=options.length_penalty)
  tower = None
  results = []
  for loaded in data:
    t = loaded.task
    template = templates[t.name]
    image_of = _image_reader(loaded, side)
    for k in options.shots:
      started = time.time()
      selection = options.selection if k else "zero-shot"
      runs = []
      if k and selection == "rices":
        if tower is None:
          tower = _tower(config, params, options)
        embedder, side, tower_info = tower
        selector = rices.RICES(embedder, benchmark.Images(loaded.support, side), cache_dir=cache_dir,
                               support_key=f"{t.spec}|{task.data_dir}|support|{len(loaded.support)}|{side}|"
                                           f"{_ids_digest(loaded.support)}")
        draws = [(None, selector.select(benchmark.Images(loaded.queries, side), k))]
      elif k:
        draws = [(seed, rices.random_examples(list(range(len(loaded.queries))), len(loaded.support), k, seed=seed))
                 for seed in range(options.seeds)]
      else:
        draws = [(None, [[] for _ in loaded.queries])]
      for seed, chosen in draws:
        requests = _requests(template, loaded, chosen, image_of)
        generations = answerer.answer(requests, _max_new_tokens(config, t.kind, options))
        scores, metric, rows = benchmark.score(t.kind, loaded.queries, generations, postprocess=options.postprocess)
        for row, indices in zip(rows, chosen):
          row["shots"] = [loaded.support[i].item_id for i in indices]
        runs.append({"seed": seed, "scores": scores, "examples": rows})
      summary = {name: _spread([r["scores"][name] for r in runs]) for name in runs[0]["scores"]}
      res = {
          "task": t.name, "kind": t.kind, "spec": t.spec, "shots": k, "selection": selection,
          "family": family.name, "workdir": os.path.abspath(workdir), "step": step, "date": _now(),
          "queries": len(loaded.queries), "support": len(loaded.support) if loaded.support is not None else 0,
          "metric": metric, "prompt_template": template.text,
          "decoding": {"num_beams": options.num_beams, "length_penalty": options.length_penalty,
                       "max_new_tokens": _max_new_tokens(config, t.kind, options),
                       "method": "beam search" if options.num_beams > 1 else "greedy"},
          "devices": answerer.num_devices, "batch_split": answerer.split,
          "rices_tower": tower[2] if k and selection == "rices" else None,
          "seeds": [r["seed"] for r in runs] if selection == "random" else None,
          "scores": summary, "runs": runs, "seconds": round(time.time() - started, 1),
          "config": config.to_dict(),
      }
      path = os.path.join(out_dir, results_name(t.name, k, selection))
      filelock.atomic_write(path, json.dumps(res, indent=1, ensure_ascii=False, default=str).encode())
      res["path"] = path
      results.append(res)
  printer(markdown_table(results))
  return results


def _image_reader(loaded: _Loaded, image_size: int | None):
  """(which, index) -> image, each read once."""
  cache: dict[tuple[str, int], np.ndarray] = {}

  def image_of(which: str, i: int) -> np.ndarray:
    if (which, i) not in cache:
      items = loaded.queries if which == "query" else loaded.support
      cache[(which, i)] = benchmark.load_image(items[i], image_size)
    return cache[(which, i)]
  return image_of


def _ids_digest(items: Sequence[benchmark.Item]) -> str:
  return hashlib.sha256("\0".join(str(i.item_id) for i in items).encode()).hexdigest()


def markdown_table(results: Sequence[dict]) -> str:
  """One row per results file: task, shots, selection, each score (mean ± std over seeds)."""
  lines = ["| task | shots | selection | score | queries | family | step |", "|---|---|---|---|---|---|---|"]
  for r in results:
    cells = []
    for name, s in r["scores"].items():
      shown = f"{s['mean']:.2f}" if name == "accuracy" else f"{s['mean']:.3f}"
      if len(r["runs"]) > 1:
        shown += f" ± {s['std']:.2f} ({len(r['runs'])} seeds)" if name == "accuracy" else f" ± {s['std']:.3f}"
      cells.append(f"{name} {shown}")
    lines.append(f"| {r['task']} | {r['shots']} | {r['selection']} | {'; '.join(cells)} | {r['queries']} | "
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
