"""Prompt templates of few-shot evaluation: one string per task kind, holding the example's
fields, from which both a solved in-context example and the query are made.

  template = PromptTemplate("vqa", "<image>Question:{question} Short answer:{answer}<|endofchunk|>")
  template.example(question="how many?", answer="3")  # "<image>Question:how many? Short answer:3<|endofchunk|>"
  template.query(question="what colour?")               # "<image>Question:what colour? Short answer:"
  template.prompt([shot1, shot2], query)                # the shots' examples, then the query

The query is the template cut just before its answer field (and its trailing spaces), so a
model completes exactly what the solved examples show. The defaults (`DEFAULT_TEMPLATES`) are OpenFlamingo's
(`open_flamingo/eval/evaluate.py`: `get_vqa_prompt`, `get_caption_prompt`); a config
replaces them per kind with `eval.prompts.<kind>` (a run trained on other wording is asked in
its own words). Every `<image>` of a prompt takes the next image: the shots' in order, then
the query's.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence

IMAGE_TOKEN = "<image>"

# kind -> (the fields a template must name, the answer field among them: where the query stops)
FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "vqa": (("question", "answer"), "answer"),
    "captioning": (("caption",), "caption"),
}
DEFAULT_TEMPLATES: dict[str, str] = {
    "vqa": "<image>Question:{question} Short answer:{answer}<|endofchunk|>",
    "captioning": "<image>Output:{caption}<|endofchunk|>",
}


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A template of task kind `kind` (a key of FIELDS); ValueError naming the template when it
  does not name each of the kind's fields exactly once, names another, or holds no `<image>`."""

  kind: str
  text: str

  def __post_init__(self):
    if self.kind not in FIELDS:
      raise ValueError(f"no prompt template for task kind {self.kind!r}; templates exist for {sorted(FIELDS)}")
    required, answer = FIELDS[self.kind]
    try:
      named = [name for _, name, _, _ in string.Formatter().parse(self.text) if name is not None]
    except ValueError as e:
      raise ValueError(f"prompt template {self.text!r} ({self.kind}) does not parse as a str.format pattern: {e}") from None
    wrong = sorted({n for n in named if n not in required})
    counts = {n: named.count(n) for n in required}
    if wrong or any(c != 1 for c in counts.values()):
      raise ValueError(f"prompt template {self.text!r} ({self.kind}) names {named}; expected each of "
                       f"{['{' + n + '}' for n in required]} exactly once and nothing else")
    if IMAGE_TOKEN not in self.text.split("{" + answer + "}")[0]:
      raise ValueError(f"prompt template {self.text!r} ({self.kind}) has no {IMAGE_TOKEN} before {{{answer}}}; "
                       "expected one where the example's image goes")

  @property
  def answer_field(self) -> str:
    return FIELDS[self.kind][1]

  @property
  def images_per_example(self) -> int:
    return self.text.count(IMAGE_TOKEN)

  def example(self, **fields: str) -> str:
    """A solved in-context example: the whole template, filled."""
    return self.text.format(**fields)

  def query(self, **fields: str) -> str:
    """The query: the template up to its answer field, filled (the answer field is not needed),
    without the spaces that end it: "Answer: {answer}" asks "Answer:", and the model writes
    the space with the answer, as a tokenizer that joins a word to the space before it
    ("▁3") saw it in training; a prompt ending in a lone space is one it never saw."""
    head = self.text.split("{" + self.answer_field + "}")[0]
    return head.format(**{k: v for k, v in fields.items() if k != self.answer_field}).rstrip(" ")

  def prompt(self, shots: Sequence[Mapping[str, str]], query: Mapping[str, str]) -> str:
    """The shots' solved examples in order, then the query."""
    return "".join(self.example(**shot) for shot in shots) + self.query(**query)


def template_for(kind: str, overrides: Mapping[str, str] | None = None) -> PromptTemplate:
  """The template of `kind`: `overrides[kind]` (a config's `eval.prompts`) when given, else the default."""
  if kind not in FIELDS:
    raise ValueError(f"task kind {kind!r} is not answered by generating text; prompts exist for {sorted(FIELDS)}")
  text = (overrides or {}).get(kind) or DEFAULT_TEMPLATES[kind]
  return PromptTemplate(kind, str(text))
