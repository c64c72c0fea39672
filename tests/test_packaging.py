"""Every package folder is listed in pyproject.toml, so a non-editable install is complete."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
  cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(cfg["packages"])
  found = set()
  for package, folder in cfg["package-dir"].items():
    for init in (ROOT / folder).rglob("__init__.py"):
      rel = init.parent.relative_to(ROOT / folder)
      found.add(".".join([package, *rel.parts]))
  assert found - listed == set(), f"add to pyproject packages: {sorted(found - listed)}"
  assert listed - found == set(), f"listed but missing: {sorted(listed - found)}"


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  blocks = [b.split("```")[0].strip() for b in readme.split("```bash\n")[1:]]
  assert len(blocks) >= 2, "README must give the demo and the test command"
  assert blocks[1] in (ROOT / ".ci" / "run").read_text()
