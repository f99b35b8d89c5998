//! 2-D convolution through cuDNN with a plan cached per shape, f32 accumulation for f16 data.
//!
//! candle's cuDNN convolution builds four descriptors per call, asks cuDNN's heuristics per
//! call unless an algorithm is fixed, allocates a zeroed workspace, and for f16 computes in half
//! precision ("true half"). Here the descriptors and the heuristics' choice are made once per
//! shape (thread-local, like candle's cuDNN handles), the workspace is a plain stream-ordered
//! allocation, and f16 convolutions accumulate in f32 ("pseudo-half", as PyTorch does: on
//! Pascal true half would run at 1/64 of the f32 rate, on tensor-core GPUs it loses precision
//! for nothing).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    self, sys, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::{DeviceId, WrapErr};
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
}

/// Descriptors and algorithm for one shape, storage type T (f16 or f32), compute in f32.
struct Plan<T: cudnn::CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
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
    if k.half {
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
            // A shape cuDNN cannot plan is remembered and left to candle's path.
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
                let mut work = unsafe { stream.alloc::<u8>($p.workspace.max(1)) }.w()?;
                let fwd = ConvForward {
                    conv: &$p.conv,
                    x: &$p.x,
                    w: &$p.w,
                    y: &$p.y,
                };
                // SAFETY: the descriptors were made for exactly these shapes and dtype.
                unsafe { fwd.launch($p.algo, Some(&mut work), ($one, $zero), &x, &w, &mut y) }
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
