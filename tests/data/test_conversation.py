"""LLaVA conversations: records become turns, turns a chat template, the template an example in
which only the assistant's answers carry loss; bad records are named; packed rows keep every
segment apart and the packed iterator resumes exactly."""

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image

from mmjax.data import builders, conversation, pairs, pipeline
from mmjax.data.conversation import (NEWLINE, ConversationBuilder, PackedDataset, SquareSlots, Turn,
                                     make_conversation_pipeline, pack)
from mmjax.data.preprocess import BAD_REASONS, BadRecordError, Bucket

S, P = 16, 4  # image size and tokens per slot of the tiny builders here


def _png(width: int = 12, height: int = 8, colour=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
  return buffer.getvalue()


def _flattened(turns: list[Turn]) -> str:
  """The record text the importer writes for these turns (`builders.jsonl_record_text`)."""
  roles = {"user": "human", "assistant": "gpt"}
  llava = {"conversations": [{"from": roles[t.role], "value": t.text} for t in turns]}
  return builders.jsonl_record_text(llava, "test")[1]


# Three rounds, two images (in the first two rounds).
TURNS = [Turn("user", "<image>\nhow many shapes are there?"), Turn("assistant", "3"),
         Turn("user", "and in this one <image>?"), Turn("assistant", "2 shapes"),
         Turn("user", "what colour is the first one?"), Turn("assistant", "red")]
ANSWERS = ["3", "2 shapes", "red"]
RECORD = {"id": b"chat/0", "text": _flattened(TURNS).encode(), "images": [_png(12, 8), _png(6, 10, (30, 30, 200))]}

# What each template trains on per answer: the text of its piece, and whether an EOS follows.
ANSWER_PIECE = {"vicuna_v1": (" {}", True), "llama_2": (" {} ", True), "plain": ("{}\n", False)}


def _builder(tokenizer, template="vicuna_v1", text_length=512, max_slots=4, **kwargs):
  return ConversationBuilder(tokenizer, template, text_length, max_slots, S, P, **kwargs)


def _loss_runs(example) -> list[np.ndarray]:
  """The targets under loss, one array per contiguous run."""
  at = np.flatnonzero(example["loss_mask"] == 1)
  return [example["targets"][run] for run in np.split(at, np.flatnonzero(np.diff(at) != 1) + 1) if len(run)]


def _expected_runs(tokenizer, template, answers) -> list[list[int]]:
  text, eos = ANSWER_PIECE[template]
  return [tokenizer.encode(text.format(a)) + ([tokenizer.eos_id] if eos else []) for a in answers]


# ---------------------------------------------------------------- templates and loss

def test_templates_render_llavas_prompt_strings():
  rounds, first_image = conversation.conversation_rounds(TURNS[:4])
  assert first_image == 0
  rendered = {name: conversation.rendered_text(t.render(rounds)) for name, t in conversation.TEMPLATES.items()}
  assert rendered["vicuna_v1"] == (
      "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives "
      "helpful, detailed, and polite answers to the human's questions. USER: <image>\nhow many shapes are "
      "there? ASSISTANT: 3</s>USER: and in this one <image>? ASSISTANT: 2 shapes</s>")
  assert rendered["llama_2"] == (
      "<s>[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
      "visual content that the user provides, and assist the user with a variety of tasks using natural "
      "language.\n<</SYS>>\n\n<image>\nhow many shapes are there? [/INST] 3 </s><s>[INST] and in this one "
      "<image>? [/INST] 2 shapes </s>")
  assert rendered["plain"] == "<s><image>3\n<image>2 shapes\n"
  trained = {name: conversation.rendered_text([p for p in t.render(rounds) if p.trainable])
             for name, t in conversation.TEMPLATES.items()}
  assert trained == {"vicuna_v1": " 3</s> 2 shapes</s>", "llama_2": " 3 </s> 2 shapes </s>", "plain": "3\n2 shapes\n"}


@pytest.mark.parametrize("template", sorted(conversation.TEMPLATES))
def test_only_the_answers_and_their_closing_token_carry_loss(tokenizer, template):
  example = _builder(tokenizer, template, bad_data="raise")(RECORD)
  expected = _expected_runs(tokenizer, template, ANSWERS)
  under_loss = example["targets"][example["loss_mask"] == 1]
  assert under_loss.tolist() == sum(expected, [])
  # Decoded (decode drops EOS; this small vocabulary writes "\n" as its unknown piece).
  assert tokenizer.decode(under_loss) == "".join(tokenizer.decode(ids) for ids in expected)
  if template == "plain":  # the third round has no image, so its answer follows the second's
    assert tokenizer.decode(under_loss).startswith(ANSWERS[0])
  else:
    assert [tokenizer.decode(run).strip() for run in _loss_runs(example)] == ANSWERS
  n = int(example["segment_ids"].sum())
  assert example["input_ids"][0] == tokenizer.bos_id
  assert not np.any(example["loss_mask"][example["targets"] == tokenizer.image_id])
  assert not np.any(example["loss_mask"][n - 1:])  # the last token predicts nothing
  np.testing.assert_array_equal(example["targets"][:n - 1], example["input_ids"][1:n])


def test_images_expand_to_their_tower_tokens_in_order(tokenizer):
  example = _builder(tokenizer, bad_data="raise")(RECORD)
  at_images = example["input_ids"] == tokenizer.image_id
  np.testing.assert_array_equal(example["feature_index"][at_images], np.arange(2 * P))
  assert np.all(example["feature_index"][~at_images] == conversation.TEXT)
  np.testing.assert_array_equal(example["image_mask"], [True, True, False, False])
  assert not example["images"][2:].any()
  n = int(example["segment_ids"].sum())
  np.testing.assert_array_equal(example["positions"][:n], np.arange(n))
  assert not example["positions"][n:].any() and not example["segment_ids"][n:].any()


def test_square_slots_centre_the_image_on_the_background():
  wide = np.zeros((4, 8, 3), np.uint8)
  wide[:] = (255, 0, 0)
  slots, index = SquareSlots(8, P, background=(0, 0, 255))(wide, first_slot=3)
  assert slots.shape == (1, 8, 8, 3)
  assert np.all(slots[0, 2:6] == (255, 0, 0))
  assert np.all(slots[0, :2] == (0, 0, 255)) and np.all(slots[0, 6:] == (0, 0, 255))
  np.testing.assert_array_equal(index, 3 * P + np.arange(P))
  tall, _ = SquareSlots(8, P, background=None)(np.full((8, 2, 3), 90, np.uint8), 0)
  assert np.all(tall == 90)  # padded with its own mean colour


# ---------------------------------------------------------------- where turns come from

def test_embedded_records_become_conversations(data_dir, tokenizer):
  builder = _builder(tokenizer, text_length=1024, max_slots=5, bad_data="raise")
  qa = builders.open_split(data_dir, "qa", "train")[0]
  assert conversation.conversation_turns(qa) == [Turn("user", f"<image>\n{qa['question'].decode()}"),
                                                 Turn("assistant", qa["answer"].decode())]
  captions = [builders.open_split(data_dir, "captions", "train")[i] for i in range(20)]
  prompts = set()
  for record in captions:
    user, answer = conversation.conversation_turns(record)
    assert user.text.startswith("<image>\n") and answer == Turn("assistant", pairs.caption_text(record["text"]))
    prompts.add(user.text[len("<image>\n"):])
  assert prompts <= set(conversation.CAPTION_PROMPTS) and len(prompts) > 1  # chosen per record
  assert conversation.conversation_turns(captions[0]) == conversation.conversation_turns(captions[0])
  document = builders.open_split(data_dir, "interleaved", "train")[0]
  turns = conversation.conversation_turns(document)
  chunks = document["text"].decode().split("<|endofchunk|>")[:-1]
  assert len(chunks) == len(document["images"])
  assert [t.role for t in turns] == ["user", "assistant"] * len(chunks)
  assert all(t.text.startswith("<image>\n") and t.text.count("<image>") == 1 for t in turns[0::2])
  assert [t.text for t in turns[1::2]] == [pairs.caption_text(c) for c in chunks]
  for record, turns in [(qa, None), (captions[0], None), (document, turns)]:
    turns = turns or conversation.conversation_turns(record)
    example = builder(record)
    assert example["image_mask"].sum() == len(record["images"])
    assert [tokenizer.decode(run).strip() for run in _loss_runs(example)] == [t.text for t in turns[1::2]]


def test_an_imported_llava_jsonl_round_trips_into_its_turns(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (8, 6), (200, 30, 30)).save(images / "red.png")
  conversations = {
      "two_rounds": ["<image>\nwhat colour is it?", "red", "and its shape?", "a square"],
      "no_image_token": ["what colour is it?", "red"],
      # The flattening's ambiguity: a user message with "\nAssistant: " in it comes back whole.
      "marker_in_question": ["<image>\nit said:\nAssistant: hello\nwhat next?", "nothing"],
  }
  lines = [{"id": name, "image": "red.png",
            "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]}
           for name, values in conversations.items()]
  jsonl = tmp_path / "train.jsonl"
  jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
  data = str(tmp_path / "data")
  builders.import_jsonl(data, "chats", {"train": str(jsonl)}, str(images), bad_data="raise")
  source = builders.open_split(data, "chats", "train")
  records = {source[i]["id"].decode().rsplit("/", 1)[-1]: source[i] for i in range(len(source))}
  for name, values in conversations.items():
    expected = [Turn("user" if k % 2 == 0 else "assistant", v) for k, v in enumerate(values)]
    if name == "no_image_token":  # the importer put it first; it comes back where LLaVA puts it
      expected[0] = Turn("user", "<image>\n" + values[0])
    assert conversation.conversation_turns(records[name]) == expected, name
  example = _builder(builders.load_tokenizer(data), bad_data="raise")(records["two_rounds"])
  assert example["image_mask"].sum() == 1 and len(_loss_runs(example)) == 2


# ---------------------------------------------------------------- bad records

def _record(turns, images, record_id="bad/0"):
  return {"id": record_id.encode(), "text": _flattened(turns).encode(), "images": images}


ONE_ROUND = [Turn("user", "<image>\nwhat is it?"), Turn("assistant", "a square")]


def _bad_cases(tokenizer):
  too_long = _builder(tokenizer, text_length=4096)(_record(ONE_ROUND, [_png()]))
  length = int(too_long["segment_ids"].sum())
  return {
      "image_token_mismatch": (_record(ONE_ROUND[:1] + [Turn("assistant", "<image> two")], [_png()]), {},
                               ["2 <image> placeholders", "1 images"]),
      "no_answer": (_record([Turn("user", "<image>\nhello?")], [_png()]), {}, ["no assistant turn", "['user']"]),
      "too_many_images": (_record([Turn("user", "<image><image>\nsame?"), Turn("assistant", "yes")], [_png(), _png()]),
                          {"max_slots": 1}, ["needs 2 image slots", "max_slots=1"]),
      "text_too_long": (_record(ONE_ROUND, [_png()]), {"text_length": length - 1},
                        [f"is {length} tokens", f"text_length={length - 1}"]),
      "image_too_small": (_record(ONE_ROUND, [_png(4, 4)]), {"image_slots": SquareSlots(S, P, min_side=8)},
                          ["image 0", "4 x 4", ">= 8"]),
      "corrupt_image": (_record(ONE_ROUND, [b"not an image"]), {}, ["image 0 cannot be decoded"]),
  }


@pytest.mark.parametrize("reason", ["image_token_mismatch", "no_answer", "too_many_images", "text_too_long",
                                    "image_too_small", "corrupt_image"])
def test_each_bad_record_is_skipped_with_its_reason_or_raised_naming_the_value(tokenizer, reason):
  record, options, fragments = _bad_cases(tokenizer)[reason]
  assert reason in BAD_REASONS
  assert _builder(tokenizer, **options)(record) == {"bad_record": reason, "record_id": "bad/0"}
  with pytest.raises(BadRecordError) as error:
    _builder(tokenizer, bad_data="raise", **options)(record)
  assert error.value.reason == reason and "bad/0" in str(error.value)
  for fragment in fragments:
    assert fragment in str(error.value)


def test_trailing_rounds_that_do_not_fit_are_dropped_whole_with_their_images(tokenizer):
  two_rounds = _builder(tokenizer, bad_data="raise")(_record(TURNS[:4], RECORD["images"]))
  length = int(two_rounds["segment_ids"].sum())
  for text_length in (length, length + 1):  # the third round fits neither
    cut = _builder(tokenizer, text_length=text_length, bad_data="raise")(RECORD)
    for key in ("input_ids", "feature_index", "targets", "loss_mask"):
      np.testing.assert_array_equal(cut[key][:length], two_rounds[key][:length])
    assert cut["segment_ids"].sum() == length and len(_loss_runs(cut)) == 2
  one_slot = _builder(tokenizer, max_slots=1, bad_data="raise")(RECORD)  # the second image needs a slot
  assert one_slot["image_mask"].tolist() == [True] and len(_loss_runs(one_slot)) == 1


# ---------------------------------------------------------------- packing

class TwoTiles:
  """A stand-in for AnyRes: two slots per image, each followed by a newline token."""

  def __call__(self, image, first_slot):
    tile = np.asarray(Image.fromarray(image).resize((S, S)))
    index = [first_slot * P + np.arange(P), [NEWLINE], (first_slot + 1) * P + np.arange(P), [NEWLINE]]
    return np.stack([tile, 255 - tile]), np.concatenate(index).astype(np.int32)


def test_pack_keeps_segments_positions_and_tower_tokens_apart(tokenizer):
  builder = _builder(tokenizer, max_slots=8, image_slots=TwoTiles(), bad_data="raise")
  one = builder(_record(ONE_ROUND, [_png()]))
  two = builder(RECORD)
  examples = [one, two, one]
  row = pack(examples, 512, 8, P)
  lengths = [int(e["segment_ids"].sum()) for e in examples]
  starts = np.cumsum([0] + lengths)
  slot_starts = [0, 2, 6]
  for k, (example, n) in enumerate(zip(examples, lengths)):
    span = slice(starts[k], starts[k] + n)
    assert np.all(row["segment_ids"][span] == k + 1)
    np.testing.assert_array_equal(row["positions"][span], np.arange(n))
    np.testing.assert_array_equal(row["input_ids"][span], example["input_ids"][:n])
    index = example["feature_index"][:n]
    np.testing.assert_array_equal(row["feature_index"][span], np.where(index >= 0, index + slot_starts[k] * P, index))
    np.testing.assert_array_equal(row["targets"][span][:-1], example["targets"][:n - 1])
    np.testing.assert_array_equal(row["loss_mask"][span], example["loss_mask"][:n])
    assert row["targets"][starts[k] + n - 1] == tokenizer.pad_id and row["loss_mask"][starts[k] + n - 1] == 0
    slots = int(example["image_mask"].sum())
    np.testing.assert_array_equal(row["images"][slot_starts[k]:slot_starts[k] + slots], example["images"][:slots])
  assert np.count_nonzero(row["feature_index"] == NEWLINE) == 2 * 4  # two per image, 4 images
  assert not row["segment_ids"][starts[-1]:].any() and row["image_mask"].all()
  assert sorted(row["feature_index"][row["feature_index"] >= 0].tolist()) == list(range(8 * P))
  with pytest.raises(ValueError, match=r"8 image slots; expected at most text_length=512 and max_slots=7"):
    pack(examples, 512, 7, P)


def _sized(tokens: int, slots: int, record_id: str, text_length: int = 10, max_slots: int = 4) -> dict:
  """An example of `tokens` tokens (ids 100 + position) and `slots` image slots; pad is 0."""
  ids = np.zeros(text_length, np.int32)
  ids[:tokens] = 100 + np.arange(tokens)
  return {"images": np.zeros((max_slots, 2, 2, 3), np.uint8), "image_mask": np.arange(max_slots) < slots,
          "input_ids": ids, "feature_index": np.full(text_length, -1, np.int32),
          "targets": np.concatenate([ids[1:], [0]]).astype(np.int32),
          "loss_mask": (np.arange(text_length) < tokens - 1).astype(np.float32),
          "segment_ids": (np.arange(text_length) < tokens).astype(np.int32),
          "positions": np.where(np.arange(text_length) < tokens, np.arange(text_length), 0).astype(np.int32),
          "record_id": record_id}


def test_packed_rows_take_examples_in_order_until_the_next_does_not_fit():
  sizes = [(5, 1), (4, 1), (3, 3), (6, 0), (1, 2), (2, 0)]
  examples = [_sized(n, s, str(k)) for k, (n, s) in enumerate(sizes)]
  rows = list(PackedDataset(grain.MapDataset.source(examples).to_iter_dataset(), 10, 4, 2))
  # (3, 3) overflows the slots of the first row; (1, 2) the slots of the second.
  assert [row["record_id"] for row in rows] == ["0,1", "2,3", "4,5"]
  assert [int(row["segment_ids"].max()) for row in rows] == [2, 2, 2]


def test_packed_pipeline_resumes_exactly_from_a_saved_state(data_dir, tokenizer):
  builder = _builder(tokenizer, text_length=1024, max_slots=8, with_record_ids=True)

  def make():
    return make_conversation_pipeline(builder, data_dir, batch_size=2, seed=3, shard_by_jax_process=False,
                                      read_threads=1, pack=True)

  first = make()
  for _ in range(2):
    next(first)
  packed = first._iterator._parent  # pylint: disable=protected-access
  # The example that did not fit the last row waits for the next: the state must re-read it.
  assert isinstance(packed, conversation._PackedIterator)  # pylint: disable=protected-access
  assert packed._waiting is not None  # pylint: disable=protected-access
  state = json.loads(json.dumps(first.get_state()))
  expected = [next(first) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  assert expected[0]["segment_ids"].max() > 1 and expected[0]["images"].shape == (2, 8, S, S, 3)
  assert resumed.bad_data_counts == first.bad_data_counts


def test_bad_records_are_counted_before_packing(tokenizer):
  builder = _builder(tokenizer)
  records = [RECORD, _record([Turn("user", "<image>\nhello?")], [_png()]), RECORD]
  examples = grain.MapDataset.source(records).map(builder).to_iter_dataset()
  dropped = pipeline._DropBadRecords(examples, 10, ["chats"])  # pylint: disable=protected-access
  rows = pipeline.Pipeline(PackedDataset(dropped, 1024, 8, P).batch(1), Bucket(8, 1024, S), 1)
  row = next(rows)
  assert row["segment_ids"].max() == 2 and rows.bad_data_counts["no_answer"] == 1
  with pytest.raises(ValueError, match="bad-record marker"):
    list(PackedDataset(examples, 1024, 8, P))


def test_an_unpacked_pipeline_gives_one_conversation_per_row(data_dir, tokenizer):
  builder = _builder(tokenizer, text_length=1024, max_slots=5)
  batch = next(make_conversation_pipeline(builder, data_dir, batch_size=3, shard_by_jax_process=False))
  shapes = {key: value.shape for key, value in batch.items()}
  assert shapes == {"images": (3, 5, S, S, 3), "image_mask": (3, 5), "input_ids": (3, 1024),
                    "feature_index": (3, 1024), "targets": (3, 1024), "loss_mask": (3, 1024),
                    "segment_ids": (3, 1024), "positions": (3, 1024)}
  assert batch["segment_ids"].max() == 1
