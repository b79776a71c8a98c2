"""What `mmjax eval` and `mmjax generate` ask of a LLaVA run: prompts rendered in its chat
template, and exact match on the embedded dataset's validation questions.

A prompt is the user's message of one round (`<image>` placeholders where its images go),
rendered by the run's template up to where the assistant's answer starts (Vicuna-v1:
"... USER: <image>\\nhow many shapes are there? ASSISTANT:"), each `<image>` expanded to
its image's tokens by the run's image geometry (LLaVA-1.5's padded square, or LLaVA-NeXT's
tiles), exactly as the training examples were built. The answer is what the model writes
up to its end-of-sequence token.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax import infer
from mmjax.data import conversation
from mmjax.data import qa as qa_lib
from mmjax.data.preprocess import decode_image
from mmjax.families.llava import model as llava

# Generation stops after this many prompts' worth of the same shape (one compile per batch shape).
BATCH = 64


def _prompt_ids(builder: conversation.ConversationBuilder, prompt: str) -> list[int]:
  """The template's rendering of one round whose answer is still to come, tokenized as in
  training: the pieces before the answer's first trainable one."""
  pieces = builder.template.render([conversation.Round(prompt, "")])
  first_answer = next(i for i, p in enumerate(pieces) if p.trainable)
  ids, _, _ = builder._tokenize(pieces[:first_answer])  # pylint: disable=protected-access
  return ids


def expand(builder: conversation.ConversationBuilder, ids: list[int], images: list[np.ndarray]):
  """(ids with each `<image>` expanded, feature_index, slots uint8 [N, S, S, 3]). ValueError
  when the number of `<image>` ids and of images differ, or an image fits no slot layout."""
  tok = builder.tokenizer
  n = sum(i == tok.image_id for i in ids)
  if n != len(images):
    raise ValueError(f"the prompt has {n} <image> placeholders but {len(images)} images were given; expected one "
                     "image per <image>")
  out_ids, index, slots = [], [], []
  it = iter(images)
  for i in ids:
    if i != tok.image_id:
      out_ids.append(i)
      index.append(llava.TEXT)
      continue
    first = sum(len(s) for s in slots)
    image_slots, image_index = builder.image_slots(np.asarray(next(it), np.uint8), first)
    slots.append(np.asarray(image_slots, np.uint8))
    out_ids += [tok.image_id] * len(image_index)
    index += [int(j) for j in image_index]
  s = builder.image_size
  all_slots = np.concatenate(slots) if slots else np.zeros((1, s, s, 3), np.uint8)
  return np.asarray(out_ids, np.int32), np.asarray(index, np.int32), all_slots


def render_prompt(builder: conversation.ConversationBuilder, prompt: str, images: list[np.ndarray]):
  """`Task.render_prompt`: ({"images" [1, N, S, S, 3], "feature_index" [1, T]}, ids Int[T],
  the end-of-sequence id)."""
  ids, index, slots = expand(builder, _prompt_ids(builder, prompt), images)
  return {"images": slots[None], "feature_index": index[None]}, ids, builder.tokenizer.eos_id


def generate_answers(decoding: infer.Decoding, params, builder: conversation.ConversationBuilder,
                     prompts: list[tuple[str, list[np.ndarray]]], max_new_tokens: int,
                     blank: bool = False) -> list[str]:
  """Greedy answers to (prompt, images) pairs, in batches of `BATCH` right-padded prompts."""
  tok = builder.tokenizer
  generator = infer.Generator(decoding)
  rendered = [render_prompt(builder, p, imgs) for p, imgs in prompts]
  longest = max(len(ids) for _, ids, _ in rendered)
  most_slots = max(r[0]["images"].shape[1] for r in rendered)
  s = builder.image_size
  out = []
  for start in range(0, len(rendered), BATCH):
    chunk = rendered[start:start + BATCH]
    b = BATCH if len(rendered) > BATCH else len(chunk)  # one shape for every batch
    ids = np.full((b, longest), tok.pad_id, np.int32)
    index = np.full((b, longest), llava.TEXT, np.int32)
    images = np.zeros((b, most_slots, s, s, 3), np.uint8)
    lengths = np.ones((b,), np.int32)
    for i in range(b):
      inputs, prompt_ids, _ = chunk[min(i, len(chunk) - 1)]
      ids[i, :len(prompt_ids)] = prompt_ids
      index[i, :len(prompt_ids)] = inputs["feature_index"][0]
      images[i, :inputs["images"].shape[1]] = inputs["images"][0]
      lengths[i] = len(prompt_ids)
    if blank:
      images = np.zeros_like(images)
    result = generator.generate({"params": params}, {"images": images, "feature_index": index}, ids, max_new_tokens,
                                prompt_lengths=lengths, eos_token_id=tok.eos_id, pad_id=tok.pad_id)
    for i in range(len(chunk)):
      out.append(tok.decode([int(t) for t in result.tokens[i, :result.lengths[i]]]))
  return out


def qa_exact_match(config: ml_collections.ConfigDict, decoding: infer.Decoding, params,
                   builder: conversation.ConversationBuilder, limit: int = 0) -> tuple[float, list[dict]]:
  """Exact match on the validation questions of the data directory's `qa`, each asked as
  the training conversations ask it (the user turn `conversation_turns` gives the record)."""
  from mmjax.families import common  # pylint: disable=g-import-not-at-top
  source = data_lib.open_split(common.data_dir(config), "qa", "validation")
  count = len(source) if not limit else min(limit, len(source))
  records, prompts = [], []
  for i in range(count):
    record = source[i]
    user = conversation.conversation_turns(record)[0]
    images = [decode_image(bytes(b), None) for b in record["images"]]
    prompts.append((user.text, images))
    records.append(record)
  answers = generate_answers(decoding, params, builder, prompts, int(config.eval.get("max_new_tokens", 6)),
                             blank=bool(config.data.get("blank_images", False)))
  return common.qa_rows(records, answers)


def evaluate(config: ml_collections.ConfigDict, cfg: llava.LlavaConfig, tokenizer, builder, params) -> dict:
  """`Task.evaluate`: QA exact match (overall and by kind of question) with a few examples,
  when the data directory has the embedded questions; {} otherwise."""
  del tokenizer
  from mmjax.families.llava import task as task_lib  # pylint: disable=g-import-not-at-top
  from mmjax.families import common  # pylint: disable=g-import-not-at-top
  if "qa" not in data_lib.dataset_names(common.data_dir(config)):
    return {}
  acc, rows = qa_exact_match(config, task_lib.decoding(cfg), params, builder,
                             int(config.eval.get("num_questions", 0)))
  return {"blank_images": bool(config.data.get("blank_images", False)), "qa_exact_match": acc,
          "qa_by_kind": qa_lib.accuracy_by_kind(rows), "examples": rows[:8]}
