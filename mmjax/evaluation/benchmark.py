"""What `mmjax eval --task SPEC` evaluates: a task's queries and its support set (the
examples few-shot prompts draw from) as plain items, and the score of generated answers.

A spec is a task file spec (`mmjax.evaluation.tasks`) with two kinds of extra keys:

  vqa:questions=val_q.json,annotations=val_a.json,images=val2014,
      support_questions=train_q.json,support_annotations=train_a.json,support_images=train2014
  captioning:captions=dataset_coco.json,images=coco,split=test,support_split=train,name=coco-test
  vqa:embedded                 # the run's embedded dataset: validation queries, train support

- `support_KEY=VALUE`: the support set, a task of the same kind whose other keys are the
  query task's unless given (`support_split=train` reuses the Karpathy file); without any,
  the task has no support set and only zero-shot is possible.
- `name=NAME`: how results files and tables name the task (default: the kind).
- `embedded` (or `embedded=SPLIT`): the embedded dataset of the run's data directory,
  queries from SPLIT (validation) and the support set from its train split; `vqa` reads the
  `qa` records (one answer written ten times), `captioning` the `captions` records.

Nothing is written here; images are read when an item's image is asked for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data import builders
from mmjax.data.pairs import caption_text
from mmjax.data.preprocess import decode_image, load_image_file
from mmjax.evaluation import captions as caption_metrics
from mmjax.evaluation import tasks as task_files
from mmjax.evaluation import vqa as vqa_metric
from mmjax.evaluation.tasks.spec import split_spec, with_options

# The kinds a model answers by generating text, and those it answers by embedding images and
# texts in one space (compared by cosine similarity).
GENERATED_KINDS = ("vqa", "captioning")
EMBEDDING_KINDS = ("retrieval", "classification")
EMBEDDED = "embedded"
SUPPORT_PREFIX = "support_"
_EMBEDDED_DATASET = {"vqa": "qa", "captioning": "captions"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The default post-processing: OpenFlamingo's harness (the first of vqa.POSTPROCESS_OPTIONS),
# which also cuts a generated caption before a following "Output".
DEFAULT_POSTPROCESS = vqa_metric.POSTPROCESS_OPTIONS[0]


@dataclasses.dataclass(frozen=True)
class Item:
  """One query or support example: its id, the template's fields, its references and image."""

  item_id: Hashable  # the question id (vqa) or the image id (captioning)
  fields: Mapping[str, str]  # the prompt template's fields of a solved example
  references: tuple[str, ...]  # the ten answers (vqa) or the reference captions
  image: str | bytes  # an image file's path, or encoded image bytes


def load_image(item: Item, image_size: int | None) -> np.ndarray:
  """uint8 [S, S, 3] of an item's image (S = image_size; None: its own size)."""
  if isinstance(item.image, bytes):
    return decode_image(item.image, image_size, name=str(item.item_id))
  return load_image_file(item.image, image_size)


class Images(Sequence):
  """The images of items at one size, read when indexed (RICES embeds a support set through it)."""

  def __init__(self, items: Sequence[Item], image_size: int | None):
    self.items, self.image_size = items, image_size

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [load_image(item, self.image_size) for item in self.items[i]]
    return load_image(self.items[i], self.image_size)


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """A task to evaluate: where its queries and support examples come from."""

  name: str
  kind: str
  spec: str  # as given
  query: Any  # a task of mmjax.evaluation.tasks, or None for the embedded dataset
  support: Any = None  # the same, or None
  embedded_split: str | None = None  # the embedded dataset's query split

  @property
  def has_support(self) -> bool:
    return self.support is not None or self.embedded_split is not None

  def queries(self, data_dir: str | None) -> list[Item]:
    if self.embedded_split is not None:
      return embedded_items(data_dir, self.kind, self.embedded_split)
    return file_items(self.kind, self.query)

  def support_items(self, data_dir: str | None) -> list[Item]:
    """The support set; ValueError naming the task when it has none."""
    if self.embedded_split is not None:
      return embedded_items(data_dir, self.kind, "train")
    if self.support is None:
      raise ValueError(f"task {self.name!r} ({self.spec!r}) has no support set to draw in-context examples from; "
                       f"add {SUPPORT_PREFIX}KEY=VALUE options naming one (e.g. {SUPPORT_PREFIX}annotations=...), or "
                       "evaluate it with --shots 0")
    return file_items(self.kind, self.support)


def parse_eval_task(spec: str) -> EvalTask:
  """The EvalTask a spec names (module docstring); ValueError naming the spec otherwise."""
  kind, colon, body = spec.strip().partition(":")
  first, comma, rest = body.partition(",")
  full = f"{kind}:{EMBEDDED}=validation{comma}{rest}" if colon and first.strip() == EMBEDDED else spec.strip()
  kind, options = split_spec(full, task_files.names())
  task_class = task_files.get(kind)
  name = options.pop("name", kind)
  if not _NAME.match(name):
    raise ValueError(f"name={name!r} in task spec {spec!r}: expected letters, digits, '.', '_' or '-' (it names "
                     "the results file)")
  if EMBEDDED in options:
    split = options.pop(EMBEDDED)
    if options:
      raise ValueError(f"task spec {spec!r}: {EMBEDDED}= takes no other keys than name=; got "
                       f"{', '.join(k + '=' for k in options)}")
    if kind not in _EMBEDDED_DATASET:
      raise ValueError(f"task spec {spec!r}: the embedded dataset is evaluated as {sorted(_EMBEDDED_DATASET)}; "
                       f"for {kind!r} write its files with mmjax.evaluation.tasks.write_embedded_tasks")
    if split not in ("validation", "test"):
      raise ValueError(f"{EMBEDDED}={split!r} in task spec {spec!r}; expected validation or test (train is the "
                       "support set)")
    return EvalTask(name=name, kind=kind, spec=spec, query=None, embedded_split=split)
  support = {k[len(SUPPORT_PREFIX):]: v for k, v in options.items() if k.startswith(SUPPORT_PREFIX)}
  own = {k: v for k, v in options.items() if not k.startswith(SUPPORT_PREFIX)}
  query = with_options(task_class, own, spec)
  support_task = with_options(task_class, {**own, **support}, spec) if support else None
  return EvalTask(name=name, kind=kind, spec=spec, query=query, support=support_task)


def file_items(kind: str, task) -> list[Item]:
  """The items of a task read from its files (every image checked to exist)."""
  if kind == "vqa":
    return [Item(item_id=e.question_id, fields={"question": e.question, "answer": e.answers[0]},
                 references=tuple(e.answers), image=e.image_path) for e in task.load()]
  if kind == "captioning":
    return [Item(item_id=e.image_id, fields={"caption": e.captions[0].strip()}, references=tuple(e.captions),
                 image=e.image_path) for e in task.load()]
  raise ValueError(f"task kind {kind!r} is not answered by generating text; expected one of {GENERATED_KINDS}")


def embedded_items(data_dir: str | None, kind: str, split: str) -> list[Item]:
  """The items of a split of the embedded dataset, in stored order (ids are record ids)."""
  source = builders.open_split(data_dir, _EMBEDDED_DATASET[kind], split)
  out = []
  for i in range(len(source)):
    record = source[i]
    record_id, image = record["id"].decode(), bytes(record["images"][0])
    if kind == "vqa":
      answer = record["answer"].decode()
      out.append(Item(item_id=record_id, fields={"question": record["question"].decode(), "answer": answer},
                      references=(answer,) * vqa_metric.ANSWERS_PER_QUESTION, image=image))
    else:
      caption = caption_text(record["text"])
      out.append(Item(item_id=record_id, fields={"caption": caption}, references=(caption,), image=image))
  return out


# ------------------------------------------------------------------------------ scoring

def clean_caption(generation: str, postprocess: str) -> str:
  """A generated caption as scored: OpenFlamingo cuts it before a following "Output"."""
  return (generation.split("Output", 1)[0] if postprocess == DEFAULT_POSTPROCESS else generation).strip()


def score(kind: str, items: Sequence[Item], generations: Sequence[str], *,
          postprocess: str) -> tuple[dict[str, float], dict[str, Any], list[dict]]:
  """(scores, metric options, one row per item) of generated texts (each already cut where
  the model stopped). vqa: "accuracy" in percent (`vqa.vqa_accuracy`); captioning: CIDEr-D,
  BLEU-4 and ROUGE-L (`captions.caption_metrics`; CIDEr-D only without pycocoevalcap)."""
  if kind == "vqa":
    keys = list(range(len(items)))  # positions: ids need not be unique across files
    result = vqa_metric.vqa_accuracy(dict(zip(keys, generations)), {k: items[k].references for k in keys},
                                     postprocess=postprocess)
    rows = [{"id": item.item_id, "generated": g, "compared": result.compared[k], "score": result.per_question[k]}
            for k, item, g in zip(keys, items, generations)]
    return {"accuracy": result.accuracy}, {"metric": "VQA accuracy", "postprocess": postprocess}, rows
  if kind == "captioning":
    candidates = [clean_caption(g, postprocess) for g in generations]
    metrics = caption_metrics.METRICS if caption_metrics.pycocoevalcap_installed() else ("CIDEr-D",)
    result = caption_metrics.caption_metrics(candidates, [item.references for item in items], metrics=metrics)
    rows = [{"id": item.item_id, "generated": g, "compared": c,
             "score": {m: result.per_caption[m][i] for m in result.scores}}
            for i, (item, g, c) in enumerate(zip(items, generations, candidates))]
    return (dict(result.scores), {"metric": list(result.scores), "scorer": result.scorer,
                                  "tokenizer": result.tokenizer, "postprocess": postprocess}, rows)
  raise ValueError(f"task kind {kind!r} is not answered by generating text; expected one of {GENERATED_KINDS}")


def _unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def limited_retrieval(retrieval: task_files.RetrievalSet, limit: int) -> task_files.RetrievalSet:
  """The first `limit` images of a retrieval set and their captions (0: all)."""
  if not limit or limit >= len(retrieval.image_paths):
    return retrieval
  keep = retrieval.caption_image_index < limit
  return task_files.RetrievalSet(
      image_ids=retrieval.image_ids[:limit], image_paths=retrieval.image_paths[:limit],
      captions=tuple(c for c, k in zip(retrieval.captions, keep) if k),
      caption_image_index=retrieval.caption_image_index[keep])


def retrieval_scores(retrieval: task_files.RetrievalSet, image_embeddings: np.ndarray,
                     text_embeddings: np.ndarray) -> tuple[dict[str, float], dict[str, Any], list[dict]]:
  """(scores, metric options, one row per image) of embeddings [I, E] and [C, E] by cosine:
  recall@1/5/10 both ways in percent, and each image's five best captions."""
  similarity = _unit_rows(image_embeddings) @ _unit_rows(text_embeddings).T  # [I, C]
  recall = retrieval.recall(similarity)
  scores = {f"{way}_R@{k}": 100.0 * value for way, by_k in recall.items() for k, value in by_k.items()}
  rows = [{"id": image_id, "retrieved": [retrieval.captions[c] for c in np.argsort(-row, kind="stable")[:5]],
           "captions": [retrieval.captions[c] for c in np.flatnonzero(retrieval.caption_image_index == i)]}
          for i, (image_id, row) in enumerate(zip(retrieval.image_ids, similarity))]
  return scores, {"metric": "recall@k", "similarity": "cosine", "ties": "count against the query"}, rows


def classification_scores(classes: task_files.ClassificationSet, examples: Sequence[Any], image_embeddings: np.ndarray,
                          prompt_embeddings: np.ndarray) -> tuple[dict[str, float], dict[str, Any], list[dict]]:
  """(scores, metric options, one row per image) of zero-shot classification, CLIP's way: each
  class is the normalised mean of its prompts' unit embeddings ([K * templates, E], class
  major, as `ClassificationSet.prompts` orders them), each image takes the class of highest
  cosine. Accuracy and chance in percent."""
  k, t = len(classes.labels), len(classes.templates)
  per_prompt = _unit_rows(prompt_embeddings).reshape(k, t, -1)
  class_embeddings = _unit_rows(per_prompt.mean(axis=1))  # [K, E]
  predicted = np.argmax(_unit_rows(image_embeddings) @ class_embeddings.T, axis=1)
  rows = [{"id": e.image_path, "label": classes.labels[e.label], "predicted": classes.labels[int(p)],
           "correct": bool(int(p) == e.label)} for e, p in zip(examples, predicted)]
  accuracy = 100.0 * float(np.mean([r["correct"] for r in rows]))
  return ({"accuracy": accuracy, "chance": 100.0 / k},
          {"metric": "zero-shot accuracy", "templates": list(classes.templates), "class_names": list(classes.class_names)},
          rows)
