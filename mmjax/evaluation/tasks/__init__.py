"""Benchmark tasks read from the benchmark's own files: one kind per file format, in one
explicit registry, each loading the user's files and image folder into plain examples.
Nothing is downloaded and nothing is written.

  task = tasks.parse_task_spec("vqa:questions=q.json,annotations=a.json,images=val2014")
  examples = task.load()                      # list of VQAExample, every image checked

| kind | files | `load()` gives |
|---|---|---|
| `vqa` | VQAv2 / OK-VQA questions + annotations, TextVQA's or VizWiz's one file | `[VQAExample]` |
| `captioning` | COCO captions, or a Karpathy split file and `split` | `[CaptionExample]` |
| `retrieval` | the same files | `RetrievalSet` (images, captions, the image of each caption) |
| `classification` | a folder per class or a labels JSON, class names, templates | `ClassificationSet` |

A spec is `KIND:KEY=VALUE,KEY=VALUE,...`, the keys the fields of the kind's class (`spec`
says how values may hold commas). `write_embedded_tasks` writes the embedded dataset in
each form. docs/evaluation.md ("Task files") describes every format
and check.
"""

from __future__ import annotations

from mmjax.evaluation.tasks.captions import (CaptionExample, CaptioningTask, RetrievalSet, RetrievalTask,
                                             read_captions)
from mmjax.evaluation.tasks.classification import ClassificationExample, ClassificationSet, ClassificationTask
from mmjax.evaluation.tasks.embedded import write_embedded_tasks
from mmjax.evaluation.tasks.spec import split_spec, task_spec, with_options
from mmjax.evaluation.tasks.vqa import VQAExample, VQATask, answers_by_question

Task = VQATask | CaptioningTask | RetrievalTask | ClassificationTask

REGISTRY: dict[str, type[Task]] = {
    VQATask.kind: VQATask,
    CaptioningTask.kind: CaptioningTask,
    RetrievalTask.kind: RetrievalTask,
    ClassificationTask.kind: ClassificationTask,
}


def names() -> list[str]:
  return sorted(REGISTRY)


def get(kind: str) -> type[Task]:
  """The class of task kind `kind`; ValueError listing the known kinds otherwise."""
  if kind not in REGISTRY:
    raise ValueError(f"task kind {kind!r} is not known; expected one of {names()}")
  return REGISTRY[kind]


def parse_task_spec(spec: str) -> Task:
  """The task a spec string names (`vqa:questions=PATH,annotations=PATH,images=DIR`);
  ValueError naming the spec and the offending part otherwise. Files are read by `load()`."""
  kind, options = split_spec(spec, names())
  return with_options(get(kind), options, spec)


__all__ = [
    "REGISTRY", "CaptionExample", "CaptioningTask", "ClassificationExample", "ClassificationSet",
    "ClassificationTask", "RetrievalSet", "RetrievalTask", "Task", "VQAExample", "VQATask",
    "answers_by_question", "get", "names", "parse_task_spec", "read_captions", "task_spec",
    "write_embedded_tasks",
]
