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

import codecs
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from mmjax import filelock
from mmjax.data import scenes as scenes_lib
from mmjax.data.preprocess import BAD_DATA_POLICIES
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.data.tokenizer import Tokenizer

MANIFEST = "mmjax_data.json"
DATA_LOCK = ".mmjax_data.lock"  # held by the process writing the data directory (`writing`)
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

# Why a JSONL record is not imported; `import_jsonl` counts skipped records under these.
IMPORT_BAD_REASONS = (
    "invalid JSON",            # the line does not parse as JSON
    "not UTF-8",               # the line's bytes are not UTF-8
    "wrong type",              # the record, or one of its fields, has the wrong JSON type
    "missing field",           # neither 'text' nor LLaVA's 'conversations'
    "wrong value",             # a conversation turn from someone other than human or gpt
    "duplicate id",            # an id an earlier record of the same split already has
    "image outside --images",  # an image path resolving (symlinks followed) outside the folder
)
# An image path inside the folder naming no file: counted apart, since with bad_data="skip"
# its record is kept (with an empty image, which the pipeline's bad-data policy handles).
IMAGES_MISSING = "images missing"


class BadJsonlRecord(ValueError):
  """A JSONL line that cannot be imported: `FILE:LINE: <reason>...`, and the reason alone."""

  def __init__(self, where: str, reason: str, message: str):
    super().__init__(f"{where}: {message}")
    self.where, self.reason = where, reason


@dataclasses.dataclass(frozen=True)
class JsonlRecord:
  """One importable line of a JSONL file."""
  where: str                # FILE:LINE
  record_id: str            # "<dataset>/<split>/<the record's id, else its line number>"
  text: str
  images: tuple[str, ...]   # real paths, all inside the image folder
  missing: tuple[str, ...]  # the image paths, as the record writes them, that are not files


@dataclasses.dataclass
class ImageTextFolderConfig(tfds.core.BuilderConfig):
  """A folder of image files and one JSONL file of records per split.

  `name` is the tfds folder's (unique per import, so that a new import never reuses or
  overwrites an old folder); `dataset_name` is the name records are imported under.
  """
  jsonl: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_dir: str = ""
  dataset_name: str = ""


def _described(value) -> str:
  text = json.dumps(value)
  return f"{type(value).__name__} ({text if len(text) <= 40 else text[:37] + '...'})"


def _wrong_type(where: str, what: str, value, expected: str) -> BadJsonlRecord:
  return BadJsonlRecord(where, "wrong type",
                        f"wrong type: {what} is {_described(value)}; expected {expected}")


def _image_list(record: Mapping, key: str, where: str, single_allowed: bool = False) -> list[str]:
  """The image paths under `key` (absent: none): a list of strings, or one string where
  the form allows it (LLaVA's `image`)."""
  images = record.get(key, [])
  if single_allowed and isinstance(images, str):
    return [images]
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    expected = "a file name or a list of them" if single_allowed else "a list of file names"
    raise _wrong_type(where, repr(key), images, expected)
  return images


def jsonl_record_text(record, where: str) -> tuple[list[str], str]:
  """(image paths, text) of one JSONL record, plain or LLaVA-conversation form.

  Plain: `{"images": ["a.jpg", ...], "text": "... <image> ..."}`, `images` a list.
  LLaVA: `{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}` becomes `"User: <image>\\n...\\nAssistant: ...<|endofchunk|>"`,
  with `<image>` put first when the conversation does not place it (LLaVA's convention);
  `image` may be one file name or a list, `images` a list. Either form may carry an `id`
  (a string or an integer). Raises `BadJsonlRecord` naming `where` otherwise.
  """
  if not isinstance(record, dict):
    raise _wrong_type(where, "the record", record, "a JSON object")
  given_id = record.get("id", "")
  if isinstance(given_id, bool) or not isinstance(given_id, (str, int)):
    raise _wrong_type(where, "'id'", given_id, "a string or an integer")
  if "conversations" in record:
    images = (_image_list(record, "image", where, single_allowed=True) if "image" in record
              else _image_list(record, "images", where))
    turns = record["conversations"]
    if not isinstance(turns, list):
      raise _wrong_type(where, "'conversations'", turns, "a list of turns")
    parts = []
    for turn_number, turn in enumerate(turns, start=1):
      if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
              and isinstance(turn.get("value"), str)):
        raise _wrong_type(where, f"conversation turn {turn_number}", turn,
                          'an object with string "from" and "value"')
      role = turn["from"]
      if role in ("human", "user"):
        parts.append(f"User: {turn['value']}\n")
      elif role in ("gpt", "assistant"):
        parts.append(f"Assistant: {turn['value']}{END_OF_CHUNK_TOKEN}")
      else:
        raise BadJsonlRecord(where, "wrong value", f"wrong value: conversation turn {turn_number} "
                             f"is from {role!r}; expected human (user) or gpt (assistant)")
    text = "".join(parts)
    if images and IMAGE_TOKEN not in text:
      text = IMAGE_TOKEN * len(images) + text
    return images, text
  if "text" not in record:
    raise BadJsonlRecord(where, "missing field", f"missing field: the record has keys "
                         f"{sorted(record)}; expected 'text' (and 'images') or LLaVA's "
                         "'conversations'")
  if not isinstance(record["text"], str):
    raise _wrong_type(where, "'text'", record["text"], "a string")
  return _image_list(record, "images", where), record["text"]


def _parse_line(raw: bytes, where: str) -> object:
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise BadJsonlRecord(where, "not UTF-8", f"not UTF-8 (byte 0x{raw[error.start]:02x} at "
                         f"column {error.start + 1}: {error.reason})") from None
  try:
    # Without its line break, so that a string left open reads as such.
    return json.loads(line.rstrip("\r\n"))
  except json.JSONDecodeError as error:
    raise BadJsonlRecord(where, "invalid JSON",
                         f"invalid JSON ({error.msg}: column {error.colno})") from None


def _image_paths(paths: list[str], image_root: str, where: str) -> tuple[tuple, tuple]:
  """(real paths, the paths naming no file) of a record's images; raises for any path
  that resolves outside `image_root` (a real path)."""
  real_paths, missing = [], []
  for path in paths:
    real = os.path.realpath(os.path.join(image_root, path))
    if os.path.commonpath([real, image_root]) != image_root:
      raise BadJsonlRecord(where, "image outside --images", f"image outside --images: {path!r} "
                           f"resolves to {real}, which is not under {image_root}")
    real_paths.append(real)
    if not os.path.isfile(real):
      missing.append(path)
  return tuple(real_paths), tuple(missing)


def read_jsonl(path: str, name: str, split: str,
               image_dir: str) -> Iterator[JsonlRecord | BadJsonlRecord]:
  """Every non-blank line of a JSONL file, as a record or as the error saying why it is not one.

  Errors are yielded, not raised, so that the caller applies its bad-data policy. Lines
  are decoded one by one, so one non-UTF-8 line spoils only itself. A record repeating the
  id of an earlier one is an error; the earlier one stays. Image paths are relative to
  `image_dir` and must stay inside it once symlinks are followed.
  """
  image_root = os.path.realpath(image_dir)
  first_line_of_id = {}
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      if line_number == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
      if not raw.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = _parse_line(raw, where)
        paths, text = jsonl_record_text(record, where)
        key = record.get("id", line_number)
        record_id = f"{name}/{split}/{key}"
        if record_id in first_line_of_id:
          raise BadJsonlRecord(where, "duplicate id", f"duplicate id {str(key)!r}, first at "
                               f"{path}:{first_line_of_id[record_id]}")
        images, missing = _image_paths(paths, image_root, where)
      except BadJsonlRecord as error:
        yield error
        continue
      first_line_of_id[record_id] = line_number
      yield JsonlRecord(where, record_id, text, images, missing)


def _read_image(path: str, where: str) -> bytes:
  try:
    with open(path, "rb") as image_file:
      return image_file.read()
  except OSError as error:
    # Kept as an unreadable image: the pipeline's bad-data policy decides.
    _log.warning("%s: image %s cannot be read: %s", where, path, error)
    return b""


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
    config = self.builder_config
    for record in read_jsonl(path, config.dataset_name or config.name, split, config.image_dir):
      if isinstance(record, BadJsonlRecord):
        continue  # `import_jsonl` applied the bad-data policy to it before the build
      yield record.record_id, {"id": record.record_id, "text": record.text,
                               "images": [_read_image(p, record.where) for p in record.images]}


# ---------------------------------------------------------------- the manifest

def read_manifest(data_dir: str | None = None) -> dict:
  data_dir = data_dir or default_data_dir()
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise ValueError(f"no dataset in {data_dir!r} ({MANIFEST} missing); run "
                     f"`mmjax data build --data-dir {data_dir}` first")
  try:
    with open(path, "rb") as f:
      manifest = json.loads(f.read().decode("utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), dict):
      raise ValueError("expected an object with a 'datasets' object")
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ValueError(f"the data directory's manifest {path} is unreadable ({e}); it lists the datasets and "
                     "tokenizer of the directory, so it was left as it is: restore it (each dataset is a folder "
                     "under the directory) or move it away to start the directory afresh") from None
  return manifest


def _write_manifest(data_dir: str, manifest: dict) -> None:
  """Replaces the manifest whole (a temporary file of this process, synced, then renamed)."""
  filelock.atomic_write(os.path.join(data_dir, MANIFEST),
                        json.dumps(manifest, indent=2, sort_keys=True).encode())


def _manifest_or_empty(data_dir: str) -> dict:
  """The manifest, or an empty one where there is none yet (an unreadable one raises)."""
  if not os.path.exists(os.path.join(data_dir, MANIFEST)):
    return {"datasets": {}}
  return read_manifest(data_dir)


@contextlib.contextmanager
def writing(data_dir: str, log: Callable[[str], None] = _log.warning):
  """Holds the data directory for a writer (`build_embedded`, `import_jsonl`): a second
  writer waits (saying for whom) rather than racing it for the manifest."""
  os.makedirs(data_dir, exist_ok=True)
  lock = filelock.HolderLock(os.path.join(data_dir, DATA_LOCK))
  if not lock.acquire(blocking=False):
    log(f"waiting for {lock.holder()} to finish writing {data_dir}")
    lock.acquire(blocking=True)
  try:
    yield
  finally:
    lock.release()


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
  with writing(data_dir, log):
    return _build_embedded(data_dir, size, image_size, seed, vocab_size, log)


def _build_embedded(data_dir: str, size: int, image_size: int, seed: int, vocab_size: int,
                    log: Callable[[str], None]) -> BuildResult:
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


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """What `import_jsonl` did."""
  path: str                     # the dataset's tfds folder
  records: dict[str, int]       # split -> records imported
  skipped: dict[str, int]       # reason (IMPORT_BAD_REASONS) -> records skipped
  first_skipped: dict[str, str]  # reason -> the error of its first record: "FILE:LINE: ..."
  images_missing: int           # image files not found: their records keep an empty image
  tokenizer: str                # the data directory's tokenizer
  tokenizer_trained: bool       # whether this import trained it
  replaced: str | None          # the folder of the dataset this one replaced (removed)


def _records(count: int) -> str:
  return f"{count} record" + ("" if count == 1 else "s")


def _split_counts(folder: str) -> str:
  """The record count of each split of a tfds folder: "train: 2 records, test: 1 record"."""
  try:
    splits = tfds.builder_from_directory(folder).info.splits
  except (ValueError, OSError) as error:
    return f"record counts unreadable: {error}"
  return ", ".join(f"{split}: {_records(info.num_examples)}" for split, info in splits.items())


def _check_records(name: str, jsonl: Mapping[str, str], image_dir: str, bad_data: str) -> dict:
  """Reads every JSONL file once, before anything is written, applying `bad_data`.

  Returns the counts of `ImportResult` (records, skipped, first_skipped, images_missing).
  With "raise" the first bad record raises; with "skip" it is counted. A file left
  without a record raises in both.
  """
  records, skipped, first_skipped, images_missing = {}, {}, {}, 0
  for split, path in jsonl.items():
    kept, skipped_here, first_here = 0, {}, {}
    for record in read_jsonl(path, name, split, image_dir):
      if isinstance(record, BadJsonlRecord):
        if bad_data == "raise":
          raise record
        skipped_here[record.reason] = skipped_here.get(record.reason, 0) + 1
        first_here.setdefault(record.reason, str(record))
        continue
      if record.missing:
        if bad_data == "raise":
          raise BadJsonlRecord(record.where, IMAGES_MISSING, f"{IMAGES_MISSING}: "
                               f"{record.missing[0]!r} is not a file in {image_dir}")
        images_missing += len(record.missing)
      kept += 1
    if not kept:
      why = ("; ".join(f"{reason} {count}, first at {first_here[reason]}"
                       for reason, count in skipped_here.items()))
      why = f"{sum(skipped_here.values())} skipped: {why}" if why else "it is empty"
      raise ValueError(f"no usable records in {path} ({why})")
    records[split] = kept
    for reason, count in skipped_here.items():
      skipped[reason] = skipped.get(reason, 0) + count
      first_skipped.setdefault(reason, first_here[reason])
  return dict(records=records, skipped=skipped, first_skipped=first_skipped,
              images_missing=images_missing)


def _train_tokenizer(data_dir: str, name: str, texts: list[str], vocab_size: int) -> str:
  """Trains a tokenizer into a file named by a hash of its bytes; returns the file name.

  No existing file is ever rewritten (a training run elsewhere may be reading it): a
  file of the same name already holds the same bytes.
  """
  handle, tmp = tempfile.mkstemp(prefix=f".tokenizer_{name}_", suffix=".tmp", dir=data_dir)
  os.close(handle)
  try:
    Tokenizer.train(texts, vocab_size, tmp)
    with open(tmp, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()[:10]
    file_name = f"tokenizer_{name}_v{vocab_size}_{digest}.model"
    if not os.path.exists(os.path.join(data_dir, file_name)):
      os.replace(tmp, os.path.join(data_dir, file_name))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return file_name


def _remove_dataset_folder(data_dir: str, folder: str) -> None:
  """Removes a tfds folder inside `data_dir`, then its parents left empty.

  A folder elsewhere (a manifest edited by hand) is left alone, with a warning.
  """
  data_dir, folder = os.path.realpath(data_dir), os.path.realpath(folder)
  if os.path.commonpath([data_dir, folder]) != data_dir or folder == data_dir:
    _log.warning("dataset folder %s is not inside the data directory %s: not removed",
                 folder, data_dir)
    return
  shutil.rmtree(folder, ignore_errors=True)
  parent = os.path.dirname(folder)
  while parent != data_dir and os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)
    parent = os.path.dirname(parent)


def import_jsonl(data_dir: str | None, name: str, jsonl: Mapping[str, str], image_dir: str,
                 retrain_tokenizer: bool = False, vocab_size: int = DEFAULT_VOCAB_SIZE,
                 bad_data: str = "skip", overwrite: bool = False) -> ImportResult:
  """Turns JSONL records (one file per split) plus an image folder into dataset `name`.

  Each line of a JSONL file is a record in the form `jsonl_record_text` reads; image
  paths are relative to `image_dir` and must stay inside it (symlinks followed).

  Every file is read before anything is written. A bad record (`IMPORT_BAD_REASONS`: a
  line that is not UTF-8 or not JSON, a field of the wrong type or missing, a duplicate
  id, an image outside `image_dir`) is skipped and counted (`bad_data="skip"`), or raises
  `BadJsonlRecord` naming FILE:LINE (`"raise"`). An image path naming no file raises with
  "raise"; with "skip" it is counted (`images_missing`) and its record kept with an empty
  image, which the pipeline's own bad-data policy skips or raises on. A file without a
  usable record raises `ValueError` either way.

  A dataset already named `name` is refused unless `overwrite`. The new one is built in
  a fresh folder, and only then does the manifest switch to it and the old folder go, so
  a failed or interrupted import leaves the old dataset and the manifest as they were.

  The data directory's tokenizer is kept unless there is none or `retrain_tokenizer`:
  then one is trained on the imported training text (all of it when there is no train
  split) into a new file, and the manifest switches to it; an old file is never rewritten.
  """
  if not name.isidentifier() or name in KINDS:
    raise ValueError(f"name={name!r}; expected an identifier other than {KINDS}")
  if bad_data not in BAD_DATA_POLICIES:
    raise ValueError(f"bad_data={bad_data!r}; expected one of {BAD_DATA_POLICIES}")
  if not jsonl:
    raise ValueError("jsonl={}; expected at least one split and its JSONL file")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  image_dir = os.path.abspath(os.path.expanduser(image_dir))
  jsonl = {split: os.path.abspath(os.path.expanduser(path)) for split, path in jsonl.items()}
  missing = [p for p in jsonl.values() if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"JSONL files {missing} do not exist (or are not files)")
  if not os.path.isdir(image_dir):
    raise ValueError(f"image folder {image_dir} is not a directory")
  with writing(data_dir):
    return _import_locked(data_dir, name, jsonl, image_dir, retrain_tokenizer=retrain_tokenizer,
                          vocab_size=vocab_size, bad_data=bad_data, overwrite=overwrite)


def _import_locked(data_dir: str, name: str, jsonl: Mapping[str, str], image_dir: str, *, retrain_tokenizer: bool,
                   vocab_size: int, bad_data: str, overwrite: bool) -> ImportResult:
  manifest = _manifest_or_empty(data_dir)
  old_folder = manifest["datasets"].get(name)
  old_folder = os.path.join(data_dir, old_folder) if old_folder else None
  if old_folder and not os.path.isdir(old_folder):
    old_folder = None  # named by the manifest but gone: nothing to keep
  if old_folder and not overwrite:
    raise ValueError(f"dataset {name!r} already exists in {data_dir}: {old_folder} "
                     f"({_split_counts(old_folder)}); pass --overwrite to replace it, or pick "
                     "another --name")
  counts = _check_records(name, jsonl, image_dir, bad_data)

  os.makedirs(data_dir, exist_ok=True)
  config = ImageTextFolderConfig(name=f"{name}_{uuid.uuid4().hex[:8]}", dataset_name=name,
                                 jsonl=jsonl, image_dir=image_dir)
  builder = ImageTextFolder(config=config, data_dir=data_dir, file_format="array_record")
  tokenizer_file = manifest.get("tokenizer")
  try:
    folder = _prepare(builder)
    train_tokenizer = retrain_tokenizer or not tokenizer_file
    if train_tokenizer:
      splits = ["train"] if "train" in jsonl else list(jsonl)
      texts = [record.text for split in splits
               for record in read_jsonl(jsonl[split], name, split, image_dir)
               if isinstance(record, JsonlRecord)]
      tokenizer_file = _train_tokenizer(data_dir, name, texts, vocab_size)
    # Read again (cheap): the manifest is only ever rewritten under `writing`.
    manifest = _manifest_or_empty(data_dir)
    manifest["datasets"][name] = folder
    manifest["tokenizer"] = tokenizer_file
    _write_manifest(data_dir, manifest)
  except BaseException:
    _remove_dataset_folder(data_dir, str(builder.data_dir))
    raise
  if old_folder and os.path.relpath(old_folder, data_dir) not in manifest["datasets"].values():
    _remove_dataset_folder(data_dir, old_folder)
  return ImportResult(path=os.path.join(data_dir, folder),
                      tokenizer=os.path.join(data_dir, tokenizer_file),
                      tokenizer_trained=train_tokenizer, replaced=old_folder, **counts)
