"""`magistral-jax plot`: one PNG per metric of a run's metrics.jsonl, and its errors."""

import json

import matplotlib.image
import numpy as np

from magistral_jax.cli import main

ROWS = [
    {"step": 1, "reward_mean": 0.1, "loss": 0.52, "kl": 0.0, "note": "warm-up"},
    {"step": 2, "reward_mean": 1.1, "loss": 0.31, "kl": 0.013},
    {"step": 3, "reward_mean": 0.9, "loss": 0.27},
]


def _run_dir(tmp_path, rows=ROWS, text=None):
    (tmp_path / "metrics.jsonl").write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_one_png_per_numeric_metric(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main(["plot", str(run_dir)]) == 0
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert plots == ["kl.png", "loss.png", "reward_mean.png"]  # not the step, not text
    for name in plots:
        image = matplotlib.image.imread(run_dir / "plots" / name)
        assert image.shape[:2] == (385, 660)  # 6 x 3.5 inches at 110 dpi
        assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10  # drawn, not blank
    assert "wrote 3 plots" in capsys.readouterr().out


def test_chosen_metrics_only_and_a_missing_one_is_named(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main(["plot", str(run_dir), "--metrics", "loss"]) == 0
    assert [p.name for p in (run_dir / "plots").iterdir()] == ["loss.png"]
    assert main(["plot", str(run_dir), "--metrics", "entropy"]) == 1
    assert "error: entropy: not in" in capsys.readouterr().err


def test_an_empty_or_absent_metrics_file_is_an_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.jsonl: no metrics to plot" in capsys.readouterr().err
    assert main(["plot", str(_run_dir(tmp_path, text="\n"))]) == 1
    assert "metrics.jsonl: empty" in capsys.readouterr().err
