"""Dependency direction (STYLE 4, README "Layout and dependency direction"), read from the source:

  kernels_pallas  imports nothing from dsv3_jax but itself and the leaf `dsv3_jax.errors`;
  sharding        imports nothing from dsv3_jax but itself (tests/test_sharding_rules.py);
  the model       (every dsv3_jax module but the command-line entry points) never imports
                  `dsv3_jax.convert`: convert depends on the model, not back.

Imports are found with `ast` (also those inside functions, which runtime checks would miss), so a
lazy import cannot hide a cycle.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Entry points that wire the packages together (they may import convert).
ENTRY_POINTS = {"dsv3_jax/cli.py", "dsv3_jax/plan_cli.py", "dsv3_jax/inference/cli.py",
                "dsv3_jax/train/cli.py", "dsv3_jax/demo.py", "dsv3_jax/train/demo.py"}



def _imports(path: pathlib.Path):
  """Every module name `path` imports (absolute names; relative imports resolved)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: only within the same package, never crosses the boundary
        continue
      if node.module:
        yield node.module
        if node.module == "dsv3_jax":  # from dsv3_jax import convert
          yield from (f"dsv3_jax.{a.name}" for a in node.names)


def _under(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def test_kernels_import_nothing_from_the_model():
  files = sorted((ROOT / "kernels_pallas").rglob("*.py"))
  assert len(files) > 10
  bad = [(f.relative_to(ROOT).as_posix(), m) for f in files for m in _imports(f)
         if _under(m, "dsv3_jax") and not _under(m, "dsv3_jax.kernels_pallas")
         and m != "dsv3_jax.errors"]
  assert bad == [], f"kernels_pallas must not import the model: {bad}"


def test_model_does_not_import_convert():
  files = sorted((ROOT / "dsv3_jax").rglob("*.py"))
  assert len(files) > 20
  edges = {(f.relative_to(ROOT).as_posix(), "dsv3_jax.convert") for f in files
           if f.relative_to(ROOT).as_posix() not in ENTRY_POINTS
           and any(_under(m, "dsv3_jax.convert") for m in _imports(f))}
  assert edges == set(), f"the model must not import dsv3_jax.convert: {edges}"


def test_the_guard_sees_lazy_imports(tmp_path):
  """A function-level import counts (the form the pretrained -> convert edge took)."""
  f = tmp_path / "m.py"
  f.write_text("def g():\n  from dsv3_jax.convert.orbax_io import x\n"
               "  from dsv3_jax import convert\n")
  assert list(_imports(f)) == ["dsv3_jax.convert.orbax_io", "dsv3_jax", "dsv3_jax.convert"]
