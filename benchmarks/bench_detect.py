"""Benchmark: the default detector (``bye_fast.detect``) on large score arrays: time and peak memory.

The goal (detector issue): 1,000,000 samples x 1,024 features in at most 60 s and 8 GB on a
2-core machine. The input is a ``Scores`` whose ``entropy`` (the test's features) has 1,024
columns, float32 (4 GB at 1M; the score arrays are part of the peak; the refinement reads the
same columns less the test's), ``answer_token`` with 8 answer groups, and a 5% poisoned group
that four of the features see (a tight cluster at the low end) and that gives one answer, its
target (``--target``) -- so the run also checks that the poison is found. Each size runs in its
own process so that the peak resident memory (``ru_maxrss``) is that size's alone.

    python benchmarks/bench_detect.py                       # 10k, 100k and 1M samples x 1,024 features
    python benchmarks/bench_detect.py --sizes 100000 --features 256

Writes benchmarks/results/bench_detect.csv and .md (with the machine) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import describe, write_markdown  # noqa: E402


def one(n: int, features: int, seed: int = 0, embedding: int = 0, target: str = "phrase", prompts: int = 0) -> dict:
    """Generate, detect, measure (in this process)."""
    import numpy as np

    from bye_fast import Scores, detect

    rng = np.random.default_rng(seed)
    ent = np.empty((n, features), np.float32)
    for j0 in range(0, features, 64):  # in blocks: no float64 copy of the whole array
        j1 = min(features, j0 + 64)
        ent[:, j0:j1] = rng.normal(4.0, 0.3, size=(n, j1 - j0)).astype(np.float32)
    truth = rng.random(n) < 0.05
    for j in (features // 2, features // 2 + 1, features // 2 + 2, features // 2 + 3):
        ent[truth, j] = (2.5 + rng.normal(0, 0.03, truth.sum())).astype(np.float32)
    answer = rng.integers(0, 8, n)
    # a backdoor's samples all give its one target: a 9th answer (phrase) or class 0's (existing); v7 sets
    # aside an all-samples tail cluster spread over many answers as a clean mode (min_answer_share)
    key = None
    if prompts:  # two kinds of prompt: answers 0-3 under the first half of the keys, 4-7 under the second
        key = rng.integers(0, prompts, n)
        answer = np.where(key < prompts // 2, answer % 4, 4 + answer % 4)
    answer[truth] = 8 if target == "phrase" else 0
    emb = None
    if embedding:  # images that follow the answer (8 class centres); a poisoned image is of any class
        centres = rng.normal(size=(8, embedding)).astype(np.float32) * 3
        emb = np.empty((n, embedding), np.float32)
        for s0 in range(0, n, 65_536):
            s1 = min(n, s0 + 65_536)
            cls = np.where(truth[s0:s1], rng.integers(0, 8, s1 - s0), answer[s0:s1])
            emb[s0:s1] = centres[cls] + rng.normal(0, 0.5, size=(s1 - s0, embedding)).astype(np.float32)
    scores = Scores(entropy=ent, answer_token=answer, image_embedding=emb, prompt_key=key)
    del ent, emb
    t = time.perf_counter()
    det = detect(scores)
    seconds = time.perf_counter() - t
    tp = int((det.flagged & truth).sum())
    return {
        "samples": n,
        "features": int(det.details["evidence"].shape[0]),
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "embedding": embedding,
        "target": target,
        "prompts": prompts,
        "input_gb": round((scores.entropy.nbytes + (0 if scores.image_embedding is None else scores.image_embedding.nbytes)) / 2**30, 2),
        "flagged": int(det.n_flagged),
        "recall": round(tp / max(1, truth.sum()), 4),
        "precision": round(tp / max(1, det.n_flagged), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--features", type=int, default=1024, help="features of the test (default 1,024)")
    ap.add_argument("--embedding", type=int, default=0,
                    help="also an image embedding of this size whose poisoned group disagrees with its answer "
                         "(the content test; default 0: none)")
    ap.add_argument("--target", choices=["phrase", "existing"], default="phrase",
                    help="with --embedding: the poisoned samples answer a 9th answer (phrase, default) or class "
                         "0's (existing: the content test's vote then also takes clean zeros, and the attention "
                         "re-decides the group's members)")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=0,
                    help="also a prompt key per sample: this many prompts of two kinds (answers 0-3 under the first "
                         "half, 4-7 under the second), the target under all of them, so the answer-reach rule runs "
                         "(and with --target existing its per-kind member rule; default 0: no prompt keys)")  # fmt: skip
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_detect")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.sizes[0], args.features, embedding=args.embedding, target=args.target,
                             prompts=args.prompts)))
        return 0
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", "--sizes", str(n), "--features", str(args.features),
               "--embedding", str(args.embedding), "--target", args.target, "--prompts", str(args.prompts)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Default detector: time and peak memory",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/bench_detect.py {' '.join(sys.argv[1:])}`.",
        "Goal: 1M samples x 1,024 features in <= 60 s and <= 8 GB (peak RSS includes the float32 "
        "score arrays themselves, `input GB`). Poison: 5%, seen by 4 of the features; 8 answer groups.",
        "",
        "With `--embedding D`: also a D-dim image embedding; the poisoned samples answer a 9th answer "
        "(`--target existing`: class 0's) whatever their image (class centre), so the content test flags "
        "that group and searches neighbours for each of its members. With `--prompts K`: K prompt keys of two "
        "kinds (answers 0-3 / 4-7), the target under every prompt: the answer-reach rule names it, and with "
        "`--target existing` judges the members asked its own kind by their neighbours.",
        "",
        "| samples | features | embedding | target | prompts | seconds | peak RSS GB | input GB | flagged | recall | precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['samples']:,} | {r['features']:,} | {r['embedding']} | {r.get('target', 'phrase')} | {r.get('prompts', 0)} "
            f"| {r['seconds']} | {r['peak_rss_gb']} | {r['input_gb']} "
            f"| {r['flagged']:,} | {r['recall']} | {r['precision']} |"
        )
    write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
