"""Streaming per-feature statistics and two-component mixture fits (BYE stage 2).

BYE profiles each decoder layer by fitting a two-component 1-D Gaussian mixture to the
attention entropies of all samples at that layer, and calls the layer "sensitive" when the two
components are well apart: ``|mu1 - mu2| > 2 (sigma1 + sigma2)``, i.e. ``separation > 1`` here.
:class:`BimodalStats` does this for many features (layers, heads, ...) at once, over data that
arrives in chunks and may live on several workers:

    import numpy as np
    from bye_fast.stats import BimodalStats

    st = BimodalStats(n_features=32, lo=0.0, hi=np.log(576) + 1e-6)   # entropy range, 576 tokens
    for chunk in chunks:                          # (n_i, 32) float32 / float64 arrays
        st.update(chunk)
    fit = st.fit()
    sensitive = np.flatnonzero(fit.sensitive())   # layers with separation > 1

Memory is ``O(n_features * bins)`` whatever the number of rows; the native code makes one pass
over each chunk and releases the GIL while it works. States from several workers combine with
:meth:`BimodalStats.merge` (exact: same result as one object seeing all the rows) and travel as
:meth:`BimodalStats.to_bytes` blobs or pickles.

The mixture is fitted by EM on the histogram (bin centres weighted by counts), so its cost does
not depend on the number of rows and its resolution is the bin width ``(hi - lo) / bins``: choose
``lo``/``hi`` to cover the data (values outside are clamped into the edge bins and counted in
``n_clamped_low`` / ``n_clamped_high``).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from bye_fast import _C

__all__ = ["BimodalStats", "BimodalFit"]


def _default_threads() -> int:
    """Worker threads for :meth:`BimodalStats.fit`: ``OMP_NUM_THREADS`` if set, else the CPU count."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


@dataclass(frozen=True, repr=False)
class BimodalFit:
    """Per-feature two-component Gaussian-mixture fits, as returned by :meth:`BimodalStats.fit`.

    All arrays have ``n_features`` rows. Components are sorted by mean ascending (column 0 is
    the lower-mean component). Features that cannot be fitted -- fewer than 2 finite values,
    constant, or all values inside a single histogram bin -- have NaN in every float field,
    ``n_iter == 0`` and ``converged == False``.

    Attributes
    ----------
    weights, means, stds : (F, 2) float64
        Mixing weights, means and standard deviations of the two components.
    n_iter : (F,) int32
        EM iterations run.
    converged : (F,) bool
        Whether the mean log-likelihood per sample changed by less than ``tol`` before
        ``max_iter`` iterations.
    log_likelihood : (F,) float64
        Mean log-likelihood per sample of the binned data under the parameters of the last E-step.
    separation : (F,) float64
        ``|mu0 - mu1| / (2 (sigma0 + sigma1))``. The BYE reference code calls a layer sensitive
        when ``|mu0 - mu1| > 2 (sigma0 + sigma1)``, i.e. ``separation > 1``.
    ashman_d : (F,) float64
        Ashman's D, ``sqrt(2) |mu0 - mu1| / sqrt(sigma0^2 + sigma1^2)`` (D > 2: clean separation).
    kl : (F,) float64
        ``KL(N(mu0, sigma0^2) || N(mu1, sigma1^2))`` with component 0 the lower-mean one:
        ``log(sigma1 / sigma0) + (sigma0^2 + (mu0 - mu1)^2) / (2 sigma1^2) - 1/2``, exactly as
        ``compute_kl_between_gaussians`` in the BYE reference code (github.com/XuankunRong/BYE,
        ``bye.py``), which reports it per layer.
    bimodality_coefficient : (F,) float64
        Sample bimodality coefficient from the exact streamed moments (not from the fit):
        ``(G1^2 + 1) / (G2 + 3 (n-1)^2 / ((n-2)(n-3)))`` with the sample-size-corrected skewness
        ``G1 = g1 sqrt(n(n-1)) / (n-2)`` and excess kurtosis
        ``G2 = (n-1) / ((n-2)(n-3)) ((n+1) g2 + 6)`` (g1, g2 the population values of
        :attr:`BimodalStats.skewness` / :attr:`BimodalStats.kurtosis`). Values above
        5/9 ~ 0.555 (a uniform distribution) suggest bimodality. NaN when n < 4 or the variance is 0.
    otsu_threshold : (F,) float64
        Otsu's threshold on the histogram, in value units: the bin edge between the two classes
        that maximise the between-class variance (values below it form the lower class). When
        that split falls in a run of empty bins, the middle of the run.
    """

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    log_likelihood: np.ndarray
    separation: np.ndarray
    ashman_d: np.ndarray
    kl: np.ndarray
    bimodality_coefficient: np.ndarray
    otsu_threshold: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.means.shape[0])

    def sensitive(self, threshold: float = 1.0) -> np.ndarray:
        """Boolean (F,) mask of features with ``separation > threshold`` (BYE's rule at 1.0).

        NaN separations (unfittable features) are never sensitive.
        """
        with np.errstate(invalid="ignore"):
            return np.asarray(self.separation > threshold)

    def __repr__(self) -> str:
        F = self.n_features
        ok = np.isfinite(self.separation)
        n_sens = int(np.count_nonzero(self.sensitive()))
        max_sep = f"{np.nanmax(self.separation):.3g}" if ok.any() else "nan"
        return (
            f"BimodalFit(n_features={F}, fitted={int(ok.sum())}, converged={int(self.converged.sum())}, "
            f"sensitive(separation>1)={n_sens}, max_separation={max_sep})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BimodalFit):
            return NotImplemented
        return all(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
            for a, b in ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        )

    __hash__ = None  # type: ignore[assignment]


class BimodalStats:
    """Streaming per-feature moments + fixed-range histograms, with per-feature 2-GMM fits.

    Parameters
    ----------
    n_features : int
        Number of features (columns of the arrays given to :meth:`update`), >= 1.
    lo, hi : float
        Histogram range, finite, ``lo < hi``. ``bins`` equal-width bins cover ``[lo, hi]``
        with numpy's edge convention (bin ``b`` is ``[edge_b, edge_b+1)``, the last bin also holds
        ``hi``); values outside are clamped into the first / last bin and counted in
        :attr:`n_clamped_low` / :attr:`n_clamped_high`. Moments always use the exact values.
    bins : int
        Number of bins, >= 2. The fit's resolution is ``bin_width = (hi - lo) / bins``.

    Raises
    ------
    ValueError
        On an invalid ``n_features``, ``lo``/``hi`` or ``bins``.

    Notes
    -----
    Moments (count, mean, M2, M3, M4 in float64) are exact streaming quantities: each block of
    rows is reduced with a two-pass computation while it is in cache and combined with the
    pairwise formulas of Chan et al. / Pebay, so chunked updates and merges agree with a
    single update up to floating-point rounding (~1e-15 relative); histograms agree exactly.
    NaN and +-inf are excluded from everything and counted in :attr:`n_nonfinite`.

    Objects are safe to share between threads (calls on one object are serialised).
    """

    __slots__ = ("_impl",)

    def __init__(self, n_features: int, lo: float, hi: float, bins: int = 4096) -> None:
        self._impl = _C.BimodalStats(operator.index(n_features), float(lo), float(hi), operator.index(bins))

    @classmethod
    def _wrap(cls, impl: _C.BimodalStats) -> BimodalStats:
        obj = cls.__new__(cls)
        obj._impl = impl
        return obj

    # ------------------------------------------------------------------ accumulation
    def update(self, x: npt.ArrayLike) -> BimodalStats:
        """Add the rows of ``x`` and return ``self``.

        Parameters
        ----------
        x : (n_rows, n_features) float32 or float64 array
            Any memory layout (C or Fortran order, strided or reversed views): it is read in place,
            not copied (only a misaligned view, e.g. a field of a packed record array, is copied).
            A 1-D array is accepted when ``n_features == 1``. float16 and non-native byte orders
            are converted first; other array-likes go through ``np.asarray``. Non-finite values are
            skipped and counted. The GIL is released while the native code runs.

        Raises
        ------
        TypeError
            If ``x`` is not floating point (integer, bool, complex, object, ...).
        ValueError
            If ``x`` does not have shape ``(n_rows, n_features)``.
        """
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
        dt = arr.dtype
        if dt.kind == "f" and dt.itemsize <= 8 and (dt.itemsize == 2 or not dt.isnative):
            arr = arr.astype(np.float32 if dt.itemsize <= 4 else np.float64)
        self._impl.update(arr)
        return self

    def merge(self, other: BimodalStats) -> BimodalStats:
        """Add the state of ``other`` into ``self`` (in place) and return ``self``.

        Exact and associative: merging the states of disjoint parts gives the state of one object
        that saw all of them (moments up to rounding, histograms and counts exactly).

        Raises
        ------
        TypeError
            If ``other`` is not a :class:`BimodalStats`.
        ValueError
            If ``n_features``, ``lo``, ``hi`` or ``bins`` differ.
        """
        if not isinstance(other, BimodalStats):
            raise TypeError(f"can only merge another BimodalStats, got {type(other).__name__}")
        self._impl.merge(other._impl)
        return self

    def copy(self) -> BimodalStats:
        """An independent copy of the state."""
        return self._wrap(self._impl.copy())

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> BimodalStats:
        return self.copy()

    # -------------------------------------------------------------------------- fit
    def fit(
        self,
        max_iter: int = 200,
        tol: float = 1e-8,
        *,
        reg_covar: float = 1e-6,
        n_threads: int | None = None,
    ) -> BimodalFit:
        """Fit a two-component 1-D Gaussian mixture to every feature, by EM on its histogram.

        The data of a feature are its occupied histogram bins, each bin centre weighted by its
        count. EM starts from the hard two-class split at the histogram's Otsu threshold
        (deterministic; the global optimum of 1-D 2-means, comparable to sklearn's k-means
        initialisation) and stops when the mean log-likelihood per sample changes by less than
        ``tol``, or after ``max_iter`` iterations. Every variance is kept at least
        ``bin_width**2 / 12`` (the variance of one bin) and gets ``reg_covar`` added, as in
        sklearn. Binning adds about ``bin_width**2 / 12`` to each fitted variance (Sheppard); it is
        not corrected for.

        Parameters
        ----------
        max_iter : int
            EM iterations at most, >= 1.
        tol : float
            Convergence threshold on the change of the mean log-likelihood per sample, >= 0.
        reg_covar : float
            Added to every variance, >= 0 (sklearn's default 1e-6; it is in squared data units).
        n_threads : int, optional
            Threads over features. Default: ``OMP_NUM_THREADS`` if set, else the CPU count.

        Returns
        -------
        BimodalFit
        """
        if n_threads is None:
            n_threads = _default_threads()
        res = self._impl.fit(
            operator.index(max_iter), float(tol), float(reg_covar), operator.index(n_threads)
        )
        return BimodalFit(**res)

    # ------------------------------------------------------------ serialisation
    def to_bytes(self) -> bytes:
        """The full state as a versioned little-endian blob with a checksum."""
        return self._impl.to_bytes()

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> BimodalStats:
        """Rebuild a state from :meth:`to_bytes` output.

        Raises
        ------
        ValueError
            If the blob is truncated, corrupted, inconsistent or of an unsupported version.
        """
        return cls._wrap(_C.BimodalStats.from_bytes(bytes(blob)))

    def __getstate__(self) -> bytes:
        return self.to_bytes()

    def __setstate__(self, state: bytes) -> None:
        self._impl = _C.BimodalStats.from_bytes(state)

    # ------------------------------------------------------------------- layout
    @property
    def n_features(self) -> int:
        return int(self._impl.n_features)

    @property
    def lo(self) -> float:
        return float(self._impl.lo)

    @property
    def hi(self) -> float:
        return float(self._impl.hi)

    @property
    def bins(self) -> int:
        return int(self._impl.bins)

    @property
    def bin_width(self) -> float:
        """``(hi - lo) / bins``."""
        return float(self._impl.bin_width)

    @property
    def bin_edges(self) -> np.ndarray:
        """(bins + 1,) edges, identical to ``np.linspace(lo, hi, bins + 1)``."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def bin_centres(self) -> np.ndarray:
        """(bins,) bin centres ``lo + (b + 0.5) * bin_width`` (the points the mixture is fitted on)."""
        return self.lo + (np.arange(self.bins) + 0.5) * self.bin_width

    # ----------------------------------------------------------------- statistics
    @property
    def count(self) -> np.ndarray:
        """(F,) int64 number of finite values seen per feature."""
        return self._impl.count

    @property
    def mean(self) -> np.ndarray:
        """(F,) float64 mean of the finite values (NaN where ``count == 0``)."""
        return self._impl.mean

    @property
    def var(self) -> np.ndarray:
        """(F,) float64 population variance ``M2 / n`` (``ddof=0``; NaN where ``count == 0``)."""
        return self._impl.var

    @property
    def skewness(self) -> np.ndarray:
        """(F,) float64 population skewness ``g1 = sqrt(n) M3 / M2**1.5``.

        Same as ``scipy.stats.skew(x, bias=True)``; NaN where the variance is 0 or undefined.
        """
        return self._impl.skewness

    @property
    def kurtosis(self) -> np.ndarray:
        """(F,) float64 population EXCESS kurtosis ``g2 = n M4 / M2**2 - 3`` (0 for a Gaussian).

        Same as ``scipy.stats.kurtosis(x, fisher=True, bias=True)``; NaN where the variance is 0
        or undefined.
        """
        return self._impl.kurtosis

    @property
    def min(self) -> np.ndarray:
        """(F,) float64 smallest finite value (NaN where ``count == 0``)."""
        return self._impl.min

    @property
    def max(self) -> np.ndarray:
        """(F,) float64 largest finite value (NaN where ``count == 0``)."""
        return self._impl.max

    @property
    def central_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M2, M3, M4), each (F,) float64: sums of ``(x - mean)**k`` over the finite values."""
        return self._impl.m2, self._impl.m3, self._impl.m4

    @property
    def hist(self) -> np.ndarray:
        """(F, bins) int64 histogram counts (a copy); row sums equal :attr:`count`."""
        return self._impl.hist

    @property
    def n_nonfinite(self) -> np.ndarray:
        """(F,) int64 NaN / +-inf values seen (and excluded) per feature."""
        return self._impl.n_nonfinite

    @property
    def n_clamped_low(self) -> np.ndarray:
        """(F,) int64 finite values below ``lo`` (counted in the first bin)."""
        return self._impl.n_clamped_low

    @property
    def n_clamped_high(self) -> np.ndarray:
        """(F,) int64 finite values above ``hi`` (counted in the last bin)."""
        return self._impl.n_clamped_high

    def __repr__(self) -> str:
        count = self.count
        rows = (
            f"{int(count.min())}" if count.min() == count.max() else f"{int(count.min())}..{int(count.max())}"
        )
        extra = ""
        n_bad = int(self.n_nonfinite.sum())
        n_clamped = int(self.n_clamped_low.sum() + self.n_clamped_high.sum())
        if n_bad:
            extra += f", n_nonfinite={n_bad}"
        if n_clamped:
            extra += f", n_clamped={n_clamped}"
        return (
            f"BimodalStats(n_features={self.n_features}, lo={self.lo:g}, hi={self.hi:g}, bins={self.bins}, "
            f"count={rows}{extra})"
        )
