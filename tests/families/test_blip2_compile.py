"""`mmjax compile` of the `blip2` family for a real TPU topology on this CPU host: BLIP-2's
stage-2 train step (the tower and the LM frozen, the Q-Former and the projection trained),
whose frozen components carry no optimizer state, and the stage-1 step (ITC, ITM with hard
negatives drawn on each batch device, ITG) under the sharded step; and the FLOPs the family
adds for a scanned LM, whose loop body XLA's cost analysis counts once."""

import json

import dataclasses

import jax
import pytest

from mmjax import families, zoo
from mmjax.families.blip2 import compile as blip2_compile, task
from mmjax.scale import compile_cli
from mmjax.train import config as config_lib, optimizer, state as state_lib

STAGE1 = "configs/blip2/tiny_stage1.py"
STAGE2 = "configs/blip2/tiny_stage2.py"


def _compile(capsys, out, config: str, *extra: str) -> tuple[int, str, list[dict]]:
  code = compile_cli.main(["--config", config, "--topology", "v5e:2x2", "--json", str(out), *extra])
  text = capsys.readouterr().out
  return code, text, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def _param_bytes(config_path: str) -> dict[str, int]:
  """float32 bytes of the config's model by component label."""
  config = config_lib.load_config(config_path)
  model = families.of_config(config).abstract(config)
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  out = {}
  for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(model.param_labels(params))):
    out[label] = out.get(label, 0) + x.size * 4
  return out


def _components_with_adam_state(config_path: str) -> set[str]:
  """The component labels of the parameters Adam keeps moments for, from the optimizer the
  trainer builds for the config's first freeze stage."""
  config = config_lib.load_config(config_path)
  family = families.of_config(config)
  model = family.abstract(config)
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  labels = model.param_labels(params)
  trainable = optimizer.parse_stages(str(config.freeze.stages), family.components)[0].trainable
  mask = optimizer.trainable_mask(labels, trainable)
  state = jax.eval_shape(lambda p: state_lib.create(p, optimizer.make_transform(config, mask), seed=0), params)
  label_of = {jax.tree_util.keystr(path): label for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    # Adam's moments repeat the parameter tree below their own keys: match on the suffix.
    key = jax.tree_util.keystr(path)
    found |= {label for param_path, label in label_of.items() if key.endswith(param_path)}
  return found


@pytest.mark.tpu_aot
@pytest.mark.slow  # two TPU compiles of the tiny stage-2 model (unrolled, scanned): about 80 s on 2 shared CPU cores
def test_stage2_compiles_for_v5e_2x2_with_adam_state_for_the_qformer_and_projection_only_scanned_or_not(capsys, tmp_path):
  code, text, fits = _compile(capsys, tmp_path / "fit.jsonl", STAGE2)
  assert code == 0, text
  assert "trainable projector,qformer" in text  # the config's freeze stage "0:qformer,projector"
  row = next(line for line in text.splitlines() if line.startswith("v5e:2x2"))
  assert row.split()[-3] == "yes", row  # the fits column
  fit = fits[0]
  assert fit["chips"] == 4 and fit["fits"] and fit["hbm_bytes"] == 16 << 30
  assert fit["total_bytes"] > fit["param_bytes"] + fit["opt_bytes"] and fit["flops_per_chip"] > 0

  assert _components_with_adam_state(STAGE2) == {"qformer", "projector"}
  # The compiled sharded state agrees: every parameter is float32 and FSDP splits it 4 ways,
  # so one chip holds a quarter of the parameters, and Adam's two moments of at least a
  # quarter of the trained ones (more: the few small leaves FSDP leaves whole), but less than
  # the moments of the smallest frozen component would add.
  nbytes = _param_bytes(STAGE2)
  assert 0 < nbytes["vision"] < nbytes["lm"]  # both there, frozen
  trained = nbytes["qformer"] + nbytes["projector"]
  assert fit["param_bytes"] == pytest.approx(sum(nbytes.values()) / 4, rel=0.02)
  assert 2 * trained / 4 <= fit["opt_bytes"] < 2 * (trained + nbytes["vision"]) / 4

  # The LM's 4 layers scanned: the same sharded state, and XLA's count (the loop body once)
  # plus the family's uncounted_flops close to the unrolled count.
  code, text, fits = _compile(capsys, tmp_path / "fit.jsonl", STAGE2, "--scan-layers")
  assert code == 0, text
  unrolled, scanned = fits
  assert scanned["scan_layers"] and not unrolled["scan_layers"]
  assert (scanned["param_bytes"], scanned["opt_bytes"]) == (unrolled["param_bytes"], unrolled["opt_bytes"])
  assert unrolled["scan_flops_added"] == 0 < scanned["scan_flops_added"]
  assert scanned["flops_per_chip"] == pytest.approx(unrolled["flops_per_chip"], rel=0.1)


@pytest.mark.tpu_aot
@pytest.mark.slow  # one TPU compile of the tiny stage-1 model (its four Q-Former passes) and one refused
# trace: about 190 s on 2 shared CPU cores
def test_stage1_losses_compile_for_v5e_2x2_with_hard_negatives_drawn_on_each_batch_device(capsys, tmp_path):
  code, text, fits = _compile(capsys, tmp_path / "fit.jsonl", STAGE1)
  assert code == 0, text
  assert "trainable qformer" in text  # the tower frozen
  fit = fits[0]
  assert fit["fits"] and fit["flops_per_chip"] > 0
  assert _components_with_adam_state(STAGE1) == {"qformer"}

  # Under the sharded step ITM draws each hard negative among its own device's rows: a
  # global batch of 4 over the 4 chips leaves each device one row and no negative.
  code, text, fits = _compile(capsys, tmp_path / "small.jsonl", STAGE1, "--batch", "4")
  assert code == 1 and not fits, text
  assert "leaves 1 row per device" in text, text


def test_uncounted_flops_are_the_scanned_lm_layers_after_the_first_as_stage_2_runs_them():
  # BLIP-2 OPT-2.7B's stage 2 under remat: each of the 32 LM layers runs forward, again for
  # remat, and backward to the projection (x3); XLA sees one, the family adds the other 31.
  cfg = zoo.get("blip2-opt-2.7b")
  d = dataclasses.replace(cfg.decoder, scan_layers=True, remat=True)
  scanned = dataclasses.replace(cfg, decoder=d)
  lm = task.forward_flops(scanned, 128)["lm"] - 2 * 128 * d.width * d.vocab_size  # the layers, not the head
  stage2 = frozenset({"qformer", "projector"})
  added = blip2_compile.uncounted_flops(scanned, stage2, 8, 128, 0, 4)
  assert added == pytest.approx(31 / 32 * 3 * lm * 8 / 4, rel=1e-12)
  # Trained, the LM's layers count x4; with nothing upstream trained, forward and remat only.
  assert blip2_compile.uncounted_flops(scanned, stage2 | {"lm"}, 8, 128, 0, 4) == pytest.approx(added * 4 / 3)
  assert blip2_compile.uncounted_flops(scanned, frozenset(), 8, 128, 0, 4) == pytest.approx(added * 2 / 3)
  # Unscanned, XLA counts every layer; stage 1 has no LM.
  assert blip2_compile.uncounted_flops(dataclasses.replace(scanned, decoder=cfg.decoder), stage2, 8, 128, 0, 4) == 0
  assert blip2_compile.uncounted_flops(zoo.get("blip2-tiny"), frozenset({"qformer"}), 8, 24, 0, 4) == 0
