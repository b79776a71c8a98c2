"""The real thing, small: `mmjax train / eval / generate / plot` on Flamingo over a tiny
embedded dataset, and the Flamingo recipe's freezing on the real parameter labels."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import data as data_lib
from mmjax.data import builders
from mmjax.data import scenes
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import evaluate
from mmjax.train import metrics as metrics_lib
from mmjax.families.flamingo import task as task_lib

SMALL = ["--config.data.batch_size=4", "--config.data.text_length=32", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.train.num_steps=4", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.eval.num_questions=4", "--config.eval.few_shot_k=1", "--config.eval.max_new_tokens=2",
         "--config.log.tensorboard=False", "--config.model.decoder.depth=2", "--config.model.resampler.depth=1",
         "--config.model.vision.depth=1", "--config.mesh.num_devices=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("train_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


def _args(data_dir, workdir, *extra):
  return [f"--config={cli.TINY}", f"--workdir={workdir}", f"--config.data.dir={data_dir}", *SMALL, *extra]


@pytest.mark.slow
def test_train_eval_generate_plot_run_on_a_trained_workdir(data_dir, tmp_path, capsys):
  wd = str(tmp_path / "run")
  assert cli.train_main(_args(data_dir, wd)) == 0
  assert "done at step 4" in capsys.readouterr().out
  assert config_lib.read_resolved(wd).data.dir == data_dir
  assert cli.eval_main([f"--workdir={wd}"]) == 0
  out = capsys.readouterr().out
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["step"] == 4 and np.isfinite(res["val_loss"]) and 0.0 <= res["qa_zero_shot"] <= 1.0
  assert "qa_1_shot" in res and res["cider"] >= 0.0 and "qa_zero_shot" in out
  assert set(res["qa_zero_shot_by_kind"]) <= set(scenes.QUESTION_KINDS)
  img = next(iter(builders.open_split(data_dir, "qa", "validation")))["images"][0]
  png = tmp_path / "a.png"
  png.write_bytes(bytes(img))
  prompt = "<image>Question: how many shapes are there? Answer:"
  assert cli.generate_main([f"--workdir={wd}", f"--image={png}", f"--prompt={prompt}", "--max-new-tokens=3"]) == 0
  printed = capsys.readouterr().out.strip()
  # The cached generator (mmjax.infer) agrees with greedy decoding by full forward passes.
  from mmjax.train import evaluate
  config, task, _, params = evaluate.load(wd)
  image = np.asarray(Image.open(png).convert("RGB").resize((16, 16), Image.BICUBIC), np.uint8)
  tok = task.tokenizer
  ids = list(evaluate.prompt_ids(tok, prompt))
  for _ in range(3):
    x = np.asarray([ids], np.int32)
    batch = {"images": image[None, None], "input_ids": x, "image_mask": np.ones((1, 1), bool),
             "image_index": np.cumsum(x == tok.image_id, axis=1, dtype=np.int32)}
    logits = np.array(task.apply_fn(params, batch))[0, -1]  # a writable copy
    logits[tok.image_id] = -np.inf  # generation never samples <image>
    ids.append(int(np.argmax(logits)))
    if ids[-1] == tok.end_of_chunk_id:
      break
  want = tok.decode(ids[len(evaluate.prompt_ids(tok, prompt)):])
  assert printed == want.split("<|endofchunk|>")[0].strip()
  assert cli.plot_main([f"--workdir={wd}", f"--out={tmp_path / 'c.png'}"]) == 0
  assert Image.open(tmp_path / "c.png").size[0] > 100
  # Rerunning the same command resumes and has nothing left to do.
  assert cli.train_main(_args(data_dir, wd)) == 0
  assert "done at step 4 (started at 4)" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_both_runs_and_prints_accuracy_with_and_without_images_by_kind(tmp_path, capsys):
  wd, data = str(tmp_path / "demo"), str(tmp_path / "data")
  small = [a for a in SMALL if not a.startswith("--config.mesh.num_devices")] + ["--config.mesh.num_devices=1"]
  cache = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    assert cli.demo_main([f"--workdir={wd}", f"--data-dir={data}", "--data-size=40", "--data-image-size=16",
                          *small]) == 0
  finally:  # the demo keeps compiled programs in its work directory: not for the other tests
    jax.config.update("jax_compilation_cache_dir", cache[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", cache[1])
  out = capsys.readouterr().out
  for line in ("QA exact match, with images:", "QA exact match, images blanked:", "by kind of question",
               "caption CIDEr-D"):
    assert line in out, line
  results = json.load(open(os.path.join(wd, "demo.json")))["results"]
  assert results["blank"]["blank_images"] and not results["images"]["blank_images"]
  for res in results.values():
    assert res["step"] == 4 and set(res["qa_zero_shot_by_kind"]) <= set(scenes.QUESTION_KINDS)
  assert os.path.exists(os.path.join(wd, "curves.png"))


@pytest.mark.slow
def test_the_flamingo_recipe_on_flamingo_freezes_vision_and_lm_bitwise_and_opens_every_gate(data_dir, tmp_path):
  from mmjax.train import loop
  config = config_lib.load_config(cli.TINY, [f"--config.data.dir={data_dir}", *SMALL, "--config.train.num_steps=3",
                                             "--config.freeze.stages=0:resampler,xattn",
                                             "--config.model.cross_attn_every_n_layers=1",
                                             "--config.init.gate_value=0.0",  # Flamingo's closed gates
                                             "--config.optimizer.lr=0.01"])
  task = task_lib.flamingo_task(config)
  params0 = jax.jit(task.init_params)(jax.random.key(int(config.seed)))
  params = loop.train(config, str(tmp_path), task)["state"].params
  labels = task.param_labels(params0)
  seen = set()
  for (path, p0), p1, label in zip(jax.tree_util.tree_flatten_with_path(params0)[0], jax.tree.leaves(params),
                                   jax.tree.leaves(labels)):
    seen.add(label)
    same = np.array_equal(np.asarray(p0).view(np.uint32), np.asarray(p1).view(np.uint32))
    assert same == (label in ("vision", "lm")), (jax.tree_util.keystr(path), label)
  assert seen == {"vision", "resampler", "xattn", "lm"}
  # Every gate in the parameters is logged, and every one has moved off its initial value.
  gate_paths = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params0)[0]
                if jax.tree_util.keystr(path).endswith(("attn_gate']", "ff_gate']"))}
  assert len(gate_paths) == 4, gate_paths  # two xattn blocks (depth 2, one before every layer), two gates each
  gates = {k: float(v) for k, v in
           metrics_lib.read_metrics(str(tmp_path))[-1].items() if k.startswith("gate/")}
  assert len(gates) == len(gate_paths) and all(abs(v) > 1e-4 for v in gates.values()), gates


def test_a_bad_override_is_one_line_and_status_2(capsys, tmp_path):
  assert cli.train_main([f"--config={cli.TINY}", f"--workdir={tmp_path}", "--config.optimizer.lrr=1"]) == 2
  assert "lrr" in capsys.readouterr().err
  assert cli.eval_main([f"--workdir={tmp_path / 'nothing'}"]) == 2


def test_the_evaluator_prompts_a_question_exactly_as_training_sequences_begin(data_dir):
  # A QA training sequence is BOS <image>Question: ... Answer: <answer><|endofchunk|> EOS;
  # the evaluator's prompt for the same question must be that sequence up to "Answer:".
  # (It once lacked the BOS: the blanked model then scored below the text prior.)
  tok = data_lib.load_tokenizer(data_dir)
  batch = next(iter(data_lib.make_pipeline(data_dir, "validation", batch_size=4, mixture={"qa": 1.0},
                                           bucket=data_lib.Bucket(max_images=1, text_length=32, image_size=16))))
  for row in batch["input_ids"]:
    text = tok.decode(row)
    question = text.split("Question: ")[1].split(" Answer:")[0]
    prompt = evaluate.prompt_ids(tok, data_lib.qa_prompt(question))
    assert prompt[0] == tok.bos_id
    assert list(row[:len(prompt)]) == prompt, (text, prompt)
    assert row[len(prompt)] not in (tok.end_of_chunk_id, tok.eos_id, tok.pad_id)  # the answer comes next


def test_accuracy_by_kind_groups_rows_by_the_wording_of_their_question():
  rows = [{"question": "how many shapes are there?", "correct": True},
          {"question": "how many circles are there?", "correct": False},
          {"question": "how many shapes are there?", "correct": False},
          {"question": "is the red circle left or right of the blue square?", "correct": True},
          {"question": "what is this?", "correct": True}]
  assert evaluate.accuracy_by_kind(rows) == {"count": 0.5, "count_shape": 0.0, "other": 1.0, "position": 1.0}
