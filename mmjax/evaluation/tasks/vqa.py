"""The `vqa` task: a benchmark's questions, their ten human answers and the image folder.

Three published forms, told apart by the annotations file's top level:

- VQAv2 and OK-VQA (`{"annotations": [...]}`): the questions are in a second file
  (`{"questions": [{"image_id", "question", "question_id"}]}`), the annotations give each
  question id ten `{"answer", "answer_confidence", "answer_id"}`; images are COCO's,
  `COCO_<data_subtype>_<image id, 12 digits>.jpg` (`COCO_val2014_000000000042.jpg`), the
  subtype read from the files' `data_subtype`.
- TextVQA (`{"data": [{"question_id", "image_id", "question", "answers": [ten strings]}]}`,
  as `TextVQA_0.5.1_val.json`): one file, images `<image_id>.jpg` (`train_images/`).
- VizWiz (`[{"image", "question", "answers": [{"answer", "answer_confidence"}] x10}]`, as
  `val.json`): one file, a list; a record has no question id (one question per image), so
  its image file name serves as both ids.

`image_pattern` (a `str.format` pattern of `{image_id}`) replaces the default file naming.
The test splits, which publish no answers, cannot be evaluated here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import ClassVar

from mmjax.evaluation.tasks import files
from mmjax.evaluation.vqa import ANSWERS_PER_QUESTION

VQAV2_QUESTIONS = '{"questions": [{"image_id", "question", "question_id"}, ...]}'
VQAV2_ANNOTATIONS = ('{"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence", '
                     '"answer_id"} x10]}, ...]}')
TEXTVQA = '{"data": [{"question_id", "image_id", "question", "answers": [ten strings]}, ...]}'
VIZWIZ = '[{"image", "question", "answers": [{"answer", "answer_confidence"} x10]}, ...]'


@dataclasses.dataclass(frozen=True)
class VQAExample:
  """One question about one image, with its ten human answers (`vqa.vqa_accuracy`'s input)."""

  question_id: Hashable  # an integer (VQAv2, OK-VQA, TextVQA) or the image file name (VizWiz)
  image_id: Hashable
  image_path: str
  question: str
  answers: tuple[str, ...]  # the ten human answers, as written


def answers_by_question(examples: Sequence[VQAExample]) -> dict[Hashable, tuple[str, ...]]:
  """Question id -> ten answers: what `vqa.vqa_accuracy` scores predictions against."""
  return {example.question_id: example.answers for example in examples}


def _ten_answers(answers: list[str], question_id, where: str) -> tuple[str, ...]:
  if len(answers) != ANSWERS_PER_QUESTION:
    raise ValueError(f"{where}: question id {question_id!r} has {len(answers)} answers; the VQA accuracy needs "
                     f"{ANSWERS_PER_QUESTION}")
  return tuple(answers)


def _answer_strings(record: dict, where: str) -> list[str]:
  """The `answer` of each of a record's `answers` objects (VQAv2 and VizWiz)."""
  return [files.field(answer, "answer", f"{where}.answers[{k}]", str)
          for k, answer in enumerate(files.field(record, "answers", where, list))]


def _check_first(question_id, seen, where: str) -> None:
  """Raises when `question_id` is already in `seen` (a set or a dict of earlier records)."""
  if question_id in seen:
    raise ValueError(f"{where}: question id {question_id!r} appears twice")


@dataclasses.dataclass(frozen=True)
class VQATask:
  """Spec: `vqa:annotations=PATH,images=DIR[,questions=PATH][,image_pattern=PATTERN]`
  (`questions` for the VQAv2 form only)."""

  kind: ClassVar[str] = "vqa"
  annotations: str  # the answers: VQAv2's annotations file, TextVQA's or VizWiz's one file
  images: str  # the folder holding the image files
  questions: str | None = None  # VQAv2's questions file
  image_pattern: str | None = None  # the file name of an image, from `{image_id}`

  def load(self) -> list[VQAExample]:
    """The examples in the order of the annotations file; raises ValueError naming the file,
    record and value for any of the checks in the module docstring."""
    folder = files.existing_folder(self.images, "images")
    path = files.resolve(self.annotations)
    document = files.read_json(path, "annotations")
    if isinstance(document, dict) and "annotations" in document:
      rows, default_pattern = self._vqav2(path, document)
    elif isinstance(document, dict) and "data" in document:
      rows, default_pattern = self._textvqa(path, document), "{image_id}.jpg"
    elif isinstance(document, list):
      rows, default_pattern = self._vizwiz(path, document), "{image_id}"
    else:
      found = (f"the top-level keys {sorted(document)}" if isinstance(document, dict)
               else f"a JSON {files.json_type(document)} at top level")
      raise ValueError(f"annotations file {path!r} has {found}; expected the key 'annotations' (VQAv2, OK-VQA: "
                       f"{VQAV2_ANNOTATIONS}), the key 'data' (TextVQA: {TEXTVQA}) or an array (VizWiz: {VIZWIZ})")
    pattern = self.image_pattern or default_pattern
    examples = [VQAExample(question_id=question_id, image_id=image_id,
                           image_path=files.image_file(folder, pattern, image_id), question=question,
                           answers=answers)
                for question_id, image_id, question, answers in rows]
    files.check_images([e.image_path for e in examples], folder, f"annotations file {path!r}")
    return examples

  def _not_vqav2(self, path: str, form: str) -> None:
    if self.questions is not None:
      raise ValueError(f"questions={self.questions!r}, but annotations file {path!r} is in {form}'s form, which "
                       "holds its questions: leave questions out")

  def _vqav2(self, path: str, annotations_document: dict) -> tuple[list, str | None]:
    if self.questions is None:
      raise ValueError(f"annotations file {path!r} is in the VQAv2 form, whose questions are in a file of their "
                       f"own ({VQAV2_QUESTIONS}): add questions=PATH")
    questions_path = files.resolve(self.questions)
    questions_document = files.read_json(questions_path, "questions")
    questions = {}
    for i, record in enumerate(files.top_level_list(questions_document, "questions", questions_path, "questions",
                                                    VQAV2_QUESTIONS)):
      where = f"{questions_path}: questions[{i}]"
      question_id = files.field(record, "question_id", where, int, str)
      _check_first(question_id, questions, where)
      questions[question_id] = (files.field(record, "image_id", where, int, str),
                                files.field(record, "question", where, str))
    answers = {}
    for i, record in enumerate(files.top_level_list(annotations_document, "annotations", path, "annotations",
                                                    VQAV2_ANNOTATIONS)):
      where = f"{path}: annotations[{i}]"
      question_id = files.field(record, "question_id", where, int, str)
      _check_first(question_id, answers, where)
      image_id = files.field(record, "image_id", where, int, str)
      if question_id in questions and questions[question_id][0] != image_id:
        raise ValueError(f"{where}: question id {question_id!r} is about image id {image_id!r} here and "
                         f"{questions[question_id][0]!r} in questions file {questions_path!r}")
      answers[question_id] = _ten_answers(_answer_strings(record, where), question_id, where)
    files.check_same_ids(answers, questions, f"annotations file {path!r}", f"questions file {questions_path!r}",
                         "question ids")
    rows = [(question_id, questions[question_id][0], questions[question_id][1], given)
            for question_id, given in answers.items()]
    return rows, self._coco_pattern(questions_path, questions_document, annotations_document)

  def _coco_pattern(self, questions_path: str, *documents: dict) -> str | None:
    """COCO's naming, from the files' `data_subtype` ("val2014"); None where they have none and
    image_pattern replaces it."""
    subtypes = [d["data_subtype"] for d in documents if isinstance(d.get("data_subtype"), str)]
    if not subtypes and self.image_pattern is None:
      raise ValueError(f"questions file {questions_path!r} has no 'data_subtype' (such as \"val2014\") to name "
                       "COCO's image files by: add image_pattern=, e.g. image_pattern=COCO_val2014_{image_id:012d}.jpg")
    return f"COCO_{subtypes[0]}_{{image_id:012d}}.jpg" if subtypes else None

  def _textvqa(self, path: str, document: dict) -> list:
    self._not_vqav2(path, "TextVQA")
    rows, seen = [], set()
    for i, record in enumerate(files.top_level_list(document, "data", path, "annotations", TEXTVQA)):
      where = f"{path}: data[{i}]"
      question_id = files.field(record, "question_id", where, int, str)
      _check_first(question_id, seen, where)
      seen.add(question_id)
      given = files.field(record, "answers", where, list)
      for k, answer in enumerate(given):
        if not isinstance(answer, str):
          raise ValueError(f"{where}: answers[{k}] is a JSON {files.json_type(answer)}; expected a string")
      rows.append((question_id, files.field(record, "image_id", where, int, str),
                   files.field(record, "question", where, str), _ten_answers(given, question_id, where)))
    return rows

  def _vizwiz(self, path: str, document: list) -> list:
    self._not_vqav2(path, "VizWiz")
    rows, seen = [], set()
    for i, record in enumerate(document):
      where = f"{path}: [{i}]"
      image = files.field(record, "image", where, str)
      _check_first(image, seen, where)
      seen.add(image)
      rows.append((image, image, files.field(record, "question", where, str),
                   _ten_answers(_answer_strings(record, where), image, where)))
    return rows
