"""`mmjax compile`: the train step compiled for real TPU topologies on this CPU host."""

import pytest

from mmjax import sharding as sh
from mmjax.scale import aot, compile_cli

pytestmark = pytest.mark.tpu_aot


def test_two_slices_of_a_topology_put_the_dcn_axis_across_slices():
  devices = aot.topology_devices("v5e:2x2", slices=2)
  mesh = sh.make_mesh({"fsdp": -1, "slices": 2}, devices)
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  for s in range(2):
    assert {d.slice_index for d in mesh.devices[s].flat} == {s}


def test_unknown_topologies_are_reported_not_crashed_on(capsys):
  assert compile_cli.main(["--config", "configs/flamingo/tiny.py", "--topology", "v9x:2x2"]) == 2
  assert "v9x" in capsys.readouterr().err
  with pytest.raises(ValueError, match="axis=size"):
    compile_cli.parse_mesh("fsdp")


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_compile_tiny_for_v5e_2x2_prints_per_chip_memory_that_fits(capsys, tmp_path):
  out = tmp_path / "fit.jsonl"
  code = compile_cli.main(["--config", "configs/flamingo/tiny.py", "--topology", "v5e:2x2", "--batch", "8",
                           "--json", str(out)])
  text = capsys.readouterr().out
  assert code == 0, text
  assert "v5e:2x2" in text and "params" in text
  import json
  fit = json.loads(out.read_text().splitlines()[0])
  assert fit["chips"] == 4 and fit["fits"] and fit["hbm_bytes"] == 16 << 30
  # Every parameter of flamingo-tiny is float32 and FSDP splits it 4 ways (norm scales
  # and gates, a few KiB, stay whole): per-chip bytes are close to a quarter of the total.
  import jax
  from mmjax.train import config as config_lib
  _, state, _ = aot.build_step(config_lib.load_config("configs/flamingo/tiny.py"),
                               sh.make_mesh({"fsdp": -1}, jax.devices()[:4]), sh.FSDP,
                               trainable=frozenset({"vision", "resampler", "xattn", "lm"}), batch=8, length=32,
                               num_images=1)
  total = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert total / 4 <= fit["param_bytes"] <= total / 4 * 1.05
  assert fit["opt_bytes"] >= 2 * fit["param_bytes"]  # Adam's mu and nu for every (trainable) weight
  assert fit["temp_bytes"] > 0 and fit["flops_per_chip"] > 0


def test_fsdp_per_chip_parameter_and_optimizer_bytes_fall_7x_from_4_to_32_chips():
  from mmjax.train import config as config_lib
  config = config_lib.load_config("configs/flamingo/tiny.py")
  fits = [aot.compile_step(config, topology=topology, mesh={"fsdp": -1}, rules="fsdp",
                           trainable=frozenset({"resampler", "xattn"}), batch=batch, length=32, num_images=1,
                           compile=False)
          for topology, batch in (("v5e:2x2", 8), ("v5e:4x8", 64))]
  small, large = (f.param_bytes + f.opt_bytes for f in fits)
  assert fits[0].chips == 4 and fits[1].chips == 32
  assert small / large >= 7.0, small / large
  assert fits[0].fits is None  # not compiled: no peak to judge


@pytest.mark.slow  # two TPU compiles of the tiny model (unrolled and scanned); the default tier compiles one
def test_scan_layers_compiles_with_the_unrolled_state_bytes_and_flops(tmp_path):
  # flamingo-tiny scanned (2 blocks of 2 layers) vs unrolled: the same sharded state, and
  # XLA's count (loop body once) plus uncounted_flops close to the unrolled count.
  import json
  out = tmp_path / "fit.jsonl"
  args = ["--config", "configs/flamingo/tiny.py", "--topology", "v5e:2x2", "--batch", "8",
          "--trainable", "resampler,xattn", "--remat", "layers", "--json", str(out)]
  assert compile_cli.main(args) == 0
  assert compile_cli.main(args + ["--scan-layers"]) == 0
  unrolled, scanned = (json.loads(line) for line in out.read_text().splitlines())
  assert not unrolled["scan_layers"] and scanned["scan_layers"]
  assert scanned["param_bytes"] == unrolled["param_bytes"] and scanned["opt_bytes"] == unrolled["opt_bytes"]
  assert unrolled["scan_flops_added"] == 0 < scanned["scan_flops_added"]
  assert scanned["flops_per_chip"] == pytest.approx(unrolled["flops_per_chip"], rel=0.1)
