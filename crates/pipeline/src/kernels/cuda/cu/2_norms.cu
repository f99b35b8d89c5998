// ------------------------------------------------------------------------------- group norm
// x, y: [batch, channels, spatial] contiguous; one block per (batch, group). Two passes over the
// group for mean and centred variance (as torch), a third normalises, applies the f32 affine
// and optionally SiLU.
template <typename T>
__device__ void group_norm(const T *x, T *y, const float *w, const float *b, int channels,
                           int spatial, int groups, float eps, int silu) {
    __shared__ float scratch[32];
    int bg = blockIdx.x, g = bg % groups;
    int cg = channels / groups;
    long n = (long)cg * spatial;
    const T *xg = x + (long)bg * n;
    T *yg = y + (long)bg * n;
    float s = 0.f;
    for (long i = threadIdx.x; i < n; i += blockDim.x) s += load_f(xg, i);
    float mean = block_sum(s, scratch) / (float)n;
    float q = 0.f;
    for (long i = threadIdx.x; i < n; i += blockDim.x) {
        float d = load_f(xg, i) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(block_sum(q, scratch) / (float)n + eps);
    for (long i = threadIdx.x; i < n; i += blockDim.x) {
        int c = g * cg + (int)(i / spatial);
        float v = (load_f(xg, i) - mean) * rstd * w[c] + b[c];
        if (silu) v = v / (1.f + __expf(-v));
        store_f(yg, i, v);
    }
}

extern "C" __global__ void group_norm_f16(const half_t *x, half_t *y, const float *w,
                                          const float *b, int channels, int spatial, int groups,
                                          float eps, int silu) {
    group_norm(x, y, w, b, channels, spatial, groups, eps, silu);
}
extern "C" __global__ void group_norm_f32(const float *x, float *y, const float *w,
                                          const float *b, int channels, int spatial, int groups,
                                          float eps, int silu) {
    group_norm(x, y, w, b, channels, spatial, groups, eps, silu);
}

// The same over many blocks: a group's channels are split into chunks of `cpc` channels
// (grid: chunks x batch*groups), so a large group no longer rests on one multiprocessor.
// Pass 1 writes each chunk's (count, mean, M2): per-thread sums shifted by the thread's first
// value, merged with Chan's formula; pass 2 merges the group's chunks the same way and
// normalises its own chunk (no per-element division: loops run over whole channels).
struct Moments {
    float n, mean, m2;
};
__device__ __forceinline__ Moments merge_moments(Moments a, Moments b) {
    float n = a.n + b.n;
    if (b.n == 0.f) return a;
    if (a.n == 0.f) return b;
    float d = b.mean - a.mean, f = b.n / n;
    return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}
__device__ Moments block_moments(Moments v, float *scratch) {  // scratch: 3 * 32 floats
    for (int o = 16; o > 0; o >>= 1) {
        Moments u = {__shfl_xor_sync(0xffffffffu, v.n, o), __shfl_xor_sync(0xffffffffu, v.mean, o),
                     __shfl_xor_sync(0xffffffffu, v.m2, o)};
        v = merge_moments(v, u);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v.n;
        scratch[32 + warp] = v.mean;
        scratch[64 + warp] = v.m2;
    }
    __syncthreads();
    Moments t = {0.f, 0.f, 0.f};
    if (warp == 0) {
        for (int i = 0; i < warps; i++) t = merge_moments(t, {scratch[i], scratch[32 + i], scratch[64 + i]});
    }
    return t;  // valid in warp 0
}

template <typename T>
__device__ void group_norm_stats(const T *x, float *part, int channels, int spatial, int groups,
                                 int cpc) {
    __shared__ float scratch[96];
    const int chunk = blockIdx.x, chunks = gridDim.x, bg = blockIdx.y;
    const int cg = channels / groups;
    const int c0 = chunk * cpc, c1 = min(cg, c0 + cpc);
    const T *xg = x + (long)bg * cg * spatial;
    float shift = 0.f, s = 0.f, q = 0.f, cnt = 0.f;
    bool first = true;
    for (int c = c0; c < c1; c++) {
        const T *xc = xg + (long)c * spatial;
        for (int i = threadIdx.x; i < spatial; i += blockDim.x) {
            float v = load_f(xc, i);
            if (first) {
                shift = v;
                first = false;
            }
            float d = v - shift;
            s += d;
            q += d * d;
            cnt += 1.f;
        }
    }
    Moments m = {cnt, 0.f, 0.f};
    if (cnt > 0.f) {
        float mean_d = s / cnt;
        m.mean = shift + mean_d;
        m.m2 = fmaxf(q - s * mean_d, 0.f);
    }
    m = block_moments(m, scratch);
    if (threadIdx.x == 0) {
        float *p = part + ((long)bg * chunks + chunk) * 3;
        p[0] = m.n;
        p[1] = m.mean;
        p[2] = m.m2;
    }
}

template <typename T>
__device__ void group_norm_apply(const T *x, T *y, const float *part, const float *w,
                                 const float *b, int channels, int spatial, int groups, int cpc,
                                 float eps, int silu) {
    __shared__ float stats[2];
    const int chunk = blockIdx.x, chunks = gridDim.x, bg = blockIdx.y, g = bg % groups;
    const int cg = channels / groups;
    if (threadIdx.x == 0) {
        Moments t = {0.f, 0.f, 0.f};
        const float *p = part + (long)bg * chunks * 3;
        for (int i = 0; i < chunks; i++) t = merge_moments(t, {p[3 * i], p[3 * i + 1], p[3 * i + 2]});
        stats[0] = t.mean;
        stats[1] = rsqrtf(t.m2 / t.n + eps);
    }
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];
    const int c0 = chunk * cpc, c1 = min(cg, c0 + cpc);
    const long base = (long)bg * cg * spatial;
    for (int c = c0; c < c1; c++) {
        const int ch = g * cg + c;
        const float scale = rstd * w[ch], add = b[ch] - mean * rstd * w[ch];
        const long off = base + (long)c * spatial;
        for (int i = threadIdx.x; i < spatial; i += blockDim.x) {
            float v = load_f(x, off + i) * scale + add;
            if (silu) v = v / (1.f + __expf(-v));
            store_f(y, off + i, v);
        }
    }
}

#define GROUP_NORM_SPLIT(T, S)                                                                     \
    extern "C" __global__ void group_norm_stats_##S(const T *x, float *part, int channels,       \
                                                    int spatial, int groups, int cpc) {          \
        group_norm_stats(x, part, channels, spatial, groups, cpc);                                \
    }                                                                                              \
    extern "C" __global__ void group_norm_apply_##S(const T *x, T *y, const float *part,         \
                                                    const float *w, const float *b,              \
                                                    int channels, int spatial, int groups,       \
                                                    int cpc, float eps, int silu) {              \
        group_norm_apply(x, y, part, w, b, channels, spatial, groups, cpc, eps, silu);            \
    }
GROUP_NORM_SPLIT(half_t, f16)
GROUP_NORM_SPLIT(float, f32)

// ------------------------------------------------------------------------------- layer norm
// x, y: [rows, dim] contiguous; one warp per row, two passes (mean, centred variance).
template <typename T>
__device__ void layer_norm(const T *x, T *y, const float *w, const float *b, int rows, int dim,
                           float eps) {
    int warps = blockDim.x >> 5;
    int row = blockIdx.x * warps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *xr = x + (long)row * dim;
    T *yr = y + (long)row * dim;
    float s = 0.f;
    for (int i = lane; i < dim; i += 32) s += load_f(xr, i);
    float mean = warp_sum(s) / (float)dim;
    float q = 0.f;
    for (int i = lane; i < dim; i += 32) {
        float d = load_f(xr, i) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(warp_sum(q) / (float)dim + eps);
    for (int i = lane; i < dim; i += 32) store_f(yr, i, (load_f(xr, i) - mean) * rstd * w[i] + b[i]);
}

extern "C" __global__ void layer_norm_f16(const half_t *x, half_t *y, const float *w,
                                          const float *b, int rows, int dim, float eps) {
    layer_norm(x, y, w, b, rows, dim, eps);
}
extern "C" __global__ void layer_norm_f32(const float *x, float *y, const float *w,
                                          const float *b, int rows, int dim, float eps) {
    layer_norm(x, y, w, b, rows, dim, eps);
}

// ------------------------------------------------------------------------------- GEGLU
// h: [rows, 2 * inner], y: [rows, inner]; y = h[:, :inner] * gelu_erf(h[:, inner:]) in f32.
template <typename T>
__device__ void geglu(const T *h, T *y, long rows, int inner) {
    long n = rows * inner;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        long r = i / inner;
        int c = (int)(i - r * inner);
        float a = load_f(h, r * 2 * inner + c);
        float g = load_f(h, r * 2 * inner + inner + c);
        store_f(y, i, a * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
}

extern "C" __global__ void geglu_f16(const half_t *h, half_t *y, long rows, int inner) {
    geglu(h, y, rows, inner);
}
extern "C" __global__ void geglu_f32(const float *h, float *y, long rows, int inner) {
    geglu(h, y, rows, inner);
}
