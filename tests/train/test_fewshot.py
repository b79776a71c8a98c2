"""`mmjax eval --task`: a benchmark task asked of a Flamingo trained for two steps on a tiny
embedded dataset, zero- and few-shot, its results file and its errors (the decoding and the
mesh: test_fewshot_decoding.py)."""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pytest

from mmjax import families
from mmjax.data import builders
from mmjax.evaluation import prompts
from mmjax.evaluation import tasks as task_files
from mmjax.evaluation.benchmark import parse_eval_task
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import fewshot

SMALL = ["--config.data.batch_size=4", "--config.data.text_length=32", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.train.num_steps=2", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.model.decoder.depth=2", "--config.model.resampler.depth=1",
         "--config.model.vision.depth=1", "--config.mesh.num_devices=1", "--config.eval.max_new_tokens=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("fewshot_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("fewshot_run") / "run")
  assert cli.train_main([f"--config={cli.TINY}", f"--workdir={wd}", f"--config.data.dir={data_dir}", *SMALL]) == 0
  return wd


def _options(**kw):
  return fewshot.Options(**{"limit": 6, "batch_size": 8, "max_new_tokens": 3, **kw})


def _answers(res):
  return [[row["generated"] for row in r["examples"]] for r in res["runs"]]


def _files_outside_eval(workdir):
  out = {}
  for dirpath, dirnames, files in os.walk(workdir):
    dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != os.path.join(workdir, "eval")]
    for f in files:
      path = os.path.join(dirpath, f)
      out[path] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def test_zero_and_two_shot_vqa_write_results_with_prompts_shots_and_scores(workdir, capsys):
  before = _files_outside_eval(workdir)
  results = fewshot.run(workdir, ["vqa:embedded"], _options(shots=(0, 2), seeds=2))
  assert _files_outside_eval(workdir) == before  # a reader: the training's files untouched
  table = capsys.readouterr().out
  assert "| vqa | 0 | zero-shot |" in table and "| vqa | 2 | random (2 seeds) |" in table
  zero, two = results
  assert os.path.basename(zero["path"]) == "vqa-0shot.json" and os.path.basename(two["path"]) == "vqa-2shot-random.json"
  saved = json.load(open(two["path"]))
  assert saved["step"] == 2 and saved["family"] == "flamingo" and saved["shots"] == 2 and saved["queries"] == 6
  assert saved["metric"] == {"metric": "VQA accuracy", "postprocess": "open_flamingo"}
  assert saved["prompt_template"] == prompts.DEFAULT_TEMPLATES["vqa"]
  assert saved["decoding"]["method"] == "greedy" and saved["config"]["model"]["family"] == "flamingo"
  assert saved["seeds"] == [0, 1] and len(saved["runs"]) == 2
  support = builders.open_split(config_lib.read_resolved(workdir).data.dir, "qa", "train")
  support_ids = {support[i]["id"].decode() for i in range(len(support))}
  for run in saved["runs"]:
    assert len(run["examples"]) == 6
    for row in run["examples"]:
      assert len(row["shots"]) == 2 and set(row["shots"]) <= support_ids and 0.0 <= row["score"] <= 1.0
  # The mean is over the seeds, each run's accuracy the mean of its questions' scores.
  per_run = [100 * np.mean([row["score"] for row in r["examples"]]) for r in saved["runs"]]
  assert saved["scores"]["accuracy"]["mean"] == pytest.approx(np.mean(per_run))
  assert saved["runs"][0]["examples"][0]["shots"] != saved["runs"][1]["examples"][0]["shots"]
  assert json.load(open(zero["path"]))["runs"][0]["examples"][0]["shots"] == []


def test_rices_with_the_runs_own_tower_picks_the_nearest_support_images_most_similar_last(workdir):
  from mmjax.evaluation import rices
  from mmjax.train import loop
  res, = fewshot.run(workdir, ["captioning:embedded"], _options(shots=(2,), selection="rices"))
  assert os.path.basename(res["path"]) == "captioning-2shot-rices.json"
  assert set(res["scores"]) >= {"CIDEr-D"} and res["rices_tower"]["workdir"] == "the evaluated run"
  assert os.listdir(os.path.join(workdir, "eval", "rices-cache"))
  # The same choice by brute force over the tower's embeddings.
  config = config_lib.read_resolved(workdir)
  task = families.of_config(config).task(config, workdir)
  _, params = loop.restore_params(config, workdir, task)
  tower = rices.image_tower(families.of_config(config).abstract(config).config.vision, params)
  source = builders.open_split(config.data.dir, "captions", "train")
  queries = builders.open_split(config.data.dir, "captions", "validation")
  from mmjax.data.preprocess import decode_image
  support = np.stack([decode_image(bytes(source[i]["images"][0]), 16) for i in range(len(source))])
  query = np.stack([decode_image(bytes(queries[i]["images"][0]), 16) for i in range(6)])
  s, q = rices.normalize_rows(tower.embed(support)), rices.normalize_rows(tower.embed(query))
  for row, sims in zip(res["runs"][0]["examples"], q @ s.T):
    best = np.argsort(-sims, kind="stable")[:2][::-1]  # the most similar last
    assert row["shots"] == [source[int(i)]["id"].decode() for i in best]


def test_zero_shot_with_text_only_examples_puts_their_text_but_not_their_images_before_the_query(workdir):
  res, = fewshot.run(workdir, ["vqa:embedded"], _options(text_only_examples=2, seeds=2))
  assert os.path.basename(res["path"]) == "vqa-0shot-text-only.json" and res["text_only_examples"] == 2
  assert res["seeds"] == [0, 1] and all(len(row["shots"]) == 2 for r in res["runs"] for row in r["examples"])
  config = config_lib.read_resolved(workdir)
  task = parse_eval_task("vqa:embedded")
  loaded = fewshot._Loaded(task, task.queries(config.data.dir)[:1], task.support_items(config.data.dir))
  blank = np.zeros((16, 16, 3), np.uint8)
  request, = fewshot._requests(prompts.template_for("vqa"), loaded, [[0, 1]], lambda which, i: blank, text_only=True)
  assert request.text.count("<image>") == 1 and len(request.images) == 1
  assert request.text.startswith(f"Question:{loaded.support[0].fields['question']} Short answer:")


def test_task_files_with_a_support_set_are_answered_as_the_benchmark_files_name_them(workdir, data_dir, tmp_path):
  val = task_files.write_embedded_tasks(str(tmp_path / "val"), data_dir, "validation")["vqa"]
  train = task_files.write_embedded_tasks(str(tmp_path / "train"), data_dir, "train")["vqa"]
  support = ",".join("support_" + part for part in train.split(":", 1)[1].split(",image_pattern=")[0].split(","))
  res, = fewshot.run(workdir, [f"{val},{support},name=files"], _options(shots=(1,)))
  assert os.path.basename(res["path"]) == "files-1shot-random.json"
  ids = [row["id"] for row in res["runs"][0]["examples"]]
  assert all(isinstance(i, int) for i in ids) and len(ids) == 6  # question ids of the files


def test_shots_beyond_the_support_set_are_refused_naming_both_numbers(workdir, capsys):
  assert cli.eval_main([f"--workdir={workdir}", "--task=vqa:embedded", "--shots=0,41"]) == 2
  err = capsys.readouterr().err
  assert "--shots 41" in err and "holds 40" in err and "'vqa'" in err


def test_prompts_longer_than_the_model_takes_are_refused_before_it_is_loaded(workdir):
  with pytest.raises(ValueError, match=r"family 'flamingo' cannot answer task 'vqa' with 38 shots: a prompt of \d+ "
                                       r"tokens \(its 39 images included\) \+ 3 new tokens exceeds the 512"):
    fewshot.run(workdir, ["vqa:embedded"], _options(shots=(0, 38)))


def test_a_task_without_a_support_set_is_refused_few_shot(workdir, data_dir, tmp_path):
  val = task_files.write_embedded_tasks(str(tmp_path / "val"), data_dir, "validation")["vqa"]
  with pytest.raises(ValueError, match="has no support set"):
    fewshot.run(workdir, [val], _options(shots=(1,)))


def test_retrieval_is_refused_to_a_generating_family(workdir, data_dir, tmp_path):
  spec = task_files.write_embedded_tasks(str(tmp_path / "val"), data_dir, "validation")["retrieval"]
  with pytest.raises(ValueError, match="family 'flamingo' cannot answer task 'retrieval'"):
    fewshot.run(workdir, [spec], _options())


def test_few_shot_is_refused_to_a_family_whose_prompt_takes_one_image(workdir, monkeypatch):
  config = config_lib.read_resolved(workdir)
  real = families.of_config(config).task

  def one_image_task(cfg, wd):
    task = real(cfg, wd)

    def render_prompt(prompt, images):  # as BLIP-2's renderer refuses
      if len(images) != 1:
        raise ValueError(f"a BLIP-2 prompt holds one <image> and one image is given; got {len(images)} images")
      return {"images": images[0][None]}, np.asarray(task.tokenizer.encode_prompt(prompt), np.int32), 1
    task.render_prompt = render_prompt
    return task
  flamingo = families.get("flamingo")
  monkeypatch.setitem(families.REGISTRY, "flamingo", dataclasses.replace(flamingo, task=one_image_task))
  with pytest.raises(ValueError, match=r"family 'flamingo' cannot answer task 'vqa' with 2 shots: it refuses a "
                                       r"prompt with 3 images \(a BLIP-2 prompt holds one"):
    fewshot.run(workdir, ["vqa:embedded"], _options(shots=(0, 2)))


@pytest.mark.parametrize("spec, message", [
    ("vqa:embedded=train", "train is the support set"),
    ("retrieval:embedded", "write its files"),
    ("vqa:questions=q.json", "lacks annotations=, images="),
    ("vqa:embedded,name=a/b", "name='a/b'"),
])
def test_bad_task_specs_name_what_is_wrong(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    parse_eval_task(spec)


def test_templates_cut_the_query_before_the_answer_and_check_their_fields():
  t = prompts.template_for("vqa")
  shot = {"question": "how many?", "answer": "3"}
  assert t.prompt([shot], {"question": "what colour?", "answer": "red"}) == (
      "<image>Question:how many? Short answer:3<|endofchunk|><image>Question:what colour? Short answer:")
  assert prompts.template_for("captioning", {"captioning": "<image>{caption}<|endofchunk|>"}).query(caption="x") == "<image>"
  # The space before the answer is the answer's to write, as the tokenizer joined it in training.
  spaced = prompts.PromptTemplate("vqa", "<image>Question: {question} Answer: {answer}<|endofchunk|>")
  assert spaced.query(question="how many?") == "<image>Question: how many? Answer:"
  with pytest.raises(ValueError, match="exactly once"):
    prompts.PromptTemplate("vqa", "<image>{question}")
  with pytest.raises(ValueError, match="no <image>"):
    prompts.PromptTemplate("captioning", "Output:{caption}")


def test_inputs_shorter_than_the_batchs_longest_repeat_their_last_entry():
  text = -1  # a text position of a per-position input such as LLaVA's feature_index
  np.testing.assert_array_equal(fewshot.pad_with_last(np.array([0, 1, text]), (5,)), [0, 1, text, text, text])
  slots = np.arange(2 * 4).reshape(2, 2, 2)
  padded = fewshot.pad_with_last(slots, (3, 2, 2))
  np.testing.assert_array_equal(padded[:2], slots)
  np.testing.assert_array_equal(padded[2], slots[1])


def test_config_eval_tasks_name_the_tasks_as_a_list_or_a_string_split_at_semicolons():
  assert fewshot.tasks_of_config(config_lib.load_config(cli.TINY)) == []
  config = ml_collections.ConfigDict({"eval": {"tasks": "vqa:embedded; captioning:embedded,name=c"}})
  assert fewshot.tasks_of_config(config) == ["vqa:embedded", "captioning:embedded,name=c"]
  config = ml_collections.ConfigDict({"eval": {"tasks": ["vqa:embedded"]}})
  assert fewshot.tasks_of_config(config) == ["vqa:embedded"]
  assert fewshot.parse_shots("0,4,8") == (0, 4, 8)
  with pytest.raises(ValueError, match="'0,four'"):
    fewshot.parse_shots("0,four")
  assert fewshot.parse_prompt("vqa=<image>Q: {question} A: {answer}") == ("vqa", "<image>Q: {question} A: {answer}")
