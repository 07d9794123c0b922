"""The house rules, checked: the README's room map names every module, model/ imports nothing above it, and no
module of t5jax/ runs over 400 lines or has a function over 60."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "t5jax")
MODULES = sorted(
  os.path.relpath(os.path.join(d, f), PACKAGE) for d, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")
)


def _room_map():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  return re.search(r"```\nt5jax/\n(.*?)```", readme, re.S).group(1)


def test_the_readme_room_map_names_every_module_in_its_folder():
  rooms, folder = {}, ""
  for line in _room_map().splitlines():
    heading = re.match(r"  ([a-z_]+)/ ", line)
    if heading:
      folder = heading.group(1)
    elif re.match(r"  \S", line):  # a top-level line: back at t5jax/
      folder = ""
    rooms.setdefault(folder, set()).update(re.findall(r"([a-z_0-9]+\.py)", line))
  missing = [
    m
    for m in MODULES
    if not m.endswith("__init__.py") and os.path.basename(m) not in rooms.get(os.path.dirname(m), set())
  ]
  assert not missing, f"README.md's room map leaves out {missing}"


def _imports(path):
  tree = ast.parse(open(path, encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_model_imports_nothing_above_it():
  above = {
    (m, name)
    for m in MODULES
    if m.startswith("model/")
    for name in _imports(os.path.join(PACKAGE, m))
    if name.split(".")[0] == "t5jax" and not name.startswith("t5jax.model")
  }
  assert not above, f"model/ imports from above it: {sorted(above)}"


@pytest.mark.parametrize("module", MODULES)
def test_modules_and_functions_stay_small(module):
  text = open(os.path.join(PACKAGE, module), encoding="utf-8").read()
  assert text.count("\n") <= 400, f"t5jax/{module} has {text.count(chr(10))} lines (at most 400)"
  functions = [f for f in ast.walk(ast.parse(text)) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
  long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions if f.end_lineno - f.lineno >= 60]
  assert not long, f"t5jax/{module}: functions over 60 lines: {long}"
