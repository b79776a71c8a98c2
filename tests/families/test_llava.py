"""The `llava` family: cached generation equal to the full forward (LLaVA-1.5 and LLaVA-NeXT),
packed conversations equal to unpacked ones with no attention across segments, train, eval
and generate from the shipped stage configs, the two-stage recipe's freezing, and the errors
for input that does not fit."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import families
from mmjax import infer
from mmjax.data import builders, conversation
from mmjax.families.llava import anyres
from mmjax.families.llava import model as llava
from mmjax.families.llava import task as task_lib
from mmjax.kernels.attention import reference
from mmjax.layers import attention as attention_lib
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import ViTConfig
from mmjax.train import cli
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import step as step_lib

TOWER = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
LM = DecoderConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_length=256)
IMAGE_ID = 5
PINPOINTS = ((16, 32), (32, 16), (32, 32))


def _model(next_: bool):
  cfg = llava.LlavaConfig(vision=TOWER, decoder=LM, image_token_id=IMAGE_ID, image_newline=next_,
                          grid_pinpoints=PINPOINTS if next_ else ())
  return cfg, llava.Llava(cfg)


def _prompts(cfg, rng, sizes):
  """Two prompts with one image each (LLaVA-NeXT: of the given sizes), right-padded, and
  their inputs, built as the pipeline builds them."""
  p = cfg.tokens_per_slot
  rows, slots_all = [], []
  for k, (h, w) in enumerate(sizes):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if cfg.grid_pinpoints:
      slots = anyres.tiles(image, PINPOINTS, 16)
      index = anyres.feature_index((h, w), PINPOINTS, 16, 4)
    else:
      slots, index = image[None, :16, :16], np.arange(p, dtype=np.int32)
    text = rng.integers(6, 64, (3 + 2 * k,)).tolist()
    ids = [1] + text[:2] + [IMAGE_ID] * len(index) + text[2:]
    fi = [-1] * 3 + index.tolist() + [-1] * (len(text) - 2)
    rows.append((ids, fi))
    slots_all.append(slots)
  t = max(len(i) for i, _ in rows)
  n = max(len(s) for s in slots_all)
  ids = np.zeros((2, t), np.int32)
  fi = np.full((2, t), -1, np.int32)
  images = np.zeros((2, n, 16, 16, 3), np.uint8)
  for r, ((i, f), s) in enumerate(zip(rows, slots_all)):
    ids[r, :len(i)], fi[r, :len(f)], images[r, :len(s)] = i, f, s
  return ids, fi, images, np.asarray([len(i) for i, _ in rows], np.int32)


@pytest.mark.parametrize("next_", [pytest.param(False, marks=pytest.mark.slow), True], ids=["llava-1.5", "llava-next"])
def test_cached_greedy_generation_equals_the_full_forward_token_for_token(next_):
  cfg, module = _model(next_)
  rng = np.random.default_rng(0)
  ids, fi, images, lengths = _prompts(cfg, rng, [(16, 40), (40, 16)])
  params = module.init(jax.random.key(0), images, ids, fi)
  forward = jax.jit(module.apply)
  out = infer.Generator(task_lib.decoding(cfg)).generate(
      params, {"images": images, "feature_index": fi}, ids, 6, prompt_lengths=lengths, pad_id=0)
  assert out.tokens.shape == (2, 6)
  for r in range(2):
    n = int(lengths[r])
    seq = np.concatenate([ids[r, :n], out.tokens[r]])[None]
    index = np.concatenate([fi[r, :n], np.full((6,), -1, np.int32)])[None]
    logits, _ = forward(params, images[r:r + 1], seq, index)
    # Each generated token is the argmax of the full forward at the position before it.
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[0, n - 1:n + 5], -1), out.tokens[r])
  assert IMAGE_ID not in out.tokens  # <image> is never sampled


def test_without_a_feature_index_the_kth_image_position_takes_the_kth_image_token():
  ids = np.asarray([[1, 5, 5, 7, 5, 9], [5, 8, 8, 5, 5, 5]])
  np.testing.assert_array_equal(llava.plain_feature_index(ids, 5), [[-1, 0, 1, -1, 2, -1], [0, -1, -1, 1, 2, 3]])
  np.testing.assert_array_equal(np.asarray(llava.plain_feature_index(jnp.asarray(ids), 5)),
                                llava.plain_feature_index(ids, 5))


def _example(rng, n_text, slot_images, p, t=None):
  """One unpacked example: BOS, text, P image tokens per slot, text; loss on the last half."""
  ids = [1] + rng.integers(6, 64, (n_text,)).tolist()
  index = [-1] * len(ids)
  for s in range(len(slot_images)):
    ids += [IMAGE_ID] * p
    index += list(range(s * p, (s + 1) * p))
  tail = rng.integers(6, 64, (n_text,)).tolist()
  ids += tail
  index += [-1] * len(tail)
  n = len(ids)
  t = t or n
  row = {"input_ids": np.zeros((t,), np.int32), "feature_index": np.full((t,), -1, np.int32),
         "targets": np.zeros((t,), np.int32), "loss_mask": np.zeros((t,), np.float32),
         "segment_ids": np.zeros((t,), np.int32), "positions": np.zeros((t,), np.int32),
         "images": np.zeros((2, 16, 16, 3), np.uint8), "image_mask": np.arange(2) < len(slot_images)}
  row["input_ids"][:n], row["feature_index"][:n] = ids, index
  row["targets"][:n - 1] = ids[1:]
  row["loss_mask"][n // 2:n - 1] = 1.0
  row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
  for s, image in enumerate(slot_images):
    row["images"][s] = image
  return row


def _per_example_loss(logits, batch):
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  return nll * batch["loss_mask"]


@pytest.mark.slow  # 13-14 s: out of the default tier, which must stay under 20 min on 2 cores
def test_packed_conversations_give_the_unpacked_losses_and_attend_only_within_their_segment(monkeypatch):
  cfg, module = _model(False)
  p = cfg.tokens_per_slot
  rng = np.random.default_rng(1)
  image = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  examples = [_example(rng, 4, [image()], p), _example(rng, 7, [], p), _example(rng, 3, [image(), image()], p)]
  t = 96
  unpacked = {k: np.stack([np.pad(e[k], [(0, (t if e[k].ndim == 1 and k not in ("image_mask",) else e[k].shape[0])
                                           - e[k].shape[0])] + [(0, 0)] * (e[k].ndim - 1))
                           for e in examples]) for k in examples[0]}
  packed = conversation.pack(examples, t, 4, p)
  packed = {k: np.asarray(v)[None] for k, v in packed.items() if k != "record_id"}
  params = module.init(jax.random.key(0), unpacked["images"], unpacked["input_ids"], unpacked["feature_index"])

  weights = []

  def recording(q, k, v, **kw):
    """The model's own attention, recording its weights: softmax of the scaled logits under
    the mask the model's segment ids and positions give (reference.attention_reference's)."""
    b, tq, h, kd = q.shape
    mask = reference.allowed_mask(b, tq, k.shape[1], causal=kw["causal"], query_positions=kw["query_positions"],
                                  key_positions=kw["key_positions"], query_segment_ids=kw["query_segment_ids"],
                                  key_segment_ids=kw["key_segment_ids"])
    g = k.shape[2]
    logits = jnp.einsum("BTGRK,BSGK->BGRTS", q.reshape(b, tq, g, h // g, kd), k) * kd ** -0.5
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    weights.append(np.asarray(jnp.nan_to_num(jax.nn.softmax(logits, -1))))
    return reference.attention_reference(q, k, v, causal=kw["causal"], query_positions=kw["query_positions"],
                                         key_positions=kw["key_positions"],
                                         query_segment_ids=kw["query_segment_ids"],
                                         key_segment_ids=kw["key_segment_ids"])

  apply = lambda batch: module.apply(params, batch["images"], batch["input_ids"], batch["feature_index"],
                                     positions=batch["positions"], segment_ids=batch["segment_ids"])[0]
  want = _per_example_loss(apply(unpacked), unpacked)
  monkeypatch.setattr(attention_lib, "dot_product_attention", recording)
  got = _per_example_loss(apply(packed), packed)[0]
  start = 0
  for k, e in enumerate(examples):
    n = int(e["segment_ids"].sum())
    per_token = got[start:start + n]
    np.testing.assert_allclose(per_token.sum(), want[k].sum(), rtol=1e-5)
    np.testing.assert_allclose(per_token, want[k][:n], rtol=1e-5, atol=1e-6)
    start += n
  # The decoder's self-attention layers (the tower's run without segments): no query gives
  # any weight to a key of another segment, or to padding.
  seg = packed["segment_ids"][0]
  across = seg[:, None] != seg[None, :]
  decoder_weights = [w for w in weights if w.shape[-1] == t]
  assert len(decoder_weights) == LM.depth
  for w in decoder_weights:
    assert np.all(w[0][..., across & (seg[:, None] > 0)] == 0.0)
    np.testing.assert_allclose(w[0].sum(-1)[..., seg > 0], 1.0, rtol=1e-5)


def test_generation_inputs_that_do_not_fit_are_refused_naming_them():
  cfg, _ = _model(False)
  ids = np.asarray([[1] + [IMAGE_ID] * 20])
  with pytest.raises(ValueError, match="give 16"):
    task_lib.validate_inputs(cfg, {"images": np.zeros((1, 1, 16, 16, 3), np.uint8)}, ids)
  with pytest.raises(ValueError, match=r"images have shape \(1, 1, 8, 8, 3\)"):
    task_lib.validate_inputs(cfg, {"images": np.zeros((1, 1, 8, 8, 3), np.uint8)}, ids[:, :5])
  with pytest.raises(ValueError, match="other positions than its <image>"):
    task_lib.validate_inputs(cfg, {"images": np.zeros((1, 1, 16, 16, 3), np.uint8),
                                   "feature_index": np.asarray([[0, -1, -1, -1, -1]])}, ids[:, :5])


def test_configs_the_model_cannot_take_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="vision_feature_layers has \\[5\\]"):
    llava.LlavaConfig(vision=TOWER, decoder=LM, vision_feature_layers=(5,)).validate()
  with pytest.raises(ValueError, match="grid_pinpoints has"):
    llava.LlavaConfig(vision=TOWER, decoder=LM, image_newline=True, grid_pinpoints=((20, 32),)).validate()
  with pytest.raises(ValueError, match="projector='mlp3x'"):
    llava.LlavaConfig(vision=TOWER, decoder=LM, projector="mlp3x").validate()
  with pytest.raises(ValueError, match="select_strategy='default' drops the CLS"):
    llava.LlavaConfig(vision=dataclasses.replace(TOWER, class_token=False), decoder=LM).validate()


def test_params_are_labelled_vision_projector_and_lm():
  cfg, module = _model(True)
  params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, 16, 16, 3), jnp.uint8),
                          jnp.zeros((1, 8), jnp.int32), jnp.full((1, 8), -1, jnp.int32))["params"]
  labels = llava.param_labels(params)
  assert set(jax.tree.leaves(labels["vision"])) == {"vision"}
  assert set(jax.tree.leaves(labels["decoder"])) == {"lm"}
  assert labels["image_newline"] == "projector"
  assert set(jax.tree.leaves(labels["projector"])) == {"projector"}


# ------------------------------------------------------------------ the trainer, the shipped configs

SMALL = ["--config.data.batch_size=4", "--config.train.num_steps=2", "--config.schedule.warmup_steps=1",
         "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_batches=1",
         "--config.log.tensorboard=False", "--config.mesh.num_devices=1", "--config.data.image_size=16",
         "--config.model.vision.image_size=16", "--config.data.text_length=48", "--config.eval.num_questions=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_stage_two_trains_evaluates_and_answers_from_the_shipped_config(data_dir, tmp_path, capsys):
  wd = str(tmp_path / "stage2")
  # With length buckets: the questions (29 tokens) and captions (up to 48) make batches of
  # either length, each compiled once.
  assert cli.train_main(["--config=configs/llava/tiny_stage2.py", f"--workdir={wd}", f"--config.data.dir={data_dir}",
                         "--config.init.from_workdir=", "--config.data.buckets=32,48", *SMALL]) == 0
  assert "done at step 2" in capsys.readouterr().out
  assert cli.eval_main([f"--workdir={wd}"]) == 0
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["family"] == "llava" and res["step"] == 2
  assert 0.0 <= res["qa_exact_match"] <= 1.0 and len(res["examples"]) == 8
  assert set(res["qa_by_kind"]) <= {"count", "count_shape", "colour", "shape", "leftmost", "rightmost", "position",
                                    "other"}
  capsys.readouterr()
  image = os.path.join(str(tmp_path), "scene.png")
  from PIL import Image
  Image.fromarray(np.full((24, 40, 3), 200, np.uint8)).save(image)
  assert cli.generate_main([f"--workdir={wd}", f"--image={image}", "--prompt=<image>\nhow many shapes are there?",
                            "--max-new-tokens=3"]) == 0
  capsys.readouterr()
  assert cli.generate_main([f"--workdir={wd}", "--prompt=<image>\nhow many?"]) != 0
  assert "1 <image> tokens but 0 --image" in capsys.readouterr().err


@pytest.mark.slow  # two trainings: about 60 s on 2 cores
def test_stage_one_trains_only_the_projector_and_stage_two_leaves_the_tower_bitwise(data_dir, tmp_path):
  wd1, wd2 = str(tmp_path / "s1"), str(tmp_path / "s2")
  assert cli.train_main(["--config=configs/llava/tiny_stage1.py", f"--workdir={wd1}", f"--config.data.dir={data_dir}",
                         "--config.init.from_workdir=", *SMALL]) == 0
  config1 = config_lib.read_resolved(wd1)
  task1 = families.of_config(config1).task(config1, wd1)
  first = jax.jit(task1.init_params)(jax.random.key(int(config1.seed)))  # what the trainer starts from (jitted)
  step, last = loop.restore_params(config1, wd1, task1)
  assert step == 2
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(first["vision"], last["vision"]) and same(first["decoder"], last["decoder"])
  assert not same(first["projector"], last["projector"])
  assert cli.train_main(["--config=configs/llava/tiny_stage2.py", f"--workdir={wd2}", f"--config.data.dir={data_dir}",
                         f"--config.init.from_workdir={wd1}", *SMALL]) == 0
  config2 = config_lib.read_resolved(wd2)
  _, tuned = loop.restore_params(config2, wd2, families.of_config(config2).task(config2, wd2))
  assert same(tuned["vision"], last["vision"])  # adopted from stage 1, frozen since
  assert not same(tuned["decoder"], last["decoder"]) and not same(tuned["projector"], last["projector"])


def test_a_run_of_another_shape_is_refused_naming_what_differs():
  cfg, module = _model(False)
  params = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, 16, 16, 3), jnp.uint8),
                                   jnp.zeros((1, 8), jnp.int32), jnp.full((1, 8), -1, jnp.int32))["params"])
  other = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
  other["decoder"]["embed"]["embedding"] = np.zeros((65, 32), np.float32)
  with pytest.raises(ValueError, match="other shapes at"):
    task_lib.adopt_params(params, "lm", {"decoder": other["decoder"]})
  with pytest.raises(ValueError, match="family 'flamingo'"):
    task_lib.adopt_params(params, "flamingo", other)
  with pytest.raises(ValueError, match="missing"):
    task_lib.adopt_params(params, "contrastive", {"vision": {}})


def test_the_train_step_loss_counts_assistant_tokens_only():
  """The trainer's loss over a batch is the mean NLL over loss_mask, not over every token."""
  cfg, module = _model(False)
  rng = np.random.default_rng(2)
  ex = _example(rng, 5, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)], cfg.tokens_per_slot, t=48)
  batch = {k: v[None] for k, v in ex.items()}
  params = module.init(jax.random.key(0), batch["images"], batch["input_ids"], batch["feature_index"])["params"]
  model = task_lib.Model(cfg, 48, 2)
  total, count, _ = step_lib.next_token_loss(model.apply)(params, batch, None)
  want = _per_example_loss(model.apply(params, batch), batch).sum()
  assert float(count) == batch["loss_mask"].sum()
  np.testing.assert_allclose(float(total), want, rtol=1e-5)


def _png(h, w):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_an_image_too_thin_for_any_pinpoint_is_bad_data_naming_its_size(data_dir):
  """LLaVA-NeXT's geometry in the conversation builder: a 2 x 300 image keeps no row of its
  tile grid once unpadded; skipped as image_too_small, or raised naming the size."""
  tokenizer = builders.load_tokenizer(data_dir)
  slots = task_lib.AnyResSlots(PINPOINTS, 16, 4)
  record = {"id": b"thin", "text": b"User: <image>\nhow many shapes are there?\nAssistant: 3<|endofchunk|>",
            "images": [_png(2, 300)]}
  make = lambda bad_data: conversation.ConversationBuilder(tokenizer, "vicuna_v1", 256, 8, 16, 16, slots,
                                                           bad_data=bad_data)
  assert make("skip")(record) == {"bad_record": "image_too_small", "record_id": "thin"}
  with pytest.raises(ValueError, match="2x300"):
    make("raise")(record)
  ok = dict(record, images=[_png(20, 40)])
  example = make("raise")(ok)
  n = anyres.num_image_tokens((20, 40), PINPOINTS, 16, 4)
  assert int((example["input_ids"] == tokenizer.image_id).sum()) == n
  np.testing.assert_array_equal(example["feature_index"][example["input_ids"] == tokenizer.image_id],
                                anyres.feature_index((20, 40), PINPOINTS, 16, 4))


def test_the_recipe_of_stage_two_trains_the_lm_the_tower_stage_one_then_stage_two_each_from_the_last():
  from mmjax.train import recipe
  commands = recipe.stage_commands("llava/tiny_stage2", "/r", ["--config.data.dir=/d"])
  assert [c[0] for c in commands] == ["--config=lm/tiny", "--config=clip/tiny", "--config=llava/tiny_stage1",
                                      "--config=llava/tiny_stage2"]
  assert [c[1] for c in commands] == ["--workdir=/r/lm-tiny", "--workdir=/r/clip-tiny",
                                      "--workdir=/r/llava-tiny_stage1", "--workdir=/r/llava-tiny_stage2"]
  assert commands[2][-1] == "--config.init.from_workdir=/r/lm-tiny,/r/clip-tiny"
  assert commands[3][-1] == "--config.init.from_workdir=/r/llava-tiny_stage1"
  assert all("--config.data.dir=/d" in c for c in commands)
