"""VQA accuracy as the official VQA evaluation computes it, with the answer post-processing of
OpenFlamingo's or lmms-eval's harness.

A question has ten human answers. A predicted answer scores `min(1, matches / 3)` against each
subset of nine (one answer left out), and the question's accuracy is the mean over the ten
subsets; the reported accuracy is the mean over questions, in percent. Before comparing, the
prediction and the answers are normalised (`normalize_answer`):

- punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it
  touches a space in the original text, or anywhere once the text holds a digit-comma-digit
  ("1,000"), and replaced by a space otherwise ("t-shirt" -> "t shirt"); a period not followed
  by a digit is deleted ("3.5" keeps its own);
- words: lower-cased; the number words none/zero..ten become digits; the articles a/an/the
  are dropped; contractions written without their apostrophes get them back ("dont" ->
  "don't").

Where generated text ends is a harness's choice, made before that normalisation, and the
harnesses differ (the `postprocess` option of `vqa_accuracy`, printed with the score):

- "open_flamingo": OpenFlamingo's `evaluate_vqa` keeps the text before the first "Question",
  "Answer" or "Short", then before the first ", "; it scores with its copy of the official
  code, which normalises every reference answer.
- "lmms_eval": lmms-eval's `vqav2_process_results` lower-cases, deletes "," and "?", writes
  "'s" as " 's" and normalises the prediction; the reference answers, and the prediction a
  second time, are normalised only when the ten answers are not all the same string.
- "none": the generated text as it is, scored as under "open_flamingo".

Each rule is tested equal to its reference (tests/evaluation/test_vqa.py). The original
evaluation of the VQA authors normalises the reference answers by punctuation only, and only
when they disagree; where reference answers are already in normal form (as the released
annotations are meant to be) it gives what "none" gives. docs/evaluation.md shows where they
part. OpenFlamingo's OK-VQA post-processing (stemming through nltk) is not reproduced.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable, Mapping, Sequence

# The characters the official evaluation treats as punctuation (the period apart).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# A digit, a comma, a digit: the official test for a number written with thousands separators.
# lmms-eval's copy writes it with lookarounds and `,+`, so "1,,2" counts there too.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_DIGIT_COMMAS_DIGIT = re.compile(r"\d,+\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group, meant as a lookbehind, is a
# lookahead for "<=" and a digit, which never holds where the next character is ".", so only
# "not followed by a digit" remains.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where `sub` takes its count, so at most 32
# periods are deleted from one answer.
_PERIODS_DELETED_AT_MOST = 32

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))


def _contractions() -> dict[str, str]:
  """The official table of contractions written without apostrophes, as a rule and its exceptions.

  A contraction with one apostrophe is restored from its spelling without it ("dont");
  one with several, from each spelling that lacks exactly one of them ("couldnt've",
  "couldn'tve"; never "couldntve"). The table also holds "Id've", "I'dve", "Im" and "Ive",
  which cannot match a lower-cased word, and "let's" and "she's" mapped to themselves.
  """
  single = """ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
      how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
      should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's
      there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's
      what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've
      wouldn't y'all you'd you'll you're you've""".split()
  several = """couldn't've hadn't've he'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've
      someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've
      you'd've""".split()
  table = {word.replace("'", ""): word for word in single}
  for word in several:
    apostrophes = [i for i, c in enumerate(word) if c == "'"]
    table.update({word[:i] + word[i + 1:]: word for i in apostrophes})
  # The one entry that goes the other way in the official table.
  table["somebody'd"] = "somebodyd"
  return table


_CONTRACTIONS = _contractions()


def _normalize_punctuation(text: str, digit_comma_digit: re.Pattern = _DIGIT_COMMA_DIGIT) -> str:
  has_number_with_commas = digit_comma_digit.search(text) is not None
  out = text
  for p in _PUNCTUATION:
    # Decided on the text as given, not as already changed by earlier characters.
    touches_space = p + " " in text or " " + p in text
    out = out.replace(p, "" if touches_space or has_number_with_commas else " ")
  return _PERIOD.sub("", out, count=_PERIODS_DELETED_AT_MOST)


def _normalize_words(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """An answer as the official evaluation compares it: "Two dogs." -> "2 dogs"."""
  return _normalize_words(_normalize_punctuation(_clean_whitespace(text)))


def _cut_at_prompt_words(generation: str) -> str:
  """OpenFlamingo's cut: the text before "Question", "Answer" or "Short", then before ", "."""
  cut = min((i for i in (generation.find(w) for w in ("Question", "Answer", "Short")) if i >= 0),
            default=len(generation))
  return generation[:cut].split(", ", 1)[0]


def _lmms_eval_normalize(text: str) -> str:
  return _normalize_words(_normalize_punctuation(text, _DIGIT_COMMAS_DIGIT))


def _lmms_eval_prediction(generation: str) -> str:
  """lmms-eval's EvalAIAnswerProcessor: its word tokenisation, then the official normalisation."""
  text = generation.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  return _lmms_eval_normalize(_clean_whitespace(text))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Mean over the subsets lacking one answer of min(1, matches among the others / 3)."""
  matches = sum(a == prediction for a in answers)
  return sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers) / len(answers)


def _score_cut_at_prompt_words(prediction: str, answers: Sequence[str]) -> tuple[str, float]:
  prediction = normalize_answer(_cut_at_prompt_words(prediction))
  return prediction, _leave_one_out_accuracy(prediction, [normalize_answer(a) for a in answers])


def _score_as_given(prediction: str, answers: Sequence[str]) -> tuple[str, float]:
  prediction = normalize_answer(prediction)
  return prediction, _leave_one_out_accuracy(prediction, [normalize_answer(a) for a in answers])


def _score_as_lmms_eval(prediction: str, answers: Sequence[str]) -> tuple[str, float]:
  prediction = _lmms_eval_prediction(prediction)
  answers = [_clean_whitespace(a) for a in answers]
  if len(set(answers)) > 1:
    answers = [_lmms_eval_normalize(a) for a in answers]
    prediction = _lmms_eval_normalize(prediction)
  return prediction, _leave_one_out_accuracy(prediction, answers)


# Each option: (prediction, answers) -> (the prediction as compared, the question's accuracy).
_RULES: dict[str, Callable[[str, Sequence[str]], tuple[str, float]]] = {
    "open_flamingo": _score_cut_at_prompt_words,
    "lmms_eval": _score_as_lmms_eval,
    "none": _score_as_given,
}
POSTPROCESS_OPTIONS = tuple(_RULES)
ANSWERS_PER_QUESTION = 10


def postprocess_generation(generation: str, postprocess: str) -> str:
  """The generated text cut and cleaned as the `postprocess` option's harness does, before scoring.

  "open_flamingo" returns the text OpenFlamingo writes to its results file; "lmms_eval" the
  prediction after lmms-eval's answer processor (normalised already); "none" the text.
  """
  if postprocess == "open_flamingo":
    return _cut_at_prompt_words(generation)
  if postprocess == "lmms_eval":
    return _lmms_eval_prediction(generation)
  _check_option(postprocess)
  return generation


@dataclasses.dataclass(frozen=True)
class VQAScore:
  """A VQA accuracy with the post-processing it was computed under."""

  accuracy: float  # percent: the mean over questions of per_question, times 100
  postprocess: str  # one of POSTPROCESS_OPTIONS
  per_question: dict[Hashable, float]  # question id -> accuracy in [0, 1]
  compared: dict[Hashable, str]  # question id -> the prediction as compared with the answers

  def __str__(self) -> str:
    return (f"VQA accuracy {self.accuracy:.2f}% over {len(self.per_question)} questions "
            f"(post-processing: {self.postprocess})")


def _check_option(postprocess: str) -> None:
  if postprocess not in _RULES:
    raise ValueError(f"postprocess={postprocess!r}; expected one of {', '.join(POSTPROCESS_OPTIONS)}")


def vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]], *,
                 postprocess: str) -> VQAScore:
  """The VQA accuracy of generated `predictions` (question id -> text) against the ten human
  `answers` of each question (question id -> strings; `answers_from_annotations` reads them
  from a VQAv2-style annotations file). Every predicted question must have ten answers;
  annotated questions without a prediction are not scored.
  """
  _check_option(postprocess)
  if not predictions:
    raise ValueError("no predictions to score")
  rule = _RULES[postprocess]
  per_question, compared = {}, {}
  for question_id, prediction in predictions.items():
    if question_id not in answers:
      raise ValueError(f"a prediction for question id {question_id!r}, which has no annotated answers")
    given = answers[question_id]
    if len(given) != ANSWERS_PER_QUESTION:
      raise ValueError(f"question id {question_id!r} has {len(given)} answers; the VQA accuracy needs "
                       f"{ANSWERS_PER_QUESTION}")
    compared[question_id], per_question[question_id] = rule(prediction, given)
  accuracy = 100.0 * sum(per_question.values()) / len(per_question)
  return VQAScore(accuracy=accuracy, postprocess=postprocess, per_question=per_question, compared=compared)


def answers_from_annotations(annotations: Mapping | Sequence[Mapping]) -> dict[Hashable, list[str]]:
  """Question id -> answer strings, from a VQAv2-style annotations file as loaded from JSON
  (`{"annotations": [{"question_id", "answers": [{"answer", ...}, ...]}, ...]}`) or its list."""
  records = annotations["annotations"] if isinstance(annotations, Mapping) else annotations
  out = {}
  for record in records:
    question_id = record["question_id"]
    if question_id in out:
      raise ValueError(f"question id {question_id!r} is annotated twice")
    out[question_id] = [a["answer"] for a in record["answers"]]
  return out
