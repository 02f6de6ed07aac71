"""Figures (matplotlib, the optional `plot` extra): they draw, and a missing matplotlib is one line naming the extra."""
from __future__ import annotations

import sys

import pytest
from PIL import Image

from dgaetok.errors import InputError
from dgaetok.gen import draw_curve
from dgaetok.plots import plot_curve, plot_latent_sweep

ROWS = [{"tokenizer": t, "step": s, "fid": f, "sfid": f / 2, "precision": p, "recall": p / 2}
        for t, k in (("default", 1.0), ("c8-sdvae", 1.3)) for s, f, p in ((800, 200 * k, 0.2), (1600, 150 * k, 0.3),
                                                                           (2400, 120 * k, float("nan")))]


def test_curve_and_latent_sweep_figures(tmp_path):
    plot_curve(ROWS, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (1260, 360)  # three panels of 4.2 x 3.6 inches at 100 dpi
    rows = [{"latent": lat, "family": fam, "psnr": 20 + i, "lpips": 0.5 - i / 10}
            for fam in ("sdvae", "dgae") for i, lat in enumerate((4096, 2048, 1024))]
    plot_latent_sweep(rows, tmp_path / "table2.png", title="DGAE vs SD-VAE")
    assert Image.open(tmp_path / "table2.png").size == (840, 360)
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
