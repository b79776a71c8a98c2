"""`mmjax bench attention` on CPU: the kernel's compiled temporary memory grows linearly
with length while the reference's grows quadratically."""

import json

from mmjax import bench


def test_bench_attention_on_cpu_shows_linear_kernel_memory_and_quadratic_reference(tmp_path, capsys):
  out = tmp_path / "attention"
  code = bench.main(["attention", "--lengths", "512", "1024", "2048", "--cross",
                     "--head-dims", "64", "--causal", "true", "--out", str(out)])
  assert code == 0
  results = json.loads(out.with_suffix(".json").read_text())
  rows = {row["query_length"]: row for row in results["rows"]}
  for short, long in ((512, 1024), (1024, 2048)):
    kernel_growth = rows[long]["kernel_fwd_temp_bytes"] / rows[short]["kernel_fwd_temp_bytes"]
    xla_growth = rows[long]["xla_fwd_temp_bytes"] / rows[short]["xla_fwd_temp_bytes"]
    assert 1.8 <= kernel_growth <= 2.2, kernel_growth
    assert 3.6 <= xla_growth <= 4.4, xla_growth
  assert rows[2048]["fwd_ratio"] >= 10
  assert "| self T=S=2048 causal |" in out.with_suffix(".md").read_text()


def test_bench_names_an_unknown_benchmark():
  assert bench.main(["nonsense"]) == 2
