"""Question-answer records for exact-match evaluation, and the prompt format.

A model is asked `"<image>Question: how many shapes are there? Answer:"` and should
continue with `" 3<|endofchunk|>"`. Few-shot prompts put solved examples first, each with
its own image: `"<image>Question: q1 Answer: a1<|endofchunk|><image>Question: q Answer:"`,
with the images passed in the same order. Training text of the `qa` dataset uses exactly
this format, so zero-shot and few-shot prompts look like the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mmjax.data import builders
from mmjax.data.preprocess import decode_image
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, qa_text, question_kind


def qa_records(data_dir: str | None = None, split: str = "validation", image_size: int | None = None,
               limit: int | None = None, name: str = "qa") -> Iterator[dict]:
  """Yields `{"id", "images": uint8 [n, S, S, 3], "question", "answer"}` in stored order.

  `image_size` resizes the images (None keeps the stored size); `limit` stops early.
  """
  source = builders.open_split(data_dir, name, split)
  count = len(source) if limit is None else min(limit, len(source))
  for i in range(count):
    record = source[i]
    images = [decode_image(bytes(b), image_size) for b in record["images"]]
    yield {
        "id": record["id"].decode(),
        "images": np.stack(images).astype(np.uint8),
        "question": record["question"].decode(),
        "answer": record["answer"].decode(),
    }


def qa_prompt(question: str, answer: str | None = None) -> str:
  """One chunk: with an answer (a solved shot), or without (the query to complete)."""
  return qa_text(question, answer)


def few_shot_prompt(shots: Sequence[tuple[str, str]], question: str) -> str:
  """Solved (question, answer) shots then the query; one `<image>` per shot and query."""
  return "".join(qa_prompt(q, a) for q, a in shots) + qa_prompt(question)


def answer_from_generation(text: str) -> str:
  """The answer in a model's continuation: up to `<|endofchunk|>` or a newline, stripped."""
  return text.split(END_OF_CHUNK_TOKEN)[0].split("\n")[0].strip().rstrip(".").lower()


def exact_match(prediction: str, answer: str) -> bool:
  return answer_from_generation(prediction) == answer.strip().lower()


def accuracy_by_kind(rows: Sequence[dict]) -> dict[str, float]:
  """Exact match per kind of question (`scenes.question_kind`; 'other' for unknown wordings),
  from rows with "question" and "correct"."""
  hits: dict[str, list[bool]] = {}
  for row in rows:
    hits.setdefault(question_kind(row["question"]) or "other", []).append(bool(row["correct"]))
  return {kind: float(np.mean(h)) for kind, h in sorted(hits.items())}
