"""Figures drawn with matplotlib (the optional ``plot`` extra): the generation curve and the latent-size sweep.

matplotlib is imported when a figure is drawn, never at import time, so the rest of dgaetok works without it;
a missing install is a one-line `InputError` that names the extra. Figures are drawn on a bare
`matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display, the same PNG on every machine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_path

EXTRA = "pip install 'dgaetok[plot]'"


def figure(width: float, height: float):
    """A new Agg figure of ``width`` x ``height`` inches; InputError naming the extra when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(f"drawing figures needs matplotlib, which is not installed: {EXTRA}") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_curve(rows: list[dict], path: Path, metrics: tuple[str, ...] = ("fid", "precision", "recall")):
    """The generation benchmark's curve: one panel per metric against DiT training step, one line per tokenizer.
    ``rows`` are curve.csv's (tokenizer, step, and the metrics); non-finite values are left out. Returns the
    figure it saved."""
    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    fig = figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = {"fid": "gFID (lower is better)", "sfid": "sFID (lower is better)", "precision": "precision",
              "recall": "recall"}
    for ax, metric in zip(axes, metrics):
        for name in names:
            line = sorted((r["step"], r[metric]) for r in rows if r["tokenizer"] == name and np.isfinite(r[metric]))
            if line:
                ax.plot(*zip(*line), marker="o", label=name)
        ax.set_xlabel("DiT training step")
        ax.set_title(labels.get(metric, metric))
        ax.grid(alpha=0.3)
        if metric in ("precision", "recall"):
            ax.set_ylim(0, 1)
    if names:
        axes[0].legend(fontsize="small")
    save(fig, path)
    return fig


def plot_latent_sweep(rows: list[dict], path: Path, title: str = ""):
    """Reconstruction quality against latent size: PSNR and LPIPS panels, one line per family (the paper's
    Table 2 as a figure). ``rows``: dicts with ``latent`` (values per image), ``family`` and ``psnr``/``lpips``;
    the x axis is logarithmic in latent size, smallest latent on the right, as the sweep goes. Returns the
    figure it saved."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    names = {"dgae": "DGAE", "sdvae": "SD-VAE"}
    fig = figure(8.4, 3.6)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("psnr", "lpips"), ("PSNR, dB (higher is better)",
                                                            "LPIPS (lower is better)")):
        for family in families:
            line = sorted((r["latent"], r[metric]) for r in rows if r["family"] == family)
            ax.plot(*zip(*line), marker="o", label=names.get(family, family))
        latents = sorted({r["latent"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(latents, [str(v) for v in latents])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("latent size (values per image)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    save(fig, path)
    return fig
