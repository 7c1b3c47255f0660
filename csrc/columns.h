// Gathering feature columns for the detector's scans (bye_fast.columns).
//
// The detector sorts and takes quantiles of every feature within every context (all samples, each
// answer group). Its features arrive as a row-major (n, F) array; a scan reads a block of b columns
// for a permutation of the rows and wants them as b contiguous rows. numpy's fancy indexing
// followed by a transposing copy does this at a few hundred MB/s (the transpose is not cache
// blocked); this does it in one cache-tiled pass.
#pragma once

#include <cstdint>

namespace bye {

// out[c * n_rows + i] = x[rows[i] * row_stride + (j0 + c) * col_stride] for c < b, i < n_rows.
// Rows are visited in tiles so that the b output rows are written in runs of `tile` values.
template <class T>
void gather_transpose(const T* x, std::int64_t row_stride, std::int64_t col_stride, const std::int64_t* rows,
                      std::int64_t n_rows, std::int64_t j0, std::int64_t b, T* out);

}  // namespace bye
