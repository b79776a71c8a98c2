"""Benchmark task files (`mmjax.evaluation.tasks`): tiny files written here in exactly the
published formats (VQAv2, TextVQA, VizWiz, COCO captions, Karpathy's splits for COCO and
Flickr30k, image folders) load into the examples they hold; the embedded dataset written
out in every form reads back as its records; each bad input is refused naming the value.
Folders have spaces and non-ASCII letters in their names throughout."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mmjax.data import builders, pairs
from mmjax.data.scenes import Scene
from mmjax.evaluation import tasks, vqa
from mmjax.evaluation.tasks import embedded


def _image(path, colour=(200, 30, 30)) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  kind = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
  Image.new("RGB", (4, 4), colour).save(path, kind)
  return str(path)


def _json(path, document) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(document, f, ensure_ascii=False)
  return str(path)


@pytest.fixture
def root(tmp_path):
  return str(tmp_path / "bénchmarks ü 1")


def _escape(path: str) -> str:
  return re.escape(repr(path))


# ---------------------------------------------------------------- vqa

def _vqav2_answers(answer: str, count: int = 10) -> list[dict]:
  return [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(count)]


def _write_vqav2(root: str, questions: list[tuple[int, int, str]], answers: dict[int, list[dict]],
                 subtype: str = "val2014", with_images: bool = True) -> tuple[str, str, str]:
  """VQAv2's two files and COCO's image folder: questions are (question_id, image_id, question)."""
  header = {"info": {"description": "VQA v2"}, "license": {"name": "CC BY 4.0"}, "data_type": "mscoco",
            "data_subtype": subtype}
  questions_file = _json(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), {
      **header, "task_type": "Open-Ended",
      "questions": [{"image_id": image_id, "question": q, "question_id": qid} for qid, image_id, q in questions]})
  image_of = {qid: image_id for qid, image_id, _ in questions}
  annotations_file = _json(os.path.join(root, "v2_mscoco_val2014_annotations.json"), {
      **header,
      "annotations": [{"question_type": "what is", "multiple_choice_answer": given[0]["answer"], "answers": given,
                       "image_id": image_of.get(qid, 1), "answer_type": "other", "question_id": qid}
                      for qid, given in answers.items()]})
  images = os.path.join(root, "val 2014")
  os.makedirs(images, exist_ok=True)
  if with_images:
    for _, image_id, _ in questions:
      _image(os.path.join(images, f"COCO_{subtype}_{image_id:012d}.jpg"))
  return questions_file, annotations_file, images


def test_vqav2_files_give_each_question_its_ten_answers_and_its_coco_image(root):
  answers = [{"answer": a, "answer_confidence": c, "answer_id": k + 1}
             for k, (a, c) in enumerate([("red", "yes")] * 6 + [("dark red", "maybe")] * 4)]
  questions_file, annotations_file, images = _write_vqav2(
      root, [(42000, 42, "What colour is the bus?"), (9001, 9, "Is it raining?")],
      {9001: _vqav2_answers("no"), 42000: answers})

  examples = tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()

  assert [e.question_id for e in examples] == [9001, 42000]  # the annotations' order
  assert examples[1] == tasks.VQAExample(
      question_id=42000, image_id=42, question="What colour is the bus?",
      image_path=os.path.join(images, "COCO_val2014_000000000042.jpg"),
      answers=("red",) * 6 + ("dark red",) * 4)
  score = vqa.vqa_accuracy({9001: "No", 42000: "red"}, tasks.answers_by_question(examples), postprocess="none")
  assert score.accuracy == 100.0
  # The answers are those `vqa.answers_from_annotations` reads from the same file.
  with open(annotations_file) as f:
    assert vqa.answers_from_annotations(json.load(f)) == {e.question_id: list(e.answers) for e in examples}


def test_image_pattern_replaces_coco_naming(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 7, "q?")], {1: _vqav2_answers("a")},
                                                          with_images=False)
  _image(os.path.join(images, "000000000007.jpg"))  # COCO 2017's naming
  task = tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images,
                       image_pattern="{image_id:012d}.jpg")
  assert task.load()[0].image_path == os.path.join(images, "000000000007.jpg")


def test_textvqa_file_holds_questions_answers_and_hex_image_ids(root):
  record = {"question": "what brand is this?", "image_id": "003a8ae2ef43b901", "image_classes": ["Bottle"],
            "flickr_original_url": "https://farm.example/1.jpg", "flickr_300k_url": "https://farm.example/2.jpg",
            "image_width": 1024, "image_height": 768, "answers": ["coca cola"] * 7 + ["coke"] * 3,
            "question_tokens": ["what", "brand", "is", "this"], "question_id": 34602, "set_name": "val"}
  path = _json(os.path.join(root, "TextVQA_0.5.1_val.json"),
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [record]})
  images = os.path.join(root, "train_images")
  _image(os.path.join(images, "003a8ae2ef43b901.jpg"))

  [example] = tasks.parse_task_spec(f"vqa:annotations={path},images={images}").load()

  assert example == tasks.VQAExample(question_id=34602, image_id="003a8ae2ef43b901",
                                     image_path=os.path.join(images, "003a8ae2ef43b901.jpg"),
                                     question="what brand is this?", answers=tuple(record["answers"]))


def test_vizwiz_list_names_each_image_and_uses_it_as_the_question_id(root):
  answers = [{"answer": "soup", "answer_confidence": "yes"}] * 8 + [{"answer": "unanswerable",
                                                                      "answer_confidence": "no"}] * 2
  path = _json(os.path.join(root, "val.json"), [
      {"image": "VizWiz_val_00000000.jpg", "question": "What is this can?", "answers": answers,
       "answer_type": "other", "answerable": 1}])
  images = os.path.join(root, "val")
  _image(os.path.join(images, "VizWiz_val_00000000.jpg"))

  [example] = tasks.VQATask(annotations=path, images=images).load()

  assert example.question_id == example.image_id == "VizWiz_val_00000000.jpg"
  assert example.answers == ("soup",) * 8 + ("unanswerable",) * 2
  assert example.image_path == os.path.join(images, "VizWiz_val_00000000.jpg")


def test_annotated_question_ids_missing_from_the_questions_are_named(root):
  questions_file, annotations_file, images = _write_vqav2(
      root, [(1, 1, "q?")], {1: _vqav2_answers("a"), 77: _vqav2_answers("b"), 78: _vqav2_answers("c")})
  with pytest.raises(ValueError, match=r"2 question ids of annotations file .* are not in questions file .*: 77, 78"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_questions_without_annotations_are_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?"), (5, 2, "p?")], {1: _vqav2_answers("a")})
  with pytest.raises(ValueError, match=r"1 question ids of questions file .* are not in annotations file .*: 5;"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_missing_images_are_counted_and_the_first_few_named(root):
  questions = [(i, i, "q?") for i in range(1, 8)]
  answers = {i: _vqav2_answers("a") for i in range(1, 8)}
  questions_file, annotations_file, images = _write_vqav2(root, questions, answers)
  for i in range(2, 8):
    os.remove(os.path.join(images, f"COCO_val2014_{i:012d}.jpg"))
  first_five = ", ".join(repr(f"COCO_val2014_{i:012d}.jpg") for i in range(2, 7))
  with pytest.raises(ValueError, match=f"6 of the 7 images named by annotations file .* are missing from "
                                       f"{_escape(images)}: {re.escape(first_five)}, \\.\\.\\."):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_a_question_with_other_than_ten_answers_is_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(3, 1, "q?")], {3: _vqav2_answers("a", count=9)})
  with pytest.raises(ValueError, match=r"annotations\[0\]: question id 3 has 9 answers; the VQA accuracy needs 10"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_a_repeated_question_id_is_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(3, 1, "q?"), (3, 1, "again?")],
                                                          {3: _vqav2_answers("a")})
  with pytest.raises(ValueError, match=r"questions\[1\]: question id 3 appears twice"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_malformed_json_names_the_file_and_where(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  with open(questions_file, "w") as f:
    f.write('{"questions": [')
  with pytest.raises(ValueError, match=f"questions file {_escape(questions_file)} is not valid JSON .* line 1"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_bytes_that_are_not_utf8_and_values_of_the_wrong_type_are_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  with open(questions_file, "wb") as f:
    f.write(b'{"questions": ["\xff"]}')
  with pytest.raises(ValueError, match=f"questions file {_escape(questions_file)} is not UTF-8 text .* at byte 17\\)"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()
  _json(questions_file, {"data_subtype": "val2014", "questions": [{"image_id": 1, "question": 7, "question_id": 1}]})
  with pytest.raises(ValueError, match=r"questions\[0\]: 'question' is 7; expected a string"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_a_question_and_its_annotation_about_different_images_are_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  with open(annotations_file) as f:
    document = json.load(f)
  document["annotations"][0]["image_id"] = 2
  _json(annotations_file, document)
  with pytest.raises(ValueError, match=r"annotations\[0\]: question id 1 is about image id 2 here and 1 in questions"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_a_wrong_top_level_key_names_the_file_and_the_key_expected(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  _json(questions_file, {"question": []})
  with pytest.raises(ValueError, match=f"questions file {_escape(questions_file)} has the top-level keys "
                                       r"\['question'\]; expected the key 'questions'"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()
  _json(annotations_file, {"anotations": []})
  with pytest.raises(ValueError, match=f"annotations file {_escape(annotations_file)} has the top-level keys "
                                       r"\['anotations'\]; expected the key 'annotations' \(VQAv2"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_a_record_missing_a_key_is_named_with_the_keys_it_has(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  _json(questions_file, {"data_subtype": "val2014", "questions": [{"image_id": 1, "question_id": 1}]})
  with pytest.raises(ValueError, match=r"questions\[0\] has no 'question' \(its keys: \['image_id', 'question_id'\]\)"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=images).load()


def test_vqav2_annotations_without_questions_ask_for_them(root):
  _, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  with pytest.raises(ValueError, match="is in the VQAv2 form, whose questions are in a file of their own.*"
                                       "add questions=PATH"):
    tasks.VQATask(annotations=annotations_file, images=images).load()


def test_a_missing_file_and_a_missing_folder_are_named(root):
  questions_file, annotations_file, images = _write_vqav2(root, [(1, 1, "q?")], {1: _vqav2_answers("a")})
  absent = os.path.join(root, "nope ü.json")
  with pytest.raises(ValueError, match=f"questions file {_escape(absent)} does not exist"):
    tasks.VQATask(questions=absent, annotations=annotations_file, images=images).load()
  with pytest.raises(ValueError, match=f"images folder {_escape(absent)} is not a directory"):
    tasks.VQATask(questions=questions_file, annotations=annotations_file, images=absent).load()


# ---------------------------------------------------------------- captioning and retrieval

def _write_coco_captions(root: str, captions: list[tuple[int, str]], image_ids=(42, 73)) -> tuple[str, str]:
  images = os.path.join(root, "val2014")
  for image_id in image_ids:
    _image(os.path.join(images, f"COCO_val2014_{image_id:012d}.jpg"))
  path = _json(os.path.join(root, "annotations", "captions_val2014.json"), {
      "info": {"description": "COCO 2014 Dataset"}, "licenses": [{"id": 1, "name": "CC", "url": "x"}],
      "images": [{"license": 1, "file_name": f"COCO_val2014_{i:012d}.jpg", "coco_url": "http://x", "height": 4,
                  "width": 4, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://y", "id": i}
                 for i in image_ids],
      "annotations": [{"image_id": image_id, "id": n, "caption": caption}
                      for n, (image_id, caption) in enumerate(captions)]})
  return path, images


def _karpathy_image(index: int, split: str, captions: list[str], filepath: str | None, cocoid: int | None,
                    filename: str) -> dict:
  record = {"sentids": [10 * index + k for k in range(len(captions))], "filename": filename, "imgid": index,
            "split": split, "sentences": [{"tokens": c.lower().rstrip(".").split(), "raw": c, "imgid": index,
                                           "sentid": 10 * index + k} for k, c in enumerate(captions)]}
  if filepath is not None:
    record["filepath"] = filepath
  if cocoid is not None:
    record["cocoid"] = cocoid
  return record


COCO_CAPTIONS = [(73, "A cat on a mat."), (42, "A bus in the street."), (73, "A cat sleeping."),
                 (42, "A red bus.")]


def test_coco_captions_group_each_images_references_in_file_order(root):
  path, images = _write_coco_captions(root, COCO_CAPTIONS)
  examples = tasks.parse_task_spec(f"captioning:captions={path},images={images}").load()
  assert examples == [
      tasks.CaptionExample(image_id=42, image_path=os.path.join(images, "COCO_val2014_000000000042.jpg"),
                           captions=("A bus in the street.", "A red bus.")),
      tasks.CaptionExample(image_id=73, image_path=os.path.join(images, "COCO_val2014_000000000073.jpg"),
                           captions=("A cat on a mat.", "A cat sleeping."))]


def test_karpathy_coco_split_is_selected_and_images_found_under_their_filepath(root):
  records = [_karpathy_image(0, "train", ["A dog."], "train2014", 9, "COCO_train2014_000000000009.jpg"),
             _karpathy_image(1, "test", ["A bus.", "A red bus."], "val2014", 42, "COCO_val2014_000000000042.jpg"),
             _karpathy_image(2, "restval", ["A cat."], "val2014", 73, "COCO_val2014_000000000073.jpg")]
  path = _json(os.path.join(root, "dataset_coco.json"), {"images": records, "dataset": "coco"})
  _image(os.path.join(root, "val2014", "COCO_val2014_000000000042.jpg"))  # only the test split's image

  examples = tasks.CaptioningTask(captions=path, images=root, split="test").load()

  assert examples == [tasks.CaptionExample(image_id=42, captions=("A bus.", "A red bus."),
                                           image_path=os.path.join(root, "val2014", "COCO_val2014_000000000042.jpg"))]


def test_karpathy_flickr30k_has_no_filepath_and_uses_imgid(root):
  records = [_karpathy_image(i, "test", [f"Caption {i}a.", f"Caption {i}b."], None, None, f"{1000 + i}.jpg")
             for i in range(3)]
  path = _json(os.path.join(root, "dataset_flickr30k.json"), {"images": records, "dataset": "flickr30k"})
  for i in range(3):
    _image(os.path.join(root, "flickr30k images", f"{1000 + i}.jpg"))

  retrieval = tasks.parse_task_spec(
      f"retrieval:captions={path},images={os.path.join(root, 'flickr30k images')},split=test").load()

  assert retrieval.image_ids == (0, 1, 2)
  assert retrieval.captions == tuple(f"Caption {i}{x}." for i in range(3) for x in "ab")
  np.testing.assert_array_equal(retrieval.caption_image_index, [0, 0, 1, 1, 2, 2])


def test_retrieval_recall_counts_both_directions(root):
  path, images = _write_coco_captions(root, COCO_CAPTIONS)
  retrieval = tasks.RetrievalTask(captions=path, images=images).load()
  # Captions: 0, 1 of image 42 (index 0), 2, 3 of image 73 (index 1).
  np.testing.assert_array_equal(retrieval.caption_image_index, [0, 0, 1, 1])
  perfect = (retrieval.caption_image_index[None, :] == np.arange(2)[:, None]).astype(np.float32)
  assert retrieval.recall(perfect) == {"image_to_text": {1: 1.0, 5: 1.0, 10: 1.0},
                                       "text_to_image": {1: 1.0, 5: 1.0, 10: 1.0}}
  # Image 0 ranks a caption of image 1 first; caption 2 (of image 1) prefers image 0.
  similarity = np.array([[0.5, 0.1, 0.9, 0.2],
                         [0.0, 0.0, 0.8, 0.3]], np.float32)
  recall = retrieval.recall(similarity, ks=(1, 2))
  assert recall["image_to_text"] == {1: 0.5, 2: 1.0}
  assert recall["text_to_image"] == {1: 0.75, 2: 1.0}
  with pytest.raises(ValueError, match=r"similarity has shape \(4, 2\); expected \[images, captions\] = \(2, 4\)"):
    retrieval.recall(similarity.T)


def test_a_karpathy_split_that_does_not_exist_is_named_with_those_that_do(root):
  path = _json(os.path.join(root, "dataset_coco.json"), {"images": [
      _karpathy_image(0, "train", ["A."], "train2014", 9, "a.jpg"),
      _karpathy_image(1, "val", ["B."], "val2014", 10, "b.jpg")], "dataset": "coco"})
  with pytest.raises(ValueError, match=r"split='tset' is not in captions file .*; expected one of \['train', 'val'\]"):
    tasks.CaptioningTask(captions=path, images=root, split="tset").load()
  with pytest.raises(ValueError, match=r"holds Karpathy's splits \['train', 'val'\]: add split=NAME"):
    tasks.CaptioningTask(captions=path, images=root).load()


def test_a_split_given_for_a_coco_file_is_refused(root):
  path, images = _write_coco_captions(root, COCO_CAPTIONS)
  with pytest.raises(ValueError, match="split='test', but captions file .* is in COCO's form, which is one split"):
    tasks.CaptioningTask(captions=path, images=images, split="test").load()


def test_captions_of_unknown_images_and_images_without_captions_are_named(root):
  path, images = _write_coco_captions(root, COCO_CAPTIONS + [(5, "x"), (6, "y")])
  with pytest.raises(ValueError, match=r"2 captions of .* are of image ids that are not in its 'images': 5, 6"):
    tasks.CaptioningTask(captions=path, images=images).load()
  path, images = _write_coco_captions(root, [(42, "A bus.")])
  with pytest.raises(ValueError, match=r"1 images of .* have no caption in its 'annotations': 73"):
    tasks.CaptioningTask(captions=path, images=images).load()


def test_a_caption_file_of_neither_form_names_both(root):
  path = _json(os.path.join(root, "c.json"), {"captions": []})
  with pytest.raises(ValueError, match=r"has the top-level keys \['captions'\]; expected 'images' and 'annotations' "
                                       r"\(COCO: .*\) or 'images' with 'sentences' \(Karpathy"):
    tasks.CaptioningTask(captions=path, images=root).load()


# ---------------------------------------------------------------- classification

def test_a_folder_per_class_gives_labels_in_sorted_order_and_prompts(root):
  images = os.path.join(root, "imagenet val")
  _image(os.path.join(images, "n02_tabby_cat", "b.JPEG"))
  _image(os.path.join(images, "n02_tabby_cat", "a.png"))
  _image(os.path.join(images, "n01 chien", "ç.jpg"))
  os.makedirs(os.path.join(images, "n03_empty"))
  with open(os.path.join(images, "n01 chien", "notes.txt"), "w") as f:
    f.write("not an image")

  result = tasks.parse_task_spec(f"classification:images={images}").load()

  assert result.labels == ("n01 chien", "n02_tabby_cat", "n03_empty")
  assert result.class_names == ("n01 chien", "n02 tabby cat", "n03 empty")
  assert [(os.path.relpath(e.image_path, images), e.label) for e in result.examples] == [
      (os.path.join("n01 chien", "ç.jpg"), 0), (os.path.join("n02_tabby_cat", "a.png"), 1),
      (os.path.join("n02_tabby_cat", "b.JPEG"), 1)]
  assert result.prompts()[1] == ["a photo of a n02 tabby cat."]


def test_a_labels_file_with_class_names_and_templates(root):
  images = os.path.join(root, "flat")
  for name in ("x1.jpg", "x2.png", "x3.jpg"):
    _image(os.path.join(images, name))
  labels = _json(os.path.join(root, "labels.json"), {"x1.jpg": "n2", "x2.png": "n1", "x3.jpg": "n2"})
  classes = _json(os.path.join(root, "classes.json"), {"n2": "goldfish", "n1": "tench", "n9": "great white shark"})
  templates = os.path.join(root, "templates.txt")
  with open(templates, "w") as f:
    f.write("a photo of a {}.\n\nitap of a {}.\n")

  result = tasks.ClassificationTask(images=images, labels=labels, classes=classes, templates=templates).load()

  assert result.labels == ("n2", "n1", "n9")  # the classes file's order; n9 has no image but is a candidate
  assert [e.label for e in result.examples] == [0, 1, 0]
  assert result.prompts() == [["a photo of a goldfish.", "itap of a goldfish."],
                              ["a photo of a tench.", "itap of a tench."],
                              ["a photo of a great white shark.", "itap of a great white shark."]]


def test_classification_bad_inputs_are_named(root):
  images = os.path.join(root, "flat")
  _image(os.path.join(images, "x1.jpg"))
  labels = _json(os.path.join(root, "labels.json"), {"x1.jpg": "n2", "gone.jpg": "n1"})
  with pytest.raises(ValueError, match=r"1 of the 2 images named by labels file .* are missing .*: 'gone.jpg'"):
    tasks.ClassificationTask(images=images, labels=labels).load()
  labels = _json(os.path.join(root, "labels.json"), {"x1.jpg": "n2"})
  classes = _json(os.path.join(root, "classes.json"), {"n1": "tench"})
  with pytest.raises(ValueError, match=r"1 labels of the images are not in classes file .*: 'n2'"):
    tasks.ClassificationTask(images=images, labels=labels, classes=classes).load()
  templates = os.path.join(root, "templates.txt")
  with open(templates, "w") as f:
    f.write("a photo of a {}.\na photo of a thing.\n")
  with pytest.raises(ValueError, match=r"templates file .* line 2: 'a photo of a thing.'; expected one '\{\}'"):
    tasks.ClassificationTask(images=images, labels=labels, templates=templates).load()
  with pytest.raises(ValueError, match=r"1 images lie directly in images folder .*: 'x1.jpg'"):
    tasks.ClassificationTask(images=images).load()


# ---------------------------------------------------------------- specs

def test_a_spec_value_may_hold_spaces_unicode_colons_and_commas():
  task = tasks.parse_task_spec("vqa:questions=/data/vqa ü/q, v2.json,annotations=C:/a.json, images=/i m g")
  assert task == tasks.VQATask(questions="/data/vqa ü/q, v2.json", annotations="C:/a.json", images="/i m g")
  assert tasks.parse_task_spec(tasks.task_spec(task)) == task


@pytest.mark.parametrize("spec,message", [
    ("vqa", r"task spec 'vqa' has no ':'; expected KIND:KEY=VALUE,KEY=VALUE,\.\.\. with KIND one of \['captioning', "
            r"'classification', 'retrieval', 'vqa'\]"),
    ("vqav2:annotations=a", r"task kind 'vqav2' is not known; expected one of \['captioning', 'classification', "
                            r"'retrieval', 'vqa'\]"),
    ("vqa:annotations=a,images=b,imgs=c", r"task kind 'vqa' takes no imgs= .*; expected annotations=, images=, "
                                          r"questions=, image_pattern="),
    ("captioning:images=b", r"task spec 'captioning:images=b' lacks captions=; task kind 'captioning' needs "
                            r"captions=, images="),
    ("vqa:annotations=,images=b", r"annotations= is empty"),
    ("vqa:images=a,images=b,annotations=c", r"images= is given twice"),
    ("vqa:annotations", r"'annotations' in task spec 'vqa:annotations' is not KEY=VALUE"),
])
def test_a_bad_spec_is_refused_naming_the_part(spec, message):
  with pytest.raises(ValueError, match=message):
    tasks.parse_task_spec(spec)


# ---------------------------------------------------------------- the embedded dataset

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(data dir, name -> spec) of the embedded validation split written in every form."""
  data_dir = str(tmp_path_factory.mktemp("mmjax_data"))
  builders.build_embedded(data_dir, size=2, image_size=8, seed=0)
  target = str(tmp_path_factory.mktemp("exported") / "täsks, évaluation")
  return data_dir, target, embedded.write_embedded_tasks(target, data_dir)


def _records(data_dir: str, name: str) -> dict[int, dict]:
  source = builders.open_split(data_dir, name, "validation")
  return {int(source[i]["id"].decode().rsplit("/", 1)[1]): source[i] for i in range(len(source))}


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def test_the_embedded_qa_reads_back_as_vqa_with_ten_copies_of_each_answer(exported):
  data_dir, _, specs = exported
  examples = tasks.parse_task_spec(specs["vqa"]).load()
  records = _records(data_dir, "qa")
  assert [e.question_id for e in examples] == sorted(records)
  for example in examples:
    record = records[example.question_id]
    assert example.question == record["question"].decode()
    assert example.answers == (record["answer"].decode(),) * 10
    assert _read(example.image_path) == bytes(record["images"][0])
  truth = {e.question_id: e.answers[0] for e in examples}
  assert vqa.vqa_accuracy(truth, tasks.answers_by_question(examples), postprocess="none").accuracy == 100.0


def test_the_embedded_captions_read_back_alike_from_coco_and_karpathy_files(exported):
  data_dir, _, specs = exported
  coco = tasks.parse_task_spec(specs["captioning"]).load()
  karpathy = tasks.parse_task_spec(specs["captioning_karpathy"]).load()
  assert coco == karpathy
  records = _records(data_dir, "captions")
  assert [e.image_id for e in coco] == sorted(records)
  for example in coco:
    assert example.captions == (pairs.caption_text(records[example.image_id]["text"]),)
    assert _read(example.image_path) == bytes(records[example.image_id]["images"][0])
  for name in ("retrieval", "retrieval_karpathy"):
    retrieval = tasks.parse_task_spec(specs[name]).load()
    assert retrieval.captions == tuple(e.captions[0] for e in coco)
    assert retrieval.recall(np.eye(len(coco)))["text_to_image"][1] == 1.0


def test_the_embedded_scenes_read_back_as_shape_count_classes(exported):
  data_dir, _, specs = exported
  by_folders = tasks.parse_task_spec(specs["classification"]).load()
  by_labels = tasks.parse_task_spec(specs["classification_labels"]).load()
  assert by_folders.labels == by_labels.labels == ("1 shape", "2 shapes", "3 shapes", "4 shapes")
  assert by_folders.class_names == ("one shape", "two shapes", "three shapes", "four shapes")
  assert sorted(by_folders.examples, key=lambda e: e.image_path) == sorted(by_labels.examples,
                                                                          key=lambda e: e.image_path)
  records = _records(data_dir, "captions")
  for example in by_folders.examples:
    record = records[int(os.path.basename(example.image_path)[:-4])]
    assert example.label + 1 == len(Scene.from_key(record["scenes"][0].decode()).shapes)
  assert by_folders.prompts()[1] == ["a picture of two shapes.", "a drawing with two shapes."]


def test_readers_write_nothing_and_the_export_refuses_a_folder_in_use(exported):
  data_dir, target, specs = exported

  def tree():
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(target) for f in fs}

  before = tree()
  for spec in specs.values():
    tasks.parse_task_spec(spec).load()
  assert tree() == before
  with open(os.path.join(target, "tasks.txt"), encoding="utf-8") as f:
    assert f.read().splitlines() == [f"{name}: {spec}" for name, spec in specs.items()]
  with pytest.raises(ValueError, match=f"target {_escape(target)} exists and is not an empty folder"):
    embedded.write_embedded_tasks(target, data_dir)
