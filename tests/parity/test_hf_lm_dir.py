"""Parity: tiny random HF LLaMA, GPT-NeoX and Phi models saved to a directory, sharded, as
safetensors (``save_pretrained``) and as ``pytorch_model.bin`` shards, and Mistral, MPT, OPT and
Persimmon as one ``model.safetensors``, imported with
`load_hf_lm` give transformers' logits; a pickle that would run code or build an object is
refused, not executed."""

import builtins
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.families.lm.convert import load_hf_lm
from mmjax.families.lm.model import LanguageModel
from tests.parity.test_hf_gpt_neox import _tiny_neox
from tests.parity.test_hf_llama import _tiny_llama

pytestmark = pytest.mark.parity


def _tiny_phi() -> transformers.PhiForCausalLM:
  torch.manual_seed(7)
  config = transformers.PhiConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                  num_attention_heads=6, max_position_embeddings=64)
  model = transformers.PhiForCausalLM(config).eval()
  with torch.no_grad():  # LayerNorms and biases start at (1, 0): perturb them so the import shows
    for name, p in model.named_parameters():
      if "layernorm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  return model


MODELS = {"llama": lambda: _tiny_llama(False), "gpt_neox": lambda: _tiny_neox(True), "phi": _tiny_phi}


def save_torch_bin_shards(model, directory, shards: int = 2) -> None:
  """config.json, then the state_dict as ``pytorch_model-0000i-of-0000n.bin`` shards with
  ``pytorch_model.bin.index.json``: the layout transformers 4 wrote with
  ``safe_serialization=False`` (transformers 5 writes safetensors whatever that flag says)."""
  model.config.architectures = [type(model).__name__]  # as save_pretrained records it
  model.config.save_pretrained(directory)
  state_dict = model.state_dict()
  weight_map = {}
  names = list(state_dict)
  per_shard = -(-len(names) // shards)
  for s, keys in enumerate(names[i:i + per_shard] for i in range(0, len(names), per_shard)):
    name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
    torch.save({key: state_dict[key].clone() for key in keys}, directory / name)
    weight_map.update({key: name for key in keys})
  (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_hf_directory_of_shards_imports_to_the_hf_logits(name, fmt, tmp_path):
  model = MODELS[name]()
  if fmt == "safetensors":
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  else:
    save_torch_bin_shards(model, tmp_path)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  config, params = load_hf_lm(tmp_path, scan_layers=fmt == "bin")
  ids = np.random.default_rng(0).integers(0, 97, size=(2, 11)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = LanguageModel(config).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf {name}| = {diff:.2e} ({fmt}, scan_layers={config.decoder.scan_layers})")
  assert diff <= 1e-4


@pytest.mark.parametrize("name", ["mistral", "mpt", "opt", "persimmon"])
def test_the_other_architectures_import_from_one_safetensors_file_to_the_hf_logits(name, tmp_path):
  from tests.parity.test_hf_lm_variants import ARCHS  # pylint: disable=g-import-not-at-top
  model = ARCHS[name][0]()
  model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
  config, params = load_hf_lm(tmp_path)
  ids = np.random.default_rng(0).integers(2, 97, size=(2, 11)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = LanguageModel(config).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf {name}| = {diff:.2e} (one file)")
  assert diff <= 1e-4


CONSTRUCTED = []


def _record_construction(what):
  CONSTRUCTED.append(what)


class _RunsCode:
  """Pickles as a call of exec: unpickling it would write `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


class _CustomObject:
  """Pickles as a call of a function of this module: unpickling it would record itself."""

  def __reduce__(self):
    return _record_construction, ("a _CustomObject",)


@pytest.mark.parametrize("payload", ["runs code", "custom object"])
def test_a_pickle_holding_anything_but_tensors_is_refused_and_not_executed(payload, tmp_path):
  model = _tiny_llama(False)
  model.config.architectures = ["LlamaForCausalLM"]
  model.config.save_pretrained(tmp_path)
  marker = tmp_path / "marker"
  evil = _RunsCode(marker) if payload == "runs code" else _CustomObject()
  path = tmp_path / "pytorch_model.bin"
  torch.save({**model.state_dict(), "model.extra": evil}, path)
  with pytest.raises(ValueError, match=rf"{path}: refused: torch.load\(weights_only=True"):
    load_hf_lm(tmp_path)
  assert not marker.exists() and CONSTRUCTED == []
  # The file is what it claims: a full unpickling does run it.
  torch.load(path, weights_only=False)
  assert marker.exists() if payload == "runs code" else CONSTRUCTED == ["a _CustomObject"]
  CONSTRUCTED.clear()
