"""The `contrastive` family (CLIP, SigLIP): `mmjax train | eval | compile` from the shipped
configs, the sharded step on 8 devices equal to the single-device one for both losses, the
pair builder's handling of bad input, and the retrieval metric against a brute-force count."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import families
from mmjax import sharding as sh
from mmjax.data import builders, pairs, scenes
from mmjax.data.preprocess import BadRecordError
from mmjax.families.contrastive import evaluate as evaluate_lib
from mmjax.families.contrastive import model as contrastive
from mmjax.families.contrastive import task as task_lib
from mmjax.train import cli
from mmjax.train import config as config_lib

SMALL = ["--config.data.batch_size=8", "--config.train.num_steps=4", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.mesh.num_devices=1", "--config.data.image_size=16",
         "--config.model.vision.image_size=16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("pairs_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.mark.parametrize("name", ["clip", pytest.param("siglip", marks=pytest.mark.slow)])
def test_train_then_eval_from_the_shipped_config_reports_retrieval_and_zero_shot_against_chance(
    name, data_dir, tmp_path, capsys):
  wd = str(tmp_path / name)
  config_path = f"configs/{name}/tiny.py"
  assert cli.train_main([f"--config={config_path}", f"--workdir={wd}", f"--config.data.dir={data_dir}", *SMALL]) == 0
  out = capsys.readouterr().out
  assert "done at step 4" in out
  assert cli.eval_main([f"--workdir={wd}"]) == 0
  printed = capsys.readouterr().out
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["family"] == "contrastive" and res["step"] == 4
  assert "val_perplexity" not in res  # a contrastive loss is no perplexity
  assert res["pairs"] == 20 and res["pairs_skipped"] == 0  # the validation captions of a size-40 build
  assert res["chance_r@1"] == pytest.approx(1 / 20)
  for key in ("i2t_r@1", "t2i_r@10", "i2t_r@5_content", "zero_shot_count", "zero_shot_leftmost_colour_chance",
              "zero_shot_red_circle_majority"):
    assert 0.0 <= res[key] <= 1.0 and key in printed, key
  assert res["i2t_r@1"] <= res["i2t_r@5"] <= res["i2t_r@10"] and res["i2t_r@1"] <= res["i2t_r@1_content"]
  assert res["zero_shot_count_chance"] == 0.25 and res["zero_shot_leftmost_colour_chance"] == 0.2
  cfg = config_lib.read_resolved(wd)
  assert cfg.model.loss == ("sigmoid" if name == "siglip" else "softmax")


@pytest.mark.slow  # a TPU ahead-of-time compile: 37 s on 2 idle cores
def test_the_tiny_config_compiles_for_a_tpu_slice_with_the_ring_loss(tmp_path):
  from mmjax.scale import compile_cli
  out = str(tmp_path / "fit.jsonl")
  assert compile_cli.main(["--config=configs/siglip/tiny.py", "--topology=v5e:2x2", f"--json={out}"]) == 0
  row = json.loads(open(out).read().splitlines()[-1])
  assert row["fits"] is True and row["chips"] == 4 and row["flops_per_chip"] > 0, row


def _small_config(loss: str) -> contrastive.ContrastiveConfig:
  from mmjax import zoo
  preset = zoo.get("siglip-tiny" if loss == "sigmoid" else "clip-tiny")
  import dataclasses
  return dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, image_size=16, stem="patch",
                                                                patch_size=4, width=32, mlp_dim=64),
                             text=dataclasses.replace(preset.text, vocab_size=40, eos_token_id=3, max_length=8,
                                                      width=32, mlp_dim=64, projection_dim=32),
                             vision_projection_dim=32 if loss == "softmax" else 0)


def _batch(seed: int, b: int = 16) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 40, (b, 8)).astype(np.int32)
  lengths = rng.integers(2, 8, b)
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  ids[np.arange(b), lengths - 1] = 3
  return {"images": rng.integers(0, 256, (b, 16, 16, 3)).astype(np.uint8), "input_ids": ids, "text_mask": mask,
          "text_truncated": np.zeros((b,), np.float32)}


@pytest.mark.parametrize("loss, mesh_config", [
    # The ring loss over both batch axes: 41 s on 2 cores, so slow like the others
    # (tests/losses checks the sharded losses themselves in the default tier).
    pytest.param("sigmoid", {"data": 2, "fsdp": 4}, marks=pytest.mark.slow),
    pytest.param("softmax", {"data": 2, "fsdp": 4}, marks=pytest.mark.slow),
    pytest.param("sigmoid", {"fsdp": 8}, marks=pytest.mark.slow)])
def test_the_sharded_train_step_on_8_devices_equals_the_single_device_step(loss, mesh_config):
  from mmjax.train import optimizer, state as state_lib, step as step_lib
  from mmjax.train.sharded_step import shard_train_step
  from tests.scale import standin
  cfg = _small_config(loss)
  model = task_lib.Model(cfg, 8)
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))
  mask = jax.tree.map(lambda _: True, params)
  opt = standin.optimizer_config()
  tx = optimizer.make_transform(opt, mask)
  train_step = step_lib.make_train_step(loss_fn=model.loss, tx=tx, mask=mask, schedule=optimizer.make_schedule(opt))
  state = jax.device_get(state_lib.create(params, tx, seed=0))
  single, want = state, []
  for i in range(2):
    single, metrics = jax.jit(train_step)(single, jax.tree.map(jnp.asarray, _batch(i)))
    want.append(float(metrics["loss"]))
  mesh = sh.make_mesh(mesh_config)
  step = shard_train_step(train_step, jax.eval_shape(lambda: state), jax.eval_shape(lambda: _batch(0)),
                          model.boxed(jax.random.key(0)), mesh, sh.get_rules("fsdp"))
  sharded, got = step.put_state(state), []
  for i in range(2):
    sharded, metrics = step(sharded, step.put_batch(_batch(i)))
    got.append(float(metrics["loss"]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(single.params))[0],
                          jax.tree.leaves(jax.device_get(sharded.params))):
    if jax.tree_util.keystr(path).endswith("['key']['bias']"):
      # A key bias adds one constant to every logit of a query's softmax: its gradient is
      # exactly zero, so Adam turns the round-off of either computation into full steps.
      continue
    # Two Adam steps divide each gradient by its own root-mean-square, which amplifies the
    # round-off of a small one: a LayerNorm bias (from zero) differed by 1.2e-5 of its size
    # on JAX 0.12 (the loss by < 1e-6), so parameters get 5e-5.
    err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-12)
    assert err <= 5e-5, (jax.tree_util.keystr(path), err)
  # And the loss is the dense reference's: the first step's value from the embeddings.
  out = model.apply(params, jax.tree.map(jnp.asarray, _batch(0)))
  from mmjax.losses import contrastive as losses
  ref = (losses.sigmoid_contrastive_loss_reference(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                                                   out["logit_bias"]) if loss == "sigmoid" else
         losses.softmax_contrastive_loss_reference(out["image_embeds"], out["text_embeds"], out["logit_scale"]))
  assert want[0] == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_initial_temperature_and_bias_are_the_papers():
  clip = contrastive.ContrastiveModel(_small_config("softmax"))
  siglip = contrastive.ContrastiveModel(_small_config("sigmoid"))
  b = jax.tree.map(jnp.asarray, _batch(0, 2))
  import flax
  pc = flax.core.meta.unbox(jax.jit(clip.init)(jax.random.key(0), b["images"], b["input_ids"])["params"])
  ps = flax.core.meta.unbox(jax.jit(siglip.init)(jax.random.key(0), b["images"], b["input_ids"])["params"])
  assert float(np.exp(pc["logit_scale"])) == pytest.approx(1 / 0.07, rel=1e-6) and "logit_bias" not in pc
  assert float(np.exp(ps["logit_scale"])) == pytest.approx(10.0, rel=1e-6)
  assert float(ps["logit_bias"]) == -10.0
  out = jax.jit(clip.apply)({"params": pc}, b["images"], b["input_ids"])
  norms = np.linalg.norm(np.asarray(out["image_embeds"]), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_gradient_accumulation_is_refused_naming_the_value(data_dir):
  config = config_lib.load_config("clip/tiny", [f"--config.data.dir={data_dir}", "--config.optimizer.grad_accum_steps=2",
                                                "--config.data.image_size=16", "--config.model.vision.image_size=16"])
  with pytest.raises(ValueError, match=r"grad_accum_steps=2; the contrastive loss compares every pair"):
    families.of_config(config).task(config, None)


# ------------------------------------------------------------------ the pair builder


def _record(text, images=1):
  png = scenes.encode_png(np.zeros((8, 8, 3), np.uint8))
  return {"id": "r1", "text": text, "images": [png] * images}


def test_a_pair_is_the_caption_without_its_markers_then_eos_then_padding(data_dir):
  tok = builders.load_tokenizer(data_dir)
  ex = pairs.PairBuilder(tok, 24, 16)(_record("<image>a red circle.<|endofchunk|>"))
  words = tok.encode("a red circle.")
  n = len(words) + 1
  assert ex["input_ids"][:n].tolist() == words + [tok.eos_id]
  assert (ex["input_ids"][n:] == tok.pad_id).all() and ex["text_mask"].tolist() == [1] * n + [0] * (24 - n)
  assert ex["images"].shape == (16, 16, 3) and ex["text_truncated"] == 0


def test_text_longer_than_the_tower_is_cut_and_flagged_or_refused_naming_the_lengths(data_dir):
  tok = builders.load_tokenizer(data_dir)
  text = "<image>there are 4 shapes: a red circle, a blue square, a green triangle and a yellow circle."
  n = len(tok.encode(pairs.caption_text(text)))
  cut = pairs.PairBuilder(tok, 6, 16, truncate=True)(_record(text))
  assert cut["text_truncated"] == 1 and cut["input_ids"][-1] == tok.eos_id and cut["text_mask"].all()
  assert cut["input_ids"][:5].tolist() == tok.encode(pairs.caption_text(text))[:5]
  assert pairs.PairBuilder(tok, 6, 16)(_record(text)) == {"bad_record": "text_too_long", "record_id": "r1"}
  with pytest.raises(BadRecordError, match=rf"has {n} tokens \+ end-of-text, more than text_length=6"):
    pairs.PairBuilder(tok, 6, 16, bad_data="raise")(_record(text))


@pytest.mark.parametrize("text, images, reason", [("<image><|endofchunk|>", 1, "empty_text"),
                                                   ("<image>   <|endofchunk|>", 1, "empty_text"),
                                                   ("<image>a red circle.<image>", 2, "not_a_pair"),
                                                   ("a red circle.", 0, "not_a_pair")])
def test_an_empty_caption_or_a_record_that_is_not_one_pair_is_a_counted_bad_record(data_dir, text, images, reason):
  tok = builders.load_tokenizer(data_dir)
  assert pairs.PairBuilder(tok, 24, 16)(_record(text, images))["bad_record"] == reason
  with pytest.raises(BadRecordError, match=reason):
    pairs.PairBuilder(tok, 24, 16, bad_data="raise")(_record(text, images))


def test_the_pipeline_counts_the_records_it_skips(data_dir):
  from mmjax import data as data_lib
  tok = builders.load_tokenizer(data_dir)
  # Interleaved documents hold 2-5 images: none is a pair, every one is counted.
  pipe = data_lib.make_pipeline(data_dir, "validation", batch_size=4, bucket=data_lib.Bucket(1, 24, 16),
                                mixture={"captions": 1.0, "interleaved": 1.0}, num_epochs=1, shuffle=False,
                                tokenizer=tok, builder=pairs.PairBuilder(tok, 24, 16))
  batches = list(pipe)
  # (One pass of a mixture ends with its first dataset: a few batches of captions.)
  assert batches and all(b["images"].shape == (4, 16, 16, 3) for b in batches)
  assert pipe.bad_data_counts["not_a_pair"] > 0
  assert sum(pipe.bad_data_counts.values()) == pipe.bad_data_counts["not_a_pair"]


# ------------------------------------------------------------------ the metric


def test_recall_at_k_equals_a_brute_force_count_and_counts_ties_against_the_query():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, (30, 30)).astype(np.float64)  # many ties
  correct = np.eye(30, dtype=bool)
  got = evaluate_lib.recall_at(scores, correct, ks=(1, 3, 10))
  for k in (1, 3, 10):
    hits = 0
    for q in range(30):
      ahead = sum(1 for c in range(30) if c != q and scores[q, c] >= scores[q, q])
      hits += ahead < k
    assert got[k] == hits / 30
  # Content recall: any item of the same content found is enough.
  same = np.zeros((3, 3), bool) | np.eye(3, dtype=bool)
  same[0, 1] = True
  s = np.array([[0.1, 0.9, 0.5], [0.2, 0.8, 0.1], [0.3, 0.2, 0.9]])
  assert evaluate_lib.recall_at(s, np.eye(3, dtype=bool), ks=(1,))[1] == pytest.approx(2 / 3)
  assert evaluate_lib.recall_at(s, same, ks=(1,))[1] == 1.0


def test_a_scene_key_gives_back_its_shapes_left_to_right():
  rng = np.random.default_rng(3)
  for _ in range(50):
    scene = scenes.sample_scene(rng, 64)
    assert evaluate_lib.parse_scene_key(scene.key) == tuple((s.shape, s.colour) for s in scene.shapes)


def test_a_global_batch_the_devices_cannot_split_is_refused_before_training_naming_both(data_dir, tmp_path, capsys):
  args = [a for a in SMALL if "num_devices" not in a and "batch_size" not in a]
  assert cli.train_main(["--config=configs/siglip/tiny.py", f"--workdir={tmp_path / 'w'}",
                         f"--config.data.dir={data_dir}", *args, "--config.mesh.num_devices=8",
                         "--config.data.batch_size=12"]) == 2
  assert "data.batch_size=12 does not split over the 8-way batch axes" in capsys.readouterr().err
  # The loss itself refuses it too, for a caller outside the trainer (no padding).
  from mmjax.losses import contrastive as losses
  x = jnp.ones((12, 4), jnp.float32) / 2
  with pytest.raises(ValueError, match=r"global batch 12 is not divisible by the 8 devices"):
    losses.sigmoid_contrastive_loss(x, x, 0.0, 0.0, mesh=sh.make_mesh({"fsdp": 8}))


def test_a_users_imported_captions_are_pairs_and_their_interleaved_records_are_counted_not_paired(tmp_path, data_dir):
  """`mmjax data import` of one-image captions (and one two-image record) into the embedded
  data directory's copy: the family's pipeline reads them by name, counts the other."""
  import shutil
  from mmjax.families import common
  d = str(tmp_path / "data")
  shutil.copytree(data_dir, d)
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    (images / f"{i}.png").write_bytes(scenes.encode_png(rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)))
  lines = [json.dumps({"id": f"p{i}", "images": [f"{i}.png"], "text": f"<image>a red circle number {i}."})
           for i in range(5)]
  lines.append(json.dumps({"id": "two", "images": ["4.png", "5.png"], "text": "<image>one <image>two"}))
  jsonl = tmp_path / "mine.jsonl"
  jsonl.write_text("\n".join(lines) + "\n")
  builders.import_jsonl(d, "mine_train", {"train": str(jsonl)}, str(images))
  config = config_lib.load_config("clip/tiny", [f"--config.data.dir={d}", "--config.data.mixture=mine_train:1",
                                                "--config.data.batch_size=4", "--config.data.image_size=16",
                                                "--config.model.vision.image_size=16", "--config.mesh.num_devices=1"])
  task = families.of_config(config).task(config, None)
  pipe = task.train_data()
  batch = next(pipe)
  tok = task.tokenizer
  assert batch["images"].shape == (4, 16, 16, 3) and batch["input_ids"].shape == (4, 24)
  texts = {tok.decode([int(t) for t in row if t not in (tok.pad_id, tok.eos_id)]) for row in batch["input_ids"]}
  assert all(t.startswith("a red circle number") for t in texts), texts
  assert pipe.bad_data_counts["not_a_pair"] >= 1  # the two-image record, counted by name
  assert common.data_dir(config) == d
