// Streaming per-feature statistics for bimodality testing (plain C++17, no Python).
//
// BimodalStats accumulates, for each of F features (e.g. one attention-entropy value per decoder
// layer), in one pass over row-major or column-major data:
//   * exact central moments in float64: count, mean, M2, M3, M4 (M_k = sum (x - mean)^k), combined
//     across blocks / chunks / merged objects with the pairwise formulas of Chan et al. (1979) and
//     Pebay (2008, SAND2008-6212);
//   * a fixed-range histogram of `bins` equal-width bins over [lo, hi] (int64 counts); values
//     outside are clamped into the edge bins and counted separately;
//   * per-feature counts of non-finite values (NaN, +-inf), which are otherwise ignored;
//   * per-feature min and max of the finite values.
// fit() then fits, per feature, a two-component 1-D Gaussian mixture by EM on the weighted
// histogram bin centres, plus derived separation scores (see FitResult).
//
// Thread safety: none inside the class (like std::vector). Callers that share one object between
// threads must serialise access; the Python bindings do so with a per-object mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace bye {

struct FitOptions {
    int max_iter = 200;       // EM iterations at most (>= 1)
    double tol = 1e-8;        // stop when the mean log-likelihood per sample changes by less
    double reg_covar = 1e-6;  // added to every variance, as in sklearn's GaussianMixture
    int n_threads = 1;        // worker threads over features (>= 1)
};

// Per-feature fit results. Arrays of shape (F, 2) are row-major with the two components sorted by
// mean ascending (component 0 = lower mean). Features that cannot be fitted (fewer than 2 finite
// values, zero variance, or all values in one histogram bin) get NaN parameters, n_iter = 0 and
// converged = 0.
struct FitResult {
    std::int64_t n_features = 0;
    std::vector<double> weights;  // (F, 2) mixing weights
    std::vector<double> means;    // (F, 2)
    std::vector<double> stds;     // (F, 2) standard deviations
    std::vector<std::int32_t> n_iter;
    std::vector<std::uint8_t> converged;
    std::vector<double> log_likelihood;  // mean log-likelihood per sample of the binned data
    // |mu0 - mu1| / (2 (s0 + s1)); the BYE "sensitive layer" rule is separation > 1.
    std::vector<double> separation;
    // Ashman's D = sqrt(2) |mu0 - mu1| / sqrt(s0^2 + s1^2).
    std::vector<double> ashman_d;
    // KL(N(mu0, s0^2) || N(mu1, s1^2)), component 0 = lower mean, as in the BYE reference code.
    std::vector<double> kl;
    // Sample bimodality coefficient (G1^2 + 1) / (G2 + 3 (n-1)^2 / ((n-2)(n-3))) from the exact
    // moments, G1 / G2 the sample-size-corrected skewness / excess kurtosis; NaN when n < 4.
    std::vector<double> bimodality_coefficient;
    // Otsu threshold on the histogram, in value units: the bin edge between the two classes
    // (values below it form the lower class); when the split falls in a run of empty bins, the
    // middle of that run.
    std::vector<double> otsu_threshold;
};

class BimodalStats {
public:
    // Throws std::invalid_argument unless n_features >= 1, lo < hi (both finite) and bins >= 2.
    BimodalStats(std::int64_t n_features, double lo, double hi, std::int64_t bins);

    // Accumulate n_rows rows. Element (i, j) is data[i * row_stride + j * col_stride] (strides in
    // elements, may be negative or zero). When the feature stride is the smaller one (C order) the
    // data are read in tiles of 16 features x 256 rows, rows outer and features inner; otherwise
    // (Fortran order) down each column. Either way each input cache line is read from memory once.
    // Instantiated for float and double.
    template <class T>
    void update(const T* data, std::int64_t n_rows, std::ptrdiff_t row_stride, std::ptrdiff_t col_stride);

    // In-place merge; throws std::invalid_argument unless n_features, lo, hi and bins all match.
    void merge(const BimodalStats& other);

    FitResult fit(const FitOptions& options) const;

    // Versioned little-endian blob with a checksum; from_bytes throws std::invalid_argument on a
    // truncated, corrupted or inconsistent blob.
    std::vector<std::uint8_t> to_bytes() const;
    static BimodalStats from_bytes(const std::uint8_t* data, std::size_t size);

    std::int64_t n_features() const { return n_features_; }
    double lo() const { return lo_; }
    double hi() const { return hi_; }
    std::int64_t bins() const { return bins_; }
    double bin_width() const { return width_; }
    // Left edge of bin b (0 <= b <= bins); computed exactly like numpy.linspace(lo, hi, bins + 1).
    double edge(std::int64_t b) const { return b >= bins_ ? hi_ : static_cast<double>(b) * width_ + lo_; }

    const std::vector<std::int64_t>& count() const { return count_; }
    const std::vector<double>& min() const { return min_; }    // +inf where count == 0
    const std::vector<double>& max() const { return max_; }    // -inf where count == 0
    const std::vector<double>& m2() const { return m2_; }
    const std::vector<double>& m3() const { return m3_; }
    const std::vector<double>& m4() const { return m4_; }
    const std::vector<std::int64_t>& histogram() const { return hist_; }  // (F, bins) row-major
    const std::vector<std::int64_t>& n_nonfinite() const { return nonfinite_; }
    const std::vector<std::int64_t>& n_clamped_low() const { return clamped_low_; }
    const std::vector<std::int64_t>& n_clamped_high() const { return clamped_high_; }

    // Mean and population (biased) statistics: var = M2/n, skewness g1 = sqrt(n) M3 / M2^1.5, excess
    // kurtosis g2 = n M4 / M2^2 - 3. NaN where undefined (n == 0, or M2 == 0 for g1 / g2).
    double mean(std::int64_t f) const;  // NaN where count == 0
    double variance(std::int64_t f) const;
    double skewness(std::int64_t f) const;
    double excess_kurtosis(std::int64_t f) const;

private:
    // Combine the moments (n_b, mean_b, M2_b, M3_b, M4_b) of a disjoint set into feature f.
    void combine_moments(std::int64_t f, double n_b, double mean_b, double m2_b, double m3_b, double m4_b,
                         double min_b, double max_b);
    // Add a block given its count n, provisional mean c and power sums s_k = sum (x - c)^k.
    void add_block(std::int64_t f, double n, double c, double s1, double s2, double s3, double s4, double mn,
                   double mx);
    double provisional_mean(std::int64_t f, double n, double sum, double mn, double mx);
    std::int64_t bin_of(double x, std::int64_t f);  // also counts clamping for feature f

    template <class T, bool Contiguous>
    void update_rows(const T* data, std::int64_t n_rows, std::ptrdiff_t row_stride, std::ptrdiff_t col_stride);
    template <class T>
    void update_cols(const T* data, std::int64_t n_rows, std::ptrdiff_t row_stride, std::ptrdiff_t col_stride);

    std::int64_t n_features_;
    double lo_, hi_;
    std::int64_t bins_;
    double width_;  // (hi - lo) / bins
    double norm_;   // bins / (hi - lo)

    std::vector<std::int64_t> count_;
    // Moments are kept relative to a per-feature origin shift_ (the provisional mean of the
    // feature's first block): mean = shift_ + mean_. For data far from zero (x = 1e4 + N(0, 1e-2))
    // every later difference x - shift_ is then exact (Sterbenz) and small, so the combination
    // formulas work on well-scaled numbers and keep ~1e-15 relative accuracy.
    std::vector<double> shift_, mean_, m2_, m3_, m4_, min_, max_;
    std::vector<std::int64_t> hist_;
    std::vector<std::int64_t> nonfinite_, clamped_low_, clamped_high_;
};

}  // namespace bye
