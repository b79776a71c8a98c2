"""The packages of mmjax import downwards only (docs/architecture.md): every import, at module
top or inside a function, goes from a package to one on a lower layer, so there is no
import cycle between packages and nothing low (kernels, sharding, layers, data) depends on
the trainer or the launchers above it."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmjax")

# Lowest first; the packages of one layer do not import each other. docs/architecture.md
# says what each layer is for; change both together.
LAYERS = (
    ("errors", "filelock"),
    ("kernels",),
    ("sharding",),
    ("layers", "losses"),
    ("models",),
    ("data",),
    ("convert", "infer", "evaluation"),
    ("families",),
    ("zoo",),
    ("train",),
    ("scale",),
    ("bench_step",),
    ("bench", "configs"),
    ("cli", "__init__"),
    ("__main__",),
)
LAYER = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}


def _package(path: str) -> str:
  rel = os.path.relpath(path, ROOT).split(os.sep)
  return rel[0][:-3] if rel[0].endswith(".py") else rel[0]


def _imported_packages(path: str):
  """(line, mmjax package) of every import of mmjax in the file at `path`."""
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] if node.module != "mmjax" else [f"mmjax.{a.name}" for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "mmjax" and len(parts) > 1:
        yield node.lineno, parts[1]


def _imports():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        for line, target in _imported_packages(path):
          yield path, line, _package(path), target


def layering_violations(imports) -> list[str]:
  out = []
  for path, line, source, target in imports:
    if source == target:
      continue
    if source not in LAYER or target not in LAYER:
      out.append(f"{os.path.relpath(path, ROOT)}:{line}: {source} or {target} has no layer in LAYERS")
    elif LAYER[target] >= LAYER[source]:
      out.append(f"{os.path.relpath(path, ROOT)}:{line}: {source} (layer {LAYER[source]}) imports {target} "
                 f"(layer {LAYER[target]})")
  return out


def test_every_package_of_mmjax_has_a_layer():
  packages = {_package(os.path.join(ROOT, n)) for n in os.listdir(ROOT)
              if n.endswith(".py") or os.path.isdir(os.path.join(ROOT, n, ""))}
  packages.discard("__pycache__")
  assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_mmjax_imports_only_downwards():
  assert layering_violations(list(_imports())) == []


@pytest.mark.parametrize("source,target", [("train", "scale"), ("layers", "models"), ("kernels", "sharding"),
                                           ("data", "train"), ("infer", "zoo")])
def test_an_upward_or_sideways_import_is_reported(source, target):
  path = os.path.join(ROOT, source, "x.py")
  assert len(layering_violations([(path, 1, source, target)])) == 1


def _code_mentions(path: str, word: str):
  """(line, text) of every name or string in the file's code (not its docstrings or comments)
  that contains `word`, case-insensitively."""
  import io  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  source = open(path).read()
  docstrings = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
      first = node.body[0]
      if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstrings.add(first.lineno)
  # Python 3.12 splits f-strings into FSTRING_* tokens; 3.11 has them as STRING.
  kinds = {tokenize.NAME, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type in kinds and word in tok.string.lower() and tok.start[0] not in docstrings:
      yield tok.start[0], tok.string


# Names of reference code, not of the family: the VQA metric's option for OpenFlamingo's
# evaluation harness (its answer post-processing), chosen by the user as "open_flamingo".
_NAMES_OF_REFERENCE_CODE = {(os.path.join("evaluation", "vqa.py"), '"open_flamingo"')}


def test_outside_its_family_package_no_code_names_flamingo():
  """Issue 14: a family is an addition. Outside `families/flamingo/` the word appears only in
  docstrings and comments (which name the paper and the design), in the registry's lines
  (`families/__init__.py`), and in `_NAMES_OF_REFERENCE_CODE`."""
  found = []
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      path = os.path.join(dirpath, f)
      rel = os.path.relpath(path, ROOT)
      if not f.endswith(".py") or rel.startswith(os.path.join("families", "flamingo")) or \
          rel == os.path.join("families", "__init__.py"):
        continue
      found += [f"{rel}:{line}: {text}" for line, text in _code_mentions(path, "flamingo")
                if (rel, text) not in _NAMES_OF_REFERENCE_CODE]
  assert not found, "\n".join(found)


def test_the_trainer_the_launchers_and_inference_import_no_family_package():
  """They reach families through the registry (`mmjax.families`) and its interface (`base`,
  `common`) only, so adding a family edits none of them."""
  bad = []
  for sub in ("train", "scale", "infer"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, sub)):
      for f in (f for f in files if f.endswith(".py")):
        path = os.path.join(dirpath, f)
        for node in ast.walk(ast.parse(open(path).read())):
          names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                   else [])
          for name in names:
            parts = name.split(".")
            if parts[:2] == ["mmjax", "families"] and len(parts) > 2 and parts[2] not in ("base", "common") \
                and parts[2][:1].islower() and parts[2] in _family_packages():
              bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {name}")
  assert not bad, bad


def _family_packages() -> set[str]:
  root = os.path.join(ROOT, "families")
  return {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != "__pycache__"}
