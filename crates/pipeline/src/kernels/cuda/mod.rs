//! sdserve's own CUDA kernels for the hot spots candle composes from many small ops, and the
//! device settings that take the host out of the way (docs/GPU.md, "Kernels").
//!
//! - [`attention`]: flash-style attention straight from the q/k/v projections' `[B, N, H*D]`
//!   layout (no head split/merge copies); the scores never reach device memory. f16 or f32 in
//!   and out, f32 accumulation and softmax; for f16 tensor cores (`mma.sync` m16n8k16) on sm_80+
//!   and a register-tiled CUDA-core kernel below; f32 on CUDA cores in f32 everywhere.
//! - [`group_norm`] (+ SiLU), [`layer_norm`], [`geglu`]: one pass each, f32 statistics, f16 or
//!   f32 storage, f32 affine parameters (candle: 8-13 ops with f32 casts each).
//! - [`bias_add`]: a bias (and a residual) added in one pass after a GEMM or convolution.
//! - [`linear`]: with `SDSERVE_CUDA_LINEAR=lt`, linear layers as one cuBLASLt GEMM with the bias
//!   in its epilogue and the residual as its `C` operand (default: candle's cuBLAS GEMM, then
//!   [`bias_add`]); with `lt_nchw` also [`linear_from_nchw`] / [`linear_to_nchw_add`], the
//!   projections around each transformer on the NCHW image (no transposes).
//! - [`conv2d`]: cuDNN convolutions with descriptors and algorithm cached per shape, f16 data
//!   accumulated in f32 (candle: new descriptors per call, half-precision accumulation).
//! - [`prepare_device`]: no CUDA events per allocation, a memory pool that keeps freed memory.
//!
//! The kernels (kernels.cu) are compiled by NVRTC when first used, for the device's compute
//! capability (`SDSERVE_CUDA_KERNEL_ARCH=75` forces an older target, e.g. to run the pre-Ampere
//! code path on a newer GPU), or loaded from `SDSERVE_CUDA_KERNELS_PTX`; [`arch`] holds every
//! architecture-dependent choice (`SDSERVE_CUDA_ARCH_AS=61`: all as on a GTX 1060); `SDSERVE_CUDA_KERNELS=none` or a comma list of
//! `attention,group_norm,layer_norm,geglu,bias_add,conv` chooses which ones replace candle's ops (default all),
//! for A/B measurements. Every front end returns `Ok(None)` when it does not apply (CPU tensors,
//! other dtypes or shapes, a build without CUDA), and the caller keeps its generic path.

use candle_core::{Device, Result, Tensor};

pub mod arch;
#[cfg(feature = "cuda-core")]
mod attn;
#[cfg(feature = "cuda")]
mod conv;
#[cfg(feature = "cuda-core")]
mod graph;
#[cfg(feature = "cuda-core")]
mod imp;
#[cfg(feature = "cuda-core")]
mod lt;
#[cfg(feature = "cuda-core")]
mod profile;
pub mod source;

/// Whether `SDSERVE_CUDA_PROFILE=1` asked for device time per kind of op ([`profiled`]).
pub fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDSERVE_CUDA_PROFILE").is_ok_and(|v| v.trim() == "1"))
}

/// Runs `f`, and when [`profiling`] on a GPU, adds the device time of the work it issued to
/// `what`'s total (CUDA events around it; nested calls count for the outermost only).
pub fn profiled<T>(
    device: &Device,
    what: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    #[cfg(feature = "cuda-core")]
    if profiling() && !device.is_cpu() {
        return profile::profiled(device, what, f);
    }
    let _ = (device, what);
    f()
}

/// Device milliseconds and calls per kind of op since the last call (waits for the device);
/// empty unless [`profiling`].
pub fn take_profile(device: &Device) -> Result<std::collections::BTreeMap<String, (f64, usize)>> {
    #[cfg(feature = "cuda-core")]
    if profiling() && !device.is_cpu() {
        let p = profile::take(device)?;
        return Ok(p.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    }
    let _ = device;
    Ok(Default::default())
}

/// The UNet step captured once per shape as a CUDA graph and replayed, so that the host no
/// longer issues its thousands of launches each step (`SDSERVE_CUDA_GRAPH=1`; off by default,
/// and off under `SDSERVE_CUDA_PROFILE`). One lives for one denoising loop, whose UNet weights
/// stay where they are meanwhile: the graph holds their device addresses. The first step of a
/// shape runs plainly, the second is captured and launched, later ones are launched. If
/// capturing or launching fails (something in the step that a graph cannot hold), one line
/// says so and the loop goes on without a graph. A no-op on the CPU and without CUDA.
pub struct StepGraph {
    on: bool,
    #[cfg(feature = "cuda-core")]
    device: Device,
    #[cfg(feature = "cuda-core")]
    state: Option<graph::Graphed>,
}

impl StepGraph {
    pub fn new(device: &Device) -> Self {
        let on = cfg!(feature = "cuda-core")
            && !device.is_cpu()
            && !profiling()
            && std::env::var("SDSERVE_CUDA_GRAPH").is_ok_and(|v| v.trim() == "1");
        StepGraph {
            on,
            #[cfg(feature = "cuda-core")]
            device: device.clone(),
            #[cfg(feature = "cuda-core")]
            state: None,
        }
    }

    /// On whatever `SDSERVE_CUDA_GRAPH` says (tests).
    #[cfg(all(test, feature = "cuda-core"))]
    pub(crate) fn forced(device: &Device) -> Self {
        StepGraph {
            on: !device.is_cpu(),
            device: device.clone(),
            state: None,
        }
    }

    /// Whether a graph is captured and in use.
    pub fn captured(&self) -> bool {
        #[cfg(feature = "cuda-core")]
        return self.on && self.state.as_ref().is_some_and(|g| g.captured());
        #[cfg(not(feature = "cuda-core"))]
        false
    }

    /// `f(inputs)`, through the graph when on (see [`StepGraph`]). `f` must depend on nothing
    /// but `inputs` and state that stays put for the graph's life (weights, settings).
    pub fn run<E>(
        &mut self,
        inputs: &[&Tensor],
        mut f: impl FnMut(&[Tensor]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Tensor, E>
    where
        E: From<candle_core::Error> + std::fmt::Display,
    {
        if !self.on {
            return f(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
        }
        #[cfg(feature = "cuda-core")]
        if inputs.iter().all(|t| t.device().same_device(&self.device)) {
            match graph::run(&mut self.state, &self.device, inputs, &mut f)? {
                graph::Outcome::Done(t) => return Ok(t),
                graph::Outcome::Failed(e) => {
                    eprintln!("sdserve: CUDA graph of the UNet step failed, running without: {e}");
                    self.on = false;
                    self.state = None;
                }
            }
        }
        f(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>())
    }
}

/// A kernel that [`enabled`] can switch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Attention,
    GroupNorm,
    LayerNorm,
    Geglu,
    BiasAdd,
    Conv,
}

impl Kernel {
    const ALL: [Kernel; 6] = [
        Kernel::Attention,
        Kernel::GroupNorm,
        Kernel::LayerNorm,
        Kernel::Geglu,
        Kernel::BiasAdd,
        Kernel::Conv,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::GroupNorm => "group_norm",
            Kernel::LayerNorm => "layer_norm",
            Kernel::Geglu => "geglu",
            Kernel::BiasAdd => "bias_add",
            Kernel::Conv => "conv",
        }
    }
}

/// Which kernels `SDSERVE_CUDA_KERNELS` (`all` when unset, `none`, or a comma list) turns on.
fn parse_enabled(spec: Option<&str>) -> Vec<Kernel> {
    match spec.map(str::trim) {
        None | Some("") | Some("all") => Kernel::ALL.to_vec(),
        Some(list) => Kernel::ALL
            .into_iter()
            .filter(|k| list.split(',').any(|s| s.trim() == k.name()))
            .collect(),
    }
}

/// Whether `k` replaces candle's ops in this process.
pub fn enabled(k: Kernel) -> bool {
    static ON: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
    ON.get_or_init(|| parse_enabled(std::env::var("SDSERVE_CUDA_KERNELS").ok().as_deref()))
        .contains(&k)
}

/// Device settings for speed, applied once right after the device is opened (before the model
/// is loaded): no CUDA event pair per allocation (candle uses a single stream, so cudarc's
/// cross-stream tracking only costs two driver calls per op), and a memory-pool release
/// threshold so that freed blocks are reused instead of going back to the driver at every
/// synchronisation (a caching allocator in effect; `memory::release_cached_memory` still trims
/// the pool between requests). `SDSERVE_CUDA_EVENT_TRACKING=1` and `SDSERVE_CUDA_POOL_KEEP_MB=0`
/// restore candle's defaults for A/B runs. A no-op on the CPU.
pub fn prepare_device(device: &Device) {
    #[cfg(feature = "cuda-core")]
    imp::prepare_device(device);
    #[cfg(not(feature = "cuda-core"))]
    let _ = device;
}

/// `softmax(q k^T * scale) v` over `[B, N, heads*D]` queries and `[B, M, heads*D]` keys/values,
/// returned as `[B, N, heads*D]` (heads merged): f16 or f32 CUDA tensors with a head dim of 32,
/// 40, 64, 80, 128 or 160. f32 runs the register-tiled CUDA-core kernel in f32 (no TF32);
/// `SDSERVE_CUDA_ATTENTION_F32=candle` leaves f32 to candle's ops (A/B runs).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    if q.device().is_cpu() || !enabled(Kernel::Attention) {
        return Ok(None);
    }
    if q.dtype() == candle_core::DType::F32 && !f32_attention() {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    {
        // SDSERVE_CUDA_ATTENTION (f16): simt = the register-tiled CUDA-core kernel on any GPU
        // (the pre-Ampere path), simt_warp = the first CUDA-core kernel (one warp per query
        // row), mma1 = the first tensor-core kernel, without double buffering (A/B runs).
        static VARIANT: std::sync::OnceLock<attn::Variant> = std::sync::OnceLock::new();
        let variant = *VARIANT.get_or_init(|| {
            attn::Variant::parse(std::env::var("SDSERVE_CUDA_ATTENTION").ok().as_deref())
        });
        profiled(q.device(), "attention", || {
            attn::attention(q, k, v, heads, scale, variant)
        })
    }
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (k, v, heads, scale);
        Ok(None)
    }
}

/// Whether f32 attention runs our kernel (`SDSERVE_CUDA_ATTENTION_F32=candle`: candle's ops).
fn f32_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("SDSERVE_CUDA_ATTENTION_F32").map_or(true, |v| v.trim() != "candle")
    })
}

/// `act(group_norm(x) * weight + bias)` over `[B, C, ...]` (f16 or f32 CUDA), statistics in
/// f32, `weight`/`bias` f32; `silu` picks the activation (identity otherwise).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if x.device().is_cpu() || !enabled(Kernel::GroupNorm) {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(x.device(), "group_norm", || {
        imp::group_norm(x, groups, weight, bias, eps, silu)
    });
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (groups, weight, bias, eps, silu);
        Ok(None)
    }
}

/// LayerNorm over the last dim (f16 or f32 CUDA), statistics in f32, `weight`/`bias` f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if x.device().is_cpu() || !enabled(Kernel::LayerNorm) {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(x.device(), "layer_norm", || {
        imp::layer_norm(x, weight, bias, eps)
    });
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (weight, bias, eps);
        Ok(None)
    }
}

/// GEGLU over the last dim: `h[.., :inner] * gelu_erf(h[.., inner:])` (f16 or f32 CUDA, f32
/// arithmetic).
pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    if h.device().is_cpu() || !enabled(Kernel::Geglu) {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(h.device(), "geglu", || imp::geglu(h));
    #[cfg(not(feature = "cuda-core"))]
    Ok(None)
}

/// `y + bias (+ residual)` with `bias` repeating every `inner` elements of `y` and cycling over
/// its length: a linear layer's bias (`inner` 1), a convolution's (`inner` = H*W), a per
/// (batch, channel) bias over `[B, C, H, W]` (`inner` = H*W, `bias` of B*C). One pass in f32
/// instead of candle's broadcast add (which also uploads the broadcast strides each call).
pub fn bias_add(
    y: &Tensor,
    bias: &Tensor,
    inner: usize,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if y.device().is_cpu() || !enabled(Kernel::BiasAdd) {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(y.device(), "bias_add", || {
        imp::bias_add(y, bias, inner, residual)
    });
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (bias, inner, residual);
        Ok(None)
    }
}

/// How linear layers run on a GPU (`SDSERVE_CUDA_LINEAR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinearPath {
    /// `cublas` (default): candle's cuBLAS GEMM, then [`bias_add`].
    Cublas,
    /// `lt`: one cuBLASLt GEMM, bias and residual in its epilogue.
    Lt,
    /// `lt_nchw`: `lt`, and each transformer's `proj_in`/`proj_out` reading and writing the
    /// NCHW image (no transposes, the residual in the GEMM).
    LtNchw,
}

fn parse_linear(spec: Option<&str>) -> Result<LinearPath> {
    match spec.map(str::trim) {
        None | Some("") | Some("cublas") => Ok(LinearPath::Cublas),
        Some("lt") => Ok(LinearPath::Lt),
        Some("lt_nchw") => Ok(LinearPath::LtNchw),
        Some(other) => {
            candle_core::bail!("SDSERVE_CUDA_LINEAR={other}: expected cublas, lt or lt_nchw")
        }
    }
}

/// This process's [`LinearPath`] (read once; an unknown value is said once on stderr and
/// means the default).
fn linear_path() -> LinearPath {
    static PATH: std::sync::OnceLock<LinearPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(
        || match parse_linear(std::env::var("SDSERVE_CUDA_LINEAR").ok().as_deref()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("sdserve: {e}; using cublas");
                LinearPath::Cublas
            }
        },
    )
}

/// `x W^T + bias (+ residual)` over the last dim of `x` (`w` `[n, k]` as stored, `bias` `[n]`,
/// `residual` shaped like the output) as one cuBLASLt GEMM, bias and residual in its epilogue,
/// when `SDSERVE_CUDA_LINEAR=lt` or `lt_nchw` (off by default: not yet measured on a GPU); f16
/// (f32 compute) or f32 (no TF32) CUDA tensors of one dtype. `None` elsewhere: the caller runs
/// its own path.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if x.device().is_cpu() || linear_path() == LinearPath::Cublas {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(x.device(), "gemm_lt", || lt::linear(x, w, bias, residual));
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (w, bias, residual);
        Ok(None)
    }
}

/// A transformer's `proj_in` over its NCHW input `x` `[B, k, H, W]` -> tokens `[B, H*W, n]`
/// (`w` `[n, k]`), one batched cuBLASLt GEMM reading the image in place, bias in its epilogue,
/// when `SDSERVE_CUDA_LINEAR=lt_nchw`; `None` elsewhere (the caller transposes and runs its
/// linear layer).
pub fn linear_from_nchw(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if x.device().is_cpu() || linear_path() != LinearPath::LtNchw {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return profiled(x.device(), "gemm_lt", || lt::linear_from_nchw(x, w, bias));
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (w, bias);
        Ok(None)
    }
}

/// A transformer's `proj_out` back to NCHW plus its residual: tokens `t` `[B, H*W, k]`,
/// `residual` `[B, n, H, W]` -> `residual + proj_out(t)` as `[B, n, H, W]`: one batched cuBLASLt
/// GEMM writing the image with the residual as its `C`, then the bias over the image
/// ([`bias_add`], a convolution's layout), when `SDSERVE_CUDA_LINEAR=lt_nchw`; `None` elsewhere.
pub fn linear_to_nchw_add(
    t: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    if t.device().is_cpu() || linear_path() != LinearPath::LtNchw {
        return Ok(None);
    }
    #[cfg(feature = "cuda-core")]
    return lt::linear_to_nchw_add(t, w, bias, residual);
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = (w, bias, residual);
        Ok(None)
    }
}

/// `conv2d(x, weight)` through cuDNN with a per-shape plan (kernels/cuda/conv.rs) for f16/f32
/// NCHW CUDA tensors; `None` elsewhere, without cuDNN (`cuda-core`), or when
/// `SDSERVE_CUDNN_ALGO` asks for candle's own path with a fixed algorithm.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Option<Tensor>> {
    if x.device().is_cpu() || !enabled(Kernel::Conv) {
        return Ok(None);
    }
    if std::env::var("SDSERVE_CUDNN_ALGO").is_ok_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return profiled(x.device(), "conv", || {
        conv::conv2d(x, weight, stride, padding)
    });
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (weight, stride, padding);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_switch_parses_lists() {
        assert_eq!(parse_enabled(None), Kernel::ALL.to_vec());
        assert_eq!(parse_enabled(Some("all")), Kernel::ALL.to_vec());
        assert!(parse_enabled(Some("none")).is_empty());
        assert_eq!(
            parse_enabled(Some("geglu, attention")),
            vec![Kernel::Attention, Kernel::Geglu]
        );
    }

    #[test]
    fn linear_switch_parses() {
        assert_eq!(parse_linear(None).unwrap(), LinearPath::Cublas);
        assert_eq!(parse_linear(Some(" cublas ")).unwrap(), LinearPath::Cublas);
        assert_eq!(parse_linear(Some("lt")).unwrap(), LinearPath::Lt);
        assert_eq!(parse_linear(Some("lt_nchw")).unwrap(), LinearPath::LtNchw);
        let e = parse_linear(Some("cublaslt")).unwrap_err().to_string();
        assert!(e.contains("SDSERVE_CUDA_LINEAR=cublaslt"), "{e}");
    }

    #[test]
    fn cpu_tensors_are_left_to_the_cpu_kernels() -> Result<()> {
        let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
        let w = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
        assert!(group_norm(&x, 2, &w, &w, 1e-5, true)?.is_none());
        assert!(layer_norm(&x, &w.narrow(0, 0, 2)?, &w.narrow(0, 0, 2)?, 1e-5)?.is_none());
        assert!(geglu(&x)?.is_none());
        let q = Tensor::ones((1, 3, 64), candle_core::DType::F32, &Device::Cpu)?;
        assert!(attention(&q, &q, &q, 2, 0.1)?.is_none());
        let w = Tensor::ones((5, 64), candle_core::DType::F32, &Device::Cpu)?;
        assert!(linear(&q, &w, None, None)?.is_none());
        assert!(linear_from_nchw(&x, &w, None)?.is_none());
        assert!(linear_to_nchw_add(&q, &w, None, &x)?.is_none());
        prepare_device(&Device::Cpu);
        Ok(())
    }
}
