#include "columns.h"

#include <algorithm>

namespace bye {

template <class T>
void gather_transpose(const T* x, std::int64_t row_stride, std::int64_t col_stride, const std::int64_t* rows,
                      std::int64_t n_rows, std::int64_t j0, std::int64_t b, T* out) {
    constexpr std::int64_t kTile = 256;  // b x kTile values written per tile: stays in L2 for b <= 256
    for (std::int64_t i0 = 0; i0 < n_rows; i0 += kTile) {
        const std::int64_t i1 = std::min(n_rows, i0 + kTile);
        for (std::int64_t i = i0; i < i1; ++i) {
            const T* src = x + rows[i] * row_stride + j0 * col_stride;
            if (col_stride == 1) {
                for (std::int64_t c = 0; c < b; ++c) out[c * n_rows + i] = src[c];
            } else {
                for (std::int64_t c = 0; c < b; ++c) out[c * n_rows + i] = src[c * col_stride];
            }
        }
    }
}

template void gather_transpose<float>(const float*, std::int64_t, std::int64_t, const std::int64_t*,
                                      std::int64_t, std::int64_t, std::int64_t, float*);
template void gather_transpose<double>(const double*, std::int64_t, std::int64_t, const std::int64_t*,
                                       std::int64_t, std::int64_t, std::int64_t, double*);

}  // namespace bye
