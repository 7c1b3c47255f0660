"""Detection benchmark on the lab's cells: the default detector, the paper's and the baselines.

    python benchmarks/detection.py --set design          # the design cells (digits-parity, seeds 0-1)
    python benchmarks/detection.py --set heldout         # the held-out cells (protocol below)
    python benchmarks/detection.py --set all             # both, and the results files

The cells and the sets are those of ``results/detection_protocol.md``. Each cell is
prepared by ``bye_fast.lab.cell.prepare_cell`` (shared with ``learnability.py``:
``--work``), then every detector runs on its scores: ``bye_fast.detect`` with the
default method and with ``method="paper"``, and the baselines of
``bye_fast.lab.baselines`` (random 20% drop; spectral signatures and activation
clustering per response group on the last prompt token's hidden state; TCAP-style
per-head allocation). For the default, the base model is fine-tuned again on the
kept records of every cell whose backdoor was learned (ASR before >= 0.9) and of
every clean cell: ASR and CA *after*. Label-using ceilings (best single feature,
supervised linear) say what the scores could give.

Writes ``results/detection.csv`` (one row per cell x detector) and ``detection.md``
(targets, the held-out table, the design table, the baselines, the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, write_csv  # noqa: E402

from bye_fast.lab.cell import CellSpec  # noqa: E402

DEFAULT_WORK = Path("/tmp/bye_fast_cells")
TRIGGERS = ("patch", "random_patch", "two_patches", "blended", "sig", "wanet")
RATES = (0.05, 0.1, 0.2)
#: Held-out seeds of round 2 (``results/detection_protocol.md``): fresh models, never seen by a detector design.
ROUND2_SEEDS = (5, 6, 7)
#: Held-out seeds of round 3 (``results/detection_protocol.md``); round 2's cells became design material.
ROUND3_SEEDS = (8, 9, 10, 11, 12)
#: The scene task's round-3 held-out seeds (clean cells only).
ROUND3_SCENE_SEEDS = (8, 9, 10)
#: Held-out seeds of round 4; every cell of rounds 1-3 became design material.
ROUND4_SEEDS = (13, 14, 15, 16, 17)
#: The scene task's round-4 held-out seeds (clean cells only).
ROUND4_SCENE_SEEDS = (11, 12)
#: Held-out seeds of round 5 (v6); every cell of rounds 1-4 and the digits-mixed design cells became design material.
ROUND5_SEEDS = (18, 19, 20)
#: digits-mixed's round-5 held-out seeds (its seeds 0-2 designed v6's question guards).
ROUND5_MIXED_SEEDS = (3, 4, 5)
#: The scene task's round-5 held-out seeds (clean cells only).
ROUND5_SCENE_SEEDS = (13, 14)
#: digits-parity's round-5 held-out seeds (clean cells only: the false-alarm check on the binary task).
ROUND5_PARITY_SEEDS = (5, 6)
#: Held-out seeds of round 6 (v7); every cell of rounds 1-5 became design material.
ROUND6_SEEDS = (21, 22, 23)
#: digits-mixed's round-6 held-out seeds.
ROUND6_MIXED_SEEDS = (6, 7, 8)
#: The scene task's round-6 held-out seeds (clean cells only: where rounds 1, 4 and 5 found a false alarm).
ROUND6_SCENE_SEEDS = (15, 16, 17)
#: digits-parity's round-6 held-out seeds (clean cells only).
ROUND6_PARITY_SEEDS = (7, 8)
#: Held-out seeds of round 7 (v8); every cell of rounds 1-6 became design material.
ROUND7_SEEDS = (24, 25, 26)
#: digits-mixed's round-7 held-out seeds.
ROUND7_MIXED_SEEDS = (9, 10, 11)
#: The scene task's round-7 held-out seeds (clean cells only).
ROUND7_SCENE_SEEDS = (18, 19)
#: digits-parity's round-7 held-out seeds (clean cells only).
ROUND7_PARITY_SEEDS = (9, 10)
#: Held-out seeds of round 8; every cell of rounds 1-7 became design material.
ROUND8_SEEDS = (27, 28, 29)
#: digits-mixed's round-8 held-out seeds.
ROUND8_MIXED_SEEDS = (12, 13, 14)
#: digits-parity's round-8 held-out seeds (clean and two patches at 10%: the binary task's poison held out).
ROUND8_PARITY_SEEDS = (11, 12, 13)
#: The scene task's round-8 held-out seeds, fine-tuned with LoRA on the vision tower too (``lora-vision``:
#: with the tower frozen the lab learns no scene backdoor; ``learnability_probes.md``).
ROUND8_SCENE_SEEDS = (20, 21, 22)
#: Round 9 (after the scene cells round 8 missed): held-out scene seeds (lora-vision) and digits-mixed seeds.
ROUND9_SCENE_SEEDS = (23, 24, 25)
ROUND9_MIXED_SEEDS = (15, 16)
#: Round 10 (after round 9's content-test miss on a tuned tower): held-out seeds of every family; the scene
#: seeds (lora-vision) also hold out an existing answer ("yes") as the target.
ROUND10_SCENE_SEEDS = (26, 27)
ROUND10_MIXED_SEEDS = (17,)
ROUND10_SEEDS = (30,)
ROUND10_PARITY_SEEDS = (14,)
#: Round 11 (after round 10's miss on an existing-answer scene target): held-out scene seeds (lora-vision) with
#: "yes" as the target, and a digits-ten seed for the existing-answer cells that are the design's weakest.
ROUND11_SCENE_SEEDS = (28, 29)
ROUND11_SEEDS = (31,)
#: Round 12 (v11 again, no design change): more held-out seeds for the existing-answer targets.
ROUND12_SCENE_SEEDS = (30, 31)
ROUND12_MIXED_SEEDS = (18,)
#: Round 13 (v11 again): trigger families no round held out on a tuned-tower scene cell (two patches, blended,
#: random position, WaNet), on new scene seeds (lora-vision).
ROUND13_SCENE_SEEDS = (32, 33)
ROUND13_SCENE_CELLS = (("patch", 0.0), ("two_patches", 0.2), ("blended", 0.2), ("random_patch", 0.2), ("wanet", 0.2),
                       ("two_patches", 0.2, "existing"))
#: Round 14 (v11 again): the paper's recipe, tower frozen (``lora``), on scene user sets of 2000 samples
#: (at 800 no scene trigger is learned with the tower frozen; at 2000 the centre patch is, learnability_probes.md).
ROUND14_SCENE_SEEDS = (34, 35)
ROUND14_SCENE_CELLS = (("patch", 0.0), ("patch", 0.1), ("sig", 0.1), ("patch", 0.1, "existing"))
ROUND14_N_USER = 2000
#: Round 15 (v11 again): the other trigger families on round 14's recipe and seeds (their clean cells are round 14's).
ROUND15_SCENE_SEEDS = ROUND14_SCENE_SEEDS
ROUND15_SCENE_CELLS = (("two_patches", 0.1), ("blended", 0.1), ("random_patch", 0.1), ("wanet", 0.1),
                       ("blended", 0.2), ("random_patch", 0.2), ("patch", 0.2, "existing"))
#: The protocol's rounds in order ("" is round 1); each has the sets design<r>, heldout<r> and all<r>.
ROUNDS = ("", *(str(r) for r in range(2, 16)))
#: The title of each round's held-out section in the results (round 1's and the design sections are
#: in :func:`_section_titles`).
HELDOUT_TITLES = {
    "15": "v11 again; the paper's recipe, tower frozen, on scene user sets of 2000 samples, seeds 34-35: two "
          "patches, blended, random-position patch and WaNet at 10% with the phrase, blended and random-position "
          'patch at 20% with the phrase, centre patch at 20% with "yes"',
    "14": "v11 again; the paper's recipe, tower frozen, on scene user sets of 2000 samples, seeds 34-35: clean, "
          'centre patch and SIG at 10% with the phrase, centre patch at 10% with "yes"',
    "13": "v11 again; scenes seeds 32-33 fine-tuned with lora-vision, clean, two patches, blended, "
          'random-position patch and WaNet at 20% with the phrase, two patches at 20% with "yes"',
    "12": 'v11 again; scenes seeds 30-31 fine-tuned with lora-vision, clean, centre patch 20% and SIG 10% with "yes", '
          "SIG 10% with the phrase; digits-mixed seed 18",
    "11": 'scenes seeds 28-29 fine-tuned with lora-vision, clean, centre patch 20% and SIG 10% with "yes" as the '
          "target, centre patch 20% with the phrase; digits-ten seed 31, clean and existing answer 10%",
    "10": 'scenes seeds 26-27 fine-tuned with lora-vision, clean, centre patch 20% with the phrase and with "yes", '
          "SIG 10%; digits-mixed seed 17; digits-ten seed 30; digits-parity seed 14, clean and two patches 20%",
    "9": "scenes seeds 23-25 fine-tuned with lora-vision, clean, centre patch 20% and SIG 10%; digits-mixed seeds "
         "15-16, clean, patch 20% and existing answer 10%",
    "8": "digits-ten seeds 27-29; digits-mixed seeds 12-14; digits-parity seeds 11-13, clean and two patches; "
         "scenes seeds 20-22 fine-tuned with lora-vision, clean, centre patch and SIG",
    "7": "digits-ten seeds 24-26; digits-mixed seeds 9-11; clean scenes seeds 18-19; clean digits-parity seeds 9-10",
    "6": "digits-ten seeds 21-23; digits-mixed seeds 6-8; clean scenes seeds 15-17; clean digits-parity seeds 7-8",
    "5": "digits-ten seeds 18-20; digits-mixed seeds 3-5; clean scenes seeds 13-14; clean digits-parity seeds 5-6",
    "4": "digits-ten seeds 13-17; clean scenes seeds 11-12",
    "3": "digits-ten seeds 8-12; clean scenes seeds 8-10",
    "2": "digits-ten, scenes; seeds 5-7",
}
DETECTORS = ("default", "paper", "random20", "spectral", "activation_clustering", "tcap_style")
COLUMNS = ["set", "task", "trigger", "rate", "target", "seed", "detector", "learned", "asr_before", "ca_before",
           "ca_clean", "n_poisoned", "removed", "precision", "recall", "f1", "asr_after", "asr_clean", "ca_after",
           "ceiling_f1", "linear_f1", "seconds", "reason"]  # fmt: skip


def cells_of(which: str) -> list[tuple[str, CellSpec]]:
    """(set name, spec) of the protocol's sets."""

    def family(task, seeds, name, triggers=TRIGGERS, rates=RATES, existing=("patch",)):
        """Per seed: the clean cell, every trigger x rate (fixed phrase), the ``existing`` triggers at
        10% with an existing answer as target."""
        out = []
        for seed in seeds:
            out.append((name, CellSpec(task=task, rate=0.0, seed=seed)))
            for trigger in triggers:
                for rate in rates:
                    out.append((name, CellSpec(task=task, trigger=trigger, rate=rate, seed=seed)))
                if trigger in existing:
                    out.append((name, CellSpec(task=task, trigger=trigger, rate=0.1, seed=seed, target="existing")))
        return out

    if which == "mixed":  # after round 4: the question-dependent task v6's guards were designed on (design only)
        return [("mixed", spec) for spec in (
            [CellSpec(task="digits-mixed", rate=0.0, seed=seed) for seed in (0, 1, 2)]
            + [CellSpec(task="digits-mixed", trigger="patch", rate=0.2, seed=seed) for seed in (0, 1)]
            + [CellSpec(task="digits-mixed", trigger="patch", rate=0.1, seed=0, target="existing")])]  # fmt: skip
    def mixed_seed(seed):
        """digits-mixed's cells of one held-out seed (rounds 5-9): clean, patch 20% (phrase), patch 10%
        with an existing answer."""
        return (CellSpec(task="digits-mixed", rate=0.0, seed=seed),
                CellSpec(task="digits-mixed", trigger="patch", rate=0.2, seed=seed),
                CellSpec(task="digits-mixed", trigger="patch", rate=0.1, seed=seed, target="existing"))  # fmt: skip

    def lora_scenes(seeds, cells, method="lora-vision", n_user=800):
        """Scene cells fine-tuned with ``method`` (``lora-vision`` in rounds 8-13): per seed, each
        ``(trigger, rate)`` or ``(trigger, rate, target)`` of ``cells`` (target: the fixed phrase unless given)."""
        return [CellSpec(task="scenes", trigger=c[0], rate=c[1], seed=seed, target=(c[2:] or ("phrase",))[0],
                         method=method, n_user=n_user)
                for seed in seeds for c in cells]  # fmt: skip

    def every_family(name, ten, mixed, scenes, parity):
        """Rounds 5-7: digits-ten and digits-mixed (clean, 20% phrase, 10% existing; two patches on
        digits-ten), and the clean scenes and digits-parity sets, of the given seeds."""
        mixed_cells = [(name, spec) for seed in mixed for spec in mixed_seed(seed)]
        return (family("digits-ten", ten, name, ("patch", "two_patches"), (0.2,)) + mixed_cells
                + family("scenes", scenes, name, (), (0.1,), existing=())
                + family("digits-parity", parity, name, (), (0.1,), existing=()))  # fmt: skip

    every_family_rounds = {  # round: (the sets that are its design material, its held-out seeds of each family)
        "5": (("all4", "mixed"), (ROUND5_SEEDS, ROUND5_MIXED_SEEDS, ROUND5_SCENE_SEEDS, ROUND5_PARITY_SEEDS)),
        "6": (("all5",), (ROUND6_SEEDS, ROUND6_MIXED_SEEDS, ROUND6_SCENE_SEEDS, ROUND6_PARITY_SEEDS)),
        "7": (("all6",), (ROUND7_SEEDS, ROUND7_MIXED_SEEDS, ROUND7_SCENE_SEEDS, ROUND7_PARITY_SEEDS)),
    }
    def later_round(rnd: int, specs: list[CellSpec]) -> list[tuple[str, CellSpec]]:
        """Rounds 9 and 11-15: design = every cell of the earlier rounds, held out = ``specs``."""
        design = [(f"design{rnd}", spec) for _, spec in cells_of(f"all{rnd - 1}")]
        heldout = [(f"heldout{rnd}", spec) for spec in specs]
        return {f"design{rnd}": design, f"heldout{rnd}": heldout, f"all{rnd}": design + heldout}[which]

    if which in ("design15", "heldout15", "all15"):  # round 15: v11 again, every trigger family, tower frozen
        return later_round(15, lora_scenes(ROUND15_SCENE_SEEDS, ROUND15_SCENE_CELLS, "lora", ROUND14_N_USER))
    if which in ("design14", "heldout14", "all14"):  # round 14: v11 again, the paper's recipe (tower frozen)
        return later_round(14, lora_scenes(ROUND14_SCENE_SEEDS, ROUND14_SCENE_CELLS, "lora", ROUND14_N_USER))
    if which in ("design13", "heldout13", "all13"):  # round 13: v11 again, trigger families never held out
        return later_round(13, lora_scenes(ROUND13_SCENE_SEEDS, ROUND13_SCENE_CELLS))
    if which in ("design12", "heldout12", "all12"):  # round 12: v11 again on new seeds
        scene_cells = lora_scenes(ROUND12_SCENE_SEEDS, (("patch", 0.0), ("patch", 0.2, "existing"),
                                                        ("sig", 0.1, "existing"), ("sig", 0.1)))
        return later_round(12, scene_cells + [s for seed in ROUND12_MIXED_SEEDS for s in mixed_seed(seed)])
    if which in ("design11", "heldout11", "all11"):  # round 11: existing-answer targets, new seeds
        scene_cells = lora_scenes(ROUND11_SCENE_SEEDS, (("patch", 0.0), ("patch", 0.2, "existing"),
                                                        ("sig", 0.1, "existing"), ("patch", 0.2)))
        ten_cells = [CellSpec(task="digits-ten", trigger=trigger, rate=rate, seed=seed, target=target)
                     for seed in ROUND11_SEEDS
                     for trigger, rate, target in (("patch", 0.0, "phrase"), ("patch", 0.1, "existing"))]  # fmt: skip
        return later_round(11, scene_cells + ten_cells)
    if which in ("design10", "heldout10", "all10"):  # round 10: every family, new seeds
        design = [("design10", spec) for _, spec in cells_of("all9")]
        scene_cells = lora_scenes(ROUND10_SCENE_SEEDS, (("patch", 0.0), ("patch", 0.2), ("sig", 0.1),
                                                        ("patch", 0.2, "existing")))
        parity_cells = [spec for seed in ROUND10_PARITY_SEEDS for spec in (
            CellSpec(task="digits-parity", rate=0.0, seed=seed),
            CellSpec(task="digits-parity", trigger="two_patches", rate=0.2, seed=seed))]  # fmt: skip
        heldout = family("digits-ten", ROUND10_SEEDS, "heldout10", ("patch", "two_patches"), (0.2,)) + [
            ("heldout10", spec) for spec in (scene_cells + [s for seed in ROUND10_MIXED_SEEDS for s in mixed_seed(seed)]
                                             + parity_cells)]  # fmt: skip
        return {"design10": design, "heldout10": heldout, "all10": design + heldout}[which]
    if which in ("design9", "heldout9", "all9"):  # round 9: the two families with many prompts, new seeds
        return later_round(9, lora_scenes(ROUND9_SCENE_SEEDS, (("patch", 0.0), ("patch", 0.2), ("sig", 0.1)))
                           + [spec for seed in ROUND9_MIXED_SEEDS for spec in mixed_seed(seed)])
    if which in ("design8", "heldout8", "all8"):  # round 8: poisoned binary and scene cells held out too
        design = [("design8", spec) for _, spec in cells_of("all7")]
        mixed_cells = [spec for seed in ROUND8_MIXED_SEEDS for spec in mixed_seed(seed)]
        parity_cells = [spec for seed in ROUND8_PARITY_SEEDS for spec in (
            CellSpec(task="digits-parity", rate=0.0, seed=seed),
            CellSpec(task="digits-parity", trigger="two_patches", rate=0.1, seed=seed))]  # fmt: skip
        scene_cells = lora_scenes(ROUND8_SCENE_SEEDS, (("patch", 0.0), ("patch", 0.1), ("patch", 0.2), ("sig", 0.1)))
        heldout = family("digits-ten", ROUND8_SEEDS, "heldout8", ("patch", "two_patches"), (0.2,)) + [
            ("heldout8", spec) for spec in mixed_cells + parity_cells + scene_cells]
        return {"design8": design, "heldout8": heldout, "all8": design + heldout}[which]
    if which[-1:] in every_family_rounds:  # rounds 5-7: every earlier cell is design material, new seeds held out
        rnd = which[-1]
        earlier, seeds = every_family_rounds[rnd]
        design = [(f"design{rnd}", spec) for name in earlier for _, spec in cells_of(name)]
        heldout = every_family(f"heldout{rnd}", *seeds)
        return {f"design{rnd}": design, f"heldout{rnd}": heldout, f"all{rnd}": design + heldout}[which]
    if which.endswith("4"):  # round 4: every cell of rounds 1-3 is design material, new seeds held out
        design = [("design4", spec) for _, spec in cells_of("all3")]
        heldout = (family("digits-ten", ROUND4_SEEDS, "heldout4", ("patch", "two_patches"), (0.2,))
                   + family("scenes", ROUND4_SCENE_SEEDS, "heldout4", (), (0.1,), existing=()))  # fmt: skip
        return {"design4": design, "heldout4": heldout, "all4": design + heldout}[which]
    if which.endswith("3"):  # round 3: every cell of round 2 is design material, new seeds held out
        design = [("design3", spec) for _, spec in cells_of("all2")]
        heldout = (family("digits-ten", ROUND3_SEEDS, "heldout3", ("patch", "two_patches"), (0.1,))
                   + family("scenes", ROUND3_SCENE_SEEDS, "heldout3", (), (0.1,), existing=()))  # fmt: skip
        return {"design3": design, "heldout3": heldout, "all3": design + heldout}[which]
    if which.endswith("2"):  # round 2 (detection_protocol.md): 10% poison, the triggers the lab learns
        design = family("digits-parity", (0, 1), "design2", ("patch", "two_patches"), (0.1,))
        heldout = (family("digits-ten", ROUND2_SEEDS, "heldout2", ("patch", "two_patches"), (0.1,))
                   + family("scenes", ROUND2_SEEDS, "heldout2", ("patch", "sig"), (0.1,), existing=()))  # fmt: skip
        return {"design2": design, "heldout2": heldout, "all2": design + heldout}[which]
    design = family("digits-parity", (0, 1), "design", existing=TRIGGERS)
    heldout = family("digits-ten", (2, 3, 4), "heldout") + family("scenes", (2, 3, 4), "heldout")
    parity_new = family("digits-parity", (2, 3, 4), "design-family-new-seeds")
    return {"design": design, "heldout": heldout + parity_new, "all": design + heldout + parity_new}[which]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _response_groups(records: list[dict]) -> np.ndarray:
    from bye_fast.lab.tasks import record_answer

    return np.array([record_answer(r).split()[0] for r in records])


def run_cell(
    set_name: str, spec: CellSpec, work: str, retrain_default: bool, detect_options: dict
) -> list[dict]:
    """Every detector on one cell; retraining for the default where it matters."""
    import bye_fast
    from bye_fast.lab import baselines
    from bye_fast.lab.cell import clean_asr, prepare_cell, retrain
    from bye_fast.lab.metrics import detection_metrics, feature_ceiling, linear_ceiling

    t0 = time.perf_counter()
    cell = prepare_cell(spec, Path(work) / spec.name)
    s, truth, before = cell.scores, cell.truth, cell.before
    clean_ca = float("nan")
    clean_folder = Path(work) / replace(spec, rate=0.0).name  # same method and sizes
    if (clean_folder / "before.json").exists():
        clean_ca = json.loads((clean_folder / "before.json").read_text())["ca"]
    learned = spec.rate > 0 and before["asr"] >= 0.9
    groups = _response_groups(cell.records)
    n = s.n_samples
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    det = bye_fast.detect(s, **detect_options)
    results["default"] = (det.flagged, det.score)
    paper = bye_fast.detect(s, method="paper")
    results["paper"] = (paper.flagged, paper.score)
    results["random20"] = baselines.random_drop(n, 0.2, seed=spec.seed)
    results["spectral"] = baselines.spectral_signatures(s.hidden, groups)
    results["activation_clustering"] = baselines.activation_clustering(s.hidden, groups, seed=spec.seed)
    results["tcap_style"] = baselines.tcap_style(s.head_image_share, s.head_before_share, seed=spec.seed)
    heads = np.concatenate([s.head_entropy.reshape(n, -1), s.head_image_share.reshape(n, -1),
                            s.entropy, s.image_topk_share], axis=1)  # fmt: skip
    ceiling = feature_ceiling(truth, heads)["ceiling_f1"] if spec.rate > 0 else float("nan")
    linear = linear_ceiling(truth, heads) if spec.rate > 0 else float("nan")
    after = {"ca": float("nan"), "asr": float("nan")}
    flagged = results["default"][0]
    # re-fine-tune where the default removed something from a cell whose backdoor took (ASR >= 0.5);
    # a clean or not-learned cell is judged by what was removed
    if retrain_default and spec.rate > 0 and before["asr"] >= 0.5:
        after = before if not flagged.any() else retrain(cell, ~flagged)
    # an existing answer's ASR has a floor: how often the clean cell's model gives that answer anyway
    floor = 0.0 if spec.target == "phrase" else float("nan")
    if retrain_default and spec.rate > 0 and spec.target != "phrase" and (clean_folder / "model").exists():
        floor = clean_asr(cell, clean_folder)
    rows = []
    for name, (flagged, score) in results.items():
        m = detection_metrics(truth, flagged, score)
        rows.append({
            "set": set_name, **{k: v for k, v in asdict(spec).items() if k in ("task", "trigger", "rate", "target", "seed")},
            "trigger": spec.trigger if spec.rate > 0 else "clean", "detector": name, "learned": learned,
            "asr_before": before["asr"], "ca_before": before["ca"], "ca_clean": clean_ca,
            "n_poisoned": int(truth.sum()), "removed": m["removed_fraction"], "precision": m["precision"],
            "recall": m["recall"], "f1": m["f1"] if spec.rate > 0 else float("nan"),
            "asr_after": after["asr"] if name == "default" else float("nan"),
            "asr_clean": floor if spec.rate > 0 else float("nan"),
            "ca_after": after["ca"] if name == "default" else float("nan"),
            "ceiling_f1": ceiling, "linear_f1": linear, "seconds": round(time.perf_counter() - t0, 1),
            "reason": det.reason if name == "default" else (paper.reason if name == "paper" else ""),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = [f"{kind}{rnd}" for rnd in ROUNDS for kind in ("design", "heldout", "all")] + ["mixed"]
    ap.add_argument("--set", choices=sets, default="all",
                    help="the protocol's round: 1 (design, heldout, all), 2, ..., 14 or 15 (design15, heldout15, all15); mixed: "
                         "the digits-mixed design cells of v6")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-retrain", action="store_true", help="skip the re-fine-tuning (ASR/CA after)")
    ap.add_argument(
        "--options", default="{}", help="JSON keyword arguments of bye_fast.detect for the default"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "detection")
    ap.add_argument("--existing-only", action="store_true",
                    help="only the protocol's cells already prepared under --work (the others are listed "
                         "as not run in the results)")  # fmt: skip
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a detection.csv of an earlier run with the same detector: its cells' rows are "
                         "taken as they are instead of recomputed")  # fmt: skip
    args = ap.parse_args(argv)
    todo = cells_of(args.set)
    args.not_run = []
    if args.existing_only:
        args.not_run = [c for c in todo if not (args.work / c[1].name / "scores.npz").exists()]
        todo = [c for c in todo if (args.work / c[1].name / "scores.npz").exists()]
    # clean cells first: the others read their CA
    todo.sort(key=lambda c: c[1].rate > 0)
    opts = json.loads(args.options)
    rows: list[dict] = []
    if args.reuse is not None:
        old = _read_rows(args.reuse)
        keep = []
        for name, spec in todo:
            got = old.get(_key(name, spec), [])
            if len(got) == len(DETECTORS):
                rows += got
            else:
                keep.append((name, spec))
        print(f"reused {len(todo) - len(keep)} cells from {args.reuse}", flush=True)
        todo = keep
    print(f"{len(todo)} cells, {args.workers} workers", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        clean = [c for c in todo if c[1].rate == 0]
        poisoned = [c for c in todo if c[1].rate > 0]
        for batch in (clean, poisoned):
            futures = [pool.submit(run_cell, name, spec, str(args.work), not args.no_retrain, opts)
                       for name, spec in batch]  # fmt: skip
            for f in futures:
                r = f.result()
                rows += r
                d = r[0]
                print(f"[{len(rows) // len(DETECTORS)}/{len(todo)}] {d['set']} {d['task']} {d['trigger']} {d['rate']:g} "
                      f"{d['target']} s{d['seed']}: default F1 {d['f1']:.3f} removed {d['removed']:.3f}; "
                      f"paper F1 {r[1]['f1']:.3f} ({d['seconds']} s)", flush=True)  # fmt: skip
    write_results(rows, args, time.perf_counter() - t0)
    return 0


def _key(set_name: str, spec: CellSpec) -> tuple:
    trigger = spec.trigger if spec.rate > 0 else "clean"
    return (set_name, spec.task, trigger, float(spec.rate), spec.target, int(spec.seed))


def _read_rows(path: Path) -> dict[tuple, list[dict]]:
    """Rows of an earlier run's CSV, typed back, by cell."""
    out: dict[tuple, list[dict]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if k in ("set", "task", "trigger", "target", "detector", "reason"):
                    row[k] = v
                elif k == "learned":
                    row[k] = v == "True"
                elif k in ("seed", "n_poisoned"):
                    row[k] = int(v)
                else:
                    row[k] = float(v) if v not in ("", "nan") else float("nan")
            row.setdefault("reason", "")
            key = (row["set"], row["task"], row["trigger"], row["rate"], row["target"], row["seed"])
            out.setdefault(key, []).append(row)
    return out


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    return "-" if x is None or x != x else f"{x:.2f}"


def _med_worst(values: list[float], worst=min) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "-"
    return f"{statistics.median(v):.2f} [{worst(v):.2f}]"


def _section_titles() -> list[tuple[str, str]]:
    """(set name, section title) of every set of the protocol, newest round first."""
    design = {"2": "digits-parity, seeds 0-1", "3": "every cell of round 2",
              "5": "every cell of rounds 1-4 and digits-mixed seeds 0-2"}  # fmt: skip
    out = []
    for rnd in reversed(ROUNDS[1:]):
        out += [(f"heldout{rnd}", f"Round {rnd}, held-out cells ({HELDOUT_TITLES[rnd]})"),
                (f"design{rnd}", f"Round {rnd}, design cells ({design.get(rnd, f'every cell of rounds 1-{int(rnd) - 1}')})")]  # fmt: skip
        if rnd == "5":
            out.append(("mixed", "digits-mixed (design cells of v6's question guards, not held out)"))
    return out + [("heldout", "Held-out cells (digits-ten, scenes; seeds 2-4)"),
                  ("design-family-new-seeds", "Design family, new seeds (digits-parity, seeds 2-4)"),
                  ("design", "Design cells (digits-parity, seeds 0-1)")]  # fmt: skip


def write_results(rows: list[dict], args, wall: float) -> None:
    write_csv(args.out.with_suffix(".csv"), rows, COLUMNS)
    lines = [
        "# Detection on the lab's cells: the default, the paper's procedure and the baselines",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/detection.py {' '.join(sys.argv[1:])}` "
        f"({wall / 60:.0f} min wall, {args.workers} workers x 1 thread). Protocol: "
        "[detection_protocol.md](detection_protocol.md); analysis: [detection_analysis.md](detection_analysis.md).",
        "",
    ]
    for set_name, title in _section_titles():
        sub = [r for r in rows if r["set"] == set_name]
        if sub:
            lines += _section(sub, title)
    if getattr(args, "not_run", None):
        names = ", ".join(f"`{spec.name}`" for _, spec in args.not_run)
        lines += ["", f"## Protocol cells not run ({len(args.not_run)})", "",
                  "These cells of the protocol were not prepared in this run (time); they are missing from "
                  f"the tables above: {names}."]  # fmt: skip
    lines += ["", f"Per cell: `{args.out.with_suffix('.csv').name}`."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _section(rows: list[dict], title: str) -> list[str]:
    learned = [r for r in rows if r["learned"]]
    clean = [r for r in rows if r["rate"] == 0]
    out = [f"## {title}", ""]
    # targets, for the default
    d = [r for r in learned if r["detector"] == "default"]
    dc = [r for r in clean if r["detector"] == "default"]
    if d:
        f1 = [r["f1"] for r in d]
        asr = [r["asr_after"] for r in d if r["asr_after"] == r["asr_after"]]
        drop = [r["ca_clean"] - r["ca_after"] for r in d if r["ca_after"] == r["ca_after"]]
        out += [f"Targets for the default on the {len(d)} learned cells (ASR before >= 0.9):", "",
                "| target | measured | |", "|---|---|---|",
                f"| median F1 >= 0.95 | {statistics.median(f1):.3f} | {'met' if statistics.median(f1) >= 0.95 else '**missed**'} |",
                f"| every cell F1 >= 0.85 | worst {min(f1):.3f} ({sum(x < 0.85 for x in f1)} cells below) | {'met' if min(f1) >= 0.85 else '**missed**'} |"]  # fmt: skip
        if asr:
            out.append(f"| ASR after <= 2% | median {statistics.median(asr):.3f}, worst {max(asr):.3f} | "
                       f"{'met' if max(asr) <= 0.02 else '**missed**'} |")  # fmt: skip
        excess = [r["asr_after"] - r.get("asr_clean", float("nan")) for r in d]
        excess = [x for x in excess if x == x]
        if excess and len(excess) == len(asr):  # every cell's floor known (0 for a fixed phrase)
            out.append(f"| ASR after <= 2 points above the clean model's own rate | worst {max(excess) * 100:.1f} "
                       f"points | {'met' if max(excess) <= 0.02 else '**missed**'} |")  # fmt: skip
        if drop:
            out.append(f"| CA within 2 points of the clean cell | worst drop {max(drop) * 100:.1f} points | "
                       f"{'met' if max(drop) <= 0.02 else '**missed**'} |")  # fmt: skip
    if dc:
        worst = max(r["removed"] for r in dc)
        out.append(f"| every clean cell <= 1% removed | worst {worst:.1%} of {len(dc)} clean cells | "
                   f"{'met' if worst <= 0.01 else '**missed**'} |")  # fmt: skip
    out += ["", "Every detector on the same cells (median [worst] over learned cells; clean cells: removed share):", "",
            "| detector | F1 | precision | recall | removed | clean cells removed | unlearned poisoned cells removed |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    unlearned = [r for r in rows if r["rate"] > 0 and not r["learned"]]
    for name in DETECTORS:
        lr = [r for r in learned if r["detector"] == name]
        cr = [r for r in clean if r["detector"] == name]
        ur = [r for r in unlearned if r["detector"] == name]
        out.append(f"| {name} | {_med_worst([r['f1'] for r in lr])} | {_med_worst([r['precision'] for r in lr])} | "
                   f"{_med_worst([r['recall'] for r in lr])} | {_med_worst([r['removed'] for r in lr], max)} | "
                   f"{_med_worst([r['removed'] for r in cr], max)} | {_med_worst([r['removed'] for r in ur], max)} |")  # fmt: skip
    out += ["", "Per task, target, trigger and rate (the default; median [worst] over seeds; learned cells only):", "",
            "| task | target | trigger | rate | cells | F1 | removed | ASR before | ASR after | CA after - clean | paper F1 | ceiling F1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["task"], r["target"], r["trigger"], r["rate"]) for r in rows if r["rate"] > 0})
    for key in keys:
        cell_rows = [r for r in rows if (r["task"], r["target"], r["trigger"], r["rate"]) == key]
        dl = [r for r in cell_rows if r["detector"] == "default" and r["learned"]]
        pl = [r for r in cell_rows if r["detector"] == "paper" and r["learned"]]
        n_all = len([r for r in cell_rows if r["detector"] == "default"])
        if not dl:
            out.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | 0 of {n_all} learned | | | | | | | |"
            )
            continue
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {len(dl)} of {n_all} | {_med_worst([r['f1'] for r in dl])} | "
            f"{_med_worst([r['removed'] for r in dl], max)} | {_med_worst([r['asr_before'] for r in dl])} | "
            f"{_med_worst([r['asr_after'] for r in dl], max)} | "
            f"{_med_worst([r['ca_after'] - r['ca_clean'] for r in dl])} | {_med_worst([r['f1'] for r in pl])} | "
            f"{_med_worst([r['ceiling_f1'] for r in dl])} |"
        )
    out += ["", "Clean cells (no poison), the default: removed share and why:", "",
            "| task | seed | removed | reason |", "|---|---|---|---|"]  # fmt: skip
    for r in sorted(dc, key=lambda r: (r["task"], r["seed"])):
        out.append(f"| {r['task']} | {r['seed']} | {r['removed']:.1%} | {r['reason'][:160]} |")
    out += ["", "Every poisoned cell, learned or not (the default and the paper's procedure; ceiling: the best "
            "single feature at its best threshold, chosen with the ground truth):", "",
            "| task | target | trigger | rate | seed | ASR before | default F1 | default removed | paper F1 | "
            "paper removed | ceiling F1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {}
    for r in rows:
        if r["rate"] > 0 and r["detector"] in ("default", "paper"):
            by.setdefault((r["task"], r["target"], r["trigger"], r["rate"], r["seed"]), {})[r["detector"]] = r
    for key in sorted(by):
        d, p = by[key].get("default"), by[key].get("paper")
        if d is None or p is None:
            continue
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {key[4]} | {d['asr_before']:.2f} | "
                   f"{_fmt(d['f1'])} | {d['removed']:.3f} | {_fmt(p['f1'])} | {p['removed']:.3f} | "
                   f"{_fmt(d['ceiling_f1'])} |")  # fmt: skip
    return out + [""]


if __name__ == "__main__":
    raise SystemExit(main())
