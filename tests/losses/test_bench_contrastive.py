"""`mmjax bench contrastive` on 8 CPU devices: the chunked SigLIP loss compiles to several
times less per-device temporary memory than the gathered one, and the results are written."""

import json

from mmjax import bench


def test_bench_contrastive_reports_the_chunked_sigmoid_far_below_the_gathered_one(tmp_path):
  out = tmp_path / "contrastive"
  assert bench.main(["contrastive", "--batch", "512", "--width", "64", "--out", str(out)]) == 0
  results = json.loads(out.with_suffix(".json").read_text())
  rows = {row["loss"]: row for row in results["rows"]}
  assert rows["sigmoid_gathered"]["fwd_bwd_temp_bytes"] >= 4 * rows["sigmoid_chunked"]["fwd_bwd_temp_bytes"]
  assert results["meta"]["gathered_over_chunked_fwd_bwd"] >= 4
  assert "| sigmoid_chunked |" in out.with_suffix(".md").read_text()
