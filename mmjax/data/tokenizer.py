"""The tokenizer: a sentencepiece model or a `tokenizer.json`, one interface, ids by name.

Special tokens: padding, BOS, EOS, `<unk>`, and `<image>` and `<|endofchunk|>`, each a
single id wherever it appears in the text. `encode` adds neither BOS nor EOS (the pipeline
does, once per example).

Two backends (`Vocabulary`) sit behind `Tokenizer`, chosen by the bytes it is given, not by
a file name (a work directory keeps its copy as `tokenizer.model` whatever it holds, and the
families build the tokenizer from those bytes):

  sentencepiece   a `.model` (LLaMA, Vicuna, Mistral, Yi; mmjax's own, from `Tokenizer.train`).
                  `<pad>` is id 0 in the ones mmjax trains.
  tokenizer.json  Hugging Face `tokenizers` (MPT and RedPajama's GPT-NeoX BPE, OPT's GPT-2
                  byte-level BPE, Qwen's): `mmjax.data.tokenizer_json`, which also says how
                  BOS, EOS and padding are found in a file that does not name them.

`Tokenizer.load` takes either file, or a directory holding `tokenizer.model` or
`tokenizer.json` (a Hugging Face model directory; with both, the `.model`: it is the
original the LM was trained with, the json transformers' conversion of it). When the
vocabulary lacks `<image>`, `<|endofchunk|>` or a padding token (LLaMA's, GPT-2's), they
are appended after its largest id, so the ids of existing tokens do not move; a vocabulary
that has them keeps their ids.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

from mmjax import filelock
from mmjax.data import tokenizer_json
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

SPECIAL_TOKENS = (IMAGE_TOKEN, END_OF_CHUNK_TOKEN)
# The files `Tokenizer.load` looks for in a directory, in order of preference.
DIRECTORY_FILES = ("tokenizer.model", "tokenizer.json")
_EXPECTED = ("expected a sentencepiece .model, a Hugging Face tokenizer.json, or a directory holding "
             f"{' or '.join(DIRECTORY_FILES)}")


class Vocabulary(Protocol):
  """What a backend gives `Tokenizer`: special tokens already added, ids >= 0 (unk: -1 if none)."""

  kind: str
  vocab_size: int  # the largest id + 1
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int
  image_id: int
  end_of_chunk_id: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def id_to_piece(self, i: int) -> str: ...


class Tokenizer:
  """A `Vocabulary` built from a file's bytes; picklable (grain workers receive a copy)."""

  def __init__(self, content: bytes):
    """`content`: a sentencepiece model's or a tokenizer.json's bytes (told apart by them)."""
    self._content = bytes(content)
    self._vocab = _vocabulary(self._content)
    self.kind = self._vocab.kind
    self.pad_id = int(self._vocab.pad_id)
    self.bos_id = int(self._vocab.bos_id)
    self.eos_id = int(self._vocab.eos_id)
    self.unk_id = int(self._vocab.unk_id)
    self.image_id = int(self._vocab.image_id)
    self.end_of_chunk_id = int(self._vocab.end_of_chunk_id)
    for name in ("pad_id", "bos_id", "eos_id", "image_id", "end_of_chunk_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"tokenizer has {name}={getattr(self, name)}; expected an id >= 0")
    if self.pad_id in (self.bos_id, self.eos_id, self.image_id, self.end_of_chunk_id):
      raise ValueError(f"tokenizer has pad_id={self.pad_id}, the id of another special token; expected its own "
                       "id (the loss mask drops every padding target)")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a `.model`, a `tokenizer.json` or a directory holding one (special tokens added if missing)."""
    file = resolve_file(path)
    with open(file, "rb") as f:
      content = f.read()
    try:
      return cls(content)
    except ValueError as e:
      raise ValueError(f"cannot load the tokenizer {file!r}: {e}") from None

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Trains a sentencepiece model on `texts`, writes it to `path` and returns it.

    `vocab_size` is an upper bound: a small corpus (the embedded dataset has a few dozen
    words) yields fewer pieces rather than failing.
    """
    texts = list(texts)
    proto = _train_proto(texts, vocab_size)
    if not proto:
      raise ValueError(f"sentencepiece produced an empty model from {len(texts)} texts")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Whole or not at all: a reader of the data directory never sees half a model.
    filelock.atomic_write(str(path), proto)
    return cls(proto)

  @property
  def vocab_size(self) -> int:
    """The largest id + 1: the number of embedding rows a model needs."""
    return int(self._vocab.vocab_size)

  def encode(self, text: str) -> list[int]:
    """Text (which may contain `<image>` and `<|endofchunk|>`) -> ids, no BOS/EOS."""
    return self._vocab.encode(text)

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt as the pipeline's training sequences begin: BOS, then `encode(text)`.

    Feed a model trained on mmjax's pipeline this, not `encode`: without the BOS it
    sees a context it never saw in training (every training sequence starts with one).
    """
    return [self.bos_id] + self.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; padding, BOS and EOS are dropped, `<image>` etc. kept as strings."""
    drop = {self.pad_id, self.bos_id, self.eos_id}
    return self._vocab.decode([int(i) for i in ids if int(i) not in drop])

  def id_to_piece(self, i: int) -> str:
    return self._vocab.id_to_piece(int(i))

  def __getstate__(self):
    return {"content": self._content}

  def __setstate__(self, state):
    self.__init__(state["content"])


def resolve_file(path: str | os.PathLike) -> str:
  """`path` if it is a file, else the first of `DIRECTORY_FILES` in the directory `path`."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in DIRECTORY_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise ValueError(f"directory {path!r} holds no tokenizer; {_EXPECTED}")
  if not os.path.exists(path):
    raise ValueError(f"no tokenizer at {path!r} (no such file or directory); {_EXPECTED}")
  return path


def _vocabulary(content: bytes) -> Vocabulary:
  if not content:
    raise ValueError(f"the tokenizer file is empty; {_EXPECTED}")
  spec = tokenizer_json.parse(content)
  if spec is not None:
    return tokenizer_json.JsonVocabulary(content, spec)
  try:
    return SentencePieceVocabulary(content)
  except RuntimeError as e:  # sentencepiece's error for bytes that are not a ModelProto
    raise ValueError(f"the file is neither a sentencepiece model nor a tokenizer.json "
                     f"({str(e).strip()[:200]}); {_EXPECTED}") from None


class SentencePieceVocabulary:
  """A `SentencePieceProcessor` over the model with `<image>`, `<|endofchunk|>` and padding."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    if spm.SentencePieceProcessor(model_proto=model_proto).get_piece_size() == 0:
      # Protobuf parses many short byte strings as a message of unknown fields.
      raise RuntimeError("a protobuf message with no pieces")
    self._sp = spm.SentencePieceProcessor(model_proto=_with_special_tokens(model_proto))
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.image_id = int(self._sp.piece_to_id(IMAGE_TOKEN))
    self.end_of_chunk_id = int(self._sp.piece_to_id(END_OF_CHUNK_TOKEN))

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(list(ids))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _trainer_kwargs(vocab_size: int) -> dict:
  return dict(
      vocab_size=int(vocab_size),
      model_type="bpe",
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      user_defined_symbols=list(SPECIAL_TOKENS),
      # Identity normalisation and no dummy prefix: encoding a text equals concatenating
      # the encodings of its pieces split before `<image>`, so chunk-wise truncation and
      # prompts built piece by piece tokenize exactly like the whole text.
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_digits=True,
      character_coverage=1.0,
      hard_vocab_limit=False,
      num_threads=1,
      minloglevel=2,
  )


def _train_proto(texts: list[str], vocab_size: int) -> bytes:
  """In-process training; a subprocess where that is known to crash (sentencepiece#1145)."""
  if os.environ.get("MMJAX_SPM_SUBPROCESS", "0") == "1":
    return _train_in_subprocess(texts, vocab_size)
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=writer, **_trainer_kwargs(vocab_size))
  return writer.getvalue()


def _train_in_subprocess(texts: list[str], vocab_size: int) -> bytes:
  code = ("import pickle, sys; from mmjax.data import tokenizer as t; "
          "texts, v = pickle.load(sys.stdin.buffer); "
          "sys.stdout.buffer.write(t._train_proto(texts, v))")
  env = dict(os.environ, MMJAX_SPM_SUBPROCESS="0")
  result = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((texts, vocab_size)),
                          capture_output=True, env=env, check=False)
  if result.returncode != 0:
    raise ValueError(f"sentencepiece training failed: {result.stderr.decode()[-2000:]}")
  return result.stdout


def _with_special_tokens(proto: bytes) -> bytes:
  """Appends `<image>`, `<|endofchunk|>` and `<pad>` to a model that lacks them."""
  sp = spm.SentencePieceProcessor(model_proto=proto)
  missing = [t for t in SPECIAL_TOKENS if sp.piece_to_id(t) == sp.unk_id()]
  if not missing and sp.pad_id() >= 0:
    return proto
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(proto)
  for token in missing:
    piece = model.pieces.add()
    piece.piece, piece.score = token, 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  if sp.pad_id() < 0:
    piece = model.pieces.add()
    piece.piece, piece.score = "<pad>", 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    model.trainer_spec.pad_id = len(model.pieces) - 1
    model.trainer_spec.pad_piece = "<pad>"
  return model.SerializeToString()
