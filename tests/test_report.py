"""Report figures are written and the Markdown report links them."""

import numpy as np
import pytest

from timm_jax.workflows import report


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_mixing_ratios(tmp_path):
    ratios = {"conv_enc0_in": [0.3, 0.7], "conv_enc0_ctx1": [0.5, 0.5], "conv_dec0_loc1": [0.9, 0.1]}
    out = tmp_path / "figs" / "alpha.png"
    assert report.plot_mixing_ratios(ratios, ["HCP 1:7", "HCP 8:14"], str(out)) == str(out)
    assert_png(out)
    with pytest.raises(ValueError, match="expected one per source"):
        report.plot_mixing_ratios({"a": [1.0]}, ["s1", "s2"], str(out))


@pytest.mark.parametrize("baseline", ["T-IMM", None])
def test_plot_per_case(tmp_path, baseline):
    rng = np.random.default_rng(0)
    per = {m: list(rng.uniform(0.3, 0.9, 7)) for m in ("T-IMM", "IMM", "No transfer")}
    per["IMM"][2] = float("nan")
    out = tmp_path / f"cases_{baseline}.png"
    report.plot_per_case(per, str(out), baseline)
    assert_png(out)
    with pytest.raises(ValueError, match="baseline"):
        report.plot_per_case(per, str(out), "nope")
    with pytest.raises(ValueError, match="numbers of cases"):
        report.plot_per_case({"a": [0.1], "b": [0.1, 0.2]}, str(out), None)


def test_plot_prediction(tmp_path):
    img = np.random.default_rng(0).random((10, 12, 8)).astype(np.float32)
    truth = np.zeros((10, 12, 8), int)
    truth[3:6, 4:8, 5] = 1
    truth[4, 5:7, 5] = 4
    pred = np.roll(truth, 1, axis=0)
    out = tmp_path / "pred.png"
    report.plot_prediction(img, truth, pred, str(out), title="case 1")
    assert_png(out)
    report.plot_prediction(img, np.zeros_like(truth), np.zeros_like(pred), str(out), axis=0)
    assert_png(out)
    with pytest.raises(ValueError, match="one shape"):
        report.plot_prediction(img, truth[:5], pred, str(out))


def test_markdown_table_and_report(tmp_path):
    rows = [{"method": "T-IMM", "dice": 0.65432, "n": 3}, {"method": "a|b", "dice": float("nan")}]
    md = report.markdown_table(rows, ["method", "dice", "n"])
    lines = md.splitlines()
    assert lines[0] == "| method | dice | n |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| T-IMM | 0.654 | 3 |"
    assert lines[3] == "| a\\|b | n/a |  |"
    path = tmp_path / "out" / "report.md"
    report.write_report(
        str(path),
        title="Demo",
        intro="Intro text.",
        table_md=md,
        figures=[("Mixing ratios", "figs/alpha.png")],
        notes="Small demo.",
    )
    text = path.read_text()
    assert text.startswith("# Demo\n")
    assert md in text and "Intro text." in text and "Small demo." in text
    assert "![Mixing ratios](figs/alpha.png)" in text
