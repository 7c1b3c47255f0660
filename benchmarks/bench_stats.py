"""Benchmark: bye_fast.stats.BimodalStats (streaming update + binned EM) vs scikit-learn.

BYE profiles every layer with ``GaussianMixture(n_components=2, random_state=0)`` on the raw
per-sample values (reference code, ``bye.py``). This times the streaming alternative on
``--rows x --features`` float32 values generated chunk by chunk (nothing of size rows x features
is ever held), and scikit-learn on ``--sk-features`` of those features (all rows), extrapolated
linearly to all features -- fitting 1,024 features of 1M rows with scikit-learn would take far too
long. It also reports how closely the two fits agree on that subset.

Data: entropy-like values in [0, log 576]. Every feature is N(m_f, s_f) with m_f in [3.5, 5.5] and
s_f in [0.1, 0.3]; every 8th feature (a "sensitive layer") instead has the same 10% of the rows
("poisoned samples") drawn from N(m_f - 1.5, 0.2).

    OMP_NUM_THREADS=1 python benchmarks/bench_stats.py            # defaults: 1M x 1024, 8 for sklearn
    python benchmarks/bench_stats.py --rows 100000 --features 64 --sk-features 4

Writes benchmarks/results/bench_stats.csv and .md and prints the markdown.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
from sklearn.mixture import GaussianMixture

from bye_fast.stats import BimodalStats
from bye_fast.stats import _default_threads as default_threads  # what fit(n_threads=None) uses

LO, HI = 0.0, float(np.log(576.0)) + 1e-6  # entropy over 576 image tokens lies in [0, log 576]
POISON_RATE = 0.1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def feature_params(n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.uniform(3.5, 5.5, n_features).astype(np.float32)
    sd = rng.uniform(0.1, 0.3, n_features).astype(np.float32)
    sensitive = np.arange(n_features) % 8 == 0
    return mean, sd, sensitive


def chunks(rows: int, chunk: int, n_features: int, seed: int):
    """Yield float32 (n, n_features) chunks; deterministic for a given seed."""
    mean, sd, sensitive = feature_params(n_features, seed)
    rng = np.random.default_rng(seed + 1)
    cols = np.flatnonzero(sensitive)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = rng.standard_normal((n, n_features), dtype=np.float32)
        x *= sd
        x += mean
        poisoned = np.flatnonzero(rng.random(n) < POISON_RATE)
        low = rng.standard_normal((poisoned.size, cols.size), dtype=np.float32) * np.float32(0.2)
        x[np.ix_(poisoned, cols)] = low + (mean[cols] - np.float32(1.5))
        yield x


def sk_subset(n_features: int, k: int) -> np.ndarray:
    """k features, half of them sensitive (bimodal), spread over the range."""
    _, _, sensitive = feature_params(n_features, 0)
    bi, uni = np.flatnonzero(sensitive), np.flatnonzero(~sensitive)
    n_bi = min(len(bi), k // 2)
    pick_bi = bi[np.linspace(0, len(bi) - 1, n_bi).astype(int)] if n_bi else bi[:0]
    pick_uni = uni[np.linspace(0, len(uni) - 1, k - n_bi).astype(int)]
    return np.sort(np.concatenate([pick_bi, pick_uni]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--sk-features", type=int, default=8, help="features fitted with scikit-learn (all rows)")
    ap.add_argument("--chunk", type=int, default=16384, help="rows per update() call")
    ap.add_argument("--bins", type=int, default=4096)
    ap.add_argument("--fit-threads", type=int, default=None, help="default: OMP_NUM_THREADS, else all cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    F, k = args.features, min(args.sk_features, args.features)
    subset = sk_subset(F, k)
    _, _, sensitive = feature_params(F, args.seed)

    # ---- bye_fast: stream the chunks, keep only the sklearn subset's raw values
    st = BimodalStats(F, LO, HI, bins=args.bins)
    raw = np.empty((args.rows, k), dtype=np.float32)
    t_gen = t_update = 0.0
    t0 = time.perf_counter()
    row = 0
    for x in chunks(args.rows, args.chunk, F, args.seed):
        t1 = time.perf_counter()
        st.update(x)
        t2 = time.perf_counter()
        t_update += t2 - t1
        raw[row : row + len(x)] = x[:, subset]
        row += len(x)
    t_gen = time.perf_counter() - t0 - t_update
    threads = args.fit_threads
    t1 = time.perf_counter()
    fit = st.fit(n_threads=threads)
    t_fit = time.perf_counter() - t1
    fit_threads = threads if threads is not None else default_threads()

    # ---- scikit-learn on the subset, one feature at a time (as the BYE reference code does)
    sk = []
    t1 = time.perf_counter()
    for j in range(k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = GaussianMixture(n_components=2, random_state=0).fit(raw[:, j : j + 1])
        o = np.argsort(g.means_.ravel())
        sk.append((g.weights_[o], g.means_.ravel()[o], np.sqrt(g.covariances_.ravel()[o])))
    t_sk = time.perf_counter() - t1
    t_sk_all = t_sk * F / k

    # ---- agreement on the subset
    bw = st.bin_width
    sk_w = np.array([s[0] for s in sk])
    sk_mu = np.array([s[1] for s in sk])
    sk_sd = np.array([s[2] for s in sk])
    dmu = np.abs(fit.means[subset] - sk_mu).max(axis=1) / bw
    dsd = np.abs(fit.stds[subset] - sk_sd).max(axis=1) / bw
    dw = np.abs(fit.weights[subset] - sk_w).max(axis=1)
    bi = sensitive[subset]
    sk_rule = np.abs(sk_mu[:, 1] - sk_mu[:, 0]) > 2 * (sk_sd[:, 0] + sk_sd[:, 1])  # bye.py's rule
    agree = int(np.sum(sk_rule == fit.sensitive()[subset]))
    found = fit.sensitive()
    n_vals = args.rows * F

    total = t_update + t_fit
    rows_out = [
        (
            "bye_fast",
            f"update, {args.chunk}-row float32 chunks",
            F,
            t_update,
            f"{n_vals / t_update / 1e6:.0f} Mvalues/s",
        ),
        (
            "bye_fast",
            f"fit, EM on {args.bins}-bin histograms, {fit_threads} thread(s)",
            F,
            t_fit,
            f"mean {fit.n_iter.mean():.0f} EM iterations; {int(fit.converged.sum())}/{F} converged "
            "(tol 1e-8)",
        ),
        ("bye_fast", "update + fit", F, total, f"state {F * args.bins * 8 / 2**20:.0f} MiB"),
        ("scikit-learn", "GaussianMixture(2, random_state=0), per feature", k, t_sk, "measured"),
        (
            "scikit-learn",
            "GaussianMixture(2, random_state=0), per feature",
            F,
            t_sk_all,
            f"EXTRAPOLATED linearly from {k} features",
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_stats.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "step", "rows", "features", "seconds", "note"])
        for method, step, feats, sec, note in rows_out:
            w.writerow([method, step, args.rows, feats, f"{sec:.3f}", note])
        w.writerow(
            [
                "ratio",
                "sklearn (extrapolated) / bye_fast update+fit",
                args.rows,
                F,
                f"{t_sk_all / total:.1f}",
                "",
            ]
        )
        w.writerow(
            [
                "agreement",
                "max |mean diff| / bin width, bimodal subset",
                args.rows,
                int(bi.sum()),
                f"{dmu[bi].max() if bi.any() else float('nan'):.3f}",
                "",
            ]
        )
        w.writerow(
            [
                "agreement",
                "max |mean diff| / bin width, unimodal subset",
                args.rows,
                int((~bi).sum()),
                f"{dmu[~bi].max() if (~bi).any() else float('nan'):.3f}",
                "",
            ]
        )

    env = (
        f"- Machine: {cpu_model()}, {usable_cores()} usable core(s) ({os.cpu_count()} logical CPUs); "
        f"{platform.system()} {platform.release()}\n"
        f"- Python {platform.python_version()}, numpy {np.__version__}, scikit-learn {sklearn.__version__}\n"
        f"- OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"bye_fast fit threads: {fit_threads}; update is single-threaded\n"
        f"- Data: {args.rows:,} rows x {F:,} features float32 (generated chunk by chunk, "
        f"{t_gen:.1f} s, not counted); histogram [{LO:g}, {HI:.4f}], {args.bins} bins, bin width {bw:.3g}\n"
    )
    lines = [
        "# bench_stats: streaming BimodalStats vs scikit-learn GaussianMixture",
        "",
        env,
        "| method | step | features | seconds | note |",
        "|---|---|---:|---:|---|",
    ]
    for method, step, feats, sec, note in rows_out:
        lines.append(f"| {method} | {step} | {feats:,} | {sec:.2f} | {note} |")
    lines.append(
        f"| ratio | sklearn (extrapolated) / bye_fast update + fit | {F:,} | {t_sk_all / total:.0f}x | |"
    )
    lines += [
        "",
        f"Fit agreement on the {k} scikit-learn features ({int(bi.sum())} bimodal, "
        f"{int((~bi).sum())} unimodal; components sorted by mean):",
        "",
        "| feature | bimodal | max abs mean diff / bin width | max abs std diff / bin width "
        "| max abs weight diff | separation (bye_fast) |",
        "|---:|:---:|---:|---:|---:|---:|",
    ]
    for j, f in enumerate(subset):
        lines.append(
            f"| {f} | {'yes' if bi[j] else 'no'} | {dmu[j]:.3f} | {dsd[j]:.3f} | {dw[j]:.2e} | "
            f"{fit.separation[f]:.2f} |"
        )
    lines += [
        "",
        f"- Sensitive-layer decisions (|mu1 - mu2| > 2 (s1 + s2)) agree on {agree}/{k} subset features; "
        f"bye_fast flags {int(found.sum())}/{F} features, {int((found == sensitive).sum())}/{F} match the "
        "generating design (every 8th feature bimodal).",
        "- Unimodal features: a 2-component fit of one Gaussian is weakly identified (flat likelihood), so "
        "the two methods stop at different points of the ridge (scikit-learn: tol 1e-3, <= 100 iterations; "
        "bye_fast: tol 1e-8, <= 200); their parameter differences are not binning error.",
        "- Wall-clock seconds of one run; on a shared machine expect some run-to-run variation. scikit-learn "
        "needs every feature's raw values in memory (rows x 4 bytes each); bye_fast keeps features x bins "
        "int64 counts plus a few float64 per feature.",
    ]
    md = "\n".join(lines) + "\n"
    (args.out / "bench_stats.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
