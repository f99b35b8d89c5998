// kernels.cu's CUDA-core attention kernels (flash_tiled_f32/f16, flash_simt) run on the CPU
// through cuda_emu.h, against a double-precision reference: every head dim, ragged query and key
// tiles, SD's 77-token cross-attention, batch x heads > 1, rows starting at an offset. Launch
// geometry as kernels/cuda/imp.rs computes it. Prints one line per case; exits 1 on a miss.
#include <cstdio>
#include <random>
#include <string>

#include "kernels_emu.cu"

namespace {

struct Case {
    int b, h, n, m;
};

std::vector<float> uniform(size_t n, float scale, unsigned seed) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-1.732f, 1.732f);
    std::vector<float> v(n);
    for (auto &x : v) x = u(g) * scale;
    return v;
}

std::vector<float> half_rounded(const std::vector<float> &v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); i++) r[i] = emu_h2f(emu_f2h(v[i]));
    return r;
}

// softmax(q k^T * scale) v per (batch, head) in double; [B, N, H*D] layout.
std::vector<double> reference(const std::vector<float> &q, const std::vector<float> &k,
                              const std::vector<float> &v, Case c, int d, double scale) {
    const int C = c.h * d;
    std::vector<double> out((size_t)c.b * c.n * C), s(c.m);
    for (int b = 0; b < c.b; b++)
        for (int h = 0; h < c.h; h++)
            for (int i = 0; i < c.n; i++) {
                const float *qi = &q[((size_t)b * c.n + i) * C + h * d];
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < c.m; j++) {
                    const float *kj = &k[((size_t)b * c.m + j) * C + h * d];
                    double acc = 0;
                    for (int e = 0; e < d; e++) acc += (double)qi[e] * kj[e];
                    s[j] = acc * scale;
                    mx = std::max(mx, s[j]);
                }
                for (int j = 0; j < c.m; j++) sum += s[j] = std::exp(s[j] - mx);
                double *o = &out[((size_t)b * c.n + i) * C + h * d];
                for (int e = 0; e < d; e++) {
                    double acc = 0;
                    for (int j = 0; j < c.m; j++) acc += s[j] * v[((size_t)b * c.m + j) * C + h * d + e];
                    o[e] = acc / sum;
                }
            }
    return out;
}

struct Errors {
    double rel, max;
};
template <typename T>
Errors compare(const std::vector<T> &got, const std::vector<double> &want, size_t off) {
    double num = 0, den = 0, mx = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double x;
        if constexpr (sizeof(T) == 2) x = emu_h2f(got[off + i]);
        else x = got[off + i];
        if (!std::isfinite(x)) return {INFINITY, INFINITY};
        num += (x - want[i]) * (x - want[i]);
        den += want[i] * want[i];
        mx = std::max(mx, std::fabs(x - want[i]));
    }
    return {std::sqrt(num / std::max(den, 1e-30)), mx};
}

template <typename T>
std::vector<T> stored(const std::vector<float> &v, size_t off) {
    std::vector<T> r(off + v.size(), T(0));
    for (size_t i = 0; i < v.size(); i++) {
        if constexpr (sizeof(T) == 2) r[off + i] = emu_f2h(v[i]);
        else r[off + i] = v[i];
    }
    return r;
}

typedef void (*KernelF32)(const float *, const float *, const float *, float *, int, int, int, float);
typedef void (*KernelF16)(const half_t *, const half_t *, const half_t *, half_t *, int, int, int,
                          float);

struct Kernels {
    KernelF32 tiled_f32;
    KernelF16 tiled_f16, simt;
    int br, smem;
};
template <int D>
Kernels kernels_for(KernelF32 f32, KernelF16 f16, KernelF16 simt) {
    return {f32, f16, simt, TiledShape<D>::BR, TiledShape<D>::SMEM};
}
Kernels kernels(int d) {
    switch (d) {
    case 32: return kernels_for<32>(flash_tiled_f32_d32, flash_tiled_f16_d32, flash_simt_d32);
    case 40: return kernels_for<40>(flash_tiled_f32_d40, flash_tiled_f16_d40, flash_simt_d40);
    case 64: return kernels_for<64>(flash_tiled_f32_d64, flash_tiled_f16_d64, flash_simt_d64);
    case 80: return kernels_for<80>(flash_tiled_f32_d80, flash_tiled_f16_d80, flash_simt_d80);
    case 128: return kernels_for<128>(flash_tiled_f32_d128, flash_tiled_f16_d128, flash_simt_d128);
    default: return kernels_for<160>(flash_tiled_f32_d160, flash_tiled_f16_d160, flash_simt_d160);
    }
}

}  // namespace

int main(int argc, char **argv) {
    std::vector<int> dims = {32, 40, 64, 80, 128, 160};
    std::vector<Case> cases = {{2, 3, 200, 200}, {1, 2, 70, 77}, {2, 1, 16, 9}, {1, 1, 1, 1}, {1, 2, 64, 32}};
    if (argc > 1 && std::string(argv[1]) == "--quick") cases.resize(2);
    bool ok = true;
    unsigned seed = 1;
    for (int d : dims) {
        Kernels kf = kernels(d);
        for (Case c : cases) {
            const int C = c.h * d;
            const double scale = 1.0 / std::sqrt((double)d);
            const float sl2 = (float)(scale * 1.4426950408889634);
            auto q = uniform((size_t)c.b * c.n * C, 2.f, seed++);
            auto k = uniform((size_t)c.b * c.m * C, 2.f, seed++);
            auto v = uniform((size_t)c.b * c.m * C, 1.f, seed++);
            // Tensors starting 4 elements into their buffers (a view's offset), as imp.rs allows.
            const size_t off = 4;
            dim3 block{128, 1, 1};
            dim3 grid{(unsigned)((c.n + kf.br - 1) / kf.br), (unsigned)(c.b * c.h), 1};

            auto want = reference(q, k, v, c, d, scale);
            auto q32 = stored<float>(q, off), k32 = stored<float>(k, off), v32 = stored<float>(v, off);
            std::vector<float> o32(off + want.size(), NAN);
            emu::launch(grid, block, kf.smem, [&] {
                kf.tiled_f32(q32.data() + off, k32.data() + off, v32.data() + off, o32.data() + off,
                             c.n, c.m, c.h, sl2);
            });
            Errors e32 = compare(o32, want, off);

            // f16 storage: the reference from the f16-rounded inputs.
            auto wanth = reference(half_rounded(q), half_rounded(k), half_rounded(v), c, d, scale);
            auto q16 = stored<half_t>(q, off), k16 = stored<half_t>(k, off), v16 = stored<half_t>(v, off);
            std::vector<half_t> o16(off + want.size(), 0x7e00);
            emu::launch(grid, block, kf.smem, [&] {
                kf.tiled_f16(q16.data() + off, k16.data() + off, v16.data() + off, o16.data() + off,
                             c.n, c.m, c.h, sl2);
            });
            Errors e16 = compare(o16, wanth, off);
            std::vector<half_t> os(off + want.size(), 0x7e00);
            dim3 grid_simt{(unsigned)((c.n + 15) / 16), (unsigned)(c.b * c.h), 1};
            emu::launch(grid_simt, block, 16 * d * 4 + 2 * 32 * (d + 2) * 2, [&] {
                kf.simt(q16.data() + off, k16.data() + off, v16.data() + off, os.data() + off, c.n,
                        c.m, c.h, sl2);
            });
            Errors es = compare(os, wanth, off);

            // f32: what f32 arithmetic allows (ex2.approx is within 2 ulp); f16: twice the output's
            // rounding (2^-11 relative).
            bool pass = e32.rel < 1e-5 && e32.max < 1e-4 && e16.rel < 4e-4 && e16.max < 2e-3 &&
                        es.rel < 4e-4 && es.max < 2e-3;
            ok &= pass;
            std::printf("d=%-3d b=%d heads=%d n=%-3d m=%-3d  tiled_f32 rel %.2e max %.2e  "
                        "tiled_f16 rel %.2e max %.2e  simt_f16 rel %.2e max %.2e  %s\n",
                        d, c.b, c.h, c.n, c.m, e32.rel, e32.max, e16.rel, e16.max, es.rel, es.max,
                        pass ? "ok" : "MISS");
            std::fflush(stdout);
        }
    }
    std::printf("%s\n", ok ? "all cases within tolerance" : "SOME CASES MISSED");
    return ok ? 0 : 1;
}
