"""The `lm` family, the second family: `mmjax train | eval | generate | compile` on
configs/lm/tiny.py, cached generation equal to greedy full forward passes, and a Flamingo
started from an lm run's checkpoint (the presets' published sizes: test_lm_presets.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import families, zoo
from mmjax.data import builders
from mmjax.families.lm import model as lm
from mmjax.families.lm import task as lm_task
from mmjax.infer import Generator
from mmjax.models.decoder import DecoderConfig
from mmjax.train import cli
from mmjax.train import config as config_lib

SMALL = ["--config.data.batch_size=4", "--config.data.text_length=32", "--config.train.num_steps=4",
         "--config.schedule.warmup_steps=1", "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0",
         "--config.eval.num_batches=1", "--config.log.tensorboard=False", "--config.model.decoder.depth=2",
         "--config.mesh.num_devices=1"]
LM = "configs/lm/tiny.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lm_data"))
  builders.build_embedded(path, size=40, image_size=16, seed=0)
  return path


@pytest.mark.slow  # a training, an evaluation, a generation and a TPU compile: about 36 s on 2 cores
def test_lm_train_then_eval_then_generate_then_compile_work_from_the_shipped_config(data_dir, tmp_path, capsys):
  wd = str(tmp_path / "lm")
  assert cli.train_main([f"--config={LM}", f"--workdir={wd}", f"--config.data.dir={data_dir}", *SMALL]) == 0
  assert "done at step 4" in capsys.readouterr().out
  assert config_lib.read_resolved(wd).model.family == "lm"

  assert cli.eval_main([f"--workdir={wd}"]) == 0
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["family"] == "lm" and res["step"] == 4
  assert np.isfinite(res["val_loss"]) and res["val_perplexity"] == pytest.approx(np.exp(res["val_loss"]))
  assert "qa_zero_shot" not in res  # a text model is not asked about images
  assert "val_perplexity" in capsys.readouterr().out

  prompt = "Question: how many shapes are there? Answer:"
  assert cli.generate_main([f"--workdir={wd}", f"--prompt={prompt}", "--max-new-tokens=5"]) == 0
  printed = capsys.readouterr().out.strip()
  # The cached generator's text is greedy decoding by full forward passes.
  from mmjax.train import evaluate
  config, task, _, params = evaluate.load(wd)
  tok = task.tokenizer
  ids = list(evaluate.prompt_ids(tok, prompt))
  start = len(ids)
  for _ in range(5):
    logits = np.asarray(task.apply_fn(params, {"input_ids": np.asarray([ids], np.int32)}))[0, -1]
    ids.append(int(np.argmax(logits)))
    if ids[-1] == tok.end_of_chunk_id:
      break
  assert printed == tok.decode(ids[start:]).split("<|endofchunk|>")[0].strip()

  # Its curves: the loss panel only (an lm logs no gates).
  from PIL import Image
  assert cli.plot_main([f"--workdir={wd}", f"--out={tmp_path / 'c.png'}"]) == 0
  assert Image.open(tmp_path / "c.png").size == (600, 450)

  # An image is refused: the family reads none.
  assert cli.generate_main([f"--workdir={wd}", "--prompt=<image>hi", "--image=x.png"]) == 2
  assert "reads no images" in capsys.readouterr().err

  from mmjax.scale import compile_cli
  out = str(tmp_path / "fit.jsonl")
  assert compile_cli.main([f"--config={LM}", "--topology=v5e:2x2", f"--json={out}"]) == 0
  row = json.loads(open(out).read().splitlines()[-1])
  assert row["fits"] is True and row["chips"] == 4 and row["flops_per_chip"] > 0, row
  model = families.get("lm").abstract(config_lib.load_config(LM))
  count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(model.init_params, jax.random.key(0))))
  # float32 parameters, split over (at most) the 4 chips or replicated.
  assert 4 * count / 4 <= row["param_bytes"] <= 4 * count, (row["param_bytes"], count)


def test_cached_lm_generation_gives_the_tokens_of_greedy_full_forward_passes():
  cfg = lm.LMConfig(DecoderConfig(vocab_size=48, width=32, depth=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                  mlp_dim=64, max_length=64))
  module = lm.LanguageModel(cfg)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 48, (2, 7)).astype(np.int32)
  lengths = np.array([7, 4], np.int32)
  params = module.init(jax.random.key(0), jnp.asarray(prompts))
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper logits: fewer near-ties
  got = Generator(lm_task.decoding(cfg)).generate(params, None, prompts, 6, prompt_lengths=lengths)
  # Full forward passes over one padded length (one compile): causal attention keeps the
  # logits at the last real token independent of the padding after it.
  forward = jax.jit(lambda ids: module.apply(params, ids)[0])
  for b in range(2):
    seq = list(prompts[b, :lengths[b]])
    for _ in range(6):
      padded = np.zeros((1, 16), np.int32)
      padded[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(forward(jnp.asarray(padded)))[0, len(seq) - 1])))
    assert got.tokens[b].tolist() == seq[lengths[b]:], b


def test_a_preset_of_another_family_is_an_error_listing_this_familys(capsys):
  from mmjax.scale import compile_cli
  assert compile_cli.main([f"--config={LM}", "--preset=openflamingo-9b", "--topology=v5e:2x2", "--no-compile"]) == 2
  err = capsys.readouterr().err
  assert "preset 'openflamingo-9b' is not one of the presets of family 'lm'" in err and "llama-7b" in err
  with pytest.raises(ValueError, match="unknown overrides"):
    zoo.get("llama-7b", cross_attn_every_n_layers=2)


@pytest.mark.slow  # two trainings: 36 s; the Flamingo recipe test adopts an lm run too
def test_flamingo_starts_from_an_lm_runs_checkpoint_with_its_lm_bitwise(data_dir, tmp_path):
  from mmjax.train import evaluate
  from mmjax.train import loop
  from mmjax.train import pretrained
  lm_wd = str(tmp_path / "lm")
  assert cli.train_main([f"--config={LM}", f"--workdir={lm_wd}", f"--config.data.dir={data_dir}", *SMALL]) == 0
  _, _, _, lm_params = evaluate.load(lm_wd)
  config = config_lib.load_config("flamingo/tiny", [
      f"--config.data.dir={data_dir}", "--config.model.decoder.depth=2", "--config.data.image_size=16",
      "--config.model.vision.image_size=16", f"--config.init.from_workdir={lm_wd}"])
  task = families.of_config(config).task(config, None)
  params = pretrained.adopt(config, task, task.init_params(jax.random.key(0)))
  for key, leaf in jax.tree_util.tree_flatten_with_path(lm_params["decoder"])[0]:
    got = params["decoder"]
    for k in key:
      got = got[k.key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf), err_msg=jax.tree_util.keystr(key))
  assert any(k.startswith("xattn") for k in params["decoder"])
  # A decoder of another shape is refused, naming what differs.
  config = config_lib.load_config("flamingo/tiny", [
      f"--config.data.dir={data_dir}", "--config.model.decoder.depth=4", f"--config.init.from_workdir={lm_wd}"])
  task = families.of_config(config).task(config, None)
  with pytest.raises(ValueError, match=r"does not fit this Flamingo's: missing \['layers_2', 'layers_3'\]"):
    pretrained.adopt(config, task, task.init_params(jax.random.key(0)))
  del loop


def test_the_staged_recipe_starts_from_an_lm_and_a_contrastive_run_and_never_trains_either():
  from mmjax.train import optimizer
  from mmjax.train import pretrained
  config = config_lib.load_config("flamingo/staged")
  assert pretrained.sources(config) == ["work/lm-tiny", "work/clip-tiny"]
  stages = optimizer.parse_stages(str(config.freeze.stages), families.of_config(config).components)
  # Only the resampler and the cross-attention ever train: the LM and the vision tower are
  # frozen from step 0.
  assert all(s.trainable == frozenset({"resampler", "xattn"}) for s in stages)
  assert stages[0].start_step == 0


def test_a_missing_pretrained_run_is_an_error_saying_how_to_make_it(tmp_path, data_dir):
  from mmjax.train import pretrained
  config = config_lib.load_config("flamingo/staged", [f"--config.data.dir={data_dir}",
                                                      f"--config.init.from_workdir={tmp_path / 'none'}"])
  task = families.of_config(config).task(config, None)
  with pytest.raises(ValueError, match=r"is not a directory; .*configs/lm/tiny.py"):
    pretrained.adopt(config, task, {})


VARIANTS = {
    "gpt-neox": (["norm=layer", "mlp=gelu", "mlp_bias=True", "attention_bias=True", "parallel_residual=True",
                  "rotary_fraction=0.25", "tie_embeddings=False"],
                 lambda p: set(p["layers_0"]["mlp"]) == {"fc1", "fc2"} and "bias" in p["layers_0"]["attn"]["query"]
                 and "bias" in p["layers_0"]["attn_norm"]),
    # MPT: ALiBi instead of rotary positions, bias-free LayerNorms, clamped q/k/v.
    "mpt": (["norm=layer", "norm_bias=False", "mlp=gelu", "positions=alibi", "clip_qkv=6.0"],
            lambda p: set(p["layers_0"]["attn_norm"]) == {"scale"} and set(p["layers_0"]["mlp"]) == {"fc1", "fc2"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_variant_lm_trains_from_the_shipped_config_through_the_decoder_fields(variant, data_dir, tmp_path, capsys):
  fields, check = VARIANTS[variant]
  wd = str(tmp_path / variant)
  flags = [f"--config.model.decoder.{f}" for f in fields]
  assert cli.train_main([f"--config={LM}", f"--workdir={wd}", f"--config.data.dir={data_dir}", *SMALL, *flags]) == 0
  out = capsys.readouterr().out
  assert "done at step 4" in out
  from mmjax.train import evaluate
  config, _, _, params = evaluate.load(wd)
  assert check(params["decoder"])
  recorded = config.model.decoder
  for f in fields:
    name, value = f.split("=")
    assert str(recorded[name]) == value, (name, recorded[name])


@pytest.mark.parametrize("field, value, message", [
    ("norm", "batch", r"DecoderConfig.norm='batch'; expected one of \('rms', 'layer'\)"),
    ("mlp", "swish", r"DecoderConfig.mlp='swish'; expected one of"),
    ("parallel_norms", 3, r"DecoderConfig.parallel_norms=3; expected 1 or 2"),
    ("rotary_fraction", 0.3, r"rotary_fraction=0.3 of head_dim=32; expected a fraction in \(0, 1\] that rotates an even"),
    ("positions", "sinusoidal", r"DecoderConfig.positions='sinusoidal'; expected one of \('rope', 'alibi', 'learned'\)"),
    ("position_offset", 2, r"position_offset=2 with positions='rope'; expected .* only with positions='learned'"),
    ("sliding_window", -1, r"sliding_window=-1; expected >= 0"),
    ("norm_bias", False, r"norm_bias=False with norm='rms'; expected norm='layer'"),
])
def test_a_decoder_variant_the_decoder_does_not_support_is_a_value_error_naming_it(field, value, message):
  import dataclasses
  from mmjax.models.decoder import Decoder
  cfg = dataclasses.replace(zoo.get("lm-tiny").decoder, **{field: value})
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))
