"""Figures (matplotlib, the optional `plot` extra): they draw, and a missing matplotlib is one line naming the extra."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from dgaetok.errors import InputError
from dgaetok.gen import draw_curve
from dgaetok.plots import plot_curve, plot_latent_sweep

ROWS = [{"tokenizer": t, "step": s, "fid": f, "sfid": f / 2, "precision": p, "recall": p / 2}
        for t, k in (("default", 1.0), ("c8-sdvae", 1.3)) for s, f, p in ((800, 200 * k, 0.2), (1600, 150 * k, 0.3),
                                                                           (2400, 120 * k, float("nan")))]


def lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): list(zip(*map(list, line.get_data()))) for line in ax.get_lines()}


def drawn(path) -> np.ndarray:
    """The PNG's pixels that are neither white nor grey: what the lines and markers put there."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 60


def test_curve_figure_draws_each_tokenizers_finite_points(tmp_path):
    fig = plot_curve(ROWS, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (1260, 360)  # three panels of 4.2 x 3.6 inches at 100 dpi
    fid, precision, recall = fig.axes
    assert lines(fid) == {"default": [(800, 200.0), (1600, 150.0), (2400, 120.0)],
                          "c8-sdvae": [(800, 260.0), (1600, 195.0), (2400, 156.0)]}
    assert lines(precision)["default"] == [(800, 0.2), (1600, 0.3)]  # the NaN at step 2400 is left out
    assert lines(recall)["c8-sdvae"] == [(800, 0.1), (1600, 0.15)]
    assert precision.get_ylim() == recall.get_ylim() == (0, 1) and fid.get_xlabel() == "DiT training step"
    assert [t.get_text() for t in fid.get_legend().get_texts()] == ["default", "c8-sdvae"]
    assert [ax.get_title() for ax in fig.axes] == ["gFID (lower is better)", "precision", "recall"]
    colour = drawn(tmp_path / "curve.png")
    assert all(colour[:, i * 420:(i + 1) * 420].sum() > 200 for i in range(3))  # every panel has its lines


def test_latent_sweep_figure(tmp_path):
    rows = [{"latent": lat, "family": fam, "psnr": 20 + i + (fam == "dgae"), "lpips": 0.5 - i / 10}
            for fam in ("sdvae", "dgae") for i, lat in enumerate((4096, 2048, 1024))]
    fig = plot_latent_sweep(rows, tmp_path / "table2.png", title="DGAE vs SD-VAE")
    assert Image.open(tmp_path / "table2.png").size == (840, 360)
    psnr, lpips = fig.axes
    assert lines(psnr) == {"SD-VAE": [(1024, 22), (2048, 21), (4096, 20)],
                           "DGAE": [(1024, 23), (2048, 22), (4096, 21)]}
    assert lines(lpips)["DGAE"] == [(1024, 0.3), (2048, 0.4), (4096, 0.5)]
    for ax in (psnr, lpips):  # log2 latent sizes, the smallest on the right
        assert ax.get_xscale() == "log" and ax.xaxis_inverted()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1024", "2048", "4096"]
    assert fig.get_suptitle() == "DGAE vs SD-VAE"
    assert drawn(tmp_path / "table2.png").sum() > 200
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    with pytest.raises(InputError, match=r"^drawing figures needs matplotlib, .*pip install 'dgaetok\[plot\]'$"):
        plot_curve(ROWS, tmp_path / "curve.png")
    notes = []
    draw_curve(ROWS, tmp_path / "curve.png", notes.append)  # bench gen: its numbers stand without the figure
    assert notes == ["curve.png not drawn: drawing figures needs matplotlib, which is not installed: "
                     "pip install 'dgaetok[plot]'"]
    assert not (tmp_path / "curve.png").exists()
