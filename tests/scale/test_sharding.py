"""Rule resolution, mesh construction, and the shardings the helpers give a model."""

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mmjax import sharding as sh


def test_first_matching_rule_wins_and_later_rules_are_fallbacks():
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", "tensor"), ("mlp", "tensor"))
  # Activations: batch takes fsdp, so embed falls back to tensor and mlp stays replicated.
  assert sh.logical_to_mesh_spec(("batch", "embed", "mlp"), rules) == P(("data", "fsdp"), "tensor", None)
  # Weights: embed gets fsdp, mlp gets tensor.
  assert sh.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")


@pytest.mark.parametrize("rule_set", sorted(sh.RULE_SETS))
@pytest.mark.parametrize("names", [("batch", "length", "embed"), ("embed", "mlp"), ("mlp", "embed"),
                                   ("embed", "heads", "kv"), ("heads", "kv", "embed"), ("vocab", "embed"),
                                   ("batch", "length", "heads", "kv"), ("batch", "length", "vocab"),
                                   ("latents", "embed"), ("norm",), (None, None, "conv_in", "embed")])
def test_resolver_agrees_with_flax_when_every_size_divides(rule_set, names):
  rules = sh.RULE_SETS[rule_set]
  assert sh.logical_to_mesh_spec(names, rules) == nn.logical_to_mesh_axes(names, rules)


def test_a_rule_whose_axes_do_not_divide_the_dimension_is_skipped():
  mesh = jax.sharding.AbstractMesh((1, 1, 4, 2), sh.MESH_AXES)
  # 3 kv heads split neither 2 (tensor) nor 4 (fsdp) ways: replicated, embed still on fsdp.
  assert sh.logical_to_mesh_spec(("embed", "kv_heads", "kv"), sh.FSDP_TENSOR, (32, 3, 8), mesh) == P("fsdp", None, None)
  # An embed of 6 cannot split 4 ways: the mlp fallback to fsdp takes over after tensor is used.
  assert sh.logical_to_mesh_spec(("embed", "mlp"), sh.FSDP_TENSOR, (6, 16), mesh) == P(None, "tensor")
  assert sh.logical_to_mesh_spec(("embed", "mlp"), sh.FSDP, (6, 16), mesh) == P(None, "fsdp")


def test_unknown_rule_set_names_and_mesh_axes_are_rejected():
  with pytest.raises(ValueError, match="not one of"):
    sh.get_rules("zero3")
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sh.get_rules([("embed", "model")])
  with pytest.raises(ValueError, match="not in the vocabulary"):
    sh.get_rules([("hidden", "fsdp")])
  assert sh.get_rules([["embed", ["data", "fsdp"]]]) == (("embed", ("data", "fsdp")),)


@pytest.mark.parametrize("config,devices,expected", [
    ({"data": 1, "fsdp": -1, "tensor": 1}, 8, {"dcn": 1, "data": 1, "fsdp": 8, "tensor": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": -1, "fsdp": 4, "tensor": 1, "slices": 2}, 64, {"dcn": 2, "data": 8, "fsdp": 4, "tensor": 1}),
    ({"fsdp": 8}, 8, {"dcn": 1, "data": 1, "fsdp": 8, "tensor": 1}),
])
def test_mesh_shape_takes_the_rest_on_the_minus_one_axis(config, devices, expected):
  assert sh.mesh_shape(config, devices) == expected


@pytest.mark.parametrize("config,match", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "expected 8"),
    ({"data": -1, "slices": 3}, "slices=3"),
])
def test_bad_mesh_configs_are_rejected(config, match):
  with pytest.raises(ValueError, match=match):
    sh.mesh_shape(config, 8)


def test_make_mesh_lays_out_all_devices_with_the_named_axes():
  mesh = sh.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert mesh.axis_names == sh.MESH_AXES
  assert dict(mesh.shape) == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_two_slices_put_dcn_across_slices(monkeypatch):
  # CPU devices have no slice_index: the hybrid mesh then groups by process; fake two
  # slices by giving each device a slice_index, as TPU devices carry.
  class Dev:
    def __init__(self, i):
      self.id, self.slice_index, self.process_index, self.platform = i, i // 4, 0, "tpu"
      self.device_kind, self.coords, self.core_on_chip = "TPU v5 lite", (i % 2, (i % 4) // 2, 0), 0
    def __repr__(self):
      return f"D{self.id}"
  devices = [Dev(i) for i in range(8)]
  mesh_array = None
  def fake_mesh(devs, axes):
    nonlocal mesh_array
    mesh_array = devs
    return devs
  monkeypatch.setattr(sh, "Mesh", fake_mesh)
  sh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "slices": 2}, devices)
  assert mesh_array.shape == (2, 1, 4, 1)
  for s in range(2):
    assert {d.slice_index for d in mesh_array[s].flat} == {s}


def test_batch_shardings_reject_a_batch_the_mesh_does_not_divide():
  mesh = sh.make_mesh({"data": 2, "fsdp": -1})
  with pytest.raises(ValueError, match="multiple of 8"):
    sh.batch_shardings({"x": jax.ShapeDtypeStruct((6, 3), np.float32)}, mesh, sh.FSDP)


def test_a_config_without_mesh_fields_gets_fsdp_over_every_device():
  import ml_collections
  mesh, rules, frozen = sh.from_config(ml_collections.ConfigDict({"model": {}}))
  assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 8, "tensor": 1}
  assert rules == sh.FSDP and frozen is None
  config = ml_collections.ConfigDict({"mesh": {"data": 2, "fsdp": -1, "tensor": 2},
                                      "sharding": {"rules": "fsdp_tensor", "frozen_rules": "frozen_towers"}})
  mesh, rules, frozen = sh.from_config(config)
  assert dict(mesh.shape)["fsdp"] == 2 and rules == sh.FSDP_TENSOR and frozen == sh.FROZEN_TOWERS
