"""A sentencepiece tokenizer with the multimodal special tokens, ids exposed by name.

Special tokens: `<pad>` (id 0), `<unk>`, `<s>` (BOS), `</s>` (EOS), and the user-defined
`<image>` and `<|endofchunk|>`, each a single id wherever it appears in the text.
`encode` adds neither BOS nor EOS (the pipeline does, once per example).

`Tokenizer.load` takes any sentencepiece `.model`; when the model lacks `<image>`,
`<|endofchunk|>` or a padding piece (e.g. a LLaMA tokenizer), they are appended at the end of
the vocabulary, so ids of the existing pieces do not move.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from collections.abc import Iterable

import sentencepiece as spm

from mmjax import filelock
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

SPECIAL_TOKENS = (IMAGE_TOKEN, END_OF_CHUNK_TOKEN)


class Tokenizer:
  """Wraps a `SentencePieceProcessor`; picklable (grain workers receive a copy)."""

  def __init__(self, model_proto: bytes):
    self._proto = _with_special_tokens(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.image_id = int(self._sp.piece_to_id(IMAGE_TOKEN))
    self.end_of_chunk_id = int(self._sp.piece_to_id(END_OF_CHUNK_TOKEN))
    for name in ("pad_id", "bos_id", "eos_id", "image_id", "end_of_chunk_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"tokenizer has {name}={getattr(self, name)}; expected an id >= 0")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a sentencepiece `.model` file (special tokens added if missing)."""
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Trains a model on `texts`, writes it to `path` and returns it.

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
    return int(self._sp.get_piece_size())

  def encode(self, text: str) -> list[int]:
    """Text (which may contain `<image>` and `<|endofchunk|>`) -> ids, no BOS/EOS."""
    return list(self._sp.encode(text, out_type=int))

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt as the pipeline's training sequences begin: BOS, then `encode(text)`.

    Feed a model trained on mmjax's pipeline this, not `encode`: without the BOS it
    sees a context it never saw in training (every training sequence starts with one).
    """
    return [self.bos_id] + self.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; padding, BOS and EOS are dropped, `<image>` etc. kept as strings."""
    drop = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])


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
