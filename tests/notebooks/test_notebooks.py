"""The notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel), with
`MMJAX_NOTEBOOK_SMALL=1`: the same cells on a smaller dataset and a few steps."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _execute(name, tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # as a Colab CPU runtime
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
  return nb, "".join(text)


def _images(nb):
  return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_every_notebook_is_tested_here():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == ["quickstart.ipynb"]


@pytest.mark.slow  # a real Jupyter kernel builds data and trains: minutes on 2 cores
def test_quickstart_builds_trains_evaluates_and_answers(tmp_path, monkeypatch):
  nb, text = _execute("quickstart.ipynb", tmp_path, monkeypatch)
  assert "(built)" in text and "trained to step 4 (started at 0)" in text
  assert "QA exact match" in text and "-> '" in text
  assert _images(nb) == 3  # records, curves, the question's image
  assert os.path.isdir(tmp_path / "mmjax-quickstart" / "flamingo-tiny" / "checkpoints" / "4")


def test_notebooks_are_committed_without_outputs():
  for name in os.listdir(NOTEBOOKS):
    if name.endswith(".ipynb"):
      nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      nbformat.validate(nb)
      assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
