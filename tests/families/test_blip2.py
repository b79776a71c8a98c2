"""The `blip2` family end to end from its shipped configs: stage 1 trains the Q-Former over a
bitwise-frozen tower and evaluates retrieval; stage 2 adopts stage 1's Q-Former, trains it
and the projection over a bitwise-frozen LM and tower, answers through cached generation;
InstructBLIP gives its Q-Former the instruction; the recipe's order; and the errors for
configs, runs and generation inputs that do not fit."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax import families
from mmjax.data import builders
from mmjax.families.blip2 import task as task_lib
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import loop

SMALL = ["--config.data.batch_size=4", "--config.train.num_steps=2", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.mesh.num_devices=1", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.eval.num_pairs=12", "--config.eval.rerank_k=4"]
STAGE2 = SMALL + ["--config.eval.num_questions=8"]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("blip2_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
  """A 2-step stage-1 run from the shipped config (no clip run: the tower is its own init)."""
  wd = str(tmp_path_factory.mktemp("blip2") / "s1")
  assert cli.train_main(["--config=configs/blip2/tiny_stage1.py", f"--workdir={wd}", f"--config.data.dir={data_dir}",
                         "--config.init.from_workdir=", *SMALL]) == 0
  return wd


@pytest.mark.slow  # a training and an evaluation: about 40 s on 2 cores
def test_stage_one_trains_only_the_qformer_and_evaluates_retrieval(stage1):
  config = config_lib.read_resolved(stage1)
  task = families.of_config(config).task(config, stage1)
  first = jax.jit(task.init_params)(jax.random.key(int(config.seed)))
  step, last = loop.restore_params(config, stage1, task)
  assert step == 2
  assert _same(first["vision"], last["vision"])
  for name in ("qformer", "query_tokens", "itm_head", "itg_transform", "vision_projection", "text_projection"):
    assert not _same(first[name], last[name]), name
  assert cli.eval_main([f"--workdir={stage1}"]) == 0
  res = json.load(open(os.path.join(stage1, "eval.json")))
  assert res["family"] == "blip2" and res["pairs"] == 12 and res["chance_r@1"] == pytest.approx(1 / 12)
  for key in ("itc_i2t_r@1", "itc_t2i_r@10", "itm_i2t_r@5", "itm_t2i_r@1", "itm_accuracy"):
    assert 0.0 <= res[key] <= 1.0, key
  assert res["itc_i2t_r@10"] >= res["itc_i2t_r@5"] >= res["itc_i2t_r@1"]
  assert res["itm_accuracy_chance"] == 0.5 and res["rerank_k"] == 4


@pytest.mark.slow  # two more trainings and a generation: about 60 s on 2 cores
def test_stage_two_adopts_stage_one_leaves_the_lm_and_tower_bitwise_and_answers(stage1, data_dir, tmp_path, capsys):
  wd = str(tmp_path / "s2")
  assert cli.train_main(["--config=configs/blip2/tiny_stage2.py", f"--workdir={wd}", f"--config.data.dir={data_dir}",
                         f"--config.init.from_workdir={stage1}", *STAGE2]) == 0
  config1 = config_lib.read_resolved(stage1)
  _, s1 = loop.restore_params(config1, stage1, families.of_config(config1).task(config1, stage1))
  config = config_lib.read_resolved(wd)
  task = families.of_config(config).task(config, wd)
  fresh = jax.jit(task.init_params)(jax.random.key(int(config.seed)))
  _, s2 = loop.restore_params(config, wd, task)
  assert _same(s2["vision"], s1["vision"])  # adopted from stage 1, frozen since
  assert _same(s2["decoder"], fresh["decoder"])  # no lm run given: its init, frozen
  assert "word_embeddings" not in s2["qformer"] and "itm_head" not in s2  # stage 2 keeps no text input or heads
  assert not _same(s2["qformer"]["layers_0"]["attention"], s1["qformer"]["layers_0"]["attention"])
  assert cli.eval_main([f"--workdir={wd}"]) == 0
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert 0.0 <= res["qa_exact_match"] <= 1.0 and len(res["examples"]) == 8
  # Captions are asked as stage 2 trains them and cut at the chunk's end before scoring.
  assert res["cider"] >= 0.0 and len(res["caption_examples"]) == 4
  assert all(r["caption"] and "<|endofchunk|>" not in r["generated"] for r in res["caption_examples"])
  capsys.readouterr()
  image = os.path.join(str(tmp_path), "scene.png")
  from PIL import Image
  Image.fromarray(np.full((24, 40, 3), 200, np.uint8)).save(image)
  assert cli.generate_main([f"--workdir={wd}", f"--image={image}", "--prompt=<image>how many shapes are there?",
                            "--max-new-tokens=3"]) == 0


@pytest.mark.slow  # a training and an evaluation: about 40 s on 2 cores
def test_instructblip_trains_with_the_instruction_in_its_qformer(stage1, data_dir, tmp_path):
  wd = str(tmp_path / "ib")
  assert cli.train_main(["--config=configs/instructblip/tiny.py", f"--workdir={wd}", f"--config.data.dir={data_dir}",
                         f"--config.init.from_workdir={stage1}", *STAGE2]) == 0
  config = config_lib.read_resolved(wd)
  task = families.of_config(config).task(config, wd)
  batch = next(iter(task.train_data()))
  assert batch["instruction_ids"].shape == (4, 24) and batch["instruction_mask"].sum() > 0
  _, params = loop.restore_params(config, wd, task)
  assert "word_embeddings" in params["qformer"]  # the instruction goes through the text embeddings
  assert cli.eval_main([f"--workdir={wd}"]) == 0


@pytest.mark.slow  # builds and runs the InstructBLIP task: about 15 s on 2 cores
def test_the_instruction_changes_the_answer_logits_only_through_the_qformer(data_dir):
  """The same image and LM prompt with two instructions: different logits (the Q-Former reads
  them); the same instruction: the same logits."""
  config = config_lib.load_config("instructblip/tiny", [f"--config.data.dir={data_dir}",
                                                         "--config.data.image_size=16",
                                                         "--config.model.vision.image_size=16"])
  task = families.of_config(config).task(config, None)
  params = task.init_params(jax.random.key(0))
  batch = next(iter(task.train_data()))
  other = dict(batch, instruction_ids=np.roll(batch["instruction_ids"], 1, axis=0),
               instruction_mask=np.roll(batch["instruction_mask"], 1, axis=0))
  a, b = task.apply_fn(params, batch, None), task.apply_fn(params, other, None)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, task.apply_fn(params, dict(batch), None))


def test_the_recipe_runs_clip_lm_stage_one_then_stage_two():
  from mmjax.train import recipe
  commands = recipe.stage_commands("blip2/tiny_stage2", "/r", [])
  assert [c[0] for c in commands] == ["--config=lm/tiny_reading", "--config=clip/tiny", "--config=blip2/tiny_stage1",
                                      "--config=blip2/tiny_stage2"]
  assert commands[2][-1] == "--config.init.from_workdir=/r/clip-tiny"
  assert commands[3][-1] == "--config.init.from_workdir=/r/lm-tiny_reading,/r/blip2-tiny_stage1"


def test_configs_the_model_cannot_take_are_refused_naming_the_value(data_dir):
  def task_of(name, *overrides):
    config = config_lib.load_config(name, [f"--config.data.dir={data_dir}", *overrides])
    return families.of_config(config).task(config, None)

  with pytest.raises(ValueError, match=r"data.text_length=40 is longer than the Q-Former's 32 position"):
    task_of("blip2/tiny_stage1", "--config.data.text_length=40")
  with pytest.raises(ValueError, match=r"grad_accum_steps=2"):
    task_of("blip2/tiny_stage1", "--config.optimizer.grad_accum_steps=2")
  with pytest.raises(ValueError, match=r"data.instruction_length=40 is longer than the Q-Former's 32"):
    task_of("instructblip/tiny", "--config.data.instruction_length=40")
  with pytest.raises(ValueError, match=r"data.text_length=8 leaves no room for text after the 8 query"):
    task_of("blip2/tiny_stage2", "--config.data.text_length=8")


def test_generation_inputs_that_do_not_fit_are_refused_naming_them(data_dir):
  config = config_lib.load_config("instructblip/tiny", [f"--config.data.dir={data_dir}"])
  cfg = task_lib.model_config(config, builders.load_tokenizer(data_dir))
  ids = np.array([[cfg.image_token_id] * 8 + [1, 5, 6]])
  images = np.zeros((1, 64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match="InstructBLIP generation needs inputs\\['instruction_ids'\\]"):
    task_lib.validate_inputs(cfg, {"images": images}, ids)
  with pytest.raises(ValueError, match=r"prompt 0 has 7 image placeholders .* expected 8"):
    task_lib.validate_inputs(cfg, {"images": images, "instruction_ids": ids}, ids[:, 1:])
  with pytest.raises(ValueError, match=r"images have shape \(1, 32, 32, 3\); expected \[1, 64, 64, 3\]"):
    task_lib.validate_inputs(cfg, {"images": images[:, :32, :32], "instruction_ids": ids}, ids)


def test_a_run_of_another_family_or_shape_is_refused_naming_it(data_dir):
  config = config_lib.load_config("blip2/tiny_stage2", [f"--config.data.dir={data_dir}"])
  task = families.of_config(config).task(config, None)
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(task.init_params, jax.random.key(0)))
  with pytest.raises(ValueError, match="family 'llava'"):
    task_lib.adopt_params(params, "llava", params)
  other = {"decoder": dict(params["decoder"], embed={"embedding": np.zeros((3, 3), np.float32)})}
  with pytest.raises(ValueError, match="other shapes at"):
    task_lib.adopt_params(params, "lm", other)
  with pytest.raises(ValueError, match="has no 'qformer'"):
    task_lib.adopt_params(params, "blip2", {"vision": params["vision"], "query_tokens": params["query_tokens"]})


def test_the_prompt_format_puts_the_queries_and_the_answer_end_as_configured(data_dir):
  tok = builders.load_tokenizer(data_dir)
  qa = {"id": b"q", "kind": b"qa", "question": b"how many shapes are there?", "answer": b"3", "text": b"",
        "images": [_png()]}
  caption = {"id": b"c", "kind": b"captions", "text": b"<image>a red circle.<|endofchunk|>", "images": [_png()]}

  def example(record, **template):
    builder = task_lib.Blip2Builder(tok, 40, 16, 4, template=task_lib.Blip2Template(**template), bad_data="raise")
    ex = builder(record)
    n = int(ex["segment_ids"].sum())
    return [int(i) for i in ex["input_ids"][:n]], ex

  ids, ex = example(qa)  # as Hugging Face lays BLIP-2 out: the queries, BOS, the question; EOS ends
  assert ids[:5] == [tok.image_id] * 4 + [tok.bos_id] and ids[-1] == tok.eos_id
  assert tok.decode(ids[5:]) == "Question: how many shapes are there? Answer: 3"
  trained = [int(t) for t, m in zip(ex["targets"], ex["loss_mask"]) if m]
  assert trained == tok.encode(" 3") + [tok.eos_id]  # the answer and its end only
  ids, _ = example(qa, image_position="after_bos", end="<|endofchunk|>")
  assert ids[:5] == [tok.bos_id] + [tok.image_id] * 4 and ids[-1] == tok.end_of_chunk_id
  ids, _ = example(caption)  # a caption request: no question, the caption follows the image
  assert tok.decode(ids[5:]) == "a red circle."
  with pytest.raises(ValueError, match="data.image_position='middle'"):
    task_lib.Blip2Template(image_position="middle")
  with pytest.raises(ValueError, match=r"data.answer_end='Answer:' is 3 tokens"):
    task_lib.stop_id(task_lib.Blip2Template(end="Answer:"), tok)


def _png():
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()
