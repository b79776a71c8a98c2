"""`mmjax compile` of the `llava` family: LLaVA's stage-2 train step (the tower frozen, the
projector and the LM trained) compiled for a real TPU topology on this CPU host, with the
frozen tower carrying no optimizer state."""

import json

import jax
import pytest

from mmjax import families
from mmjax.scale import compile_cli
from mmjax.train import config as config_lib

pytestmark = pytest.mark.tpu_aot

STAGE2 = "configs/llava/tiny_stage2.py"


@pytest.mark.slow  # one TPU compile of llava-tiny: about 40 s on 2 CPU cores
def test_stage2_compiles_for_v5e_2x2_with_adam_state_for_the_projector_and_lm_only(capsys, tmp_path):
  out = tmp_path / "fit.jsonl"
  code = compile_cli.main(["--config", STAGE2, "--topology", "v5e:2x2", "--json", str(out)])
  text = capsys.readouterr().out
  assert code == 0, text
  assert "trainable lm,projector" in text  # the config's freeze stage "0:projector,lm"
  row = next(line for line in text.splitlines() if line.startswith("v5e:2x2"))
  assert row.split()[-3] == "yes", row  # the fits column
  fit = json.loads(out.read_text().splitlines()[0])
  assert fit["chips"] == 4 and fit["fits"] and fit["hbm_bytes"] == 16 << 30
  assert fit["total_bytes"] > fit["param_bytes"] + fit["opt_bytes"] and fit["flops_per_chip"] > 0

  # Every llava-tiny parameter is float32 and FSDP splits it 4 ways: the parameters on one
  # chip are a quarter of the total, Adam's two moments twice the trained quarter, none for
  # the tower (1% slack: the few small leaves FSDP leaves whole, Adam's step count).
  config = config_lib.load_config(STAGE2)
  model = families.of_config(config).abstract(config)
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  labels = model.param_labels(params)
  nbytes = lambda keep: sum(x.size * 4 for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                            if keep(label))
  total, trained = nbytes(lambda _: True), nbytes(lambda label: label in ("projector", "lm"))
  assert total - trained > 0  # the tower is there, frozen
  assert fit["param_bytes"] == pytest.approx(total / 4, rel=0.01)
  assert fit["opt_bytes"] == pytest.approx(2 * trained / 4, rel=0.01)
