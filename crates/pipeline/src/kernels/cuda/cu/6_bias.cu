// ------------------------------------------------------------------------------- bias (+ residual)
// y viewed as [rows, cols]: per_row = 1 adds bias[row % blen] to a whole row (a convolution's
// bias over H*W, ResNet's time embedding per (batch, channel)); per_row = 0 adds bias[col]
// (a linear layer: cols = its output features). In f32, one block row per grid row, no
// per-element division; the f16 kernel moves pairs (4-byte accesses) when cols is even.
template <typename T>
__device__ void bias_rows(const T *y, const T *bias, const T *res, T *out, long rows, int cols,
                          int blen, int per_row) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const long base = r * (long)cols;
        const float rb = per_row ? load_f(bias, r % blen) : 0.f;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
            float v = load_f(y, base + c) + (per_row ? rb : load_f(bias, c));
            if (res) v += load_f(res, base + c);
            store_f(out, base + c, v);
        }
    }
}

extern "C" __global__ void bias_rows_f16(const half_t *y, const half_t *bias, const half_t *res,
                                         half_t *out, long rows, int cols, int blen, int per_row) {
    bias_rows(y, bias, res, out, rows, cols, blen, per_row);
}
extern "C" __global__ void bias_rows_f32(const float *y, const float *bias, const float *res,
                                         float *out, long rows, int cols, int blen, int per_row) {
    bias_rows(y, bias, res, out, rows, cols, blen, per_row);
}
// f16 in pairs: cols2 = cols / 2 words of two halves per row (4-byte aligned rows).
extern "C" __global__ void bias_rows_f16x2(const unsigned int *y, const half_t *bias,
                                           const unsigned int *res, unsigned int *out, long rows,
                                           int cols2, int blen, int per_row) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const long base = r * (long)cols2;
        const float rb = per_row ? h2f(bias[r % blen]) : 0.f;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols2; c += gridDim.x * blockDim.x) {
            unsigned int w = y[base + c];
            float lo = h2f((half_t)(w & 0xffff)), hi = h2f((half_t)(w >> 16));
            if (per_row) {
                lo += rb;
                hi += rb;
            } else {
                lo += h2f(bias[2 * c]);
                hi += h2f(bias[2 * c + 1]);
            }
            if (res) {
                unsigned int q = res[base + c];
                lo += h2f((half_t)(q & 0xffff));
                hi += h2f((half_t)(q >> 16));
            }
            out[base + c] = pack2(lo, hi);
        }
    }
}
