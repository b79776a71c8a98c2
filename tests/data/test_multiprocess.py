"""Two JAX processes (gloo, this machine) read disjoint shards that together cover a split."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mmjax.data import builders

WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from mmjax.data import pipeline
examples = pipeline.example_dataset(sys.argv[3], split="train", mixture={"qa": 1.0, "captions": 1.0},
                                    num_epochs=1, seed=5, with_record_ids=True)
ids = [e["record_id"] for e in examples]
print("IDS=" + json.dumps({"process": jax.process_index(), "count": jax.process_count(), "ids": ids}))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_jax_processes_read_disjoint_shards_that_cover_the_split(data_dir):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), data_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)  # a hang fails the test instead of blocking CI
      assert p.returncode == 0, err[-3000:]
      outputs.append(json.loads(next(l for l in out.splitlines() if l.startswith("IDS="))[4:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert sorted(o["process"] for o in outputs) == [0, 1]
  assert all(o["count"] == 2 for o in outputs)
  shards = [set(o["ids"]) for o in outputs]
  assert all(len(s) == len(o["ids"]) for s, o in zip(shards, outputs))  # no repeats in a shard
  assert not shards[0] & shards[1]
  everything = {builders.open_split(data_dir, kind, "train")[i]["id"].decode()
                for kind in ("qa", "captions")
                for i in range(len(builders.open_split(data_dir, kind, "train")))}
  assert shards[0] | shards[1] == everything
