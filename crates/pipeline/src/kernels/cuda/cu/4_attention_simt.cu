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
