"""Work directories written before the decoder became family-neutral: their config.json holds
Flamingo's cross-attention fields under `model.decoder` (with `media_width`); reading it
moves them up, so such a run resumes under today's config with no ConfigChanged and its
checkpoints (same parameter layout) restore."""

import json

import pytest

from mmjax.families.flamingo import model as flamingo
from mmjax.train import config as config_lib
from mmjax.train import workdir as workdir_lib


def _old_layout(config: dict) -> dict:
  """A config as mmjax recorded it before the change (no model.family either)."""
  model = dict(config["model"])
  decoder = dict(model["decoder"])
  for key in flamingo.MOVED_DECODER_FIELDS[:-1]:
    decoder[key] = model.pop(key)
  decoder["media_width"] = model["resampler"]["width"]
  model.pop("family")
  return {**config, "model": {**model, "decoder": decoder}}


def test_an_old_config_json_reads_as_todays_and_resumes_without_a_change(tmp_path):
  current = json.loads(config_lib.load_config("flamingo/tiny").to_json_best_effort())
  old = _old_layout(current)
  (tmp_path / config_lib.RESOLVED_CONFIG).write_text(json.dumps(old))
  read = config_lib.read_resolved(str(tmp_path)).to_dict()
  read_model = {k: v for k, v in read["model"].items() if k != "family"}
  want_model = {k: v for k, v in current["model"].items() if k != "family"}
  assert json.loads(json.dumps(read_model)) == want_model
  workdir_lib.check_resume(str(tmp_path), old, current, allow_change=False)  # raises on a difference
  changed = json.loads(json.dumps(current))
  changed["model"]["xattn_num_heads"] = 8
  with pytest.raises(workdir_lib.ConfigChanged, match=r"model.xattn_num_heads: 4 -> 8"):
    workdir_lib.check_resume(str(tmp_path), old, changed, allow_change=False)


def test_an_old_media_width_other_than_the_resamplers_is_refused_naming_both():
  current = json.loads(config_lib.load_config("flamingo/tiny").to_json_best_effort())
  old = _old_layout(current)
  old["model"]["decoder"]["media_width"] = 999
  with pytest.raises(ValueError, match=r"model.decoder.media_width=999 differs from model.resampler.width=64"):
    config_lib.upgrade(old)


def test_a_run_recorded_before_init_from_workdir_existed_resumes_under_todays_config(tmp_path):
  """`init.from_workdir` is read only at step 0, so its appearance (as "") is no change."""
  current = json.loads(config_lib.load_config("flamingo/tiny").to_json_best_effort())
  old = _old_layout(current)
  del old["init"]["from_workdir"]
  workdir_lib.check_resume(str(tmp_path), old, current, allow_change=False)


def test_decoder_fields_added_since_a_run_was_recorded_take_their_defaults(tmp_path):
  """The LM variant fields (norm, mlp, biases, parallel residual, rotary fraction) are absent
  from a config recorded before them; their defaults are the LLaMA decoder it trained."""
  for shipped in ("flamingo/tiny", "lm/tiny"):
    current = json.loads(config_lib.load_config(shipped).to_json_best_effort())
    old = json.loads(json.dumps(current))
    for key in ("norm", "mlp", "mlp_bias", "attention_bias", "parallel_residual", "rotary_fraction"):
      del old["model"]["decoder"][key]
    if "vision" in old["model"]:  # so does a field the ViT gained (post_norm_tokens, default True)
      del old["model"]["vision"]["post_norm_tokens"]
    workdir_lib.check_resume(str(tmp_path), old, current, allow_change=False)
    changed = json.loads(json.dumps(current))
    changed["model"]["decoder"]["norm"] = "layer"
    with pytest.raises(workdir_lib.ConfigChanged, match="model.decoder.norm: 'rms' -> 'layer'"):
      workdir_lib.check_resume(str(tmp_path), old, changed, allow_change=False)
