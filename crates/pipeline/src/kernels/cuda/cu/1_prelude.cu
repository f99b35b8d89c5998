// sdserve's own CUDA kernels, compiled at run time by NVRTC for the device's compute capability
// (kernels/cuda/mod.rs). No #include: NVRTC's built-in declarations (math, warp shuffles) and
// inline PTX are enough, so no CUDA headers are needed where sdserve runs. The files of this
// folder are one translation unit, concatenated in name order (kernels/cuda/source.rs; the
// tools that compile it outside sdserve concatenate them the same way): this one first, with
// what the others share.
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
