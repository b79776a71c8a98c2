"""`mmjax.convert.hf_lm` on LLaMA-layout checkpoints written with numpy (no torch): the
directory layouts, the lazy state_dict, dtypes, the errors for bad directories, and (slow) the
peak host memory of importing a ~1 GB checkpoint in a fresh process."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmjax.convert import hf_lm, hf_llama
from mmjax.convert.state_dict import LazyStateDict, SafetensorsFile
from mmjax.families.lm import convert as lm_convert
from mmjax.models import scan_layout

TINY = dict(vocab_size=53, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def llama_config_json(**fields) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
          "max_position_embeddings": 64, "tie_word_embeddings": False, **fields}


def llama_tensors(cfg: dict, layers, rng: np.random.Generator, dtype=np.float32):
  """(key, array) of a LlamaForCausalLM state_dict: embedding, the given layers, norm, head."""
  v, d, f = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
  k = d // cfg["num_attention_heads"]
  g = cfg["num_key_value_heads"] * k
  new = lambda *shape: rng.standard_normal(shape, dtype=np.float32).astype(dtype)
  if layers and layers[0] == 0:
    yield "model.embed_tokens.weight", new(v, d)
  for i in layers:
    p = f"model.layers.{i}."
    yield from [(p + "input_layernorm.weight", new(d)), (p + "self_attn.q_proj.weight", new(d, d)),
                (p + "self_attn.k_proj.weight", new(g, d)), (p + "self_attn.v_proj.weight", new(g, d)),
                (p + "self_attn.o_proj.weight", new(d, d)), (p + "post_attention_layernorm.weight", new(d)),
                (p + "mlp.gate_proj.weight", new(f, d)), (p + "mlp.up_proj.weight", new(f, d)),
                (p + "mlp.down_proj.weight", new(d, f))]
  if layers and layers[-1] == cfg["num_hidden_layers"] - 1:
    yield "model.norm.weight", new(d)
    yield "lm_head.weight", new(v, d)


def write_llama_dir(directory, cfg: dict, shards: int = 1, dtype=np.float32, seed: int = 0, keep: bool = True) -> dict:
  """A LLaMA-layout HF directory (config.json, safetensors, sharded with an index when
  shards > 1), written shard by shard; returns {key: array as written} (keep=False: {key:
  bytes}, so a large checkpoint is never whole in memory)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(llama_config_json(**cfg), f)
  rng = np.random.default_rng(seed)
  depth = cfg["num_hidden_layers"]
  written, weight_map = {}, {}
  for s, layers in enumerate(np.array_split(np.arange(depth), shards)):
    name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    tensors = dict(llama_tensors(cfg, [int(i) for i in layers], rng, dtype))
    save_file(tensors, os.path.join(directory, name))
    weight_map.update({key: name for key in tensors})
    written.update(tensors if keep else {key: x.nbytes for key, x in tensors.items()})
  if shards > 1:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return written


def test_sharded_safetensors_import_equals_the_in_memory_conversion_unrolled_and_scanned(tmp_path):
  written = write_llama_dir(tmp_path, TINY, shards=2)
  config, params = lm_convert.load_hf_lm(tmp_path)
  want = hf_llama.llama_from_state_dict(written, config.decoder)
  assert params["decoder"]["layers_2"]["mlp"]["down_proj"]["kernel"].shape == (24, 16)
  np.testing.assert_equal(params["decoder"], want)
  scanned_config, scanned = lm_convert.load_hf_lm(tmp_path, scan_layers=True)
  assert scanned_config.decoder.scan_layers
  np.testing.assert_equal(scanned["decoder"], scan_layout.stack_layers(want, 3))


def test_bfloat16_and_float16_files_widen_to_float32_and_dtype_sets_the_params_dtype(tmp_path):
  for dtype in (ml_dtypes.bfloat16, np.float16):
    written = write_llama_dir(tmp_path / np.dtype(dtype).name, TINY, dtype=dtype)
    _, params = hf_lm.load_hf_decoder(tmp_path / np.dtype(dtype).name)
    embedding = params["embed"]["embedding"]
    assert embedding.dtype == np.float32
    np.testing.assert_equal(embedding, written["model.embed_tokens.weight"].astype(np.float32))
  _, params = hf_lm.load_hf_decoder(tmp_path / "bfloat16", dtype="bfloat16", scan_layers=True)
  kernel = params["blocks"]["layers_0"]["attn"]["query"]["kernel"]
  assert (kernel.dtype, kernel.shape) == (np.dtype(ml_dtypes.bfloat16), (3, 16, 4, 4))


def test_the_lazy_state_dict_reads_no_tensor_for_membership_or_shape(tmp_path, monkeypatch):
  write_llama_dir(tmp_path, TINY)
  sd = hf_lm.open_state_dict(tmp_path)
  assert isinstance(sd, LazyStateDict) and len(sd) == 2 + 9 * 3 + 1
  monkeypatch.setattr(SafetensorsFile, "read", lambda self, key: pytest.fail(f"read {key}"))
  assert "model.norm.weight" in sd and "model.nope" not in sd
  assert sd.shape("lm_head.weight") == (53, 16)


def test_the_family_hf_importer_converts_for_the_given_config(tmp_path):
  write_llama_dir(tmp_path, TINY)
  from mmjax import families
  config, want = lm_convert.load_hf_lm(tmp_path, scan_layers=True)
  got = families.get("lm").importers["hf"](tmp_path, config)
  np.testing.assert_equal(got, want)


def test_an_unsupported_architecture_is_refused_listing_the_supported_ones(tmp_path):
  write_llama_dir(tmp_path, TINY)
  (tmp_path / "config.json").write_text(json.dumps(llama_config_json(**TINY, architectures=["BertModel"])))
  with pytest.raises(ValueError, match=r"architectures=\['BertModel'\] is not supported.*GPTNeoXForCausalLM.*"
                                       r"LlamaForCausalLM.*PhiForCausalLM"):
    lm_convert.load_hf_lm(tmp_path)


def test_a_directory_without_config_json_is_refused_naming_the_file(tmp_path):
  write_llama_dir(tmp_path, TINY)
  os.remove(tmp_path / "config.json")
  with pytest.raises(ValueError, match=r"config.json does not exist"):
    lm_convert.load_hf_lm(tmp_path)
  with pytest.raises(ValueError, match=r"holds none of \['model.safetensors.index.json'"):
    hf_lm.open_state_dict(tmp_path / "..")


def test_a_shard_the_index_names_but_the_directory_lacks_is_refused_by_name(tmp_path):
  write_llama_dir(tmp_path, TINY, shards=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match=r"names shards that do not exist.*\['model-00002-of-00002.safetensors'\]"):
    lm_convert.load_hf_lm(tmp_path)


def test_weights_that_disagree_with_config_json_name_the_key_and_both_shapes(tmp_path):
  write_llama_dir(tmp_path, TINY)
  (tmp_path / "config.json").write_text(json.dumps(llama_config_json(**{**TINY, "intermediate_size": 32})))
  with pytest.raises(ValueError) as err:
    lm_convert.load_hf_lm(tmp_path)
  assert "do not match" in str(err.value)
  assert "model.layers.0.mlp.gate_proj.weight: shape (24, 16), expected (32, 16)" in str(err.value)


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path):
  write_llama_dir(tmp_path, TINY)
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match=r"model.safetensors: tensor .* truncated or corrupt"):
    hf_lm.open_state_dict(tmp_path)


# ------------------------------------------------------------------------------ memory

# About 1 GB of float32: embedding and head 32000 x 2048 (262 MB each), 2 layers of 206 MB.
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
           num_key_value_heads=16)
# What the import may hold beyond its output, the largest tensor and the runtime baseline:
# allocator slack and the small arrays in flight.
SLACK_MB = 64

_PEAK = """
import json, sys
import numpy as np
from mmjax.families.lm import convert
if sys.argv[1] != "baseline":
  config, params = convert.load_hf_lm(sys.argv[2], scan_layers=sys.argv[1] == "scanned")
  out = sum(x.nbytes for x in __import__("jax").tree.leaves(params))
else:
  out = 0
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({"peak": int(status["VmHWM"].split()[0]) * 1024, "output": out}))
"""


def _peak(*args) -> dict:
  run = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True)
  return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_importing_a_1gb_checkpoint_peaks_at_its_output_plus_the_largest_tensor(layout, tmp_path):
  sizes = write_llama_dir(tmp_path, BIG, shards=2, keep=False)
  largest, total = max(sizes.values()), sum(sizes.values())
  baseline = _peak("baseline")["peak"]
  got = _peak(layout, str(tmp_path))
  mb = lambda n: n / 2**20
  extra = got["peak"] - baseline - got["output"]
  print(f"{layout}: checkpoint {mb(total):.0f} MB, output {mb(got['output']):.0f} MB, largest tensor "
        f"{mb(largest):.0f} MB, runtime baseline {mb(baseline):.0f} MB, peak {mb(got['peak']):.0f} MB: "
        f"peak - baseline - output = {mb(extra):.0f} MB")
  assert got["output"] == total
  assert extra <= largest + SLACK_MB * 2**20
