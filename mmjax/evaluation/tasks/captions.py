"""The `captioning` and `retrieval` tasks: images and their reference captions.

Two published forms, told apart by the file's top level:

- COCO captions (`captions_val2014.json`): `{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`; the file is one split, images are `<folder>/<file_name>`.
- Karpathy's splits (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`):
  `{"images": [{"filename", "filepath", "split", "imgid", "cocoid", "sentences": [{"raw",
  "tokens"}]}]}`, every split in one file, so `split` ("train", "restval", "val", "test")
  picks one; images are `<folder>/<filepath>/<filename>` (Flickr has no `filepath`:
  `<folder>/<filename>`), the image id is `cocoid` where there is one, else `imgid`.

Captioning scores a generated caption per image against its references (`captions.caption_metrics`);
retrieval ranks every caption for every image and back (`RetrievalSet.recall`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from mmjax.evaluation.retrieval import RECALL_AT, recall_at
from mmjax.evaluation.tasks import files

COCO_CAPTIONS = '{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}'
KARPATHY = ('{"images": [{"filename", "filepath", "split", "imgid", "cocoid", "sentences": [{"raw", "tokens"}, ...]}, '
            '...]}')


@dataclasses.dataclass(frozen=True)
class CaptionExample:
  """One image and its reference captions."""

  image_id: Hashable
  image_path: str
  captions: tuple[str, ...]  # as written (COCO's "caption", Karpathy's "raw")


def _coco_examples(path: str, document: dict, folder: str) -> list[CaptionExample]:
  files_by_id = {}
  for i, record in enumerate(files.top_level_list(document, "images", path, "captions", COCO_CAPTIONS)):
    where = f"{path}: images[{i}]"
    image_id = files.field(record, "id", where, int, str)
    if image_id in files_by_id:
      raise ValueError(f"{where}: image id {image_id!r} appears twice")
    files_by_id[image_id] = files.field(record, "file_name", where, str)
  captions = {image_id: [] for image_id in files_by_id}
  unknown = []
  for i, record in enumerate(files.top_level_list(document, "annotations", path, "captions", COCO_CAPTIONS)):
    where = f"{path}: annotations[{i}]"
    image_id = files.field(record, "image_id", where, int, str)
    caption = files.field(record, "caption", where, str)
    if image_id in captions:
      captions[image_id].append(caption)
    else:
      unknown.append(image_id)
  if unknown:
    raise ValueError(f"{len(unknown)} captions of {path!r} are of image ids that are not in its 'images': "
                     f"{files.first_few(unknown)}")
  uncaptioned = [image_id for image_id, given in captions.items() if not given]
  if uncaptioned:
    raise ValueError(f"{len(uncaptioned)} images of {path!r} have no caption in its 'annotations': "
                     f"{files.first_few(uncaptioned)}")
  return [CaptionExample(image_id=image_id, image_path=os.path.join(folder, files_by_id[image_id]),
                         captions=tuple(given)) for image_id, given in captions.items()]


def _karpathy_examples(path: str, document: dict, folder: str, split: str | None) -> list[CaptionExample]:
  records = files.top_level_list(document, "images", path, "captions", KARPATHY)
  splits = sorted({files.field(record, "split", f"{path}: images[{i}]", str) for i, record in enumerate(records)})
  if split is None:
    raise ValueError(f"captions file {path!r} holds Karpathy's splits {splits}: add split=NAME to pick one")
  if split not in splits:
    raise ValueError(f"split={split!r} is not in captions file {path!r}; expected one of {splits}")
  examples, seen = [], set()
  for i, record in enumerate(records):
    if record["split"] != split:
      continue
    where = f"{path}: images[{i}]"
    image_id = files.field(record, "cocoid" if "cocoid" in record else "imgid", where, int, str)
    if image_id in seen:
      raise ValueError(f"{where}: image id {image_id!r} appears twice")
    seen.add(image_id)
    subfolder = files.field(record, "filepath", where, str) if "filepath" in record else ""
    sentences = files.field(record, "sentences", where, list)
    if not sentences:
      raise ValueError(f"{where}: image id {image_id!r} has no sentences")
    captions = tuple(files.field(s, "raw", f"{where}.sentences[{k}]", str) for k, s in enumerate(sentences))
    examples.append(CaptionExample(image_id=image_id, captions=captions,
                                   image_path=os.path.join(folder, subfolder, files.field(record, "filename", where,
                                                                                          str))))
  return examples


def read_captions(captions: str, images: str, split: str | None = None) -> list[CaptionExample]:
  """The images of a COCO captions file or of one split of a Karpathy file, with their
  captions, in the file's order; every image file checked to exist."""
  folder = files.existing_folder(images, "images")
  path = files.resolve(captions)
  document = files.read_json(path, "captions")
  if isinstance(document, dict) and "annotations" in document:
    if split is not None:
      raise ValueError(f"split={split!r}, but captions file {path!r} is in COCO's form, which is one split: "
                       "leave split out")
    examples = _coco_examples(path, document, folder)
  elif (isinstance(document, dict) and isinstance(document.get("images"), list) and document["images"]
        and isinstance(document["images"][0], dict) and "sentences" in document["images"][0]):
    examples = _karpathy_examples(path, document, folder, split)
  else:
    found = (f"the top-level keys {sorted(document)}" if isinstance(document, dict)
             else f"a JSON {files.json_type(document)} at top level")
    raise ValueError(f"captions file {path!r} has {found}; expected 'images' and 'annotations' (COCO: "
                     f"{COCO_CAPTIONS}) or 'images' with 'sentences' (Karpathy: {KARPATHY})")
  files.check_images([e.image_path for e in examples], folder, f"captions file {path!r}")
  return examples


@dataclasses.dataclass(frozen=True)
class CaptioningTask:
  """Spec: `captioning:captions=PATH,images=DIR[,split=NAME]` (`split` for Karpathy files only)."""

  kind: ClassVar[str] = "captioning"
  captions: str  # a COCO captions file or a Karpathy split file
  images: str  # the folder the file names images under (COCO's `val2014/`, Karpathy's root)
  split: str | None = None  # the Karpathy split

  def load(self) -> list[CaptionExample]:
    return read_captions(self.captions, self.images, self.split)


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
  """Images and captions, each caption knowing its image (I images, C captions)."""

  image_ids: tuple[Hashable, ...]  # [I]
  image_paths: tuple[str, ...]  # [I]
  captions: tuple[str, ...]  # [C], grouped by image in image order
  caption_image_index: np.ndarray  # int [C]: the index of the image each caption describes

  def recall(self, similarity: np.ndarray, ks=RECALL_AT) -> dict[str, dict[int, float]]:
    """Recall@k both ways from `similarity` [I, C] (image i against caption c):
    "image_to_text" (an image finds one of its captions) and "text_to_image"."""
    expected = (len(self.image_paths), len(self.captions))
    if np.shape(similarity) != expected:
      raise ValueError(f"similarity has shape {np.shape(similarity)}; expected [images, captions] = {expected}")
    correct = self.caption_image_index[None, :] == np.arange(expected[0])[:, None]  # [I, C]
    return {"image_to_text": recall_at(similarity, correct, ks),
            "text_to_image": recall_at(np.transpose(similarity), np.transpose(correct), ks)}


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  """Spec: `retrieval:captions=PATH,images=DIR[,split=NAME]`, the files of `captioning`."""

  kind: ClassVar[str] = "retrieval"
  captions: str
  images: str
  split: str | None = None

  def load(self) -> RetrievalSet:
    examples = read_captions(self.captions, self.images, self.split)
    return RetrievalSet(
        image_ids=tuple(e.image_id for e in examples), image_paths=tuple(e.image_path for e in examples),
        captions=tuple(c for e in examples for c in e.captions),
        caption_image_index=np.array([i for i, e in enumerate(examples) for _ in e.captions], np.int32))
