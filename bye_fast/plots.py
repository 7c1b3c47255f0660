"""Plots of a detection (PNG, matplotlib's Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bye_fast._io import atomic_write
from bye_fast.detect import Detection
from bye_fast.scores import Scores

__all__ = ["plot_detection"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


#: The files :func:`plot_detection` writes in its folder.
PLOT_NAMES = ("separation.png", "suspicious_score.png", "layer_entropy.png")


def plot_detection(
    scores: Scores,
    detection: Detection,
    out_dir: str | os.PathLike,
    *,
    truth: np.ndarray | None = None,
) -> list[Path]:
    """Write the detection's plots to ``out_dir``; returns their paths.

    * ``separation.png``: per-feature separation (with the threshold) and KL divergence;
    * ``suspicious_score.png``: histogram of the suspicious score with the final
      mixture and the decision boundary (coloured by ``truth`` when given:
      True = poisoned, for experiments with known ground truth);
    * ``layer_entropy.png``: per-layer distribution of the head-mean entropy,
      flagged vs kept samples.
    """
    plt = _figure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    # 1. separation and KL per feature
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    x = np.arange(len(detection.separation))
    colors = np.where(np.isin(x, detection.sensitive_features), "tab:red", "tab:blue")
    ax1.bar(x, np.nan_to_num(detection.separation), color=colors)
    ax1.axhline(detection.threshold, color="k", ls="--", lw=1, label=f"threshold {detection.threshold:g}")
    ax1.set_ylabel("separation\n|mu1-mu2| / 2(s1+s2)")
    ax1.legend(loc="upper right")
    ax1.set_title(f"Per-{detection.features[:-1]} bimodality (red: sensitive)")
    ax2.bar(x, np.nan_to_num(detection.kl), color=colors)
    ax2.set_ylabel("KL(N1 || N2)")
    ax2.set_xlabel(detection.features[:-1] + " index")
    paths.append(_save(fig, out / "separation.png"))
    plt.close(fig)

    # 2. suspicious score histogram
    fig, ax = plt.subplots(figsize=(8, 4))
    s = detection.suspicious_score
    finite = np.isfinite(s)
    if finite.any():
        bins = np.histogram_bin_edges(s[finite], bins=60)
        if truth is not None:
            truth = np.asarray(truth, dtype=bool)
            ax.hist(s[finite & ~truth], bins=bins, alpha=0.7, label="clean (ground truth)", color="tab:blue")
            ax.hist(s[finite & truth], bins=bins, alpha=0.7, label="poisoned (ground truth)", color="tab:red")
        else:
            ax.hist(s[finite & ~detection.flagged], bins=bins, alpha=0.7, label="kept", color="tab:blue")
            ax.hist(s[finite & detection.flagged], bins=bins, alpha=0.7, label="flagged", color="tab:red")
        if detection.boundary is not None:
            ax.axvline(detection.boundary, color="k", ls="--", lw=1.2, label="decision boundary")
        ax.set_xlabel("suspicious score (mean entropy over sensitive features)")
        ax.set_ylabel("samples")
        ax.legend()
    else:
        ax.text(0.5, 0.5, detection.reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{detection.n_flagged} of {len(s)} samples flagged")
    paths.append(_save(fig, out / "suspicious_score.png"))
    plt.close(fig)

    # 3. per-layer entropy distributions
    ent = scores.entropy
    rows = np.isfinite(ent).all(axis=1)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * ent.shape[1] + 2), 4))
    layers = np.arange(ent.shape[1])
    groups = [
        ("kept", ~detection.flagged & rows, "tab:blue", -0.18),
        ("flagged", detection.flagged & rows, "tab:red", 0.18),
    ]
    for label, mask, color, dx in groups:
        if mask.sum() == 0:
            continue
        parts = ax.violinplot(
            [ent[mask, j] for j in layers], positions=layers + dx, widths=0.35, showmedians=True
        )
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_alpha(0.5)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("head-mean image-attention entropy")
    ax.set_xticks(layers)
    ax.legend()
    ax.set_title("Per-layer entropy: kept vs flagged")
    paths.append(_save(fig, out / "layer_entropy.png"))
    plt.close(fig)
    return paths
