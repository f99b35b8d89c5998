// Just enough of CUDA to run kernels.cu's CUDA-core (SIMT) kernels as C++ on a CPU, for
// correctness checks without a GPU (tools/cuda_on_cpu/run.sh). Every thread of a block is a
// fiber (ucontext) on one OS thread; blocks run one after another. __syncthreads switches to
// the next fiber until all of the block's threads have reached it; a warp shuffle is a
// block-wide exchange (write, barrier, read, barrier), which is right for kernels whose
// shuffles every thread of the block reaches in the same order (all of ours). Timing,
// occupancy and bank conflicts are not modelled; out-of-bounds shared-memory indexing is
// caught only by the sanitizer build (run.sh --asan).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float4 {
    float x, y, z, w;
} __attribute__((aligned(16)));
struct float2 {
    float x, y;
} __attribute__((aligned(8)));
struct uint2 {
    unsigned int x, y;
} __attribute__((aligned(8)));
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

inline float emu_h2f(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}
inline unsigned short emu_f2h(float v) {
    _Float16 f = (_Float16)v;  // round to nearest even, as cvt.rn.f16.f32
    unsigned short h;
    std::memcpy(&h, &f, 2);
    return h;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;

namespace emu {
inline dim3 gridDim, blockDim, blockIdx;
inline std::vector<dim3> thread_idx;  // per fiber
inline int current = 0;               // the running fiber
inline std::vector<ucontext_t> fibers;
inline ucontext_t scheduler;
inline std::vector<int> state;  // 0 running, 1 at a barrier, 2 done
inline std::vector<double> exchange;
inline std::vector<unsigned char> dynamic_smem;

inline void barrier() {
    state[current] = 1;
    swapcontext(&fibers[current], &scheduler);
}
template <typename T>
T shuffle(T v, int src_of_lane_fn(int lane, int arg), int arg) {
    int lane = current & 31, warp_base = current & ~31;
    exchange[current] = (double)v;
    barrier();
    double r = exchange[warp_base + (src_of_lane_fn(lane, arg) & 31)];
    barrier();
    return (T)r;
}
inline int xor_lane(int lane, int o) { return lane ^ o; }
inline int fixed_lane(int, int src) { return src; }
}  // namespace emu

#define threadIdx (emu::thread_idx[emu::current])
#define blockIdx (emu::blockIdx)
#define blockDim (emu::blockDim)
#define gridDim (emu::gridDim)

inline void __syncthreads() { emu::barrier(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
    return emu::shuffle(v, emu::xor_lane, o);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    return emu::shuffle(v, emu::fixed_lane, src);
}

// Dynamic shared memory: kernels.cu's `extern __shared__ ... smem_raw[]` (run.sh turns the
// declaration into a use of this pointer): exactly the launch's bytes, a fresh heap block per
// launch, so the sanitizer build (run.sh --asan) reports an access past the launch's size.
inline unsigned char *smem_raw = nullptr;

namespace emu {
inline void (*entry)(void *) = nullptr;
inline void *entry_arg = nullptr;
inline void trampoline() {
    entry(entry_arg);
    state[current] = 2;
    swapcontext(&fibers[current], &scheduler);
}
// Runs body() as every thread of every block of the grid.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
    if (smem > 48 * 1024) {  // what every GPU allows without an opt-in
        std::fprintf(stderr, "shared memory %zu bytes > 48 KiB\n", smem);
        std::abort();
    }
    void *smem_block = nullptr;
    if (posix_memalign(&smem_block, 16, smem ? smem : 1) != 0) std::abort();
    smem_raw = (unsigned char *)smem_block;
    gridDim = grid;
    blockDim = block;
    const int n = block.x * block.y * block.z;
    const size_t stack_size = 256 << 10;
    std::vector<std::vector<char>> stacks(n, std::vector<char>(stack_size));
    fibers.assign(n, {});
    thread_idx.assign(n, {});
    state.assign(n, 0);
    exchange.assign(n, 0.0);
    entry = [](void *f) { (*(F *)f)(); };
    entry_arg = &body;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = {bx, by, bz};
                // Fresh, poisoned shared memory per block: a read before a write shows up.
                std::memset(smem_raw, 0xff, smem);
                for (int t = 0; t < n; t++) {
                    getcontext(&fibers[t]);
                    fibers[t].uc_stack.ss_sp = stacks[t].data();
                    fibers[t].uc_stack.ss_size = stack_size;
                    fibers[t].uc_link = nullptr;
                    makecontext(&fibers[t], trampoline, 0);
                    thread_idx[t] = {(unsigned)t % block.x, (unsigned)t / block.x % block.y,
                                     (unsigned)t / (block.x * block.y)};
                    state[t] = 0;
                }
                // Round robin: run each fiber to its next barrier (or its end); when all are at
                // the barrier, release them. A mix of done and waiting fibers is a deadlock on a
                // GPU (a barrier some threads never reach): report it.
                for (;;) {
                    for (int t = 0; t < n; t++) {
                        if (state[t] != 0) continue;
                        current = t;
                        swapcontext(&scheduler, &fibers[t]);
                    }
                    int waiting = 0, done = 0;
                    for (int t = 0; t < n; t++) (state[t] == 1 ? waiting : done)++;
                    if (done == n) break;
                    if (done != 0) {
                        std::fprintf(stderr, "block (%u,%u): %d threads ended, %d wait at a barrier\n",
                                     bx, by, done, waiting);
                        std::abort();
                    }
                    for (int t = 0; t < n; t++) state[t] = 0;
                }
            }
    std::free(smem_block);
    smem_raw = nullptr;
}
}  // namespace emu
