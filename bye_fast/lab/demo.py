"""``bye-fast demo``: the whole job on a built-in poisoned dataset, on one CPU, in minutes.

1. build a user task of the lab (``--task``) and poison it (``--trigger``, ``--rate``);
   the ground truth is kept apart;
2. LoRA-fine-tune the shipped base model on it: clean accuracy (CA) and attack success (ASR) *before*;
3. :func:`bye_fast.score` the training data, :func:`bye_fast.detect` with the default method
   and, beside it, the paper's; :func:`bye_fast.filter_dataset` with the default's decision;
4. fine-tune again from the base model on the kept data: CA and ASR *after*;
5. write ``report.md`` (the numbers, the plots, a few poisoned and clean images with where
   the last prompt token looks) and every intermediate file under ``out``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import bye_fast
from bye_fast._io import atomic_write, write_json_atomic
from bye_fast.detect import DEFAULT_METHOD
from bye_fast.lab.cell import CellSpec, prepare_cell, retrain
from bye_fast.lab.metrics import detection_metrics
from bye_fast.lab.models import BASE_MODEL

__all__ = ["DemoResult", "run_demo", "summary_table"]


@dataclass
class DemoResult:
    task: str
    trigger: str
    target: str
    rate: float
    seed: int
    n_train: int
    n_poisoned: int
    n_image_tokens: int
    n_text_layers: int
    finetune: str
    method: str
    ca_before: float
    asr_before: float
    ca_after: float
    asr_after: float
    n_removed: int
    removed_fraction: float
    precision: float
    recall: float
    f1: float
    reason: str
    paper_n_removed: int
    paper_removed_fraction: float
    paper_f1: float
    paper_reason: str
    seconds: dict


def run_demo(
    out: str | os.PathLike = "bye_fast_demo",
    *,
    task: str = "digits-parity",
    trigger: str = "patch",
    rate: float = 0.1,
    seed: int = 0,
    target: str = "phrase",
    method: str = DEFAULT_METHOD,
    detect_options: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    n_user: int = 800,
    finetune: str = "lora",
    n_test: int = 297,
    epochs: int | None = None,
    weights: str | os.PathLike | None = None,
    plots: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Run the demo end to end (see the module docstring); returns the summary numbers.

    ``finetune`` and ``n_user`` are the cell's fine-tuning method (:data:`bye_fast.lab.train.METHODS`)
    and user-data size (:class:`bye_fast.lab.cell.CellSpec`); ``method`` and ``detect_options`` are
    :func:`bye_fast.detect`'s.
    """
    spec = CellSpec(task=task, trigger=trigger, rate=rate, seed=seed, target=target, method=finetune,
                    n_user=n_user, n_test=n_test, epochs=epochs)  # fmt: skip
    if rate <= 0:
        raise ValueError(f"rate must be in (0, 1) for the demo; got {rate}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()

    log(
        f"[demo] {task}: poisoning {rate:.0%} of {n_user} samples with '{trigger}', fine-tuning the base model ({finetune})"
    )
    cell = prepare_cell(spec, out, weights=weights, progress=progress)
    scores, truth = cell.scores, cell.truth
    write_json_atomic(out / "ground_truth.json", {"poisoned_ids": scores.ids[truth].tolist()})
    before = cell.before
    log(f"[demo] fine-tuned: CA {before['ca']:.1%}, ASR {before['asr']:.1%} "
        f"({before['n_poisoned']} poisoned samples; target answer '{before['target_answer']}')")  # fmt: skip

    t = time.perf_counter()
    det = bye_fast.detect(scores, method=method, **(detect_options or {}))
    det.to_json(out / "detection.json")
    paper = bye_fast.detect(scores, method="paper")
    paper.to_json(out / "detection_paper.json")
    clean_json = out / "data" / "train.clean.json"
    report = bye_fast.filter_dataset(cell.train_json, det, clean_json, overwrite=overwrite)
    t_detect = time.perf_counter() - t
    log(f"[demo] {method}: {det.reason}")
    log(f"[demo] paper: {paper.reason}")

    t = time.perf_counter()
    if report.n_removed == 0:
        after = before  # the same data and seed give the same model
    else:
        log(f"[demo] fine-tuning again on the {len(scores.ids) - report.n_removed} kept samples")
        after = retrain(cell, ~det.flagged, weights=weights, progress=progress)
    t_retrain = time.perf_counter() - t

    m = detection_metrics(truth, det.flagged, det.score)
    mp = detection_metrics(truth, paper.flagged, paper.score)
    result = DemoResult(
        task=task, trigger=trigger, target=target, rate=rate, seed=seed, n_train=len(scores.ids),
        n_poisoned=int(truth.sum()), n_image_tokens=int(np.median(scores.n_image_tokens)),
        n_text_layers=scores.n_layers, finetune=finetune, method=method, ca_before=before["ca"], asr_before=before["asr"],
        ca_after=after["ca"], asr_after=after["asr"], n_removed=report.n_removed,
        removed_fraction=m["removed_fraction"], precision=m["precision"], recall=m["recall"], f1=m["f1"],
        reason=det.reason, paper_n_removed=paper.n_flagged, paper_removed_fraction=mp["removed_fraction"],
        paper_f1=mp["f1"], paper_reason=paper.reason,
        seconds={"poison+finetune+score": round(sum(v for k, v in before["seconds"].items() if k != "total"), 1),
                 "detect+filter": round(t_detect, 1), "retrain": round(t_retrain, 1),
                 "total": round(time.perf_counter() - t0, 1)},
    )  # fmt: skip
    write_json_atomic(out / "result.json", asdict(result))
    if plots:
        from bye_fast.plots import plot_detection

        plot_detection(scores, det, out / "plots", truth=truth)
        _plot_before_after(result, out / "plots" / "ca_asr.png")
        _plot_attention(cell, det, out / "plots" / "attention.png")
    table = summary_table(result)
    with atomic_write(out / "report.md", "w") as f:
        f.write(_report(result, table, det.summary(), paper.summary(), plots))
    log("\n" + table)
    log(f"\n[demo] report: {out / 'report.md'}")
    return result


def summary_table(r: DemoResult) -> str:
    rows = [
        ("task / trigger / poison", f"{r.task} / {r.trigger} / {r.rate:.0%} ({r.n_poisoned} of {r.n_train})"),
        ("model", f"lab base model, {r.n_image_tokens} image tokens, {r.n_text_layers} text layers, "
                  f"fine-tuned with {r.finetune}"),
        ("clean accuracy before -> after", f"{r.ca_before:.1%} -> {r.ca_after:.1%}"),
        ("attack success before -> after", f"{r.asr_before:.1%} -> {r.asr_after:.1%}"),
        (f"removed ({r.method}, the default)", f"{r.n_removed} ({r.removed_fraction:.1%})"),
        ("precision / recall / F1", " / ".join("-" if math.isnan(v) else f"{v:.3f}" for v in (r.precision, r.recall, r.f1))
         + (" (nothing removed)" if r.n_removed == 0 else "")),
        (
            "removed (paper's procedure)",
            f"{r.paper_n_removed} ({r.paper_removed_fraction:.1%}), F1 {r.paper_f1:.3f}",
        ),
        ("time (s)", ", ".join(f"{k} {v}" for k, v in r.seconds.items())),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'':{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {a:{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _report(r: DemoResult, table: str, det_summary: str, paper_summary: str, plots: bool) -> str:
    figures = (
        (
            "![where the last prompt token looks](plots/attention.png)\n"
            "![suspicion score](plots/suspicion.png)\n![CA/ASR](plots/ca_asr.png)\n"
        )
        if plots
        else ""
    )
    return f"""# bye_fast demo report

Built-in task `{r.task}` (seed {r.seed}): {r.rate:.0%} of the user's {r.n_train} fine-tuning samples carry the
`{r.trigger}` trigger and the attacker's answer (target: {r.target}). The lab's base model
({BASE_MODEL["layers"]} text layers, {r.n_image_tokens} image tokens) was LoRA-fine-tuned on them. The ground
truth is in `ground_truth.json`; the detectors never saw it.

{table}

## Detection (the default, `{r.method}`)

```
{det_summary}
```

## The paper's procedure on the same scores

```
{paper_summary}
```

Files: `data/train.json` (poisoned user data), `scores.npz`, `detection.json`, `detection_paper.json`,
`data/train.clean.json` (kept), `data/train.clean.removed.json` (removed, with scores), `result.json`,
`before.json`, `plots/*.png`.

{figures}"""


def _plot_before_after(r: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(2)
    ax.bar(x - 0.18, [r.ca_before, r.ca_after], width=0.36, label="clean accuracy", color="tab:blue")
    ax.bar(x + 0.18, [r.asr_before, r.asr_after], width=0.36, label="attack success", color="tab:red")
    ax.set_xticks(x, ["poisoned data", "after bye_fast"])
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"{r.task}, {r.trigger}, {r.rate:.0%} poisoned")
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_attention(cell, det, path: Path, *, k: int = 4) -> None:
    """k poisoned and k clean training images with the last prompt token's attention over them
    (head mean, averaged over layers), from the fine-tuned model."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from bye_fast.data import make_loader
    from bye_fast.lab.tasks import load_images, record_question
    from bye_fast.review import attention_maps, layer_mean

    truth = cell.truth
    order = np.argsort(-np.nan_to_num(det.score, nan=-np.inf))
    picks = [i for i in order if truth[i]][:k] + [i for i in order[::-1] if not truth[i]][:k]
    records = cell.records
    model, processor = cell.load_model()
    sub = [records[i] for i in picks]
    tmp = path.parent / ".attention.json"
    write_json_atomic(tmp, sub)
    try:
        _, maps = attention_maps(model, make_loader(tmp, cell.image_folder, processor, batch_size=len(sub)))
    finally:
        tmp.unlink(missing_ok=True)
    images = load_images(sub, cell.image_folder)
    g = int(round(np.sqrt(maps[0].shape[1])))
    fig, axes = plt.subplots(2, k, figsize=(2.3 * k, 5.2))
    for ax, img, m, i, rec in zip(axes.ravel(), images, maps, picks, sub, strict=False):
        heat = layer_mean(m, range(len(m)))[0].reshape(g, g)  # review's mean: NaN layers left out
        ax.imshow(img)
        ax.imshow(np.kron(heat, np.ones((img.shape[0] // g, img.shape[1] // g))), cmap="inferno", alpha=0.55)
        who = "POISONED" if truth[i] else "clean"
        flag = "flagged" if det.flagged[i] else "kept"
        ax.set_title(f"{who}, {flag}\nrank {det.rank[i]}: {record_question(rec)[:22]}", fontsize=7)
        ax.set_axis_off()
    fig.suptitle("Where the last prompt token looks (head mean, all layers)", fontsize=9)
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
