"""Markdown tables and PNG plots (safejax.evaluate.report)."""

import numpy as np
import pytest
from matplotlib.image import imread

from safejax.evaluate import (
    EloEstimate,
    elo_markdown,
    markdown_table,
    plot_elo,
    plot_score_histograms,
    score_summary,
    score_summary_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_plot_score_histograms_writes_valid_png(tmp_path):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=300)
    costs = rng.normal(size=300)
    p = plot_score_histograms(rewards, costs, tmp_path / "sub" / "scores.png", title="policy")
    _assert_png(p)
    p2 = plot_score_histograms(rewards, costs, tmp_path / "labels.png", is_safe=costs < 0.5, bins=20)
    _assert_png(p2)


def test_plot_elo_writes_valid_png_and_checks_models(tmp_path):
    help_ = {"alpaca": EloEstimate(1000.0, 1000.0, 1000.0), "v1": (1100.0, 1060.0, 1150.0), "v3": 1240.0}
    harm = {"alpaca": 1000.0, "v1": (1150.0, 1100.0, 1200.0), "v3": EloEstimate(1270.0, 1230.0, 1300.0)}
    _assert_png(plot_elo(help_, harm, tmp_path / "elo.png", anchor="alpaca"))
    with pytest.raises(ValueError, match="plot_elo: helpfulness rates"):
        plot_elo(help_, {"alpaca": 1000.0}, tmp_path / "x.png")


def test_markdown_tables_render_values_and_ci():
    md = elo_markdown({"alpaca": EloEstimate(1000.0, 1000.0, 1000.0), "v3": EloEstimate(1244.9, 1200.0, 1290.5)},
                      {"alpaca": EloEstimate(1000.0, 1000.0, 1000.0), "v3": 1268.3}, anchor="alpaca")
    lines = md.splitlines()
    assert lines[0] == ("| model | helpfulness Elo [CI] | helpfulness vs alpaca | harmlessness Elo [CI] "
                        "| harmlessness vs alpaca |")
    assert lines[3] == "| v3 | 1244.9 [1200.0, 1290.5] | +244.9 | 1268.3 | +268.3 |"
    with pytest.raises(ValueError, match="harmlessness ratings cover"):
        elo_markdown({"a": 1.0, "b": 2.0}, {"a": 1.0})
    s = score_summary_markdown({"beaver": score_summary([1.0, 3.0], [-1.0, 2.0])})
    assert s.splitlines()[2] == "| beaver | 2 | 2.0000 ± 1.0000 | 0.5000 ± 1.5000 | 50.00% (1/2) |"
    assert markdown_table(["a|b"], [["x"]]).splitlines()[0] == "| a\\|b |"
