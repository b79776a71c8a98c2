"""The embedded dataset written out as benchmark files, one folder per form, to show the
formats and to test the readers against data whose answers are known.

  target/vqa/           VQAv2 questions + annotations, images/<image id, 12 digits>.png
  target/captions/      COCO captions and Karpathy's form of the same images and captions
  target/classification/ a sub-folder per class, labels.json, classes.json, templates.txt
  target/tasks.txt      the spec of each, one `name: spec` a line

The `qa` records become VQA questions: each has one answer, written ten times (the VQA
accuracy of an answer is then 1 or 0, exact match after normalisation). The `captions`
records become the captions, one per image. Classification counts the shapes of the
`captions` scenes ("1 shape" ... "4 shapes"). Image and question ids are the record
numbers; images are the stored PNG bytes, unchanged.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image

from mmjax.data import builders
from mmjax.data.pairs import caption_text
from mmjax.data.scenes import MAX_OBJECTS, Scene, question_kind
from mmjax.evaluation.captions import tokenize
from mmjax.evaluation.tasks import files
from mmjax.evaluation.tasks.captions import CaptioningTask, RetrievalTask
from mmjax.evaluation.tasks.classification import ClassificationTask
from mmjax.evaluation.tasks.spec import task_spec
from mmjax.evaluation.tasks.vqa import ANSWERS_PER_QUESTION, VQATask

# The Karpathy name of each split of the embedded dataset.
_KARPATHY_SPLITS = {"train": "train", "validation": "val", "test": "test"}
_NUMBER_WORDS = ("one", "two", "three", "four")
_TEMPLATES = ("a picture of {}.", "a drawing with {}.")
_IMAGE_NAME = "{image_id:012d}.png"


def _records(data_dir: str | None, name: str, split: str) -> list[tuple[int, dict]]:
  """(record number, record) of a split of the embedded dataset, by record number."""
  source = builders.open_split(data_dir, name, split)
  records = [source[i] for i in range(len(source))]
  return sorted((int(r["id"].decode().rsplit("/", 1)[1]), r) for r in records)


def _write(path: str, content: bytes | str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content.encode() if isinstance(content, str) else content)


def _write_json(path: str, document) -> str:
  _write(path, json.dumps(document, indent=1, ensure_ascii=False))
  return path


def _write_vqa(folder: str, records: list[tuple[int, dict]], split: str) -> str:
  header = {"info": {"description": f"mmjax's embedded qa dataset, split {split}"}, "license": {},
            "data_type": "mmjax_shapes", "data_subtype": split}
  questions, annotations = [], []
  for image_id, record in records:
    _write(os.path.join(folder, "images", _IMAGE_NAME.format(image_id=image_id)), bytes(record["images"][0]))
    question, answer = record["question"].decode(), record["answer"].decode()
    questions.append({"image_id": image_id, "question": question, "question_id": image_id})
    annotations.append({
        "question_type": question_kind(question) or "other", "multiple_choice_answer": answer,
        "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                    for k in range(ANSWERS_PER_QUESTION)],
        "image_id": image_id, "answer_type": "number" if answer.isdigit() else "other", "question_id": image_id})
  task = VQATask(
      questions=_write_json(os.path.join(folder, f"v2_OpenEnded_mmjax_{split}_questions.json"),
                            {**header, "task_type": "Open-Ended", "questions": questions}),
      annotations=_write_json(os.path.join(folder, f"v2_mmjax_{split}_annotations.json"),
                              {**header, "annotations": annotations}),
      images=os.path.join(folder, "images"), image_pattern=_IMAGE_NAME)
  return task_spec(task)


def _write_captions(folder: str, records: list[tuple[int, dict]], split: str) -> dict[str, str]:
  images, annotations, karpathy = [], [], []
  for index, (image_id, record) in enumerate(records):
    file_name = _IMAGE_NAME.format(image_id=image_id)
    png = bytes(record["images"][0])
    _write(os.path.join(folder, "images", file_name), png)
    width, height = Image.open(io.BytesIO(png)).size
    caption = caption_text(record["text"])
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    annotations.append({"image_id": image_id, "id": index, "caption": caption})
    karpathy.append({"filepath": "images", "filename": file_name, "imgid": index, "cocoid": image_id,
                     "split": _KARPATHY_SPLITS[split], "sentids": [index],
                     "sentences": [{"tokens": tokenize(caption), "raw": caption, "imgid": index, "sentid": index}]})
  coco = _write_json(os.path.join(folder, f"captions_{split}.json"),
                     {"info": {"description": f"mmjax's embedded captions dataset, split {split}"},
                      "licenses": [], "images": images, "annotations": annotations})
  karpathy_file = _write_json(os.path.join(folder, "dataset_mmjax.json"), {"images": karpathy, "dataset": "mmjax"})
  image_folder = os.path.join(folder, "images")
  return {
      "captioning": task_spec(CaptioningTask(captions=coco, images=image_folder)),
      "captioning_karpathy": task_spec(CaptioningTask(captions=karpathy_file, images=folder,
                                                      split=_KARPATHY_SPLITS[split])),
      "retrieval": task_spec(RetrievalTask(captions=coco, images=image_folder)),
      "retrieval_karpathy": task_spec(RetrievalTask(captions=karpathy_file, images=folder,
                                                    split=_KARPATHY_SPLITS[split])),
  }


def shape_count_label(count: int) -> str:
  """The class label (and folder name) of a scene with `count` shapes: "1 shape", "2 shapes"."""
  return f"{count} shape" + ("" if count == 1 else "s")


def _write_classification(folder: str, records: list[tuple[int, dict]]) -> dict[str, str]:
  image_folder = os.path.join(folder, "images")
  labels = [shape_count_label(n) for n in range(1, MAX_OBJECTS + 1)]
  for label in labels:  # every class has a folder, with images or not
    os.makedirs(os.path.join(image_folder, label), exist_ok=True)
  labels_of_files = {}
  for image_id, record in records:
    label = shape_count_label(len(Scene.from_key(record["scenes"][0].decode()).shapes))
    name = f"{label}/{_IMAGE_NAME.format(image_id=image_id)}"
    _write(os.path.join(image_folder, *name.split("/")), bytes(record["images"][0]))
    labels_of_files[name] = label
  classes = _write_json(os.path.join(folder, "classes.json"),
                        {label: f"{word} shape" + ("" if n == 1 else "s")
                         for n, (label, word) in enumerate(zip(labels, _NUMBER_WORDS), start=1)})
  templates = os.path.join(folder, "templates.txt")
  _write(templates, "".join(t + "\n" for t in _TEMPLATES))
  labels_file = _write_json(os.path.join(folder, "labels.json"), labels_of_files)
  return {
      "classification": task_spec(ClassificationTask(images=image_folder, classes=classes, templates=templates)),
      "classification_labels": task_spec(ClassificationTask(images=image_folder, labels=labels_file,
                                                            classes=classes, templates=templates)),
  }


def write_embedded_tasks(target: str, data_dir: str | None = None, split: str = "validation") -> dict[str, str]:
  """Writes `split` of the embedded dataset in `data_dir` (built by `mmjax data build`) as the
  files of every task kind into `target` (new or empty); returns name -> spec of each form."""
  target = files.resolve(target)
  if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
    raise ValueError(f"target {target!r} exists and is not an empty folder; expected a new or empty one")
  if split not in _KARPATHY_SPLITS:
    raise ValueError(f"split={split!r}; expected one of {list(_KARPATHY_SPLITS)}")
  qa, captions = _records(data_dir, "qa", split), _records(data_dir, "captions", split)
  specs = {"vqa": _write_vqa(os.path.join(target, "vqa"), qa, split),
           **_write_captions(os.path.join(target, "captions"), captions, split),
           **_write_classification(os.path.join(target, "classification"), captions)}
  _write(os.path.join(target, "tasks.txt"), "".join(f"{name}: {spec}\n" for name, spec in specs.items()))
  return specs
