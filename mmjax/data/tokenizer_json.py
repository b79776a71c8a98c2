"""The `tokenizer.json` backend of `mmjax.data.Tokenizer`, through Hugging Face `tokenizers`.

A `tokenizer.json` (GPT-2's and OPT's byte-level BPE, GPT-NeoX's for MPT and RedPajama,
Qwen's, or a sentencepiece model converted by transformers) names no BOS, EOS or padding
token: transformers keeps those in `tokenizer_config.json`. They are found here from the
file alone, so the same bytes give the same ids wherever they are read (a work directory's
copy, a grain worker's pickle):

  BOS  the special token the post-processor puts first (LLaMA's `<s>`, Llama 3's
       `<|begin_of_text|>`, OPT's `</s>`), else the first of `BOS_NAMES` in the vocabulary;
  EOS  the first of `EOS_NAMES` in the vocabulary (GPT-2, NeoX and Qwen: `<|endoftext|>`,
       which is their BOS as well);
  pad  the file's padding token, else the first of `PAD_NAMES`, provided it is none of
       BOS, EOS, `<image>`, `<|endofchunk|>` (the loss mask drops every padding target);
       else `<pad>` is added;
  unk  the model's `unk_token`, else `<unk>` / `[UNK]`; -1 when there is none (a byte-level
       BPE encodes every string).

`<image>` and `<|endofchunk|>` are made special added tokens: one that is already in the
vocabulary keeps its id, a missing one is appended after the largest id, as `<pad>` is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import tokenizers

from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")
UNK_NAMES = ("<unk>", "[UNK]")
ADDED_PAD = "<pad>"
ADDED_PAD_FALLBACK = "<|mmjax_pad|>"   # when `<pad>` is in the vocabulary but is BOS or EOS


def parse(content: bytes) -> dict | None:
  """The JSON object of a `tokenizer.json` file's bytes; None when they are not JSON at all.

  Raises ValueError for JSON that is not a tokenizer.json (a `config.json` given by mistake).
  """
  start = content[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
  if not start.startswith(b"{"):
    return None
  try:
    spec = json.loads(content.decode("utf-8-sig"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None  # binary that happens to begin with "{" after a newline byte: a sentencepiece model?
  if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
    keys = sorted(spec)[:8] if isinstance(spec, dict) else type(spec).__name__
    raise ValueError(f"a JSON file with keys {keys}, no \"model\" object; expected a tokenizer.json (a config.json "
                     "or tokenizer_config.json names no vocabulary)")
  return spec


class JsonVocabulary:
  """A `tokenizers.Tokenizer` with the multimodal special tokens; see the module docstring."""

  kind = "tokenizer.json"

  def __init__(self, content: bytes, spec: dict):
    """`spec`: `parse(content)`, the same file as a dict (read for what `tokenizers` hides)."""
    try:
      self._tok = tokenizers.Tokenizer.from_str(content.decode("utf-8-sig"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      raise ValueError(f"`tokenizers` {tokenizers.__version__} cannot read this tokenizer.json ({e}); expected one it "
                       "reads (a file written by a newer `tokenizers` may need that version)") from None
    # A tokenizer.json may carry padding or truncation settings for batches: `encode` returns
    # one text's ids, the pipeline pads and cuts.
    self._tok.no_padding()
    self._tok.no_truncation()
    self.bos_id = _bos_id(self._tok, spec)
    self.eos_id = _first_id(self._tok, EOS_NAMES)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"tokenizer.json has no BOS or no EOS token (BOS id {self.bos_id}, EOS id {self.eos_id}); "
                       f"expected one of {BOS_NAMES} and one of {EOS_NAMES} in its vocabulary")
    self.unk_id = _unk_id(self._tok, spec)
    self.image_id = self._special_id(IMAGE_TOKEN)
    self.end_of_chunk_id = self._special_id(END_OF_CHUNK_TOKEN)
    self.pad_id = self._pad_id(spec)
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    for name, token in ((IMAGE_TOKEN, self.image_id), (END_OF_CHUNK_TOKEN, self.end_of_chunk_id)):
      if self.encode(name) != [token]:
        raise ValueError(f"tokenizer.json encodes {name!r} as {self.encode(name)}; expected the single id "
                         f"[{token}] (is it an added token with lstrip/rstrip/single_word set?)")

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    piece = self._tok.id_to_token(int(i))
    if piece is None:
      raise IndexError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
    return piece

  def _special_id(self, token: str) -> int:
    """Makes `token` a special added token (keeping an existing id) and returns its id."""
    self._tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
    return int(self._tok.token_to_id(token))

  def _pad_id(self, spec: dict) -> int:
    taken = {self.bos_id, self.eos_id, self.image_id, self.end_of_chunk_id}
    padding = spec.get("padding") or {}
    names = ((padding.get("pad_token"),) if padding.get("pad_token") else ()) + PAD_NAMES
    for name in names:
      token = self._tok.token_to_id(name)
      if token is not None and token not in taken:
        return self._special_id(name)
    name = ADDED_PAD if self._tok.token_to_id(ADDED_PAD) is None else ADDED_PAD_FALLBACK
    return self._special_id(name)


def _first_id(tok: tokenizers.Tokenizer, names: Iterable[str]) -> int | None:
  for name in names:
    token = tok.token_to_id(name)
    if token is not None:
      return int(token)
  return None


def _bos_id(tok: tokenizers.Tokenizer, spec: dict) -> int | None:
  leading = _leading_special_token(spec.get("post_processor"))
  if leading is not None and tok.token_to_id(leading) is not None:
    return int(tok.token_to_id(leading))
  return _first_id(tok, BOS_NAMES)


def _leading_special_token(processor: dict | None) -> str | None:
  """The token a post-processor puts before a single text (its BOS), or None."""
  if not isinstance(processor, dict):
    return None
  kind = processor.get("type")
  if kind == "Sequence":
    for inner in processor.get("processors", []):
      if (token := _leading_special_token(inner)) is not None:
        return token
    return None
  if kind in ("BertProcessing", "RobertaProcessing"):
    return processor["cls"][0]
  if kind == "TemplateProcessing":
    single = processor.get("single") or []
    if single and "SpecialToken" in single[0]:
      return single[0]["SpecialToken"]["id"]
  return None


def _unk_id(tok: tokenizers.Tokenizer, spec: dict) -> int:
  model = spec["model"]
  if isinstance(model.get("unk_token"), str) and tok.token_to_id(model["unk_token"]) is not None:
    return int(tok.token_to_id(model["unk_token"]))
  if isinstance(model.get("unk_id"), int):  # Unigram
    return int(model["unk_id"])
  token = _first_id(tok, UNK_NAMES)
  return -1 if token is None else token
