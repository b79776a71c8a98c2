"""tensorflow-datasets builders writing ArrayRecord, and the data directory's manifest.

Every dataset, embedded or brought by the user, has the same record format, which the
pipeline reads:

  id      text   names the record in errors and logs ("qa/train/000042", "mine/train/7")
  images  sequence of encoded image bytes (PNG, JPEG, ... whatever PIL reads), decoded by
          the pipeline: TensorFlow is not needed to write or to read
  text    text with one `<image>` per image, in order; `<|endofchunk|>` ends the text
          about an image

The embedded dataset (`MmjaxShapes`) adds `kind`, `question`, `answer` (empty unless
kind == "qa") and `scenes` (the exact key of each scene, to prove the splits disjoint).

A data directory holds the tfds folders, the tokenizer and `mmjax_data.json`, a manifest
naming each dataset (`captions`, `interleaved`, `qa`, and any imported one) and the
tokenizer, so that the pipeline opens datasets by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import scenes as scenes_lib
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.data.tokenizer import Tokenizer

MANIFEST = "mmjax_data.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "validation", "test")
KINDS = ("captions", "interleaved", "qa")
DEFAULT_SIZE = 4000
DEFAULT_IMAGE_SIZE = 64
DEFAULT_VOCAB_SIZE = 256
_BUILD_FORMAT = 2  # bump when the generator changes, so stale builds are rebuilt

_log = logging.getLogger(__name__)


def default_data_dir() -> str:
  """`$MMJAX_DATA_DIR`, else `~/.cache/mmjax/data`."""
  return os.environ.get("MMJAX_DATA_DIR") or os.path.expanduser("~/.cache/mmjax/data")


def _common_features(**extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "text": tfds.features.Text(),
      **extra,
  })


# ---------------------------------------------------------------- the embedded dataset

def split_size(size: int, split: str, kind: str) -> int:
  """Records of a kind in a split: `size` for train, a tenth (at least 20) otherwise;
  half as many interleaved documents (each holds 2-5 images)."""
  n = size if split == "train" else max(size // 10, 20)
  return max(n // 2, 10) if kind == "interleaved" else n


@functools.lru_cache(maxsize=4)
def plan(size: int, image_size: int, seed: int) -> dict[tuple[str, str], list[dict]]:
  """Every record of every (split, kind), images still as `Scene`s (cheap to hold).

  Splits are drawn from different seeds, and a validation or test scene whose key
  already appears in an earlier split is redrawn, so no scene repeats across splits.
  """
  out, seen = {}, set()
  for split_index, split in enumerate(SPLITS):
    split_keys = set()
    for kind_index, kind in enumerate(KINDS):
      rng = np.random.default_rng([seed, split_index, kind_index])

      def fresh_scene(rng=rng, split_keys=split_keys):
        while True:
          scene = scenes_lib.sample_scene(rng, image_size)
          if scene.key not in seen:
            split_keys.add(scene.key)
            return scene

      records = []
      for i in range(split_size(size, split, kind)):
        record = {"id": f"{kind}/{split}/{i:06d}", "kind": kind, "question": "", "answer": ""}
        if kind == "captions":
          scene = fresh_scene()
          record.update(scenes=[scene], text=IMAGE_TOKEN + scenes_lib.caption(scene, rng) + END_OF_CHUNK_TOKEN)
        elif kind == "qa":
          scene, (_, question, answer) = scenes_lib.sample_balanced_question(
              rng, image_size, accept=lambda scene: scene.key not in seen)
          split_keys.add(scene.key)
          record.update(scenes=[scene], text=scenes_lib.qa_text(question, answer),
                        question=question, answer=answer)
        else:
          chunk_scenes = [fresh_scene() for _ in range(int(rng.integers(2, 6)))]
          record.update(scenes=chunk_scenes, text=scenes_lib.interleaved_text(chunk_scenes, rng))
        records.append(record)
      out[(split, kind)] = records
    seen |= split_keys
  return out


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """One kind of the embedded dataset at one size, resolution and seed."""
  kind: str = "captions"
  size: int = DEFAULT_SIZE
  image_size: int = DEFAULT_IMAGE_SIZE
  seed: int = 0


def shapes_config(kind: str, size: int, image_size: int, seed: int) -> ShapesConfig:
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
  return ShapesConfig(name=f"{kind}_n{size}_px{image_size}_seed{seed}_f{_BUILD_FORMAT}",
                      kind=kind, size=size, image_size=image_size, seed=seed)


class MmjaxShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes of coloured shapes with captions, documents and questions."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for checksums beside the code, which for an installed package needs
  # `importlib_resources`; there is nothing to download, so there are no checksums.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=_common_features(
            kind=tfds.features.Text(), question=tfds.features.Text(),
            answer=tfds.features.Text(), scenes=tfds.features.Sequence(tfds.features.Text())))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated offline
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    config = self.builder_config
    for record in plan(config.size, config.image_size, config.seed)[(split, config.kind)]:
      yield record["id"], {
          **{k: record[k] for k in ("id", "kind", "question", "answer", "text")},
          "images": [scenes_lib.encode_png(scenes_lib.render(s)) for s in record["scenes"]],
          "scenes": [s.key for s in record["scenes"]],
      }


# ---------------------------------------------------------------- bring your own data

@dataclasses.dataclass
class ImageTextFolderConfig(tfds.core.BuilderConfig):
  """A folder of image files and one JSONL file of records per split."""
  jsonl: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_dir: str = ""


def jsonl_record_text(record: Mapping, where: str) -> tuple[list[str], str]:
  """(image paths, text) of one JSONL record, plain or LLaVA-conversation form.

  Plain: `{"images": ["a.jpg", ...], "text": "... <image> ..."}`.
  LLaVA: `{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}` becomes `"User: <image>\\n...\\nAssistant: ...<|endofchunk|>"`,
  with `<image>` put first when the conversation does not place it (LLaVA's convention).
  """
  if "conversations" in record:
    images = record.get("image", record.get("images", []))
    images = [images] if isinstance(images, str) else list(images)
    parts = []
    for turn in record["conversations"]:
      role = turn.get("from")
      if role in ("human", "user"):
        parts.append(f"User: {turn['value']}\n")
      elif role in ("gpt", "assistant"):
        parts.append(f"Assistant: {turn['value']}{END_OF_CHUNK_TOKEN}")
      else:
        raise ValueError(f"{where}: conversation turn from {role!r}; expected human or gpt")
    text = "".join(parts)
    if images and IMAGE_TOKEN not in text:
      text = IMAGE_TOKEN * len(images) + text
    return images, text
  if "text" not in record:
    raise ValueError(f"{where}: record has keys {sorted(record)}; expected 'text' (and "
                     "'images') or LLaVA's 'conversations'")
  images = record.get("images", [])
  return ([images] if isinstance(images, str) else list(images)), record["text"]


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
  """Your own image-text data: a folder of images plus JSONL records, one file per split."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for checksums beside the code, which for an installed package needs
  # `importlib_resources`; there is nothing to download, so there are no checksums.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_common_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, path)
            for split, path in self.builder_config.jsonl.items()}

  def _generate_examples(self, split, path):
    name, image_dir = self.builder_config.name, self.builder_config.image_dir
    with open(path) as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path}:{line_number}"
        record = json.loads(line)
        paths, text = jsonl_record_text(record, where)
        images = []
        for p in paths:
          full = p if os.path.isabs(p) else os.path.join(image_dir, p)
          try:
            with open(full, "rb") as image_file:
              images.append(image_file.read())
          except OSError:
            # Kept as an unreadable image: the pipeline's bad-data policy decides.
            _log.warning("%s: image %s cannot be read", where, full)
            images.append(b"")
        record_id = f"{name}/{split}/{record.get('id', line_number)}"
        yield record_id, {"id": record_id, "images": images, "text": text}


# ---------------------------------------------------------------- the manifest

def read_manifest(data_dir: str | None = None) -> dict:
  data_dir = data_dir or default_data_dir()
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise ValueError(f"no dataset in {data_dir!r} ({MANIFEST} missing); run "
                     f"`mmjax data build --data-dir {data_dir}` first")
  with open(path) as f:
    return json.load(f)


def _write_manifest(data_dir: str, manifest: dict) -> None:
  tmp = os.path.join(data_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(data_dir, MANIFEST))


def _manifest_or_empty(data_dir: str) -> dict:
  try:
    return read_manifest(data_dir)
  except ValueError:
    return {"datasets": {}}


def tokenizer_path(data_dir: str | None = None) -> str:
  data_dir = data_dir or default_data_dir()
  return os.path.join(data_dir, read_manifest(data_dir)["tokenizer"])


def load_tokenizer(data_dir: str | None = None) -> Tokenizer:
  """The tokenizer built with the data directory's dataset."""
  return Tokenizer.load(tokenizer_path(data_dir))


def dataset_names(data_dir: str | None = None) -> list[str]:
  return sorted(read_manifest(data_dir)["datasets"])


def open_split(data_dir: str | None, name: str, split: str):
  """Random-access source (`len`, `[i]` -> record dict) of one split of a named dataset."""
  data_dir = data_dir or default_data_dir()
  datasets = read_manifest(data_dir)["datasets"]
  if name not in datasets:
    raise ValueError(f"dataset {name!r} is not in {data_dir!r}; expected one of {sorted(datasets)}")
  builder = tfds.builder_from_directory(os.path.join(data_dir, datasets[name]))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} of {name!r}; expected one of {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


# ---------------------------------------------------------------- building

@dataclasses.dataclass(frozen=True)
class BuildResult:
  data_dir: str
  datasets: dict[str, str]  # name -> tfds folder
  tokenizer: str
  reused: bool
  seconds: float


def _prepare(builder: tfds.core.DatasetBuilder) -> str:
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return os.path.relpath(str(builder.data_dir), builder.data_dir_root)


def build_embedded(data_dir: str | None = None, size: int = DEFAULT_SIZE,
                   image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                   vocab_size: int = DEFAULT_VOCAB_SIZE,
                   log: Callable[[str], None] = _log.info) -> BuildResult:
  """Builds (or reuses) the three kinds of the embedded dataset and their tokenizer."""
  if size < 1 or image_size < 8:
    raise ValueError(f"size={size}, image_size={image_size}; expected size >= 1, image_size >= 8")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  os.makedirs(data_dir, exist_ok=True)
  start = time.time()
  params = {"size": size, "image_size": image_size, "seed": seed, "vocab_size": vocab_size,
            "format": _BUILD_FORMAT}
  manifest = _manifest_or_empty(data_dir)
  reused = (manifest.get("embedded") == params
            and all(os.path.isdir(os.path.join(data_dir, manifest["datasets"].get(k, "-")))
                    for k in KINDS)
            and os.path.exists(os.path.join(data_dir, manifest.get("tokenizer", "-"))))
  if not reused:
    for kind in KINDS:
      builder = MmjaxShapes(config=shapes_config(kind, size, image_size, seed),
                            data_dir=data_dir, file_format="array_record")
      manifest["datasets"][kind] = _prepare(builder)
      log(f"built {kind} in {time.time() - start:.1f}s")
    texts = [r["text"] for kind in KINDS for r in plan(size, image_size, seed)[("train", kind)]]
    tokenizer_file = f"tokenizer_n{size}_seed{seed}_v{vocab_size}.model"
    Tokenizer.train(texts, vocab_size, os.path.join(data_dir, tokenizer_file))
    manifest.update(embedded=params, tokenizer=tokenizer_file)
    _write_manifest(data_dir, manifest)
  return BuildResult(
      data_dir=data_dir,
      datasets={k: os.path.join(data_dir, manifest["datasets"][k]) for k in KINDS},
      tokenizer=os.path.join(data_dir, manifest["tokenizer"]),
      reused=reused, seconds=time.time() - start)


def import_jsonl(data_dir: str | None, name: str, jsonl: Mapping[str, str], image_dir: str,
                 retrain_tokenizer: bool = False, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """Turns JSONL records (one file per split) plus an image folder into dataset `name`.

  The data directory's tokenizer is kept unless there is none or `retrain_tokenizer`:
  then one is trained on the imported training text.
  """
  if not name.isidentifier() or name in KINDS:
    raise ValueError(f"name={name!r}; expected an identifier other than {KINDS}")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  os.makedirs(data_dir, exist_ok=True)
  missing = [p for p in jsonl.values() if not os.path.exists(p)]
  if missing:
    raise ValueError(f"JSONL files {missing} do not exist")
  config = ImageTextFolderConfig(name=name, jsonl={k: os.path.abspath(v) for k, v in jsonl.items()},
                                 image_dir=os.path.abspath(image_dir))
  builder = ImageTextFolder(config=config, data_dir=data_dir, file_format="array_record")
  manifest = _manifest_or_empty(data_dir)
  manifest["datasets"][name] = _prepare(builder)
  if retrain_tokenizer or "tokenizer" not in manifest:
    texts = [t for split, path in jsonl.items() if split == "train" or len(jsonl) == 1
             for t in _texts_of(path)]
    tokenizer_file = f"tokenizer_{name}_v{vocab_size}.model"
    Tokenizer.train(texts, vocab_size, os.path.join(data_dir, tokenizer_file))
    manifest["tokenizer"] = tokenizer_file
  _write_manifest(data_dir, manifest)
  return os.path.join(data_dir, manifest["datasets"][name])


def _texts_of(path: str) -> Iterator[str]:
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if line.strip():
        yield jsonl_record_text(json.loads(line), f"{path}:{line_number}")[1]
