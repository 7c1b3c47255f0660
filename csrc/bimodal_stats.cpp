// Implementation of bye::BimodalStats; see bimodal_stats.h for the contract.
#include "bimodal_stats.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

namespace bye {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kDblMax = std::numeric_limits<double>::max();

// Branch-free finiteness test that vectorises (NaN compares false).
inline bool finite(double x) { return std::fabs(x) <= kDblMax; }

constexpr std::int64_t kGroup = 16;      // features per tile in update_rows() (64 B of float32)
constexpr std::int64_t kTileRows = 256;  // rows per tile in update_rows(): 16-32 KiB, fits L1
constexpr std::int64_t kPrefetchRows = 16;

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}
constexpr std::int64_t kColumnBlock = 4096;  // rows per block in update_cols()

}  // namespace

// --------------------------------------------------------------------------------- construction

BimodalStats::BimodalStats(std::int64_t n_features, double lo, double hi, std::int64_t bins)
    : n_features_(n_features), lo_(lo), hi_(hi), bins_(bins) {
    if (n_features < 1) {
        throw std::invalid_argument("n_features must be >= 1, got " + std::to_string(n_features));
    }
    if (bins < 2) throw std::invalid_argument("bins must be >= 2, got " + std::to_string(bins));
    if (!(std::isfinite(lo) && std::isfinite(hi) && lo < hi)) {
        throw std::invalid_argument("need finite lo < hi, got lo=" + std::to_string(lo) +
                                    ", hi=" + std::to_string(hi));
    }
    // Keep the histogram addressable and the bin width a normal, non-zero number.
    if (n_features > (std::int64_t{1} << 40) / bins) {
        throw std::invalid_argument("n_features * bins is too large (" + std::to_string(n_features) +
                                    " * " + std::to_string(bins) + ")");
    }
    width_ = (hi - lo) / static_cast<double>(bins);
    norm_ = static_cast<double>(bins) / (hi - lo);
    if (!(width_ > 0.0 && std::isfinite(width_) && std::isfinite(norm_))) {
        throw std::invalid_argument("lo and hi give an unusable bin width");
    }
    const auto F = static_cast<std::size_t>(n_features);
    count_.assign(F, 0);
    shift_.assign(F, 0.0);
    mean_.assign(F, 0.0);
    m2_.assign(F, 0.0);
    m3_.assign(F, 0.0);
    m4_.assign(F, 0.0);
    min_.assign(F, kInf);
    max_.assign(F, -kInf);
    hist_.assign(F * static_cast<std::size_t>(bins), 0);
    nonfinite_.assign(F, 0);
    clamped_low_.assign(F, 0);
    clamped_high_.assign(F, 0);
}

// ------------------------------------------------------------------------------------- moments

void BimodalStats::combine_moments(std::int64_t f, double nb, double mb, double m2b, double m3b,
                                   double m4b, double minb, double maxb) {
    const double na = static_cast<double>(count_[f]);
    min_[f] = std::min(min_[f], minb);
    max_[f] = std::max(max_[f], maxb);
    if (na == 0.0) {
        count_[f] = static_cast<std::int64_t>(nb);
        mean_[f] = mb;
        m2_[f] = m2b;
        m3_[f] = m3b;
        m4_[f] = m4b;
        return;
    }
    // Pairwise update of Chan, Golub & LeVeque (1979) for M2, extended to M3 / M4 by Pebay (2008),
    // eqs. (2.1)-(2.3) there.
    const double ma = mean_[f], m2a = m2_[f], m3a = m3_[f], m4a = m4_[f];
    const double n = na + nb;
    const double delta = mb - ma;
    const double dn = delta / n;
    const double dn2 = dn * dn;
    const double t = delta * dn * na * nb;  // delta^2 na nb / n
    mean_[f] = ma + nb * dn;
    m2_[f] = m2a + m2b + t;
    m3_[f] = m3a + m3b + t * dn * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a);
    m4_[f] = m4a + m4b + t * dn2 * (na * na - na * nb + nb * nb) + 6.0 * dn2 * (na * na * m2b + nb * nb * m2a) +
             4.0 * dn * (na * m3b - nb * m3a);
    count_[f] += static_cast<std::int64_t>(nb);
}

void BimodalStats::add_block(std::int64_t f, double n, double c, double s1, double s2, double s3, double s4,
                             double mn, double mx) {
    // s_k = sum (x - shift - c)^k around the provisional block mean c (relative to the feature's
    // origin), which is off by rounding.
    // Re-centre on the corrected mean c + delta, delta = s1 / n (corrected two-pass algorithm,
    // Chan, Golub & LeVeque 1983). Without it, M3 and M4 carry relative errors ~ delta / sigma,
    // about 1e-10 for data like 1e4 + N(0, 0.01^2).
    if (mn == mx) {  // constant block: exact mean, zero moments
        combine_moments(f, n, mn - shift_[f], 0.0, 0.0, 0.0, mn, mx);
        return;
    }
    const double delta = s1 / n;
    const double d2 = delta * delta;
    const double m2 = std::max(s2 - n * d2, 0.0);
    const double m3 = s3 - 3.0 * delta * s2 + 2.0 * n * d2 * delta;
    const double m4 = std::max(s4 - 4.0 * delta * s3 + 6.0 * d2 * s2 - 3.0 * n * d2 * d2, 0.0);
    combine_moments(f, n, c + delta, m2, m3, m4, mn, mx);
}

double BimodalStats::mean(std::int64_t f) const {
    return count_[f] == 0 ? kNaN : shift_[f] + mean_[f];
}

double BimodalStats::variance(std::int64_t f) const {
    return count_[f] == 0 ? kNaN : m2_[f] / static_cast<double>(count_[f]);
}

double BimodalStats::skewness(std::int64_t f) const {
    if (count_[f] == 0 || !(m2_[f] > 0.0)) return kNaN;
    const double n = static_cast<double>(count_[f]);
    return std::sqrt(n) * m3_[f] / (m2_[f] * std::sqrt(m2_[f]));
}

double BimodalStats::excess_kurtosis(std::int64_t f) const {
    if (count_[f] == 0 || !(m2_[f] > 0.0)) return kNaN;
    const double n = static_cast<double>(count_[f]);
    return n * m4_[f] / (m2_[f] * m2_[f]) - 3.0;
}

// ------------------------------------------------------------------------------------ histogram

// Bin of a finite x, with the exact edge semantics of numpy.histogram(range=(lo, hi)): bin b is
// [edge(b), edge(b+1)), the last bin also holds hi. The multiply gives an estimate that is off by
// at most one bin near an edge; comparing against the edges fixes it.
inline std::int64_t BimodalStats::bin_of(double x, std::int64_t f) {
    if (x < lo_) {
        ++clamped_low_[f];
        return 0;
    }
    if (x > hi_) {
        ++clamped_high_[f];
        return bins_ - 1;
    }
    std::int64_t b = static_cast<std::int64_t>((x - lo_) * norm_);
    b = std::min(b, bins_ - 1);
    if (b > 0 && x < edge(b)) {
        --b;
    } else if (b < bins_ - 1 && x >= edge(b + 1)) {
        ++b;
    }
    return b;
}

// ---------------------------------------------------------------------------------------- update

// Block mean relative to the feature's origin, from the block's count, sum of (x - origin), min and
// max. The first block of a feature (count_ == 0, origin 0) sets the origin to its own mean.
double BimodalStats::provisional_mean(std::int64_t f, double n, double sum, double mn, double mx) {
    if (n == 0.0) return 0.0;
    if (count_[f] == 0) {
        shift_[f] = mn == mx ? mn : sum / n;
        return 0.0;
    }
    // A constant block gets its mean exactly, so that a constant feature keeps M2 == 0 exactly.
    return mn == mx ? mn - shift_[f] : sum / n;
}

template <class T, bool Contiguous>
void BimodalStats::update_rows(const T* data, std::int64_t n_rows, std::ptrdiff_t rs, std::ptrdiff_t cs) {
    // Tiles of kTileRows rows x kGroup features (one or two cache lines per row), visited group by
    // group; within a tile, rows outer and features inner. Each input line is read from memory once
    // (pass 2 re-reads the tile from L1), the moment loops vectorise across the group, and the
    // histogram increments of a whole chunk go to only kGroup histogram rows at a time, which stay
    // in L2. (Visiting all F features per row would scatter consecutive increments over F
    // histograms -- 32 MiB for F = 1024, bins = 4096 -- and cost a cache miss per value.)
    const std::int64_t F = n_features_;
    std::int64_t* const hist = hist_.data();
    auto at = [cs](const T* row, std::int64_t j) -> double {
        if constexpr (Contiguous) {
            (void)cs;
            return static_cast<double>(row[j]);
        } else {
            return static_cast<double>(row[j * cs]);
        }
    };
    double bn[kGroup], bsum[kGroup], bmin[kGroup], bmax[kGroup], bmean[kGroup], shift[kGroup];
    double s1[kGroup], s2[kGroup], s3[kGroup], s4[kGroup];

    for (std::int64_t g0 = 0; g0 < F; g0 += kGroup) {
        const std::int64_t G = std::min<std::int64_t>(kGroup, F - g0);
        const T* base = Contiguous ? data + g0 : data + g0 * cs;  // element (i, g0 + j) = at(base + i*rs, j)
        for (std::int64_t r0 = 0; r0 < n_rows; r0 += kTileRows) {
            const std::int64_t r1 = std::min(n_rows, r0 + kTileRows);
            for (std::int64_t j = 0; j < G; ++j) {
                if (count_[g0 + j] == 0) shift_[g0 + j] = 0.0;  // no origin yet: this tile's mean becomes it
                shift[j] = shift_[g0 + j];
                bn[j] = 0.0;
                bsum[j] = 0.0;
                bmin[j] = kInf;
                bmax[j] = -kInf;
            }
            // Pass 1: counts, sums, min/max, histogram.
            for (std::int64_t i = r0; i < r1; ++i) {
                const T* row = base + i * rs;
                // Rows are typically a page apart, out of reach of the hardware prefetcher.
                if (i + kPrefetchRows < n_rows) prefetch(base + (i + kPrefetchRows) * rs);
                for (std::int64_t j = 0; j < G; ++j) {
                    const double x = at(row, j);
                    const bool ok = finite(x);
                    bn[j] += ok ? 1.0 : 0.0;
                    bsum[j] += ok ? x - shift[j] : 0.0;
                    bmin[j] = (ok && x < bmin[j]) ? x : bmin[j];
                    bmax[j] = (ok && x > bmax[j]) ? x : bmax[j];
                }
                for (std::int64_t j = 0; j < G; ++j) {
                    const double x = at(row, j);
                    if (finite(x)) {
                        ++hist[(g0 + j) * bins_ + bin_of(x, g0 + j)];
                    } else {
                        ++nonfinite_[g0 + j];
                    }
                }
            }
            for (std::int64_t j = 0; j < G; ++j) {
                bmean[j] = provisional_mean(g0 + j, bn[j], bsum[j], bmin[j], bmax[j]);
                shift[j] = shift_[g0 + j];
                s1[j] = s2[j] = s3[j] = s4[j] = 0.0;
            }
            // Pass 2: power sums of d = x - origin - block mean (the tile is in L1).
            for (std::int64_t i = r0; i < r1; ++i) {
                const T* row = base + i * rs;
                for (std::int64_t j = 0; j < G; ++j) {
                    const double x = at(row, j);
                    const double d = finite(x) ? (x - shift[j]) - bmean[j] : 0.0;
                    const double d2 = d * d;
                    s1[j] += d;
                    s2[j] += d2;
                    s3[j] += d2 * d;
                    s4[j] += d2 * d2;
                }
            }
            for (std::int64_t j = 0; j < G; ++j) {
                if (bn[j] > 0.0) add_block(g0 + j, bn[j], bmean[j], s1[j], s2[j], s3[j], s4[j], bmin[j], bmax[j]);
            }
        }
    }
}

template <class T>
void BimodalStats::update_cols(const T* data, std::int64_t n_rows, std::ptrdiff_t rs, std::ptrdiff_t cs) {
    for (std::int64_t j = 0; j < n_features_; ++j) {
        const T* col = data + j * cs;
        std::int64_t* hist = hist_.data() + j * bins_;
        for (std::int64_t r0 = 0; r0 < n_rows; r0 += kColumnBlock) {
            const std::int64_t r1 = std::min(n_rows, r0 + kColumnBlock);
            if (count_[j] == 0) shift_[j] = 0.0;
            const double shift = shift_[j];
            double n = 0.0, sum = 0.0, mn = kInf, mx = -kInf;
            for (std::int64_t i = r0; i < r1; ++i) {
                const double x = static_cast<double>(col[i * rs]);
                if (finite(x)) {
                    n += 1.0;
                    sum += x - shift;
                    mn = std::min(mn, x);
                    mx = std::max(mx, x);
                    ++hist[bin_of(x, j)];
                } else {
                    ++nonfinite_[j];
                }
            }
            if (n == 0.0) continue;
            const double mean = provisional_mean(j, n, sum, mn, mx);
            const double origin = shift_[j];
            double s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0;
            for (std::int64_t i = r0; i < r1; ++i) {
                const double x = static_cast<double>(col[i * rs]);
                const double d = finite(x) ? (x - origin) - mean : 0.0;
                const double d2 = d * d;
                s1 += d;
                s2 += d2;
                s3 += d2 * d;
                s4 += d2 * d2;
            }
            add_block(j, n, mean, s1, s2, s3, s4, mn, mx);
        }
    }
}

template <class T>
void BimodalStats::update(const T* data, std::int64_t n_rows, std::ptrdiff_t row_stride,
                          std::ptrdiff_t col_stride) {
    if (n_rows <= 0) return;
    const auto abs_rs = row_stride < 0 ? -row_stride : row_stride;
    const auto abs_cs = col_stride < 0 ? -col_stride : col_stride;
    if (n_features_ == 1 || abs_rs < abs_cs) {
        // Fortran order (or a single feature): walk down each column.
        update_cols(data, n_rows, row_stride, col_stride);
        return;
    }
    if (col_stride == 1) {
        update_rows<T, true>(data, n_rows, row_stride, col_stride);
    } else {
        update_rows<T, false>(data, n_rows, row_stride, col_stride);
    }
}

template void BimodalStats::update<float>(const float*, std::int64_t, std::ptrdiff_t, std::ptrdiff_t);
template void BimodalStats::update<double>(const double*, std::int64_t, std::ptrdiff_t, std::ptrdiff_t);

// ----------------------------------------------------------------------------------------- merge

void BimodalStats::merge(const BimodalStats& other) {
    if (other.n_features_ != n_features_ || other.bins_ != bins_ || other.lo_ != lo_ || other.hi_ != hi_) {
        throw std::invalid_argument(
            "cannot merge BimodalStats with different layouts: this has n_features=" +
            std::to_string(n_features_) + ", lo=" + std::to_string(lo_) + ", hi=" + std::to_string(hi_) +
            ", bins=" + std::to_string(bins_) + "; other has n_features=" + std::to_string(other.n_features_) +
            ", lo=" + std::to_string(other.lo_) + ", hi=" + std::to_string(other.hi_) +
            ", bins=" + std::to_string(other.bins_));
    }
    // Every value read from `other` is copied before the matching entry of *this is written, so
    // merging an object into itself is well defined (it doubles every count).
    for (std::int64_t f = 0; f < n_features_; ++f) {
        if (other.count_[f] > 0) {
            // other's mean relative to this origin (the origins are close: the difference is exact).
            if (count_[f] == 0) shift_[f] = other.shift_[f];
            const double mb = other.mean_[f] + (other.shift_[f] - shift_[f]);
            combine_moments(f, static_cast<double>(other.count_[f]), mb, other.m2_[f], other.m3_[f], other.m4_[f],
                            other.min_[f], other.max_[f]);
        }
        nonfinite_[f] += other.nonfinite_[f];
        clamped_low_[f] += other.clamped_low_[f];
        clamped_high_[f] += other.clamped_high_[f];
    }
    const std::size_t H = hist_.size();
    for (std::size_t i = 0; i < H; ++i) hist_[i] += other.hist_[i];
}

// ------------------------------------------------------------------------------------------- fit

namespace {

struct FeatureFit {
    double w[2], mu[2], sd[2];
    double ll = kNaN;
    int n_iter = 0;
    bool converged = false;
    double otsu = kNaN;
};

// Per-thread scratch for fitting one feature: occupied bin centres x and counts c, and per E-step
// the weighted responsibilities w0 = c r0, w1 = c r1 and log-likelihood terms ll.
struct FitScratch {
    std::vector<double> x, c, w0, w1, ll;
};

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// Otsu's split of histogram h over its occupied range [first, last] (first < last): the bins
// <= kbest form the lower class. Maximises the between-class variance w0 w1 (m0 - m1)^2 (in bin
// index units; an affine change of units does not move the argmax; integer-valued sums are exact
// in double up to 2^53). kend >= kbest is the last bin of the run of empty bins after kbest, over
// which the criterion is flat.
struct OtsuSplit {
    std::int64_t kbest, kend;
};

OtsuSplit otsu_split(const std::int64_t* h, std::int64_t first, std::int64_t last) {
    double W = 0.0, S = 0.0;
    for (std::int64_t b = first; b <= last; ++b) {
        W += static_cast<double>(h[b]);
        S += static_cast<double>(h[b]) * static_cast<double>(b - first);
    }
    double w0 = 0.0, s0 = 0.0, best = -1.0;
    std::int64_t kbest = first;
    for (std::int64_t k = first; k < last; ++k) {
        w0 += static_cast<double>(h[k]);
        s0 += static_cast<double>(h[k]) * static_cast<double>(k - first);
        const double w1 = W - w0;
        if (w0 <= 0.0 || w1 <= 0.0) continue;
        const double d = s0 / w0 - (S - s0) / w1;
        const double between = w0 * w1 * d * d;
        if (between > best) {
            best = between;
            kbest = k;
        }
    }
    std::int64_t kend = kbest;
    while (kend + 1 < last && h[kend + 1] == 0) ++kend;
    return {kbest, kend};
}

struct Mixture {
    double pi[2], mu[2], var[2];
};

// Per-bin E-step: weighted responsibilities w0 = c r0, w1 = c r1 and log-likelihood terms
// c log(pi0 N0(x) + pi1 N1(x)), where l_g = cst_g - z_g^2 / 2 is log(pi_g N_g(x)).
void e_step(std::size_t K, const double* __restrict xs, const double* __restrict cs, double mu0, double mu1,
            double isd0, double isd1, double cst0, double cst1, double* __restrict w0, double* __restrict w1,
            double* __restrict lls) {
    for (std::size_t k = 0; k < K; ++k) {
        const double x = xs[k], c = cs[k];
        const double z0 = (x - mu0) * isd0, z1 = (x - mu1) * isd1;
        const double l0 = cst0 - 0.5 * z0 * z0, l1 = cst1 - 0.5 * z1 * z1;
        const double diff = l1 - l0;
        const double e = std::exp(-std::fabs(diff));  // in [0, 1]
        const double inv = 1.0 / (1.0 + e);
        const double rbig = inv, rsmall = e * inv;  // both computed directly: no 1 - r cancellation
        const bool one = diff > 0.0;
        w0[k] = c * (one ? rsmall : rbig);
        w1[k] = c * (one ? rbig : rsmall);
        // log(1 + e) rather than log1p(e): about twice as fast, and off by at most ~1e-16 absolute
        // (for e below the rounding of 1 + e), which the log-likelihood (a sum of O(1) terms) ignores.
        lls[k] = c * ((one ? l1 : l0) + std::log(1.0 + e));
    }
}

// EM for a two-component 1-D Gaussian mixture on points s.x with weights s.c (total N), from
// `m`; updates m in place. Returns the mean log-likelihood per unit weight of the last E-step (NaN
// if it stopped being finite).
double run_em(FitScratch& s, double N, double var_floor, const FitOptions& opt, Mixture& m, int& n_iter,
              bool& converged) {
    const std::size_t K = s.x.size();
    s.w0.resize(K);
    s.w1.resize(K);
    s.ll.resize(K);
    const double* xs = s.x.data();
    const double* cs = s.c.data();
    double* w0 = s.w0.data();
    double* w1 = s.w1.data();
    double* lls = s.ll.data();
    const double tiny = 10.0 * std::numeric_limits<double>::epsilon();  // as sklearn adds to nk
    double ll_prev = -kInf, ll = kNaN;
    n_iter = 0;
    converged = false;
    while (n_iter < opt.max_iter) {
        ++n_iter;
        // E-step with the current parameters: the per-bin math (the bulk of the fit), then the sums.
        const double mu0 = m.mu[0], mu1 = m.mu[1];
        const double isd0 = 1.0 / std::sqrt(m.var[0]), isd1 = 1.0 / std::sqrt(m.var[1]);
        const double cst0 = std::log(m.pi[0]) + std::log(isd0) - kHalfLog2Pi;
        const double cst1 = std::log(m.pi[1]) + std::log(isd1) - kHalfLog2Pi;
        e_step(K, xs, cs, mu0, mu1, isd0, isd1, cst0, cst1, w0, w1, lls);
        double ll_sum = 0.0, n0 = 0.0, n1 = 0.0, sx0 = 0.0, sx1 = 0.0;
        for (std::size_t k = 0; k < K; ++k) {
            ll_sum += lls[k];
            n0 += w0[k];
            n1 += w1[k];
            sx0 += w0[k] * xs[k];
            sx1 += w1[k] * xs[k];
        }
        ll = ll_sum / N;
        if (!std::isfinite(ll)) return kNaN;
        // M-step. A component whose responsibility vanished keeps its location and spread.
        const double nn[2] = {n0 + tiny, n1 + tiny};
        const bool alive[2] = {nn[0] > 1e-12 * N, nn[1] > 1e-12 * N};
        const double new_mu[2] = {alive[0] ? sx0 / nn[0] : mu0, alive[1] ? sx1 / nn[1] : mu1};
        double sq0 = 0.0, sq1 = 0.0;
        for (std::size_t k = 0; k < K; ++k) {
            const double d0 = xs[k] - new_mu[0], d1 = xs[k] - new_mu[1];
            sq0 += w0[k] * d0 * d0;
            sq1 += w1[k] * d1 * d1;
        }
        const double sq[2] = {sq0, sq1};
        for (int g = 0; g < 2; ++g) {
            if (alive[g]) {
                m.mu[g] = new_mu[g];
                m.var[g] = std::max(sq[g] / nn[g], var_floor) + opt.reg_covar;
            }
            m.pi[g] = nn[g] / (nn[0] + nn[1]);
        }
        if (std::fabs(ll - ll_prev) < opt.tol) {
            converged = true;
            break;
        }
        ll_prev = ll;
    }
    return ll;
}

void fit_feature(const std::int64_t* h, std::int64_t bins, double lo, double width, const FitOptions& opt,
                 FitScratch& s, FeatureFit& out) {
    out.w[0] = out.w[1] = out.mu[0] = out.mu[1] = out.sd[0] = out.sd[1] = kNaN;
    // Occupied bins only: EM cost scales with the number of distinct values, not with bins.
    s.x.clear();
    s.c.clear();
    std::int64_t first = -1, last = -1;
    double N = 0.0;
    for (std::int64_t b = 0; b < bins; ++b) {
        if (h[b] == 0) continue;
        if (first < 0) first = b;
        last = b;
        s.x.push_back(lo + (static_cast<double>(b) + 0.5) * width);
        s.c.push_back(static_cast<double>(h[b]));
        N += static_cast<double>(h[b]);
    }
    const std::size_t K = s.x.size();
    if (K < 2) return;  // empty, a single value, or all values within one bin: nothing to split

    const OtsuSplit split = otsu_split(h, first, last);
    // Threshold at the edge after kbest, or in the middle of the empty run of bins that follows.
    const double edge_lo = static_cast<double>(split.kbest + 1) * width + lo;
    const double edge_hi = static_cast<double>(split.kend + 1) * width + lo;
    out.otsu = 0.5 * (edge_lo + edge_hi);

    // Deterministic initialisation: the hard two-class split at Otsu's threshold (the global optimum
    // of 1-D 2-means on the histogram; sklearn's default init is a k-means solution as well).
    const double var_floor = width * width / 12.0;  // variance of a uniform distribution over one bin
    const std::size_t n_low = static_cast<std::size_t>(
        std::partition_point(s.x.begin(), s.x.end(), [edge_lo](double x) { return x < edge_lo; }) - s.x.begin());
    Mixture m;
    const std::size_t lo_k[2] = {0, n_low}, hi_k[2] = {n_low, K};
    for (int g = 0; g < 2; ++g) {
        double n = 0.0, sx = 0.0, sq = 0.0;
        for (std::size_t k = lo_k[g]; k < hi_k[g]; ++k) {
            n += s.c[k];
            sx += s.c[k] * s.x[k];
        }
        const double mean = sx / n;
        for (std::size_t k = lo_k[g]; k < hi_k[g]; ++k) sq += s.c[k] * (s.x[k] - mean) * (s.x[k] - mean);
        m.pi[g] = n / N;
        m.mu[g] = mean;
        m.var[g] = std::max(sq / n, var_floor) + opt.reg_covar;
    }

    out.ll = run_em(s, N, var_floor, opt, m, out.n_iter, out.converged);
    if (!std::isfinite(out.ll)) {
        out.converged = false;
        return;
    }
    const int a = m.mu[0] <= m.mu[1] ? 0 : 1;  // sort components by mean
    for (int g = 0; g < 2; ++g) {
        const int src = g == 0 ? a : 1 - a;
        out.w[g] = m.pi[src];
        out.mu[g] = m.mu[src];
        out.sd[g] = std::sqrt(m.var[src]);
    }
}

}  // namespace

FitResult BimodalStats::fit(const FitOptions& opt) const {
    if (opt.max_iter < 1) throw std::invalid_argument("max_iter must be >= 1");
    if (!(opt.tol >= 0.0)) throw std::invalid_argument("tol must be >= 0");
    if (!(opt.reg_covar >= 0.0 && std::isfinite(opt.reg_covar))) {
        throw std::invalid_argument("reg_covar must be finite and >= 0");
    }
    if (opt.n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");

    const std::int64_t F = n_features_;
    const auto Fs = static_cast<std::size_t>(F);
    FitResult r;
    r.n_features = F;
    r.weights.assign(2 * Fs, kNaN);
    r.means.assign(2 * Fs, kNaN);
    r.stds.assign(2 * Fs, kNaN);
    r.n_iter.assign(Fs, 0);
    r.converged.assign(Fs, 0);
    r.log_likelihood.assign(Fs, kNaN);
    r.separation.assign(Fs, kNaN);
    r.ashman_d.assign(Fs, kNaN);
    r.kl.assign(Fs, kNaN);
    r.bimodality_coefficient.assign(Fs, kNaN);
    r.otsu_threshold.assign(Fs, kNaN);

    auto work = [&](std::int64_t f, FitScratch& scratch) {
        FeatureFit ff;
        fit_feature(hist_.data() + f * bins_, bins_, lo_, width_, opt, scratch, ff);
        r.otsu_threshold[f] = ff.otsu;
        r.n_iter[f] = ff.n_iter;
        r.converged[f] = ff.converged ? 1 : 0;
        r.log_likelihood[f] = ff.ll;
        for (int g = 0; g < 2; ++g) {
            r.weights[2 * f + g] = ff.w[g];
            r.means[2 * f + g] = ff.mu[g];
            r.stds[2 * f + g] = ff.sd[g];
        }
        if (std::isfinite(ff.mu[0])) {
            const double m0 = ff.mu[0], m1 = ff.mu[1], s0 = ff.sd[0], s1 = ff.sd[1];
            const double dm = std::fabs(m0 - m1);
            r.separation[f] = dm / (2.0 * (s0 + s1));
            r.ashman_d[f] = std::sqrt(2.0) * dm / std::sqrt(s0 * s0 + s1 * s1);
            // KL(N0 || N1), N0 the lower-mean component: compute_kl_between_gaussians(means[0], stds[0],
            // means[1], stds[1]) after sorting by mean in the BYE reference code,
            // github.com/XuankunRong/BYE, bye.py (commit 29efe54).
            r.kl[f] = std::log(s1 / s0) + (s0 * s0 + (m0 - m1) * (m0 - m1)) / (2.0 * s1 * s1) - 0.5;
        }
        // Sample bimodality coefficient (SAS; Pfister et al. 2013) from the exact moments.
        const double n = static_cast<double>(count_[f]);
        const double g1 = skewness(f), g2 = excess_kurtosis(f);
        if (n >= 4.0 && std::isfinite(g1) && std::isfinite(g2)) {
            const double G1 = g1 * std::sqrt(n * (n - 1.0)) / (n - 2.0);
            const double G2 = (n - 1.0) / ((n - 2.0) * (n - 3.0)) * ((n + 1.0) * g2 + 6.0);
            r.bimodality_coefficient[f] =
                (G1 * G1 + 1.0) / (G2 + 3.0 * (n - 1.0) * (n - 1.0) / ((n - 2.0) * (n - 3.0)));
        }
    };

    const int n_threads = static_cast<int>(std::min<std::int64_t>(opt.n_threads, F));
    if (n_threads <= 1) {
        FitScratch scratch;
        for (std::int64_t f = 0; f < F; ++f) work(f, scratch);
        return r;
    }
    // Dynamic schedule: features differ a lot in cost (occupied bins x EM iterations).
    std::atomic<std::int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mu;
    auto worker = [&]() {
        try {
            FitScratch scratch;
            for (std::int64_t f = next.fetch_add(1); f < F; f = next.fetch_add(1)) work(f, scratch);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mu);
            if (!error) error = std::current_exception();
            next.store(F);
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(n_threads - 1));
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
    return r;
}

// ------------------------------------------------------------------------------- serialisation

namespace {

// Blob layout, all little-endian:
//   magic "BYESTATS" | u32 version (=1) | u32 reserved (=0) | u64 n_features | u64 bins | f64 lo | f64 hi
//   | i64 count[F] | f64 shift[F], mean[F], m2[F], m3[F], m4[F], min[F], max[F]
//   | i64 n_nonfinite[F], n_clamped_low[F], n_clamped_high[F] | i64 hist[F * bins]
//   | u64 checksum (of every byte before it)
constexpr char kMagic[8] = {'B', 'Y', 'E', 'S', 'T', 'A', 'T', 'S'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeader = 8 + 4 + 4 + 8 + 8 + 8 + 8;
constexpr std::size_t kPerFeature = 11;  // 8-byte values per feature outside the histogram

void put_u64(std::uint8_t* p, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
std::uint64_t get_u64(const std::uint8_t* p) {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    return v;
}
void put_u32(std::uint8_t* p, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
std::uint32_t get_u32(const std::uint8_t* p) {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(p[i]) << (8 * i);
    return v;
}
std::uint64_t bits(double x) {
    std::uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
double from_bits(std::uint64_t u) {
    double x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

// FNV-1a style hash over little-endian 64-bit words (size is a multiple of 8 here), with a final
// avalanche. Detects accidental corruption; it is not a cryptographic MAC.
std::uint64_t checksum(const std::uint8_t* p, std::size_t n) {
    std::uint64_t h = 0xcbf29ce484222325ULL;
    for (std::size_t i = 0; i < n; i += 8) {
        h ^= get_u64(p + i);
        h *= 0x100000001b3ULL;
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

}  // namespace

std::vector<std::uint8_t> BimodalStats::to_bytes() const {
    const auto F = static_cast<std::size_t>(n_features_);
    const std::size_t n = kHeader + 8 * (kPerFeature * F + hist_.size()) + 8;
    std::vector<std::uint8_t> out(n);
    std::uint8_t* p = out.data();
    std::memcpy(p, kMagic, 8);
    put_u32(p + 8, kVersion);
    put_u32(p + 12, 0);
    put_u64(p + 16, static_cast<std::uint64_t>(n_features_));
    put_u64(p + 24, static_cast<std::uint64_t>(bins_));
    put_u64(p + 32, bits(lo_));
    put_u64(p + 40, bits(hi_));
    p += kHeader;
    auto put_i = [&p](const std::vector<std::int64_t>& v) {
        for (std::int64_t x : v) {
            put_u64(p, static_cast<std::uint64_t>(x));
            p += 8;
        }
    };
    auto put_d = [&p](const std::vector<double>& v) {
        for (double x : v) {
            put_u64(p, bits(x));
            p += 8;
        }
    };
    put_i(count_);
    for (const auto* v : {&shift_, &mean_, &m2_, &m3_, &m4_, &min_, &max_}) put_d(*v);
    for (const auto* v : {&nonfinite_, &clamped_low_, &clamped_high_}) put_i(*v);
    put_i(hist_);
    put_u64(p, checksum(out.data(), n - 8));
    return out;
}

BimodalStats BimodalStats::from_bytes(const std::uint8_t* data, std::size_t size) {
    auto fail = [](const std::string& why) { throw std::invalid_argument("invalid BimodalStats blob: " + why); };
    if (size < kHeader + 8) fail("truncated (" + std::to_string(size) + " bytes)");
    if (std::memcmp(data, kMagic, 8) != 0) fail("bad magic (not produced by BimodalStats.to_bytes)");
    const std::uint32_t version = get_u32(data + 8);
    if (version != kVersion) {
        fail("unsupported format version " + std::to_string(version) + " (this build reads version " +
             std::to_string(kVersion) + ")");
    }
    const std::uint64_t F = get_u64(data + 16), bins = get_u64(data + 24);
    const double lo = from_bits(get_u64(data + 32)), hi = from_bits(get_u64(data + 40));
    // Bound F and bins by the blob size before multiplying them, so nothing overflows.
    const std::uint64_t words = (size - kHeader - 8) / 8;
    if (F < 1 || F > words / (kPerFeature + 2) || bins < 2 || bins > words / F) {
        fail("header does not match the blob size (truncated or corrupted)");
    }
    const std::size_t expected = kHeader + 8 * (kPerFeature * F + F * bins) + 8;
    if (size != expected) {
        fail("size " + std::to_string(size) + " bytes, expected " + std::to_string(expected) +
             " (truncated or corrupted)");
    }
    if (checksum(data, size - 8) != get_u64(data + size - 8)) fail("checksum mismatch (corrupted)");

    BimodalStats s(static_cast<std::int64_t>(F), lo, hi, static_cast<std::int64_t>(bins));  // validates lo/hi
    const std::uint8_t* p = data + kHeader;
    auto get_i = [&p](std::vector<std::int64_t>& v) {
        for (auto& x : v) {
            x = static_cast<std::int64_t>(get_u64(p));
            p += 8;
        }
    };
    auto get_d = [&p](std::vector<double>& v) {
        for (auto& x : v) {
            x = from_bits(get_u64(p));
            p += 8;
        }
    };
    get_i(s.count_);
    for (auto* v : {&s.shift_, &s.mean_, &s.m2_, &s.m3_, &s.m4_, &s.min_, &s.max_}) get_d(*v);
    for (auto* v : {&s.nonfinite_, &s.clamped_low_, &s.clamped_high_}) get_i(*v);
    get_i(s.hist_);
    // Internal consistency (a valid checksum on inconsistent data means a buggy writer).
    for (std::size_t f = 0; f < F; ++f) {
        std::int64_t total = 0;
        for (std::size_t b = 0; b < bins; ++b) {
            const std::int64_t h = s.hist_[f * bins + b];
            if (h < 0 || total > std::numeric_limits<std::int64_t>::max() - h) fail("negative or overflowing counts");
            total += h;
        }
        if (s.count_[f] != total || s.nonfinite_[f] < 0 || s.clamped_low_[f] < 0 || s.clamped_high_[f] < 0 ||
            s.clamped_low_[f] + s.clamped_high_[f] > total) {
            fail("inconsistent counts for feature " + std::to_string(f));
        }
        // (NaN moments are legal: |x| beyond ~1e77 overflows x^4.)
        if (s.m2_[f] < 0.0 || s.m4_[f] < 0.0) fail("negative central moments for feature " + std::to_string(f));
    }
    return s;
}

}  // namespace bye
