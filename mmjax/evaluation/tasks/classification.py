"""The `classification` task (zero-shot): labelled images, the class names and prompt templates.

The labels come in either published layout:

- an image folder with one sub-folder per class (ImageNet's `val/n01440764/...JPEG`, torchvision's
  `ImageFolder`): the label is the sub-folder's name, the classes are the sub-folders in
  sorted order (an empty one is still a class to choose from);
- a JSON object `{"<image file, relative to the folder>": "<label>", ...}` (`labels=`).

`classes=` names the classes: a JSON object `{"<label>": "<class name>", ...}` whose order is
the class order (ImageNet's `{"n01440764": "tench", ...}`); without it a label is its own name
with underscores as spaces. `templates=` is a text file of prompt templates, one a line, each
holding `{}` once where the class name goes; without it, CLIP's "a photo of a {}.".
Files that are not images by their extension (`IMAGE_EXTENSIONS`) and hidden files are left out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from mmjax.evaluation.tasks import files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
LABELS = '{"<image file>": "<label>", ...}'
CLASSES = '{"<label>": "<class name>", ...}'


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
  image_path: str
  label: int  # the index of its class in `ClassificationSet.labels`


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
  """Labelled images and the K classes a zero-shot classifier chooses among."""

  examples: tuple[ClassificationExample, ...]
  labels: tuple[str, ...]  # [K] as the files write them (sub-folder names, JSON labels)
  class_names: tuple[str, ...]  # [K] the names the prompts use
  templates: tuple[str, ...]  # each with one "{}"

  def prompts(self) -> list[list[str]]:
    """[K][templates] texts: every template filled with every class name."""
    return [[template.format(name) for template in self.templates] for name in self.class_names]


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _from_folders(folder: str) -> tuple[list[tuple[str, str]], list[str]]:
  """((image path, label) pairs, labels) of a folder with a sub-folder per class."""
  entries = sorted(os.listdir(folder))
  labels = [name for name in entries if not name.startswith(".") and os.path.isdir(os.path.join(folder, name))]
  stray = [name for name in entries if _is_image(name) and os.path.isfile(os.path.join(folder, name))]
  if stray:
    raise ValueError(f"{len(stray)} images lie directly in images folder {folder!r}, outside any class sub-folder: "
                     f"{files.first_few(stray)}; put them in one per class, or give labels=FILE")
  if not labels:
    raise ValueError(f"images folder {folder!r} has no sub-folders; expected one per class, or labels=FILE")
  pairs = [(os.path.join(folder, label, name), label) for label in labels
           for name in sorted(os.listdir(os.path.join(folder, label))) if _is_image(name)]
  if not pairs:
    raise ValueError(f"the class sub-folders of {folder!r} hold no images (files ending in {IMAGE_EXTENSIONS})")
  return pairs, labels


def _object_of_strings(path: str, role: str, form: str) -> dict[str, str]:
  """A JSON file holding a non-empty object whose values are strings."""
  document = files.read_json(path, role)
  if not isinstance(document, dict) or not document:
    held = "an empty object" if document == {} else f"a JSON {files.json_type(document)}"
    raise ValueError(f"{role} file {path!r} holds {held}; expected an object: {form}")
  for key in document:
    files.field(document, key, f"{role} file {path!r}", str)
  return document


def _from_labels_file(path: str, folder: str) -> tuple[list[tuple[str, str]], list[str]]:
  """((image path, label) pairs, sorted labels) of a JSON object image file -> label."""
  document = _object_of_strings(path, "labels", LABELS)
  pairs = [(os.path.join(folder, name), label) for name, label in document.items()]
  files.check_images([p for p, _ in pairs], folder, f"labels file {path!r}")
  return pairs, sorted({label for _, label in pairs})


def _class_names(path: str | None, labels: list[str]) -> tuple[list[str], list[str]]:
  """(labels in class order, class names): the classes file's, or the labels themselves."""
  if path is None:
    return labels, [label.replace("_", " ") for label in labels]
  document = _object_of_strings(path, "classes", CLASSES)
  unnamed = [label for label in labels if label not in document]
  if unnamed:
    raise ValueError(f"{len(unnamed)} labels of the images are not in classes file {path!r}: "
                     f"{files.first_few(unnamed)}")
  return list(document), list(document.values())


def _templates(path: str | None) -> tuple[str, ...]:
  if path is None:
    return DEFAULT_TEMPLATES
  if not os.path.isfile(path):
    raise ValueError(f"templates file {path!r} does not exist (or is not a file)")
  with open(path, encoding="utf-8-sig") as f:
    lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(f, start=1)]
  templates = [(number, line) for number, line in lines if line.strip()]
  for number, line in templates:
    rest = line.replace("{}", "", 1)
    if "{}" not in line or "{" in rest or "}" in rest:
      raise ValueError(f"templates file {path!r} line {number}: {line!r}; expected one '{{}}' where the class name "
                       "goes, and no other braces")
  if not templates:
    raise ValueError(f"templates file {path!r} has no template; expected one a line, such as 'a photo of a {{}}.'")
  return tuple(line for _, line in templates)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """Spec: `classification:images=DIR[,labels=PATH][,classes=PATH][,templates=PATH]`."""

  kind: ClassVar[str] = "classification"
  images: str  # a folder with a sub-folder per class, or the folder `labels` names files in
  labels: str | None = None  # a JSON object image file -> label
  classes: str | None = None  # a JSON object label -> class name, in class order
  templates: str | None = None  # a text file, one prompt template a line

  def load(self) -> ClassificationSet:
    folder = files.existing_folder(self.images, "images")
    if self.labels is None:
      pairs, labels = _from_folders(folder)
    else:
      pairs, labels = _from_labels_file(files.resolve(self.labels), folder)
    classes = None if self.classes is None else files.resolve(self.classes)
    labels, class_names = _class_names(classes, labels)
    templates = _templates(None if self.templates is None else files.resolve(self.templates))
    index = {label: i for i, label in enumerate(labels)}
    return ClassificationSet(
        examples=tuple(ClassificationExample(image_path=path, label=index[label]) for path, label in pairs),
        labels=tuple(labels), class_names=tuple(class_names), templates=templates)
