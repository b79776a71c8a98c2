"""`mmjax bench packing` end to end on a small data directory: both arms are reported, and
when every conversation is at most half a row, packing puts more real tokens in a step
(greedy packing closes a row only when the next conversation does not fit, so each packed
row holds more than half a row, and each unpacked row one conversation: at most half)."""

import json

import pytest

from mmjax import bench
from mmjax.data import builders

# Conversations of the size-40 embedded data, 16 px images (4 tokens each), are 23 to 59
# tokens: at 128 every one fits in half a row. Depth 1 towers keep the compiles short.
TEXT_LENGTH = 128
SMALL = ["--config.data.image_size=16", "--config.model.vision.image_size=16",
         f"--config.data.text_length={TEXT_LENGTH}", "--config.data.batch_size=4", "--config.mesh.num_devices=1",
         "--config.model.vision.depth=1", "--config.model.decoder.depth=1"]


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_packing_bench_reports_both_arms_and_more_real_tokens_per_packed_step(tmp_path):
  data_dir = tmp_path / "data"
  builders.build_embedded(str(data_dir), size=40, image_size=16, seed=0)
  out = tmp_path / "llava"
  assert bench.main(["packing", "--data-dir", str(data_dir), "--rounds", "1", "--steps", "2", "--out", str(out),
                     *SMALL]) == 0
  run, = json.loads(out.with_suffix(".json").read_text())["runs"]
  arms = run["arms"]
  assert set(arms) == {"unpacked", "packed"}
  unpacked, packed = arms["unpacked"], arms["packed"]
  assert unpacked["conversations_per_step"] == 4  # one conversation per row, 4 rows
  assert unpacked["longest_conversation"] <= TEXT_LENGTH // 2  # the property's premise
  assert packed["real_tokens_per_step"] > unpacked["real_tokens_per_step"]
  assert packed["real_tokens_per_step"] > 4 * TEXT_LENGTH // 2
  for arm in (unpacked, packed):
    assert 0.0 <= arm["padding_fraction"] <= 1.0
    assert arm["real_tokens_per_step"] == pytest.approx((1.0 - arm["padding_fraction"]) * 4 * TEXT_LENGTH)
  assert packed["padding_fraction"] < unpacked["padding_fraction"]
  assert set(run["ratios"]) >= {"real_tokens_per_s", "conversations_per_s"}
  assert "| packed |" in out.with_suffix(".md").read_text()
