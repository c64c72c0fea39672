"""`dsv3 train` end to end on the tiny preset: metrics, checkpoints, resume, and the PNG plot."""
import functools
import json

import numpy as np
import pytest

from dsv3_jax.cli import main as dsv3_main
from dsv3_jax.train.cli import read_metrics
from dsv3_jax.train.trainer import Trainer
from tests.utils import FAST_COMPILE, fast_compiles


@pytest.mark.slow
def test_train_cli_logs_resumes_and_plots(tmp_path, capsys, monkeypatch):
  # CPU optimisations off: compiling the step, not running 5 tiny steps, is this test's cost.
  monkeypatch.setattr(Trainer, "__init__", functools.partialmethod(
      Trainer.__init__, compiler_options=FAST_COMPILE))
  out = tmp_path / "run"
  # A constant schedule (after the 1-step warmup): the run resumed with more --steps (a schedule
  # change all the same, hence --allow-schedule-change) then lowers the very train step the first
  # run compiled, which the persistent compilation cache serves; with cosine the decay length is
  # in the program and it compiles again. (make_schedule's shapes are checked in test_train.)
  common = ["train", "--config", "tiny", "--batch", "2", "--seq", "32", "--save-every", "2",
            "--schedule", "constant", "--out", str(out)]
  with fast_compiles():  # also the model init and every other program the runs compile
    assert dsv3_main(common + ["--steps", "3"]) == 0
    assert dsv3_main(common + ["--steps", "5", "--allow-schedule-change"]) == 0
  text = capsys.readouterr().out
  assert "resumed from step 3" in text
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["load_ratio"] >= 1.0
    # the logged total is CE + lambda * MTP CE + alpha * balance (defaults 0.3 and 1e-4)
    np.testing.assert_allclose(r["loss"], r["ce"] + 0.3 * r["mtp_ce"] + 1e-4 * r["balance"],
                               rtol=1e-5)
  assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
  png = out / "train_curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  img = matplotlib.image.imread(str(png))
  assert img.shape[0] > 100 and img.shape[1] > 200 and img[..., :3].std() > 0.05  # not blank
  assert "latest step 5" in text


def test_read_metrics_keeps_last_row_of_a_replayed_step(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                                  {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.0}]))
  assert read_metrics(str(p)) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                                  {"step": 3, "loss": 1.0}]
