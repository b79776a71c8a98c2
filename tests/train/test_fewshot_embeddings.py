"""`mmjax eval --task retrieval:... / classification:...`: a contrastive model trained for two
steps answers the embedding tasks from their benchmark files, with the figures its own
evaluation gives on the same data, and is refused the generated ones."""

import json
import os

import numpy as np
import pytest

from mmjax.data import builders
from mmjax.data.preprocess import load_image_file
from mmjax.evaluation import tasks as task_files
from mmjax.families.contrastive import evaluate as evaluate_lib
from mmjax.families.contrastive import task as task_lib
from mmjax.train import cli
from mmjax.train import evaluate
from mmjax.train import fewshot

SMALL = ["--config.data.batch_size=8", "--config.train.num_steps=2", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.mesh.num_devices=1", "--config.data.image_size=16",
         "--config.model.vision.image_size=16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("fewshot_clip")
  data_dir, wd = str(root / "data"), str(root / "clip")
  builders.build_embedded(data_dir, size=40, image_size=16, seed=0)
  assert cli.train_main(["--config=configs/clip/tiny.py", f"--workdir={wd}", f"--config.data.dir={data_dir}",
                         *SMALL]) == 0
  specs = task_files.write_embedded_tasks(str(root / "tasks"), data_dir, "validation")
  return wd, specs


def test_retrieval_from_the_files_equals_the_familys_own_evaluation_of_the_same_pairs(run, capsys):
  wd, specs = run
  res, = fewshot.run(wd, [specs["retrieval"]], fewshot.Options(shots=(0, 4)))
  out = capsys.readouterr().out
  assert "zero-shot only" in out and "| retrieval | 0 | zero-shot |" in out
  saved = json.load(open(os.path.join(wd, "eval", "retrieval-0shot.json")))
  assert saved["family"] == "contrastive" and saved["step"] == 2 and saved["queries"] == 20
  assert saved["metric"]["metric"] == "recall@k" and len(saved["runs"][0]["examples"]) == 20
  own = evaluate.evaluate(wd, with_cider=False)  # the contrastive family's retrieval on the validation pairs
  for way, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
    for k in (1, 5, 10):
      assert saved["scores"][f"{way}_R@{k}"]["mean"] == pytest.approx(100 * own[f"{short}_r@{k}"]), (way, k)


def test_zero_shot_classification_takes_each_images_nearest_class_prompt_mean(run):
  wd, specs = run
  res, = fewshot.run(wd, [specs["classification"]], fewshot.Options())
  classes = task_files.parse_task_spec(specs["classification"]).load()
  config, task, _, params = evaluate.load(wd)
  embed_images, embed_texts = evaluate_lib.embedder(_model(config, task), params)
  images = np.stack([load_image_file(e.image_path, 16) for e in classes.examples])
  image_embeddings = embed_images(images)
  image_embeddings /= np.linalg.norm(image_embeddings, axis=1, keepdims=True)
  class_embeddings = evaluate_lib.class_embeddings(embed_texts, task.tokenizer, int(config.data.text_length),
                                                   classes.prompts())
  want = np.argmax(image_embeddings @ class_embeddings.T, axis=1)
  got = [classes.labels.index(row["predicted"]) for row in res["runs"][0]["examples"]]
  assert got == want.tolist()
  assert res["scores"]["accuracy"]["mean"] == pytest.approx(100 * np.mean(want == [e.label for e in classes.examples]))
  assert res["scores"]["chance"]["mean"] == 25.0


def test_a_contrastive_model_is_refused_vqa_naming_the_family_and_the_task(run, capsys):
  wd, _ = run
  assert cli.eval_main([f"--workdir={wd}", "--task=vqa:embedded"]) == 2
  assert "family 'contrastive' cannot answer task 'vqa' (vqa): its model does not generate text" in \
      capsys.readouterr().err


def _model(config, task):
  """The run's dual encoder, as its task builds it (the tokenizer's vocabulary and EOS id)."""
  cfg = task_lib.model_config(config, task.tokenizer.vocab_size, task.tokenizer.eos_id)
  return task_lib.Model(cfg, int(config.data.text_length))
