"""The Cloud TPU / xpk launchers print complete, correct commands in --dry-run."""

import os
import shlex

import pytest

from mmjax.scale import cloud, launch_cli
from mmjax.train import config as config_lib

WHERE = ["--zone=us-east5-a", "--project=my-proj"]
TRAIN = ["--config=configs/flamingo/tiny.py", "--workdir=gs://bucket/run1"]
# What the workers run: the shipped config by its name (their pip install has it).
WORKER_TRAIN = ["--config=flamingo/tiny", "--workdir=gs://bucket/run1"]


def _dry(capsys, *argv):
  assert launch_cli.main([*argv]) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_single_v5p_slice_creates_installs_trains_collects_and_deletes(capsys):
  lines = _dry(capsys, "tpu", "all", "--name", "mm", "--accelerator", "v5p-32", "--zone", "us-east5-a",
               "--project", "my-proj", "--provisioning", "spot", "--dry-run", "--", *TRAIN)
  train_cmd = "export MMJAX_DISTRIBUTED=auto TPU_STDERR_LOG_LEVEL=0; " + shlex.join(
      ["python3", "-m", "mmjax.cli", "train", *WORKER_TRAIN]) + " 2>&1 | tee ~/mmjax-train.log"
  # v5p-32 is 16 chips on 4 hosts.
  assert lines == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "mm", *WHERE, "--accelerator-type=v5p-32",
       "--runtime-version=v2-alpha-tpuv5", "--node-id=mm", "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "mm", *WHERE, "--format=value(state.state)"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm", *WHERE, "--worker=all",
       "--command=python3 -m pip install --upgrade pip && python3 -m pip install 'mmjax[tpu]'"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm", *WHERE, "--worker=all", f"--command={train_cmd}"],
      ["mkdir", "-p", "logs"],
      *[["gcloud", "compute", "tpus", "tpu-vm", "scp", "mm:mmjax-train.log", f"logs/mm-w{w}.log", *WHERE,
         f"--worker={w}"] for w in range(4)],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "mm", *WHERE, "--force", "--quiet"],
  ]


def test_two_v5e_slices_are_one_multislice_request_and_every_node_runs(capsys):
  lines = _dry(capsys, "tpu", "create", "--name", "ms", "--accelerator", "v5litepod-16", "--slices", "2",
               "--zone", "us-east5-a", "--project", "my-proj", "--dry-run")
  assert lines[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms", *WHERE,
                      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                      "--node-count=2", "--node-prefix=ms"]
  for action in ("install", "train"):
    lines = _dry(capsys, "tpu", action, "--name", "ms", "--accelerator", "v5litepod-16", "--slices", "2",
                 "--zone", "us-east5-a", "--project", "my-proj", "--dry-run", "--", *TRAIN)
    # One ssh per slice, to every worker of it; the train commands run at the same time.
    assert [line[5] for line in lines] == ["ms-0", "ms-1"]
    assert all(line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in line
               for line in lines)
  assert "MMJAX_DISTRIBUTED=auto" in lines[0][-1] and shlex.join(WORKER_TRAIN) in lines[0][-1]
  logs = _dry(capsys, "tpu", "logs", "--name", "ms", "--accelerator", "v5e-16", "--slices", "2",
              "--zone", "us-east5-a", "--project", "my-proj", "--dry-run")
  assert len(logs) == 1 + 2 * 4  # mkdir + 2 slices x 4 hosts
  assert logs[-1][5:7] == ["ms-1:mmjax-train.log", "logs/ms-1-w3.log"]


def test_tpu_vm_without_a_queue_is_created_and_deleted_directly(capsys):
  lines = _dry(capsys, "tpu", "create", "--name", "vm", "--accelerator", "v6e-8", "--no-queue",
               "--zone", "us-east5-a", "--project", "my-proj", "--dry-run")
  assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vm", *WHERE, "--accelerator-type=v6e-8",
                    "--version=v2-alpha-tpuv6e"]]
  lines = _dry(capsys, "tpu", "delete", "--name", "vm", "--accelerator", "v6e-8", "--no-queue",
               "--zone", "us-east5-a", "--project", "my-proj", "--dry-run")
  assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm", *WHERE, "--quiet"]]


def test_xpk_recipe_creates_the_cluster_runs_the_workload_and_deletes_it(capsys):
  common = ["--cluster", "c1", "--tpu-type", "v5litepod-16", "--slices", "2", "--zone", "us-east5-a",
            "--project", "my-proj", "--dry-run"]
  where = ["--cluster=c1", "--zone=us-east5-a", "--project=my-proj"]
  assert _dry(capsys, "xpk", "cluster", *common) == [
      ["xpk", "cluster", "create", *where, "--tpu-type=v5litepod-16", "--num-slices=2"]]
  assert _dry(capsys, "xpk", "run", *common, "--docker-image", "gcr.io/p/mmjax:1", "--", *TRAIN) == [
      ["xpk", "workload", "create", *where, "--workload=mmjax-train", "--tpu-type=v5litepod-16", "--num-slices=2",
       "--docker-image=gcr.io/p/mmjax:1",
       "--command=export MMJAX_DISTRIBUTED=auto; " + shlex.join(["python3", "-m", "mmjax.cli", "train",
                                                                 *WORKER_TRAIN])]]
  assert _dry(capsys, "xpk", "delete", *common) == [["xpk", "workload", "delete", *where, "--workload=mmjax-train"]]


@pytest.mark.parametrize("name,gen,chips,hosts", [("v5p-8", "v5p", 4, 1), ("v5p-32", "v5p", 16, 4),
                                                  ("v5litepod-16", "v5e", 16, 4), ("v5e-8", "v5e", 8, 1),
                                                  ("v6e-256", "v6e", 256, 64), ("v4-16", "v4", 8, 2)])
def test_accelerator_types_give_chips_and_hosts(name, gen, chips, hosts):
  acc = cloud.parse_accelerator(name)
  assert (acc.generation, acc.chips, acc.hosts) == (gen, chips, hosts)


def test_bad_accelerators_and_multislice_without_a_queue_are_rejected(capsys):
  with pytest.raises(ValueError, match="v5p-32"):
    cloud.parse_accelerator("v5p32")
  assert launch_cli.main(["tpu", "create", "--name", "x", "--accelerator", "v5p-32", "--slices", "2", "--no-queue",
                          "--zone", "z", "--project", "p", "--dry-run"]) == 2
  assert "queued resource" in capsys.readouterr().err


def test_a_config_mmjax_does_not_ship_is_copied_to_every_worker_and_used_there(capsys, tmp_path):
  mine = tmp_path / "my_exp.py"
  with open(config_lib.resolve_config_path("flamingo/tiny")) as f:
    mine.write_text(f.read() + "\n# my edit\n")
  common = ["--name", "ms", "--accelerator", "v5litepod-16", "--slices", "2", "--zone", "us-east5-a",
            "--project", "my-proj", "--dry-run", "--"]
  lines = _dry(capsys, "tpu", "install", *common, "--config", f"{mine}:arg", "--workdir=gs://b/r")
  assert lines[0][-1].endswith("python3 -m pip install 'mmjax[tpu]' && mkdir -p mmjax-configs")
  assert lines[2:] == [["gcloud", "compute", "tpus", "tpu-vm", "scp", str(mine), f"{node}:mmjax-configs/my_exp.py",
                        *WHERE, "--worker=all"] for node in ("ms-0", "ms-1")]
  lines = _dry(capsys, "tpu", "train", *common, "--config", f"{mine}:arg", "--workdir=gs://b/r")
  assert "train --config=mmjax-configs/my_exp.py:arg --workdir=gs://b/r 2>&1" in lines[0][-1]
  # A path that is not a file here is the workers' business: passed as it is, nothing copied.
  lines = _dry(capsys, "tpu", "install", *common, "--config=/opt/exp.py")
  assert len(lines) == 2 and "mkdir" not in lines[0][-1]
  lines = _dry(capsys, "tpu", "train", *common, "--config=/opt/exp.py")
  assert "train --config=/opt/exp.py 2>&1" in lines[0][-1]


# Config file names that a remote shell would misread: a command substitution and a command
# separator, a space, a quote, backticks, a newline.
HOSTILE_NAMES = ["my$(touch x);y.py", "my exp.py", "it's.py", "my`touch x`.py", "my\nexp.py"]


def _shell_words(remote: str) -> list[str]:
  """The words a POSIX shell makes of `remote`, which must hold nothing it would expand.

  shlex.split alone reads `$(...)` and backticks as plain characters where a shell runs
  them, so the string must also be exactly the shell quoting of the words it splits into.
  """
  words = shlex.split(remote)
  assert shlex.join(words) == remote, f"{remote!r} is not read literally by a shell"
  return words


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_config_file_with_a_hostile_name_reaches_every_worker_as_one_literal_path(name, tmp_path):
  mine = tmp_path / name
  mine.write_text("# an experiment mmjax does not ship\n")
  workdir = "--workdir=gs://b/$(touch x) `y`"
  job = cloud.TpuJob(name="ms", accelerator=cloud.parse_accelerator("v5litepod-16"), zone="z",
                     project="p", slices=2, train_args=("--config", str(mine), workdir))
  install = cloud.install_commands(job)
  ssh_lines = [cmd[-1].removeprefix("--command=") for cmd in install if cmd[4] == "ssh"]
  scps = [cmd for cmd in install if cmd[4] == "scp"]
  train_lines = [cmd[-1].removeprefix("--command=") for cmd in cloud.train_commands(job)]
  assert len(ssh_lines) == len(scps) == len(train_lines) == 2
  for node, ssh_line, scp, train_line in zip(job.nodes, ssh_lines, scps, train_lines):
    assert scp[5] == str(mine)  # a local argv entry: the file exactly as it is named here
    host, _, remote = scp[6].partition(":")
    assert host == node
    # Legacy scp hands the destination to the worker's shell: it must see one literal path.
    [remote_path] = _shell_words(remote)
    # ... which needs no quoting at all, so that scp over SFTP (OpenSSH >= 9.0 by default,
    # where nothing unquotes it) writes the very same file.
    assert shlex.quote(remote_path) == remote_path and remote_path.endswith(".py")
    assert os.path.dirname(remote_path) == cloud.WORKER_CONFIG_DIR
    assert shlex.join(["mkdir", "-p", cloud.WORKER_CONFIG_DIR]) in ssh_line
    # The worker's shell runs train with exactly these arguments: the copied file, and the
    # other arguments verbatim.
    assert shlex.join(["python3", "-m", "mmjax.cli", "train", f"--config={remote_path}",
                       workdir]) in train_line
    assert f"--config={remote_path}" in shlex.split(train_line)
  logs = [cmd for cmd in cloud.logs_commands(job) if cmd[4:5] == ["scp"]]
  assert [_shell_words(cmd[5].partition(":")[2]) for cmd in logs] == [[cloud.LOG]] * len(logs)
