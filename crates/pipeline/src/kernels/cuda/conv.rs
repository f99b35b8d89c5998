//! 2-D convolution through cuDNN with a plan cached per shape, f32 accumulation for f16 data.
//!
//! candle's cuDNN convolution builds four descriptors per call, asks cuDNN's heuristics per
//! call unless an algorithm is fixed, allocates a zeroed workspace, and for f16 computes in half
//! precision ("true half"). Here the descriptors and the heuristics' choice are made once per
//! shape (thread-local, like candle's cuDNN handles), the workspace is a plain stream-ordered
//! allocation, and f16 convolutions accumulate in f32 ("pseudo-half", as PyTorch does: on
//! Pascal true half would run at 1/64 of the f32 rate, on tensor-core GPUs it loses precision
//! for nothing).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    self, sys, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::{DeviceId, WrapErr};

const DEFAULT_EVENT: CUevent_flags = CUevent_flags::CU_EVENT_DEFAULT;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::f16;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: DeviceId,
    half: bool,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
    /// The capability the math type is chosen for (`arch::host_arch`).
    arch: u32,
}

/// Descriptors and algorithm for one shape, storage type T (f16 or f32), compute in f32.
struct Plan<T: cudnn::CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    /// The algorithm and workspace after timing them on the first call ([`find_enabled`]).
    chosen: Cell<Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>>,
}

/// Every forward algorithm cuDNN has, tried in turn by the first call of a shape.
const ALGOS: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    [
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
};

/// Whether the first call of each shape times every algorithm and keeps the fastest (cuDNN's
/// "benchmark mode", what `cudnnFind*` does): `SDSERVE_CUDNN_FIND=1`. Off by default: measured
/// on an H200 (docs/GPU.md) it gained no device time over the heuristics' first pick at 768
/// and in f32, and at 512 its picks cost more host time to launch (the step got slower).
fn find_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDSERVE_CUDNN_FIND").is_ok_and(|v| v.trim() == "1"))
}

/// The largest workspace an algorithm may ask for (`SDSERVE_CUDNN_WORKSPACE_MB`, default 256):
/// FFT algorithms want gigabytes at 768x768, which the memory plan does not budget.
fn workspace_cap() -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("SDSERVE_CUDNN_WORKSPACE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(256)
            << 20
    })
}

enum AnyPlan {
    F16(Plan<f16>),
    F32(Plan<f32>),
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<Key, Option<Arc<AnyPlan>>>> = RefCell::new(HashMap::new());
}

/// The error that sends a convolution back to candle's own path.
const UNSUPPORTED: &str = "sdserve-cudnn-conv2d: no cuDNN plan for this shape";

fn err(e: cudnn::CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

fn make_plan<T: cudnn::CudnnDataType>(h: &Arc<Cudnn>, k: &Key) -> Result<Plan<T>> {
    let p = k.padding as i32;
    let s = k.stride as i32;
    let mut conv = h
        .create_conv2d::<f32>(
            [p, p],
            [s, s],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(err)?;
    if !super::arch::tensor_cores(k.arch) {
        // No tensor cores before Volta: FMA kernels only (on Pascal there are no others; a
        // newer GPU told SDSERVE_CUDA_ARCH_AS=61 runs what a Pascal card would).
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_FMA_MATH)
            .map_err(err)?;
    } else if k.half {
        // Tensor cores for f16 data with f32 accumulation; f32 data keeps cuDNN's default (TF32
        // where allowed, none under NVIDIA_TF32_OVERRIDE=0).
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
            .map_err(err)?;
    }
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let i = |v: [usize; 4]| v.map(|d| d as i32);
    let x = h.create_4d_tensor::<T>(nchw, i(k.x)).map_err(err)?;
    let w = h.create_4d_filter::<T>(nchw, i(k.w)).map_err(err)?;
    let oh = (k.x[2] + 2 * k.padding - k.w[2]) / k.stride + 1;
    let ow = (k.x[3] + 2 * k.padding - k.w[3]) / k.stride + 1;
    let y = h
        .create_4d_tensor::<T>(nchw, i([k.x[0], k.w[0], oh, ow]))
        .map_err(err)?;
    let fwd = ConvForward {
        conv: &conv,
        x: &x,
        w: &w,
        y: &y,
    };
    let algo = fwd.pick_algorithm().map_err(err)?;
    let workspace = fwd.get_workspace_size(algo).map_err(err)?;
    Ok(Plan {
        conv,
        x,
        w,
        y,
        algo,
        workspace,
        chosen: Cell::new(None),
    })
}

struct Conv {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "sdserve-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("sdserve-cudnn-conv2d: CUDA only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (xd, wd) = (xl.shape().dims4()?, wl.shape().dims4()?);
        let key = Key {
            dev: dev.id(),
            half: xs.dtype() == DType::F16,
            x: [xd.0, xd.1, xd.2, xd.3],
            w: [wd.0, wd.1, wd.2, wd.3],
            stride: self.stride,
            padding: self.padding,
            arch: super::arch::host_arch(dev)?,
        };
        let handle = HANDLES.with(|m| -> Result<Arc<Cudnn>> {
            if let Some(h) = m.borrow().get(&key.dev) {
                return Ok(h.clone());
            }
            let h = Cudnn::new(dev.cuda_stream()).map_err(err)?;
            m.borrow_mut().insert(key.dev, h.clone());
            Ok(h)
        })?;
        let plan = PLANS.with(|m| -> Result<Option<Arc<AnyPlan>>> {
            if let Some(p) = m.borrow().get(&key) {
                return Ok(p.clone());
            }
            let made = if key.half {
                make_plan::<f16>(&handle, &key).map(AnyPlan::F16)
            } else {
                make_plan::<f32>(&handle, &key).map(AnyPlan::F32)
            };
            // A shape cuDNN cannot plan is remembered and left to candle's path, said once (a
            // run that means to measure our path, e.g. FMA math as on sm_61, must see it).
            if let Err(e) = &made {
                eprintln!(
                    "sdserve: cuDNN cannot plan conv x {:?} w {:?} stride {} ({}, arch {}): {e}; candle's path runs it",
                    key.x,
                    key.w,
                    key.stride,
                    if key.half { "f16" } else { "f32" },
                    key.arch
                );
            }
            let p = made.ok().map(Arc::new);
            m.borrow_mut().insert(key, p.clone());
            Ok(p)
        })?;
        let Some(plan) = plan else {
            bail!("{UNSUPPORTED}")
        };
        let oh = (xd.2 + 2 * self.padding - wd.2) / self.stride + 1;
        let ow = (xd.3 + 2 * self.padding - wd.3) / self.stride + 1;
        let shape = Shape::from((xd.0, wd.0, oh, ow));
        let n = shape.elem_count();
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty, $p:expr, $one:expr, $zero:expr) => {{
                let x = super::imp::view::<$t>(xs, xl)?;
                let w = super::imp::view::<$t>(ws, wl)?;
                let mut y = unsafe { stream.alloc::<$t>(n) }.w()?;
                let fwd = ConvForward {
                    conv: &$p.conv,
                    x: &$p.x,
                    w: &$p.w,
                    y: &$p.y,
                };
                let (algo, bytes) = match $p.chosen.get() {
                    Some(c) => c,
                    None => {
                        let mut best = ($p.algo, $p.workspace, f32::INFINITY);
                        if find_enabled() {
                            for a in ALGOS {
                                let Ok(bytes) = fwd.get_workspace_size(a) else {
                                    continue;
                                };
                                if bytes > workspace_cap() {
                                    continue;
                                }
                                let mut work = unsafe { stream.alloc::<u8>(bytes.max(1)) }.w()?;
                                // SAFETY: descriptors made for these shapes; an algorithm
                                // cuDNN does not support here returns an error, nothing runs.
                                let mut go = || unsafe {
                                    fwd.launch(a, Some(&mut work), ($one, $zero), &x, &w, &mut y)
                                };
                                // One untimed run (loads the kernels), then two timed ones.
                                if go().is_err() {
                                    continue;
                                }
                                let timing = Some(DEFAULT_EVENT);
                                let t0 = stream.record_event(timing).w()?;
                                if go().is_err() || go().is_err() {
                                    continue;
                                }
                                let t1 = stream.record_event(timing).w()?;
                                t1.synchronize().w()?;
                                let ms = t0.elapsed_ms(&t1).w()? / 2.0;
                                if ms < best.2 {
                                    best = (a, bytes, ms);
                                }
                            }
                        }
                        $p.chosen.set(Some((best.0, best.1)));
                        (best.0, best.1)
                    }
                };
                let mut work = unsafe { stream.alloc::<u8>(bytes.max(1)) }.w()?;
                // SAFETY: the descriptors were made for exactly these shapes and dtype.
                unsafe { fwd.launch(algo, Some(&mut work), ($one, $zero), &x, &w, &mut y) }
                    .map_err(err)?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let out = match &*plan {
            AnyPlan::F16(p) => run!(f16, p, f16::ONE, f16::ZERO),
            AnyPlan::F32(p) => run!(f32, p, 1f32, 0f32),
        };
        Ok((out, shape))
    }
}

/// `conv2d(x, weight)` (no bias, no groups or dilation) for contiguous NCHW f16/f32 CUDA tensors.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Option<Tensor>> {
    if x.rank() != 4 || weight.rank() != 4 || x.dtype() != weight.dtype() {
        return Ok(None);
    }
    if !matches!(x.dtype(), DType::F16 | DType::F32) || x.dim(1)? != weight.dim(1)? {
        return Ok(None);
    }
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    if h + 2 * padding < weight.dim(2)? || w + 2 * padding < weight.dim(3)? || stride == 0 {
        return Ok(None);
    }
    match x
        .contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Conv { stride, padding })
    {
        Ok(y) => Ok(Some(y)),
        Err(e) if e.to_string().contains(UNSUPPORTED) => Ok(None),
        Err(e) => Err(e),
    }
}
