"""Conversations for the LLaVA family: records -> turns -> a chat template -> one example, and packing.

A record becomes turns (`conversation_turns`), the turns a rendering in a chat template
(`TEMPLATES`: pieces of text or BOS/EOS, each trainable or not), the rendering an example
(`ConversationBuilder`); several examples can share a row (`pack`, `PackedDataset`), or a
batch of one-conversation rows can be cut to a length bucket (`cut_to_bucket`).

An example (T text_length, N max_slots, S image_size, P tokens_per_slot):

  images         uint8   [N, S, S, 3]  image slots (one per LLaVA-1.5 image, several per
                                       LLaVA-NeXT image), not normalised; zeros when unused
  image_mask     bool    [N]           which slots hold a real image or tile
  input_ids      int32   [T]           BOS, the rendered conversation with each `<image>`
                                       expanded to its image's token count (every expanded
                                       position holds `tokenizer.image_id`), then pad
  feature_index  int32   [T]           -1 on text and pad; on image positions the tower token
                                       that goes there (flattened `slot * P + k`), or -2
                                       (`NEWLINE`) for LLaVA-NeXT's image_newline
  targets        int32   [T]           input_ids shifted left by one; the last one is pad
  loss_mask      float32 [T]           1 where the target is an assistant-turn token (the
                                       answer and the turn's closing EOS or separator, as the
                                       template says); 0 on system and user text, images, pad
  segment_ids    int32   [T]           1 on the conversation, 0 on pad (1..k once packed)
  positions      int32   [T]           0..len-1 on the tokens (per segment once packed), 0 on pad

Where each image goes is the `image_slots` callable's business: `image_slots(image uint8
[H, W, 3], first_slot) -> (slots uint8 [n, S, S, 3], feature_index int32 [m])`, m tokens
for n slots. `SquareSlots` is LLaVA-1.5's (pad to a square, resize, one slot, P tokens);
LLaVA-NeXT's AnyRes tiling drops in through the same signature.

Bad records (`preprocess.BAD_REASONS`; skipped and counted, or raised as `BadRecordError`):
"image_token_mismatch" (images != `<image>` placeholders), "no_answer" (no assistant turn
after a user turn), "too_many_images" (the first round alone needs more than N slots),
"text_too_long" (the first round alone is longer than T once its images are expanded),
"image_too_small" (`image_slots` raised ValueError), and the decoding reasons of
`preprocess.decode_image`. A conversation is never cut inside a round: when the whole of
it does not fit T or N, its trailing rounds are dropped, with their images, down to the
longest run of first rounds that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import enum
import functools
import zlib

from absl import flags
import grain
import numpy as np
from PIL import Image

from mmjax.data import pipeline
from mmjax.data.preprocess import (BadImageError, BadRecordError, Bucket, RecordBuilder, decode_image)
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.data.tokenizer import Tokenizer

TEXT = -1      # feature_index of a text or padding position
NEWLINE = -2   # feature_index of LLaVA-NeXT's learned image_newline embedding

ROLES = ("user", "assistant")
# The instructions of a caption turned into a conversation, one chosen per image from the
# record id (the same record always asks the same way).
CAPTION_PROMPTS = (
    "Describe the image.",
    "What does this picture show?",
    "Write a short caption for the image.",
    "Say what is in the image.",
)
# The flattened form `builders.jsonl_record_text` gives an imported LLaVA conversation.
_USER_PREFIX, _ASSISTANT_PREFIX = "User: ", "Assistant: "


# ---------------------------------------------------------------- turns

@dataclasses.dataclass(frozen=True)
class Turn:
  """One message of a conversation: `role` "user" or "assistant", its text (with `<image>`s)."""
  role: str
  text: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"turn role={self.role!r}; expected one of {ROLES}")


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def conversation_turns(record: Mapping) -> list[Turn]:
  """The turns of a record: an embedded one (it has a `kind`) or an imported one (its text).

  Embedded kinds: "qa" -> user "<image>\\n{question}", assistant "{answer}"; "captions" and
  "interleaved" -> a round per image (`caption_turns`). Without a kind, a text in the
  flattened LLaVA form is parsed back (`flattened_turns`); any other text is read as
  captions (`caption_turns`), so an imported caption dataset trains LLaVA's stage 1.
  Raises ValueError for a kind other than these.
  """
  record_id = _as_str(record.get("id", "?"))
  text = _as_str(record.get("text", ""))
  if "kind" not in record:
    turns = flattened_turns(text)
    return caption_turns(text, record_id) if turns is None else turns
  kind = _as_str(record["kind"])
  if kind == "qa":
    return [Turn("user", f"{IMAGE_TOKEN}\n{_as_str(record['question'])}"),
            Turn("assistant", _as_str(record["answer"]))]
  if kind in ("captions", "interleaved"):
    return caption_turns(text, record_id)
  raise ValueError(f"record {record_id!r} has kind={kind!r}; expected 'qa', 'captions' or 'interleaved' "
                   "(or no kind: an imported record, whose text is parsed)")


def caption_prompt(record_id: str, index: int) -> str:
  """The instruction asking for the caption of the `index`-th image of a record (fixed per record)."""
  return CAPTION_PROMPTS[zlib.crc32(f"{record_id}#{index}".encode()) % len(CAPTION_PROMPTS)]


def caption_turns(text: str, record_id: str) -> list[Turn]:
  """Chunks `"<image>words<|endofchunk|>..."` -> per chunk: user "<image>\\n{prompt}", assistant the words.

  A chunk's words are those after its first `<image>` (text before it, such as a
  document's intro, speaks of no image and is dropped, as is a chunk without an image).
  A chunk whose images have no words lends them to the next chunk's user turn; images
  with no words after them at all end the conversation as a user turn without answer.
  """
  turns, images = [], 0
  for chunk in text.split(END_OF_CHUNK_TOKEN):
    first = chunk.find(IMAGE_TOKEN)
    if first < 0:
      continue
    images += chunk.count(IMAGE_TOKEN)
    words = " ".join(chunk[first:].replace(IMAGE_TOKEN, " ").split())
    if words:
      prompt = caption_prompt(record_id, len(turns) // 2)
      turns += [Turn("user", f"{IMAGE_TOKEN * images}\n{prompt}"), Turn("assistant", words)]
      images = 0
  if images:
    turns.append(Turn("user", IMAGE_TOKEN * images))
  return turns


def flattened_turns(text: str) -> list[Turn] | None:
  """Parses `builders.jsonl_record_text`'s flattening back into turns; None if `text` is not one.

  The form: optional leading `<image>`s (the importer puts them first when the conversation
  has none), then "User: {value}\\n" per user turn and "Assistant: {value}<|endofchunk|>"
  per assistant turn. Leading `<image>`s go to the first user turn as "<image>\\n{value}",
  LLaVA's place for them (a user turn of images alone if the conversation opens with the
  assistant).

  The flattening is ambiguous where a message contains a marker. An assistant turn ends at
  `<|endofchunk|>`; what precedes it since the previous one holds the user turn and the
  answer, split at the LAST "Assistant: " that opens a line. So a user message containing
  "\\nAssistant: " comes back whole, and an answer containing "\\nAssistant: " does not
  (its part before the marker joins the user turn). The user part is one turn: two user
  turns in a row come back as one whose text holds "\\nUser: " (LLaVA's own preprocessing
  refuses such conversations).
  """
  body = text.lstrip()
  images = 0
  while body.startswith(IMAGE_TOKEN):
    body, images = body[len(IMAGE_TOKEN):], images + 1
  if not (body.startswith(_USER_PREFIX) or body.startswith(_ASSISTANT_PREFIX)):
    return None
  turns, carried = [], ""
  *segments, rest = body.split(END_OF_CHUNK_TOKEN)
  for segment in segments:
    segment = carried + segment
    cut = _answer_start(segment)
    if cut is None:  # an `<|endofchunk|>` inside a user message: it continues
      carried = segment + END_OF_CHUNK_TOKEN
      continue
    carried = ""
    if cut > 0:
      turns.append(Turn("user", _user_message(segment[:cut])))
    turns.append(Turn("assistant", segment[cut + len(_ASSISTANT_PREFIX):]))
  rest = carried + rest
  if rest:
    turns.append(Turn("user", _user_message(rest)))
  if images:
    if turns and turns[0].role == "user":
      turns[0] = Turn("user", f"{IMAGE_TOKEN * images}\n{turns[0].text}")
    else:
      turns.insert(0, Turn("user", IMAGE_TOKEN * images))
  return turns


def _answer_start(segment: str) -> int | None:
  """Where the last "Assistant: " that opens a line (or the segment) starts, or None."""
  at = segment.rfind(_ASSISTANT_PREFIX)
  while at > 0 and segment[at - 1] != "\n":
    at = segment.rfind(_ASSISTANT_PREFIX, 0, at)
  return at if at >= 0 else None


def _user_message(part: str) -> str:
  """"User: {value}\\n" -> value (a part without the marker is kept as it is)."""
  if part.startswith(_USER_PREFIX):
    part = part[len(_USER_PREFIX):]
  return part[:-1] if part.endswith("\n") else part


@dataclasses.dataclass(frozen=True)
class Round:
  """A user message and the assistant's answer to it: the unit a template renders and a cut keeps."""
  user: str
  assistant: str


def conversation_rounds(turns: Sequence[Turn]) -> tuple[list[Round], int]:
  """(rounds, the index of the first image they hold) of alternating turns.

  Consecutive turns of one role are joined with "\\n"; assistant turns before the first
  user turn and a user turn without an answer at the end are dropped, as LLaVA's
  preprocessing drops them (with their images: the rounds hold the images from the one
  returned on, in order).
  """
  merged: list[Turn] = []
  for turn in turns:
    if merged and merged[-1].role == turn.role:
      merged[-1] = Turn(turn.role, f"{merged[-1].text}\n{turn.text}")
    else:
      merged.append(turn)
  first_image = 0
  while merged and merged[0].role == "assistant":
    first_image += merged.pop(0).text.count(IMAGE_TOKEN)
  rounds = [Round(user.text, answer.text) for user, answer in zip(merged[0::2], merged[1::2])]
  return rounds, first_image


# ---------------------------------------------------------------- chat templates

class Special(enum.Enum):
  """A special token a template places by id, never as text."""
  BOS = "<s>"
  EOS = "</s>"


@dataclasses.dataclass(frozen=True)
class Piece:
  """A span of a rendered conversation: text (tokenized alone) or a special token."""
  value: str | Special
  trainable: bool  # its tokens carry loss (as targets)
  round: int       # the round it belongs to: a cut keeps whole rounds


def rendered_text(pieces: Sequence[Piece]) -> str:
  """The pieces as one string, BOS and EOS written "<s>" and "</s>" (to read, not to tokenize)."""
  return "".join(p.value.value if isinstance(p.value, Special) else p.value for p in pieces)


class ChatTemplate:
  """A chat format: `render(rounds)` -> pieces, BOS first; the pieces of round r come
  after those of every earlier round, so the pieces of rounds < r render rounds[:r]."""

  name: str

  def render(self, rounds: Sequence[Round]) -> list[Piece]:
    raise NotImplementedError


class VicunaV1(ChatTemplate):
  """LLaVA-1.5's "vicuna_v1": "{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>".

  Separators " " after the system and each question, "</s>" (EOS) after each answer;
  " {a}" and the EOS carry loss.
  """

  name = "vicuna_v1"
  system = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")

  def render(self, rounds):
    pieces = [Piece(Special.BOS, False, 0)]
    for r, turn in enumerate(rounds):
      head = f"{self.system} " if r == 0 else ""
      pieces += [Piece(f"{head}USER: {turn.user} ASSISTANT:", False, r),
                 Piece(f" {turn.assistant}", True, r), Piece(Special.EOS, True, r)]
    return pieces


class Llama2(ChatTemplate):
  """LLaVA's "llava_llama_2": "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s>"
  then "<s>[INST] {q} [/INST] {a} </s>" per later round; " {a} " and the EOS carry loss."""

  name = "llama_2"
  system = ("You are a helpful language and vision assistant. You are able to understand the visual "
            "content that the user provides, and assist the user with a variety of tasks using natural "
            "language.")

  def render(self, rounds):
    pieces = []
    for r, turn in enumerate(rounds):
      question = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{turn.user}" if r == 0 else turn.user
      pieces += [Piece(Special.BOS, False, r), Piece(f"[INST] {question} [/INST]", False, r),
                 Piece(f" {turn.assistant} ", True, r), Piece(Special.EOS, True, r)]
    return pieces


class Plain(ChatTemplate):
  """LLaVA's stage-1 "plain": "<s>" then per round its images, the answer and "\\n".

  As LLaVA's preprocess_plain replaces the user message by the image, the user's words
  are dropped and its `<image>`s kept; the answer and its "\\n" carry loss. No EOS.
  """

  name = "plain"

  def render(self, rounds):
    pieces = [Piece(Special.BOS, False, 0)]
    for r, turn in enumerate(rounds):
      pieces += [Piece(IMAGE_TOKEN * turn.user.count(IMAGE_TOKEN), False, r),
                 Piece(f"{turn.assistant}\n", True, r)]
    return pieces


TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (VicunaV1(), Llama2(), Plain())}


def template_by_name(template: str | ChatTemplate) -> ChatTemplate:
  """A template given by name (a key of `TEMPLATES`) or as itself."""
  if isinstance(template, ChatTemplate):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"template={template!r}; expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[template]


# ---------------------------------------------------------------- image geometry

# LLaVA-1.5 pads with its image processor's mean (CLIP's), which normalises to zero.
CLIP_MEAN_RGB = (122, 116, 104)  # int(255 * (0.48145466, 0.4578275, 0.40821073))


class SquareSlots:
  """LLaVA-1.5's geometry (image_aspect_ratio="pad"): the image padded to a centred square,
  resized to S x S (bicubic), one slot of P tokens `first_slot * P + arange(P)`.

  `background`: the padding colour; LLaVA's is its processor's mean (`CLIP_MEAN_RGB` for
  CLIP towers; (127, 127, 127) for SigLIP's 0.5); None pads with the image's own mean
  colour. Raises ValueError for an image with a side shorter than `min_side`.
  """

  def __init__(self, image_size: int, tokens_per_slot: int,
               background: tuple[int, int, int] | None = CLIP_MEAN_RGB, min_side: int = 1):
    if image_size < 1 or tokens_per_slot < 1 or min_side < 1:
      raise ValueError(f"image_size={image_size}, tokens_per_slot={tokens_per_slot}, min_side={min_side}; "
                       "expected each >= 1")
    self.image_size, self.tokens_per_slot = image_size, tokens_per_slot
    self.background, self.min_side = background, min_side

  def __call__(self, image: np.ndarray, first_slot: int) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    if min(height, width) < self.min_side:
      raise ValueError(f"image is {width} x {height} pixels; expected each side >= {self.min_side}")
    side = max(height, width)
    background = (tuple(int(c) for c in image.reshape(-1, 3).mean(0)) if self.background is None
                  else self.background)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    if side != self.image_size:
      square = np.asarray(Image.fromarray(square).resize((self.image_size, self.image_size),
                                                         Image.Resampling.BICUBIC))
    p = self.tokens_per_slot
    return square[None], np.arange(first_slot * p, (first_slot + 1) * p, dtype=np.int32)


# ---------------------------------------------------------------- the example builder

ImageSlots = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class ConversationBuilder(RecordBuilder):
  """Record -> the example of the module docstring (or a bad-record marker); picklable.

  Each piece of the template's rendering is tokenized alone (as LLaVA tokenizes round by
  round); images are decoded at their stored size and laid out by `image_slots` (default
  `SquareSlots(image_size, tokens_per_slot)`).
  """

  def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate, text_length: int, max_slots: int,
               image_size: int, tokens_per_slot: int, image_slots: ImageSlots | None = None,
               bad_data: str = "skip", with_record_ids: bool = False):
    super().__init__(bad_data, with_record_ids)
    if text_length < 2 or max_slots < 1 or image_size < 1 or tokens_per_slot < 1:
      raise ValueError(f"text_length={text_length}, max_slots={max_slots}, image_size={image_size}, "
                       f"tokens_per_slot={tokens_per_slot}; expected >= 2, >= 1, >= 1, >= 1")
    self.tokenizer, self.template = tokenizer, template_by_name(template)
    self.text_length, self.max_slots = text_length, max_slots
    self.image_size, self.tokens_per_slot = image_size, tokens_per_slot
    self.image_slots = image_slots or SquareSlots(image_size, tokens_per_slot)

  @property
  def bucket(self) -> Bucket:
    """The batch shapes, as the pipeline names them (N slots, T, S)."""
    return Bucket(self.max_slots, self.text_length, self.image_size)

  def _build(self, record: dict, record_id: str) -> dict:
    tok = self.tokenizer
    turns = conversation_turns(record)
    images = list(record.get("images", []))
    placeholders = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if placeholders != len(images):
      raise BadRecordError(record_id, "image_token_mismatch", f"the conversation has {placeholders} "
                           f"<image> placeholders but the record has {len(images)} images")
    rounds, first_image = conversation_rounds(turns)
    if not rounds:
      raise BadRecordError(record_id, "no_answer", "no assistant turn answers a user turn "
                           f"(turns: {[turn.role for turn in turns]})")
    ids, trainable, round_of = self._tokenize(self.template.render(rounds))
    n_images = sum(i == tok.image_id for i in ids)
    used = images[first_image:first_image + n_images]
    if n_images != sum(r.user.count(IMAGE_TOKEN) + r.assistant.count(IMAGE_TOKEN) for r in rounds):
      raise ValueError(f"the tokenizer encodes the rendered conversation with {n_images} image ids; "
                       f"expected one per {IMAGE_TOKEN!r} (is {IMAGE_TOKEN!r} a special token of it?)")
    layouts = [self._layout(data, first_image + k, record_id) for k, data in enumerate(used)]
    kept = self._rounds_that_fit(ids, round_of, layouts, record_id)
    return self._example(ids[:kept], trainable[:kept], layouts)

  def _tokenize(self, pieces: Sequence[Piece]) -> tuple[list[int], list[bool], list[int]]:
    """(ids, trainable, round) per token of the pieces."""
    tok = self.tokenizer
    special = {Special.BOS: tok.bos_id, Special.EOS: tok.eos_id}
    ids, trainable, round_of = [], [], []
    for piece in pieces:
      piece_ids = [special[piece.value]] if isinstance(piece.value, Special) else tok.encode(piece.value)
      ids += piece_ids
      trainable += [piece.trainable] * len(piece_ids)
      round_of += [piece.round] * len(piece_ids)
    return ids, trainable, round_of

  def _layout(self, data: bytes, index: int, record_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(slots [n, S, S, 3], feature_index [m] counted from slot 0) of one encoded image."""
    try:
      pixels = decode_image(bytes(data), None, f"image {index}")
    except BadImageError as e:
      raise BadRecordError(record_id, e.reason, str(e)) from e
    try:
      slots, feature_index = self.image_slots(pixels, 0)
    except ValueError as e:
      raise BadRecordError(record_id, "image_too_small", f"image {index}: {e}") from e
    slots, feature_index = np.asarray(slots), np.asarray(feature_index)
    s, p = self.image_size, self.tokens_per_slot
    if slots.dtype != np.uint8 or slots.ndim != 4 or slots.shape[1:] != (s, s, 3) or not len(slots):
      raise ValueError(f"image_slots gave slots {slots.dtype}{list(slots.shape)}; expected uint8 [n >= 1, {s}, {s}, 3]")
    tower = feature_index[feature_index != NEWLINE]
    if feature_index.ndim != 1 or not np.all((tower >= 0) & (tower < len(slots) * p)):
      raise ValueError(f"image_slots gave feature_index {feature_index.tolist()[:16]} for {len(slots)} slots; "
                       f"expected a vector of {NEWLINE} (newline) or tower tokens in [0, {len(slots) * p})")
    return slots, feature_index.astype(np.int32)

  def _rounds_that_fit(self, ids: list[int], round_of: list[int], layouts, record_id: str) -> int:
    """How many of `ids` to keep: those of the most first rounds that fit T and N, expanded."""
    lengths, slots = np.zeros(max(round_of) + 1, int), np.zeros(max(round_of) + 1, int)
    images = iter(layouts)
    for token, r in zip(ids, round_of):
      if token == self.tokenizer.image_id:
        image_slots, feature_index = next(images)
        lengths[r] += len(feature_index)
        slots[r] += len(image_slots)
      else:
        lengths[r] += 1
    fits = (np.cumsum(lengths) <= self.text_length) & (np.cumsum(slots) <= self.max_slots)
    rounds = int(np.argmin(fits)) if not fits.all() else len(fits)
    if rounds == 0:
      whole = f"{lengths.sum()} tokens and {slots.sum()} slots for all {len(lengths)} rounds"
      if slots[0] > self.max_slots:
        raise BadRecordError(record_id, "too_many_images", f"the first round needs {slots[0]} image slots "
                             f"({whole}); expected at most max_slots={self.max_slots}")
      raise BadRecordError(record_id, "text_too_long", f"the first round is {lengths[0]} tokens with its "
                           f"images expanded ({whole}); expected at most text_length={self.text_length}")
    return sum(r < rounds for r in round_of)

  def _example(self, ids: list[int], trainable: list[bool], layouts) -> dict[str, np.ndarray]:
    tok, t_max, p = self.tokenizer, self.text_length, self.tokens_per_slot
    expanded, is_trainable, feature_index, slot_blocks = [], [], [], []
    images, first_slot = iter(layouts), 0
    for token, train in zip(ids, trainable):
      if token != tok.image_id:
        expanded.append(token)
        is_trainable.append(train)
        feature_index.append(TEXT)
        continue
      slots, image_index = next(images)
      expanded += [tok.image_id] * len(image_index)
      is_trainable += [False] * len(image_index)
      feature_index += np.where(image_index == NEWLINE, NEWLINE, image_index + first_slot * p).tolist()
      slot_blocks.append(slots)
      first_slot += len(slots)
    n = len(expanded)
    images_out = np.zeros((self.max_slots, self.image_size, self.image_size, 3), np.uint8)
    if slot_blocks:
      images_out[:first_slot] = np.concatenate(slot_blocks)
    example = {
        "images": images_out,
        "image_mask": np.arange(self.max_slots) < first_slot,
        "input_ids": np.full((t_max,), tok.pad_id, np.int32),
        "feature_index": np.full((t_max,), TEXT, np.int32),
        "targets": np.full((t_max,), tok.pad_id, np.int32),
        "loss_mask": np.zeros((t_max,), np.float32),
        "segment_ids": (np.arange(t_max) < n).astype(np.int32),
        "positions": np.where(np.arange(t_max) < n, np.arange(t_max), 0).astype(np.int32),
    }
    example["input_ids"][:n] = expanded
    example["feature_index"][:n] = feature_index
    example["targets"][:n - 1] = expanded[1:]
    # The loss sits where the *target* is an assistant token; an image is never predicted.
    example["loss_mask"][:n - 1] = np.asarray(is_trainable[1:]) & (np.asarray(expanded[1:]) != tok.image_id)
    return example


# ---------------------------------------------------------------- packing

def _size(example: Mapping) -> tuple[int, int]:
  """(tokens, image slots) an example takes in a row."""
  return int(np.count_nonzero(example["segment_ids"])), int(np.count_nonzero(example["image_mask"]))


def pack(examples: Sequence[Mapping], text_length: int, max_slots: int, tokens_per_slot: int) -> dict:
  """Several examples (each one segment, as `ConversationBuilder` makes them) -> one row.

  Segment k (1-based) holds example k's tokens; positions restart at 0 per segment;
  feature_index of tower tokens is offset by the slots of the examples before (-1 and -2
  unchanged); the image slots follow one another. A segment's last target is pad with no
  loss (it is not the next segment's first token). The pad id is read from the examples
  (the target of an example's last token is pad). `record_id`s, where present, are joined
  with ",".
  """
  if not examples:
    raise ValueError("pack got no examples; expected at least one")
  sizes = [_size(e) for e in examples]
  tokens, slots = sum(n for n, _ in sizes), sum(s for _, s in sizes)
  if tokens > text_length or slots > max_slots:
    raise ValueError(f"{len(examples)} examples hold {tokens} tokens and {slots} image slots; expected at "
                     f"most text_length={text_length} and max_slots={max_slots}")
  pad_id = int(examples[0]["targets"][sizes[0][0] - 1])
  first = examples[0]["images"]
  row = {
      "images": np.zeros((max_slots,) + first.shape[1:], first.dtype),
      "image_mask": np.arange(max_slots) < slots,
      "input_ids": np.full((text_length,), pad_id, np.int32),
      "feature_index": np.full((text_length,), TEXT, np.int32),
      "targets": np.full((text_length,), pad_id, np.int32),
      "loss_mask": np.zeros((text_length,), np.float32),
      "segment_ids": np.zeros((text_length,), np.int32),
      "positions": np.zeros((text_length,), np.int32),
  }
  start, slot = 0, 0
  for segment, (example, (n, s)) in enumerate(zip(examples, sizes), start=1):
    span = slice(start, start + n)
    row["images"][slot:slot + s] = example["images"][:s]
    row["input_ids"][span] = example["input_ids"][:n]
    index = example["feature_index"][:n]
    row["feature_index"][span] = np.where(index >= 0, index + slot * tokens_per_slot, index)
    row["targets"][span] = example["targets"][:n]
    row["loss_mask"][span] = example["loss_mask"][:n]
    row["targets"][start + n - 1], row["loss_mask"][start + n - 1] = pad_id, 0.0
    row["segment_ids"][span] = segment
    row["positions"][span] = np.arange(n)
    start, slot = start + n, slot + s
  if all("record_id" in e for e in examples):
    row["record_id"] = ",".join(str(e["record_id"]) for e in examples)
  return row


class _PackedIterator(grain.DatasetIterator):
  """Greedy rows: examples in order, each into the current row if it fits, else the next.

  The example that does not fit is known only once read, and it belongs to the next row;
  while it waits, `get_state` gives the parent's state from before reading it, so a
  restored iterator reads it again: the state is exact and holds no example.
  """

  def __init__(self, parent: grain.DatasetIterator, text_length: int, max_slots: int, tokens_per_slot: int):
    super().__init__(parent)
    self.text_length, self.max_slots, self.tokens_per_slot = text_length, max_slots, tokens_per_slot
    self._waiting = None                # (example, the parent's state before it was read)

  def __next__(self) -> dict:
    row, tokens, slots = [], 0, 0
    if self._waiting is not None:
      example, self._waiting = self._waiting[0], None
      row, (tokens, slots) = [example], _size(example)
    while tokens < self.text_length:  # a full row takes nothing more: read no example for it
      state = self._parent.get_state()
      try:
        example = next(self._parent)
      except StopIteration:
        if row:
          break
        raise
      if "bad_record" in example:
        raise ValueError(f"PackedDataset got the bad-record marker {dict(example)}; expected examples "
                         "only: pack after the step that drops bad records")
      n, s = _size(example)
      if n > self.text_length or s > self.max_slots:
        raise ValueError(f"an example of {n} tokens and {s} slots; expected at most text_length="
                         f"{self.text_length} and max_slots={self.max_slots}")
      if tokens + n > self.text_length or slots + s > self.max_slots:
        self._waiting = (example, state)
        break
      row.append(example)
      tokens, slots = tokens + n, slots + s
    return pack(row, self.text_length, self.max_slots, self.tokens_per_slot)

  def get_state(self) -> dict:
    parent = self._parent.get_state() if self._waiting is None else self._waiting[1]
    return {"parent": parent}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._waiting = None


class PackedDataset(grain.IterDataset):
  """Rows of several examples of `parent` (`pack`), filled greedily in order; checkpointable."""

  def __init__(self, parent: grain.IterDataset, text_length: int, max_slots: int, tokens_per_slot: int):
    super().__init__(parent)
    if text_length < 2 or max_slots < 1 or tokens_per_slot < 1:
      raise ValueError(f"text_length={text_length}, max_slots={max_slots}, tokens_per_slot={tokens_per_slot}; "
                       "expected >= 2, >= 1, >= 1")
    self.text_length, self.max_slots, self.tokens_per_slot = text_length, max_slots, tokens_per_slot

  def __iter__(self) -> _PackedIterator:
    return _PackedIterator(self._parent.__iter__(), self.text_length, self.max_slots, self.tokens_per_slot)


# ---------------------------------------------------------------- length buckets

# The [B, T] columns of a batch; images and image_mask ([B, N, ...]) do not depend on T.
SEQUENCE_KEYS = ("input_ids", "feature_index", "targets", "loss_mask", "segment_ids", "positions")


def check_buckets(buckets: Sequence[int], text_length: int) -> tuple[int, ...]:
  """`buckets` as a tuple of ints; ValueError unless strictly ascending, each >= 2 and the
  largest == text_length (every example fits the largest, so no batch is left without one)."""
  values = tuple(int(b) for b in buckets)
  if (not values or any(b < 2 for b in values) or any(a >= b for a, b in zip(values, values[1:]))
      or values[-1] != text_length):
    raise ValueError(f"buckets={list(buckets)}; expected strictly ascending lengths >= 2 whose largest is the "
                     f"builder's text_length={text_length}")
  return values


def bucket_for(batch: Mapping[str, np.ndarray], buckets: Sequence[int]) -> int:
  """The smallest of `buckets` that holds every token of `batch` (segment_ids [B, T] > 0)."""
  used = np.flatnonzero(np.any(np.asarray(batch["segment_ids"]) > 0, axis=0))
  # The last used column, not the longest count: a cut then drops padding only, whatever
  # the layout (an unpacked row holds its tokens first, so the two agree).
  length = int(used[-1]) + 1 if len(used) else 0
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a batch uses {length} columns; expected at most the largest bucket {buckets[-1]}")


def cut_to_bucket(batch: Mapping[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """A batch with its `SEQUENCE_KEYS` [B, T] cut to [B, bucket] (`bucket_for`); other keys as they are.

  The cut columns are padding in every row (pad ids, feature_index -1, no loss, segment
  0), so the model sees the same tokens and the loss is the same; a train step compiles
  once per bucket instead of running every batch at T.
  """
  bucket = bucket_for(batch, buckets)
  return {k: (v[:, :bucket] if k in SEQUENCE_KEYS else v) for k, v in batch.items()}


# ---------------------------------------------------------------- the pipeline

def make_conversation_pipeline(builder: ConversationBuilder, data_dir: str | None = None, split: str = "train",
                               batch_size: int = 8, seed: int = 0,
                               mixture: Mapping[str, float] | str | None = None, num_workers: int = 0,
                               shard_by_jax_process: bool = True, num_epochs: int | None = None,
                               shuffle: bool = True, read_threads: int = 2,
                               max_consecutive_bad_records: int = pipeline.DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS,
                               pack: bool = False, buckets: Sequence[int] = ()) -> pipeline.Pipeline:
  """Batches of LLaVA examples (`builder`'s), packed several to a row with `pack`, or cut
  to length `buckets`.

  The steps and arguments of `pipeline.make_pipeline` (the bad-data policy is the
  builder's); packing comes after bad records are dropped and counted, so a packed row
  holds good examples only and `bad_data_counts` counts what was skipped.

  `buckets` (ascending, the largest the builder's text_length): each batch is cut to the
  smallest bucket that holds its longest sequence (`cut_to_bucket`), so its [B, T]
  arrays are [B, bucket] and a train step compiles once per bucket. The cut is a map
  over whole batches: the batches come in the same order with the same examples as
  without buckets, and the state is the batch iterator's (exact on restore, holding no
  example; `Pipeline.bucket` keeps the largest, text_length). The price: with shuffled
  data the longest sequence of each batch decides its bucket, so the larger the batch, the
  likelier it holds one long sequence and the fewer batches land in the small buckets.
  Sorting examples into per-bucket batches would waste less, but it holds half-filled
  batches of examples between steps, which the checkpointed state then has to carry (or
  re-read), and it reorders the data. Not with `pack`: a packed row is filled to
  text_length by design.
  """
  if pack and buckets:
    raise ValueError(f"pack=True and buckets={list(buckets)}; expected one of them (a packed row is filled to "
                     f"text_length={builder.text_length}, so no batch of them would be cut)")
  if buckets:
    buckets = check_buckets(buckets, builder.text_length)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers}; expected >= 0")
  if max_consecutive_bad_records < 1:
    raise ValueError(f"max_consecutive_bad_records={max_consecutive_bad_records}; expected >= 1")
  examples = pipeline.example_dataset(data_dir, split, builder.bucket, seed, mixture, shard_by_jax_process,
                                      builder.bad_data, num_epochs, shuffle, builder=builder)
  ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (see make_pipeline)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  datasets = pipeline._mixture_datasets(data_dir, mixture)  # pylint: disable=protected-access
  ds = pipeline._DropBadRecords(ds, max_consecutive_bad_records, datasets)  # pylint: disable=protected-access
  if pack:
    ds = PackedDataset(ds, builder.text_length, builder.max_slots, builder.tokens_per_slot)
  batches = ds.batch(batch_size, drop_remainder=True)
  if buckets:
    batches = batches.map(functools.partial(cut_to_bucket, buckets=buckets))
  return pipeline.Pipeline(batches, builder.bucket, batch_size)
