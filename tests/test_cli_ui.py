"""`--log-format plain` / `--quiet`: plain progress lines (no carriage returns) or none."""
from dsv3_jax import ui


def test_plain_progress_lines_and_quiet(capsys, monkeypatch):
  ui.configure(type("A", (), {"log_format": "plain", "quiet": False})())
  monkeypatch.setattr(ui._PlainProgress, "every_s", 0.0)
  assert list(ui.iterate(range(3), 3, "load", unit="param")) == [0, 1, 2]
  err = capsys.readouterr().err
  assert "\r" not in err and [l.split(" (")[0] for l in err.splitlines()] == [
      "load: 1/3 params", "load: 2/3 params", "load: 3/3 params"]
  ui.configure(type("A", (), {"log_format": "rich", "quiet": True})())
  ui.status("compiling ...")
  list(ui.iterate(range(3), 3, "load"))
  assert capsys.readouterr().err == "" and ui.mode() == "quiet"
  ui.configure(type("A", (), {"log_format": "auto", "quiet": False})())  # stderr is not a tty here
  assert ui.mode() == "plain"
