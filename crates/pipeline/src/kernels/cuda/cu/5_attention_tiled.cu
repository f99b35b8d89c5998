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
