"""Plots of a detection (PNG, matplotlib's Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bye_fast._io import atomic_write
from bye_fast.detect import Detection
from bye_fast.scores import Scores

__all__ = ["PLOT_NAMES", "plot_detection"]

#: The files :func:`plot_detection` writes in its folder.
PLOT_NAMES = ("suspicion.png", "features.png", "layer_entropy.png", "answer_groups.png")


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_detection(
    scores: Scores, detection: Detection, out_dir: str | os.PathLike, *, truth: np.ndarray | None = None
) -> list[Path]:
    """Write the detection's plots to ``out_dir``; returns their paths.

    * ``suspicion.png``: histogram of the suspicion score with the cut (coloured by
      ``truth`` when given: True = poisoned, for experiments with known ground truth;
      else kept vs flagged);
    * ``features.png``: what the method looked at, feature by feature (the paper: each
      layer's separation against the threshold; the default: each feature's evidence and
      the features it chose);
    * ``layer_entropy.png``: per-layer distribution of the head-mean entropy, flagged vs kept;
    * ``answer_groups.png``: the default's content test -- each answer group's image diversity
      relative to the median group's, against the threshold (or why the test did not run).
    """
    plt = _figure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_suspicion(plt, detection, out / "suspicion.png", truth),
             _features(plt, detection, out / "features.png"),
             _layer_entropy(plt, scores, detection, out / "layer_entropy.png"),
             _answer_groups(plt, detection, out / "answer_groups.png")]  # fmt: skip
    return paths


def _suspicion(plt, det: Detection, path: Path, truth) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    s = np.asarray(det.score, dtype=float)
    finite = np.isfinite(s)
    if finite.any() and np.ptp(s[finite]) > 0:
        bins = np.histogram_bin_edges(s[finite], bins=60)
        if truth is not None:
            truth = np.asarray(truth, dtype=bool)
            groups = [
                ("clean (ground truth)", finite & ~truth, "tab:blue"),
                ("poisoned (ground truth)", finite & truth, "tab:red"),
            ]
        else:
            groups = [
                ("kept", finite & ~det.flagged, "tab:blue"),
                ("flagged", finite & det.flagged, "tab:red"),
            ]
        for label, mask, color in groups:
            if mask.any():
                ax.hist(s[mask], bins=bins, alpha=0.7, label=label, color=color)
        cut = det.details.get("cut")
        if cut is None and det.flagged.any():
            cut = float(np.nanmin(s[det.flagged]))
        if cut is not None and np.isfinite(cut):
            ax.axvline(cut, color="k", ls="--", lw=1.2, label="cut")
        ax.set_yscale("log")
        ax.set_xlabel("suspicion score (higher = more suspicious)")
        ax.set_ylabel("samples")
        ax.legend()
    else:
        ax.text(0.5, 0.5, det.reason, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
    ax.set_title(f"{det.method}: {det.n_flagged} of {len(s)} samples flagged")
    path = _save(fig, path)
    plt.close(fig)
    return path


def _features(plt, det: Detection, path: Path) -> Path:
    d = det.details
    names = d.get("feature_names") or []
    values = np.asarray(d.get("evidence", d.get("separation", [])), dtype=float) if names else np.zeros(0)
    chosen = set(np.asarray(d.get("chosen", d.get("sensitive", [])), dtype=int).tolist())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(values) + 3), 3.6))
    if len(values):
        x = np.arange(len(values))
        colors = ["tab:red" if j in chosen else "tab:blue" for j in x]
        ax.bar(x, np.nan_to_num(values), color=colors, width=0.8)
        threshold = d.get("evidence_threshold", det.options.get("threshold"))
        if threshold is not None:
            ax.axhline(float(threshold), color="k", ls="--", lw=1, label=f"threshold {float(threshold):g}")
            ax.legend(loc="upper right")
        ax.set_ylabel(d.get("evidence_label", "separation |mu0-mu1| / (s0+s1)"))
        step = max(1, len(values) // 24)
        ax.set_xticks(x[::step], [names[j] for j in x[::step]], rotation=70, fontsize=6)
        ax.set_title(f"{det.method}: per-feature evidence (red: used for the decision)")
    else:
        ax.text(0.5, 0.5, "no per-feature statistics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    path = _save(fig, path)
    plt.close(fig)
    return path


def _answer_groups(plt, det: Detection, path: Path, *, show: int = 40) -> Path:
    groups = sorted(det.details.get("content_groups") or [], key=lambda g: -g["diversity_ratio"])
    threshold = det.details.get("content_threshold")
    shown = groups[:show]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(shown) + 3), 3.6))
    if shown:
        x = np.arange(len(shown))
        colors = ["tab:red" if g.get("tested") else "tab:blue" for g in shown]
        ax.bar(x, [g["diversity_ratio"] for g in shown], color=colors, width=0.8)
        if threshold is not None:
            ax.axhline(float(threshold), color="k", ls="--", lw=1, label=f"threshold {float(threshold):g}")
            ax.legend(loc="upper right")
        ax.set_xticks(x, [f"{g['answer_token']}\n({g['size']})" for g in shown], fontsize=6)
        more = f"; the {len(shown)} most diverse of {len(groups)}" if len(groups) > len(shown) else ""
        ax.set_xlabel(f"answer group: first answer token (samples){more}")
        ax.set_ylabel("image diversity / median group's")
        ax.set_title("answer groups whose images disagree with the answer (red: members tested)")
    else:
        why = det.details.get("content_note") or f"no content test ({det.method})"
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
    path = _save(fig, path)
    plt.close(fig)
    return path


def _layer_entropy(plt, scores: Scores, det: Detection, path: Path) -> Path:
    ent = scores.entropy
    rows = np.isfinite(ent).all(axis=1)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * ent.shape[1] + 2), 4))
    layers = np.arange(ent.shape[1])
    for label, mask, color, dx in (("kept", ~det.flagged & rows, "tab:blue", -0.18),
                                   ("flagged", det.flagged & rows, "tab:red", 0.18)):  # fmt: skip
        if mask.sum() < 2:
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
    ax.set_xticks(layers, [str(int(i)) for i in layers])
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title("Per-layer entropy: kept vs flagged")
    path = _save(fig, path)
    plt.close(fig)
    return path
