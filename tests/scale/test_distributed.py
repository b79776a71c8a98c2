"""Joining a multi-process job from the launcher's environment."""

import pytest

from mmjax.scale import distributed, local


def test_a_single_process_does_not_initialize(monkeypatch):
  for key in (distributed.ENV_NUM_PROCESSES, distributed.ENV_COORDINATOR, distributed.ENV_DISTRIBUTED):
    monkeypatch.delenv(key, raising=False)
  assert distributed.maybe_initialize() is False


def test_several_processes_without_a_coordinator_are_rejected(monkeypatch):
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
  monkeypatch.delenv(distributed.ENV_DISTRIBUTED, raising=False)
  with pytest.raises(ValueError, match="MMJAX_COORDINATOR"):
    distributed.maybe_initialize()


def test_local_processes_get_their_rank_the_coordinator_and_their_own_cpu_devices():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x", "PATH": "/bin"}
  env = local.process_environ(1, 3, 4, 12345, base=base)
  assert env[distributed.ENV_PROCESS_ID] == "1" and env[distributed.ENV_NUM_PROCESSES] == "3"
  assert env[distributed.ENV_COORDINATOR] == "127.0.0.1:12345" and env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4"]


def test_a_failing_process_stops_the_others_and_its_exit_code_is_returned(tmp_path):
  # Process 1 fails at once; process 0 would wait forever on it (as a collective would).
  code = local.run(["bash", "-c", 'if [ "$MMJAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 600'],
                   processes=2, devices=1, log_dir=str(tmp_path), timeout=60, echo=False)
  assert code == 3


def test_a_hang_past_the_timeout_fails(tmp_path):
  code = local.run(["sleep", "600"], processes=2, devices=1, log_dir=str(tmp_path), timeout=1, echo=False)
  assert code == 124
