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
