// sdserve's own CUDA kernels, compiled at run time by NVRTC for the device's compute capability
// (kernels/cuda/mod.rs). No #include: NVRTC's built-in declarations (math, warp shuffles) and
// inline PTX are enough, so no CUDA headers are needed where sdserve runs.
//
// Storage is f16 ("half", passed as unsigned short) or f32; arithmetic is f32 everywhere
// (accumulators, statistics, softmax). On sm_80+ the attention's two products run on tensor
// cores (mma.sync m16n8k16, f16 operands, f32 accumulators); below sm_80 (Pascal, Volta, Turing)
// a CUDA-core kernel does the same in f32.

typedef unsigned short half_t;

// SDSERVE_CPU_EMU: compiled as C++ on a CPU by tools/cuda_on_cpu (its header defines the CUDA
// built-ins; the sm_80 tensor-core code is left out there, as __CUDA_ARCH__ is not defined).
#ifdef SDSERVE_CPU_EMU
__device__ __forceinline__ float h2f(half_t h) { return emu_h2f(h); }
__device__ __forceinline__ half_t f2h(float f) { return emu_f2h(f); }
#else
__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)f2h(lo) | ((unsigned int)f2h(hi) << 16);
}

__device__ __forceinline__ float load_f(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float load_f(const half_t *p, long i) { return h2f(p[i]); }
__device__ __forceinline__ void store_f(float *p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(half_t *p, long i, float v) { p[i] = f2h(v); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

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

// ------------------------------------------------------------------------------- attention
// softmax(q k^T * scale) v per (batch, head), flash style: the scores never leave the chip.
// q: [B, N, H*D], k, v: [B, M, H*D], out: [B, N, H*D], all contiguous f16 (the layout the q/k/v
// projections produce, so no head split or merge copies). Grid: (ceil(N / rows per block), B*H).

#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma16816(float *c, const unsigned int *a, unsigned int b0,
                                         unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 4 warps, 16 query rows each; keys in tiles of 64. D is the head dim (a multiple of 8), DP it
// rounded up to 16 (the k step of the q.k product). Fragment layouts are those of PTX's
// mma.m16n8k16: lane = 4 * g + t; A rows g and g + 8, columns 2t, 2t+1 (+8); B column g, rows
// 2t, 2t+1 (+8); C rows g and g + 8, columns 2t, 2t+1. The score tile's C fragments are the
// A fragments of the p.v product, so probabilities stay in registers.
#define FA_ROWS 64
#define FA_KEYS 64
template <int D>
__device__ void flash_mma(const half_t *q, const half_t *k, const half_t *v, half_t *out, int N,
                          int M, int H, float scale_log2) {
    constexpr int DP = (D + 15) / 16 * 16;
    constexpr int KS = DP + 8;       // row stride of Qs/Ks (halves): 16-byte pad against bank conflicts
    constexpr int VS = FA_KEYS + 8;  // row stride of Vt (transposed V)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    half_t *Qs = (half_t *)smem_raw;
    half_t *Ks = Qs + FA_ROWS * KS;
    half_t *Vt = Ks + FA_KEYS * KS;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long row_stride = (long)H * D;
    const int r0 = blockIdx.x * FA_ROWS;
    const half_t *qb = q + (long)b * N * row_stride + (long)h * D;
    const half_t *kb = k + (long)b * M * row_stride + (long)h * D;
    const half_t *vb = v + (long)b * M * row_stride + (long)h * D;

    // Q tile (zero rows past N and columns past D), as 32-bit words.
    for (int i = threadIdx.x; i < FA_ROWS * (DP / 2); i += blockDim.x) {
        int r = i / (DP / 2), c = (i % (DP / 2)) * 2;
        unsigned int val = 0;
        if (r0 + r < N && c < D) val = *(const unsigned int *)(qb + (long)(r0 + r) * row_stride + c);
        *(unsigned int *)(Qs + r * KS + c) = val;
    }
    __syncthreads();
    unsigned int qf[DP / 16][4];
    const half_t *qw = Qs + warp * 16 * KS;
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        qf[kk][0] = *(const unsigned int *)(qw + g * KS + kk * 16 + 2 * t);
        qf[kk][1] = *(const unsigned int *)(qw + (g + 8) * KS + kk * 16 + 2 * t);
        qf[kk][2] = *(const unsigned int *)(qw + g * KS + kk * 16 + 2 * t + 8);
        qf[kk][3] = *(const unsigned int *)(qw + (g + 8) * KS + kk * 16 + 2 * t + 8);
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_lo = neg_inf(), m_hi = neg_inf(), l_lo = 0.f, l_hi = 0.f;

    for (int j0 = 0; j0 < M; j0 += FA_KEYS) {
        __syncthreads();  // the previous tile's K and V are no longer read
        for (int i = threadIdx.x; i < FA_KEYS * (DP / 2); i += blockDim.x) {
            int r = i / (DP / 2), c = (i % (DP / 2)) * 2;
            unsigned int kv = 0, vv = 0;
            if (j0 + r < M && c < D) {
                kv = *(const unsigned int *)(kb + (long)(j0 + r) * row_stride + c);
                vv = *(const unsigned int *)(vb + (long)(j0 + r) * row_stride + c);
            }
            *(unsigned int *)(Ks + r * KS + c) = kv;
            if (c < D) {
                Vt[c * VS + r] = (half_t)(vv & 0xffff);
                Vt[(c + 1) * VS + r] = (half_t)(vv >> 16);
            }
        }
        __syncthreads();

        // s = q k^T for this warp's 16 rows and the tile's 64 keys.
        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const half_t *kr = Ks + (nt * 8 + g) * KS + 2 * t;
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                unsigned int b0 = *(const unsigned int *)(kr + kk * 16);
                unsigned int b1 = *(const unsigned int *)(kr + kk * 16 + 8);
                mma16816(s[nt], qf[kk], b0, b1);
            }
        }
        // Online softmax in base 2, rows g (c0, c1) and g + 8 (c2, c3).
        float mx_lo = neg_inf(), mx_hi = neg_inf();
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            int key = j0 + nt * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool valid = key + (e & 1) < M;
                s[nt][e] = valid ? s[nt][e] * scale_log2 : neg_inf();
            }
            mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
        }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        float a_lo = exp2f(m_lo - mn_lo), a_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - mn_lo);
            s[nt][1] = exp2f(s[nt][1] - mn_lo);
            s[nt][2] = exp2f(s[nt][2] - mn_hi);
            s[nt][3] = exp2f(s[nt][3] - mn_hi);
            sum_lo += s[nt][0] + s[nt][1];
            sum_hi += s[nt][2] + s[nt][3];
        }
        l_lo = l_lo * a_lo + sum_lo;  // per-lane partial sums, reduced over the quad at the end
        l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= a_lo;
            o[i][1] *= a_lo;
            o[i][2] *= a_hi;
            o[i][3] *= a_hi;
        }
        // o += p v: p (f16) from the score fragments, v^T from shared memory.
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; kk++) {
            unsigned int pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                                  pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                const half_t *vr = Vt + (i * 8 + g) * VS + kk * 16 + 2 * t;
                mma16816(o[i], pa, *(const unsigned int *)vr, *(const unsigned int *)(vr + 8));
            }
        }
    }
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    int row_lo = r0 + warp * 16 + g, row_hi = row_lo + 8;
    half_t *ob = out + (long)b * N * row_stride + (long)h * D;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        int c = i * 8 + 2 * t;
        if (row_lo < N)
            *(unsigned int *)(ob + (long)row_lo * row_stride + c) = pack2(o[i][0] * inv_lo, o[i][1] * inv_lo);
        if (row_hi < N)
            *(unsigned int *)(ob + (long)row_hi * row_stride + c) = pack2(o[i][2] * inv_hi, o[i][3] * inv_hi);
    }
}

// The same computation with the K/V tiles double-buffered: the next tile is copied from
// global to shared memory (cp.async, 16 bytes a copy) while the current one is multiplied, and
// V's B fragments come from its row-major tile through ldmatrix.trans (no transposing stores).
// Needs 16-byte aligned rows (checked by the caller). Shared memory: Q, 2 K and 2 V tiles.
__device__ __forceinline__ unsigned int smem_addr(const void *p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x2_trans(unsigned int &r0, unsigned int &r1, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r0), "=r"(r1)
                 : "r"(smem_addr(p)));
}

// 2^x on the special-function unit (what exp2f becomes under --use_fast_math); 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <int D>
__device__ void flash_mma2(const half_t *q, const half_t *k, const half_t *v, half_t *out, int N,
                           int M, int H, float scale_log2) {
    constexpr int DP = (D + 15) / 16 * 16;
    constexpr int KS = DP + 8;  // row stride (halves) of every tile: 16-byte rows, no conflicts
    constexpr int TILE = FA_KEYS * KS;
    constexpr int CH = D / 8;   // 16-byte chunks per row
    extern __shared__ __align__(16) unsigned char smem_raw[];
    half_t *Qs = (half_t *)smem_raw;
    half_t *Ks = Qs + FA_ROWS * KS;  // [2][FA_KEYS][KS]
    half_t *Vs = Ks + 2 * TILE;      // [2][FA_KEYS][KS]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long row_stride = (long)H * D;
    const int r0 = blockIdx.x * FA_ROWS;
    const half_t *qb = q + (long)b * N * row_stride + (long)h * D;
    const half_t *kb = k + (long)b * M * row_stride + (long)h * D;
    const half_t *vb = v + (long)b * M * row_stride + (long)h * D;

    auto load_tile = [&](int j0, int buf) {
        half_t *kd = Ks + buf * TILE, *vd = Vs + buf * TILE;
        for (int i = threadIdx.x; i < FA_KEYS * CH; i += blockDim.x) {
            int r = i / CH, c = (i % CH) * 8;
            bool in = j0 + r < M;
            long off = (long)(in ? j0 + r : 0) * row_stride + c;
            cp_async16(kd + r * KS + c, kb + off, in ? 16 : 0);  // rows past M: zeros
            cp_async16(vd + r * KS + c, vb + off, in ? 16 : 0);
        }
    };
    load_tile(0, 0);
    cp_async_commit();

    // Q tile, and the pad columns D..DP of Q and of both K buffers: zeros (they enter q.k).
    for (int i = threadIdx.x; i < FA_ROWS * (DP / 2); i += blockDim.x) {
        int r = i / (DP / 2), c = (i % (DP / 2)) * 2;
        unsigned int val = 0;
        if (r0 + r < N && c < D) val = *(const unsigned int *)(qb + (long)(r0 + r) * row_stride + c);
        *(unsigned int *)(Qs + r * KS + c) = val;
    }
    constexpr int PAD = DP > D ? DP - D : 1;
    if (DP > D) {
        for (int i = threadIdx.x; i < 2 * FA_KEYS * PAD; i += blockDim.x) {
            int r = i / PAD, c = D + i % PAD;
            Ks[r * KS + c] = 0;  // r runs over both buffers (2 * FA_KEYS rows)
        }
    }
    __syncthreads();
    unsigned int qf[DP / 16][4];
    const half_t *qw = Qs + warp * 16 * KS;
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        qf[kk][0] = *(const unsigned int *)(qw + g * KS + kk * 16 + 2 * t);
        qf[kk][1] = *(const unsigned int *)(qw + (g + 8) * KS + kk * 16 + 2 * t);
        qf[kk][2] = *(const unsigned int *)(qw + g * KS + kk * 16 + 2 * t + 8);
        qf[kk][3] = *(const unsigned int *)(qw + (g + 8) * KS + kk * 16 + 2 * t + 8);
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_lo = neg_inf(), m_hi = neg_inf(), l_lo = 0.f, l_hi = 0.f;

    const int tiles = (M + FA_KEYS - 1) / FA_KEYS;
    for (int tile = 0; tile < tiles; tile++) {
        const int j0 = tile * FA_KEYS, buf = tile & 1;
        if (tile + 1 < tiles) {
            load_tile(j0 + FA_KEYS, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();  // this tile's copies are done, the next one's may run on
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const half_t *Kt = Ks + buf * TILE, *Vt = Vs + buf * TILE;

        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const half_t *kr = Kt + (nt * 8 + g) * KS + 2 * t;
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                unsigned int b0 = *(const unsigned int *)(kr + kk * 16);
                unsigned int b1 = *(const unsigned int *)(kr + kk * 16 + 8);
                mma16816(s[nt], qf[kk], b0, b1);
            }
        }
        // Keys past M only in the last tile. Maxima of the raw scores (the scale is positive),
        // then p = 2^(s * scale_log2 - max * scale_log2) in one FMA and one ex2.approx.
        if (j0 + FA_KEYS > M) {
#pragma unroll
            for (int nt = 0; nt < FA_KEYS / 8; nt++) {
                int key = j0 + nt * 8 + 2 * t;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (key + (e & 1) >= M) s[nt][e] = neg_inf();
            }
        }
        float mx_lo = neg_inf(), mx_hi = neg_inf();
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
        }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        float mn_lo = fmaxf(m_lo, mx_lo * scale_log2), mn_hi = fmaxf(m_hi, mx_hi * scale_log2);
        float a_lo = fast_exp2(m_lo - mn_lo), a_hi = fast_exp2(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = fast_exp2(fmaf(s[nt][0], scale_log2, -mn_lo));
            s[nt][1] = fast_exp2(fmaf(s[nt][1], scale_log2, -mn_lo));
            s[nt][2] = fast_exp2(fmaf(s[nt][2], scale_log2, -mn_hi));
            s[nt][3] = fast_exp2(fmaf(s[nt][3], scale_log2, -mn_hi));
            sum_lo += s[nt][0] + s[nt][1];
            sum_hi += s[nt][2] + s[nt][3];
        }
        l_lo = l_lo * a_lo + sum_lo;
        l_hi = l_hi * a_hi + sum_hi;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= a_lo;
            o[i][1] *= a_lo;
            o[i][2] *= a_hi;
            o[i][3] *= a_hi;
        }
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; kk++) {
            unsigned int pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                                  pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            // Lanes 0-15 address keys kk*16 + lane (8 per 8x8 matrix); .trans hands each lane
            // V[2t, 2t+1][g] and V[8 + 2t, 8 + 2t + 1][g]: the B fragment of p v.
            const half_t *vr = Vt + (kk * 16 + (lane & 15)) * KS;
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                unsigned int b0, b1;
                ldsm_x2_trans(b0, b1, vr + i * 8);
                mma16816(o[i], pa, b0, b1);
            }
        }
        __syncthreads();  // all warps are done with this buffer before it is refilled
    }
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    int row_lo = r0 + warp * 16 + g, row_hi = row_lo + 8;
    half_t *ob = out + (long)b * N * row_stride + (long)h * D;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        int c = i * 8 + 2 * t;
        if (row_lo < N)
            *(unsigned int *)(ob + (long)row_lo * row_stride + c) = pack2(o[i][0] * inv_lo, o[i][1] * inv_lo);
        if (row_hi < N)
            *(unsigned int *)(ob + (long)row_hi * row_stride + c) = pack2(o[i][2] * inv_hi, o[i][3] * inv_hi);
    }
}
#endif

// CUDA-core version for every architecture (the only one below sm_80): one warp per query row
// at a time, lanes over the tile's 32 keys for the scores and over head dims for p v, in f32.
#define FS_KEYS 32
#define FS_WARPS 4
#define FS_ROWS_PER_WARP 4
template <int D>
__device__ void flash_simt(const half_t *q, const half_t *k, const half_t *v, half_t *out, int N,
                           int M, int H, float scale_log2) {
    constexpr int KS = D + 2;  // odd number of 32-bit words per row: conflict-free column reads
    constexpr int DL = (D + 31) / 32;  // head dims per lane
    constexpr int RB = FS_WARPS * FS_ROWS_PER_WARP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *Qs = (float *)smem_raw;            // [RB][D]
    half_t *Ks = (half_t *)(Qs + RB * D);     // [FS_KEYS][KS]
    half_t *Vs = Ks + FS_KEYS * KS;           // [FS_KEYS][KS]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long row_stride = (long)H * D;
    const int r0 = blockIdx.x * RB;
    const half_t *qb = q + (long)b * N * row_stride + (long)h * D;
    const half_t *kb = k + (long)b * M * row_stride + (long)h * D;
    const half_t *vb = v + (long)b * M * row_stride + (long)h * D;
    for (int i = threadIdx.x; i < RB * D; i += blockDim.x) {
        int r = i / D, c = i % D;
        Qs[i] = r0 + r < N ? h2f(qb[(long)(r0 + r) * row_stride + c]) : 0.f;
    }
    float m[FS_ROWS_PER_WARP], l[FS_ROWS_PER_WARP], o[FS_ROWS_PER_WARP][DL];
#pragma unroll
    for (int r = 0; r < FS_ROWS_PER_WARP; r++) {
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < DL; i++) o[r][i] = 0.f;
    }
    for (int j0 = 0; j0 < M; j0 += FS_KEYS) {
        __syncthreads();
        for (int i = threadIdx.x; i < FS_KEYS * D; i += blockDim.x) {
            int r = i / D, c = i % D;
            bool ok = j0 + r < M;
            Ks[r * KS + c] = ok ? kb[(long)(j0 + r) * row_stride + c] : (half_t)0;
            Vs[r * KS + c] = ok ? vb[(long)(j0 + r) * row_stride + c] : (half_t)0;
        }
        __syncthreads();
        bool key_ok = j0 + lane < M;
#pragma unroll
        for (int r = 0; r < FS_ROWS_PER_WARP; r++) {
            const float *qr = Qs + (warp * FS_ROWS_PER_WARP + r) * D;
            const half_t *kr = Ks + lane * KS;
            float s = 0.f;
#pragma unroll 8
            for (int c = 0; c < D; c++) s += qr[c] * h2f(kr[c]);
            s = key_ok ? s * scale_log2 : neg_inf();
            float mn = fmaxf(m[r], warp_max(s));
            float a = exp2f(m[r] - mn);
            float p = exp2f(s - mn);
            l[r] = l[r] * a + warp_sum(p);
            m[r] = mn;
#pragma unroll
            for (int i = 0; i < DL; i++) o[r][i] *= a;
            for (int j = 0; j < FS_KEYS; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < DL; i++) {
                    int c = lane + 32 * i;
                    if (c < D) o[r][i] += pj * h2f(Vs[j * KS + c]);
                }
            }
        }
    }
    half_t *ob = out + (long)b * N * row_stride + (long)h * D;
#pragma unroll
    for (int r = 0; r < FS_ROWS_PER_WARP; r++) {
        int row = r0 + warp * FS_ROWS_PER_WARP + r;
        if (row >= N) continue;
        float inv = 1.f / l[r];
#pragma unroll
        for (int i = 0; i < DL; i++) {
            int c = lane + 32 * i;
            if (c < D) ob[(long)row * row_stride + c] = f2h(o[r][i] * inv);
        }
    }
}

#define FLASH_ENTRY(D)                                                                             \
    extern "C" __global__ void flash_simt_d##D(const half_t *q, const half_t *k, const half_t *v,  \
                                               half_t *out, int N, int M, int H, float sl2) {      \
        flash_simt<D>(q, k, v, out, N, M, H, sl2);                                                 \
    }
FLASH_ENTRY(32)
FLASH_ENTRY(40)
FLASH_ENTRY(64)
FLASH_ENTRY(80)
FLASH_ENTRY(128)
FLASH_ENTRY(160)

// CUDA-core flash attention, register-tiled: f32 arithmetic for f32 storage (the exact-f32 path:
// no TF32) and for f16 storage below sm_80 (Pascal's "pseudo-half"). 128 threads; a block takes
// BR query rows of one (batch, head) and walks the keys in tiles of TB_KEYS. Thread (ty, tx) =
// (threadIdx.x / TX, threadIdx.x % TX) owns query rows 4ty..4ty+3: for the scores, keys
// tx*TN..tx*TN+TN-1 of the tile (a 4 x TN register tile, K read as vectors); for the output,
// head dims tx, tx+TX, ... (CW of them). The tile's probabilities pass through shared memory
// (never device memory), transposed so that one 16-byte read gives a key's 4 rows. Online
// softmax in base 2: q is pre-scaled by scale*log2(e) while it is staged.
// Shared memory (f32): Qt [D][BR] (q transposed), KV [D][TB_KEYS] (k transposed, then v as
// [TB_KEYS][D]), Pt [TB_KEYS][BR + 4]; at most 44.5 KiB (D 160), so it runs on every GPU
// without an opt-in. Rows of q/k/v must start at multiples of 4 elements (checked by the
// caller): staging reads 16-byte (f32) or 8-byte (f16) vectors.
#define TB_KEYS 32
#define TB_THREADS 128
template <int D>
struct TiledShape {
    static constexpr int BR = D <= 80 ? 64 : 32;  // query rows per block
    static constexpr int TM = 4;                  // rows per thread
    static constexpr int TX = TB_THREADS / (BR / TM);  // threads per row group: 8 or 16
    static constexpr int TN = TB_KEYS / TX;       // keys per thread in the score tile: 4 or 2
    static constexpr int CW = D / TX;             // head dims per thread in the output
    static constexpr int PS = BR + 4;             // row stride of Pt
    static constexpr int SMEM = (D * BR + D * TB_KEYS + TB_KEYS * PS) * 4;
    static_assert(D % TX == 0 && D % 4 == 0, "head dim");
    static_assert(SMEM <= 48 * 1024, "shared memory within the default 48 KiB");
};

struct f4 {
    float x, y, z, w;
};
__device__ __forceinline__ f4 load4(const float *p) {
    float4 v = *(const float4 *)p;
    return {v.x, v.y, v.z, v.w};
}
__device__ __forceinline__ f4 load4(const half_t *p) {
    uint2 v = *(const uint2 *)p;
    return {h2f((half_t)(v.x & 0xffff)), h2f((half_t)(v.x >> 16)), h2f((half_t)(v.y & 0xffff)),
            h2f((half_t)(v.y >> 16))};
}
// N consecutive floats of shared memory into registers (16- or 8-byte reads).
template <int N>
__device__ __forceinline__ void lds(float *r, const float *p) {
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            float4 v = *(const float4 *)(p + i);
            r[i] = v.x, r[i + 1] = v.y, r[i + 2] = v.z, r[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            float2 v = *(const float2 *)(p + i);
            r[i] = v.x, r[i + 1] = v.y;
        }
    }
}
template <int N>
__device__ __forceinline__ void sts(float *p, const float *r) {
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) *(float4 *)(p + i) = make_float4(r[i], r[i + 1], r[i + 2], r[i + 3]);
    } else {
#pragma unroll
        for (int i = 0; i < N; i += 2) *(float2 *)(p + i) = make_float2(r[i], r[i + 1]);
    }
}

// 2^x; 2^-inf = +0. The special-function unit's ex2.approx (2 ulp) on the GPU.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef SDSERVE_CPU_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

template <typename T, int D>
__device__ void flash_tiled(const T *q, const T *k, const T *v, T *out, int N, int M, int H,
                            float scale_log2) {
    typedef TiledShape<D> S;
    constexpr int BR = S::BR, TM = S::TM, TX = S::TX, TN = S::TN, CW = S::CW, PS = S::PS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *Qt = (float *)smem_raw;  // [D][BR]
    float *KV = Qt + D * BR;        // [D][TB_KEYS] (k^T), then [TB_KEYS][D] (v)
    float *Pt = KV + D * TB_KEYS;   // [TB_KEYS][PS]

    const int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const long row_stride = (long)H * D;
    const int r0 = blockIdx.x * BR;
    const T *qb = q + (long)b * N * row_stride + (long)h * D;
    const T *kb = k + (long)b * M * row_stride + (long)h * D;
    const T *vb = v + (long)b * M * row_stride + (long)h * D;

    // Q^T, scaled; consecutive threads take consecutive rows (conflict-free transposing stores).
    for (int i = threadIdx.x; i < BR * (D / 4); i += TB_THREADS) {
        int r = i % BR, c = (i / BR) * 4;
        f4 x = {0.f, 0.f, 0.f, 0.f};
        if (r0 + r < N) x = load4(qb + (long)(r0 + r) * row_stride + c);
        Qt[c * BR + r] = x.x * scale_log2;
        Qt[(c + 1) * BR + r] = x.y * scale_log2;
        Qt[(c + 2) * BR + r] = x.z * scale_log2;
        Qt[(c + 3) * BR + r] = x.w * scale_log2;
    }

    float o[TM][CW], m[TM], l[TM];
#pragma unroll
    for (int r = 0; r < TM; r++) {
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < CW; i++) o[r][i] = 0.f;
    }

    for (int j0 = 0; j0 < M; j0 += TB_KEYS) {
        __syncthreads();  // the previous tile's V and P are no longer read (and Qt is written)
        for (int i = threadIdx.x; i < TB_KEYS * (D / 4); i += TB_THREADS) {
            int key = i % TB_KEYS, c = (i / TB_KEYS) * 4;
            f4 x = {0.f, 0.f, 0.f, 0.f};
            if (j0 + key < M) x = load4(kb + (long)(j0 + key) * row_stride + c);
            KV[c * TB_KEYS + key] = x.x;
            KV[(c + 1) * TB_KEYS + key] = x.y;
            KV[(c + 2) * TB_KEYS + key] = x.z;
            KV[(c + 3) * TB_KEYS + key] = x.w;
        }
        __syncthreads();

        // Scores (already in log2 units) for rows 4ty.., keys tx*TN..
        float s[TM][TN];
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int c = 0; c < TN; c++) s[r][c] = 0.f;
#pragma unroll 4
        for (int d = 0; d < D; d++) {
            float qr[TM], kr[TN];
            lds<TM>(qr, Qt + d * BR + ty * TM);
            lds<TN>(kr, KV + d * TB_KEYS + tx * TN);
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int c = 0; c < TN; c++) s[r][c] = fmaf(qr[r], kr[c], s[r][c]);
        }
        if (j0 + TB_KEYS > M) {  // keys past M: only in the last tile
#pragma unroll
            for (int c = 0; c < TN; c++)
                if (j0 + tx * TN + c >= M)
#pragma unroll
                    for (int r = 0; r < TM; r++) s[r][c] = neg_inf();
        }
        // Online softmax over the TX threads of each row group (adjacent lanes of one warp).
#pragma unroll
        for (int r = 0; r < TM; r++) {
            float mx = s[r][0];
#pragma unroll
            for (int c = 1; c < TN; c++) mx = fmaxf(mx, s[r][c]);
#pragma unroll
            for (int o2 = 1; o2 < TX; o2 <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
            float mn = fmaxf(m[r], mx);  // finite: key j0 < M is valid in every tile
            float a = exp2_approx(m[r] - mn);
            m[r] = mn;
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                s[r][c] = exp2_approx(s[r][c] - mn);
                sum += s[r][c];
            }
            l[r] = l[r] * a + sum;  // this thread's keys only; summed over the row group at the end
#pragma unroll
            for (int i = 0; i < CW; i++) o[r][i] *= a;
        }
        // P^T: for each of this thread's keys, its 4 rows as one vector.
#pragma unroll
        for (int c = 0; c < TN; c++) {
            float pr[TM];
#pragma unroll
            for (int r = 0; r < TM; r++) pr[r] = s[r][c];
            sts<TM>(Pt + (tx * TN + c) * PS + ty * TM, pr);
        }
        __syncthreads();  // every thread is done with K^T
        for (int i = threadIdx.x; i < TB_KEYS * (D / 4); i += TB_THREADS) {
            int key = i / (D / 4), c = (i % (D / 4)) * 4;
            f4 x = {0.f, 0.f, 0.f, 0.f};
            if (j0 + key < M) x = load4(vb + (long)(j0 + key) * row_stride + c);
            *(float4 *)(KV + key * D + c) = make_float4(x.x, x.y, x.z, x.w);
        }
        __syncthreads();
        // o += p v over the tile's keys (keys past M have p = 0 and v = 0).
#pragma unroll 2
        for (int j = 0; j < TB_KEYS; j++) {
            float pr[TM];
            lds<TM>(pr, Pt + j * PS + ty * TM);
            const float *vr = KV + j * D + tx;
#pragma unroll
            for (int i = 0; i < CW; i++) {
                float vv = vr[i * TX];
#pragma unroll
                for (int r = 0; r < TM; r++) o[r][i] = fmaf(pr[r], vv, o[r][i]);
            }
        }
    }
    T *ob = out + (long)b * N * row_stride + (long)h * D;
#pragma unroll
    for (int r = 0; r < TM; r++) {
        float lr = l[r];
#pragma unroll
        for (int o2 = 1; o2 < TX; o2 <<= 1) lr += __shfl_xor_sync(0xffffffffu, lr, o2);
        int row = r0 + ty * TM + r;
        if (row >= N) continue;
        float inv = 1.f / lr;
#pragma unroll
        for (int i = 0; i < CW; i++) store_f(ob, (long)row * row_stride + tx + i * TX, o[r][i] * inv);
    }
}

#define FLASH_TILED_ENTRY(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(TB_THREADS) flash_tiled_f32_d##D(                 \
        const float *q, const float *k, const float *v, float *out, int N, int M, int H,          \
        float sl2) {                                                                               \
        flash_tiled<float, D>(q, k, v, out, N, M, H, sl2);                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(TB_THREADS) flash_tiled_f16_d##D(                 \
        const half_t *q, const half_t *k, const half_t *v, half_t *out, int N, int M, int H,      \
        float sl2) {                                                                               \
        flash_tiled<half_t, D>(q, k, v, out, N, M, H, sl2);                                        \
    }
FLASH_TILED_ENTRY(32)
FLASH_TILED_ENTRY(40)
FLASH_TILED_ENTRY(64)
FLASH_TILED_ENTRY(80)
FLASH_TILED_ENTRY(128)
FLASH_TILED_ENTRY(160)

#if __CUDA_ARCH__ >= 800
#define FLASH_MMA_ENTRY(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) flash_mma_d##D(                             \
        const half_t *q, const half_t *k, const half_t *v, half_t *out, int N, int M, int H,      \
        float sl2) {                                                                               \
        flash_mma<D>(q, k, v, out, N, M, H, sl2);                                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_mma2_d##D(                            \
        const half_t *q, const half_t *k, const half_t *v, half_t *out, int N, int M, int H,      \
        float sl2) {                                                                               \
        flash_mma2<D>(q, k, v, out, N, M, H, sl2);                                                 \
    }
FLASH_MMA_ENTRY(32)
FLASH_MMA_ENTRY(40)
FLASH_MMA_ENTRY(64)
FLASH_MMA_ENTRY(80)
FLASH_MMA_ENTRY(128)
FLASH_MMA_ENTRY(160)
#endif

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
