//! Linear layers through cuBLASLt: `x W^T + bias (+ residual)` in one GEMM, the bias in the
//! GEMM's epilogue and the residual as its `C` operand (`D = x W^T + 1 * C + bias`), instead of
//! a cuBLAS GEMM followed by our bias pass (`SDSERVE_CUDA_LINEAR=lt`; docs/GPU.md).
//!
//! cudarc's `CudaBlasLT::matmul` creates three layouts, a descriptor and a preference and runs
//! cuBLASLt's heuristic on every call: host time the 512 step cannot spare. Here they are made
//! once per shape (with the alignment the pointers have) and kept for the process; a call only
//! sets the bias pointer on the cached descriptor and enqueues the GEMM. The workspace is one
//! allocation per device from the stream-ordered pool candle allocates from, made at the first
//! call and kept (32 MiB on Hopper and newer, 4 MiB before: NVIDIA's recommendation, as
//! cudarc's), so nothing is allocated or synchronised inside a step but the output: a CUDA
//! graph of the step captures these calls like any kernel.
//!
//! With `SDSERVE_CUDA_LINEAR=lt_nchw` the projections around each transformer read and write
//! the NCHW image directly (batched GEMMs with strides, [`linear_from_nchw`] and
//! [`linear_to_nchw`]), so that the NCHW <-> tokens transposes and the transformer's residual
//! add are no separate passes.
//!
//! Arithmetic: f16 storage with f32 compute and scale (`CUBLAS_COMPUTE_32F`), the sum of the
//! product, the residual and the bias rounded to f16 once (today's path rounds the GEMM's
//! output, then the sum); f32 in f32 without TF32 (the exact-f32 path). Where cuBLAS runs in
//! pedantic math (below sm_70, or `SDSERVE_CUBLAS_MATH=pedantic`) the compute type is
//! `CUBLAS_COMPUTE_32F_PEDANTIC` (no tensor cores), as `arch::blas_pedantic` decides for both.

use std::collections::hash_map::Entry;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use half::f16;

#[path = "lt_plan.rs"]
mod plan;
use plan::{device_state, lt_err, make_plan, set_desc, Gemm, Key, STATE};

/// The CUDA storage of a tensor's read guard (the caller checked the device).
fn cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("sdserve cuBLASLt linear: not a CUDA tensor"),
    }
}

/// Runs `g` on contiguous tensors of one dtype (f16 or f32) on one GPU, `c` (if any) added
/// with beta 1, into a new tensor of `out_dims`. `None`: no plan for it (said once), or a bias
/// off 16 bytes.
fn run(
    g: Gemm,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    c: Option<&Tensor>,
    out_dims: Vec<usize>,
) -> Result<Option<Tensor>> {
    let dtype = a.dtype();
    let (ag, al) = a.storage_and_layout();
    let (bg, bl) = b.storage_and_layout();
    let biasg = bias.map(|t| t.storage_and_layout());
    let cg = c.map(|t| t.storage_and_layout());
    let a_s = cuda(&ag)?;
    let dev = a_s.device().clone();
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let pedantic = super::arch::blas_pedantic(&dev)?;
    let elem = dtype.size_in_bytes();
    macro_rules! go {
        ($t:ty) => {{
            let av = super::imp::view::<$t>(a_s, al)?;
            let bv = super::imp::view::<$t>(cuda(&bg)?, bl)?;
            let biasv = match &biasg {
                Some((s, l)) => Some(super::imp::view::<$t>(cuda(s)?, l)?),
                None => None,
            };
            let cv = match &cg {
                Some((s, l)) => Some(super::imp::view::<$t>(cuda(s)?, l)?),
                None => None,
            };
            let count = g.batch * g.stride_d.max(g.ldd * g.n);
            // SAFETY: cuBLASLt writes every element of D (beta * C reads only `c`).
            let out = unsafe { dev.alloc::<$t>(count)? };
            let (pa, _ra) = av.device_ptr(&stream);
            let (pb, _rb) = bv.device_ptr(&stream);
            let (pd, _rd) = out.device_ptr(&stream);
            let pbias = biasv.as_ref().map(|v| v.device_ptr(&stream));
            let pcr = cv.as_ref().map(|v| v.device_ptr(&stream));
            let pc = pcr.as_ref().map_or(pd, |p| p.0);
            // The epilogue reads the bias in 16-byte pieces on some GPUs: a bias elsewhere
            // keeps today's path.
            if pbias.as_ref().is_some_and(|p| p.0 % 16 != 0) {
                return Ok(None);
            }
            let strides = [g.stride_a, g.stride_b, g.stride_d].map(|s| (s * elem) as u64);
            let align = [pa, pb, pc, pd]
                .into_iter()
                .chain(strides.into_iter().filter(|_| g.batch > 1))
                .map(|p| 1u64 << p.trailing_zeros().min(8))
                .min()
                .unwrap_or(256) as u32;
            let key = Key {
                half: dtype == DType::F16,
                gemm: g,
                bias: pbias.is_some(),
                pedantic,
                align,
            };
            let bias_ptr = pbias.as_ref().map_or(0, |p| p.0);
            let mut map = STATE
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let state = device_state(&mut map, &dev)?;
            let ws_bytes = state.workspace.len();
            let (pw, _rw) = state.workspace.device_ptr(&stream);
            let plan = match state.plans.entry(key) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let made = make_plan(state.handle, &key, ws_bytes, bias_ptr);
                    if let Err(err) = &made {
                        eprintln!(
                            "sdserve: cuBLASLt cannot plan linear {key:?}: {err:?}; cuBLAS + bias pass runs it"
                        );
                    }
                    e.insert(made.ok())
                }
            };
            let Some(p) = plan.as_ref() else {
                return Ok(None);
            };
            let (alpha, beta) = (1f32, if pcr.is_some() { 1f32 } else { 0f32 });
            // SAFETY: the plan was made for exactly these shapes, strides, dtype and
            // alignment, and the callers checked that the buffers hold what they describe; the
            // descriptor is only touched under the lock, and cuBLASLt reads the bias pointer
            // when the GEMM is enqueued.
            let enqueued = unsafe {
                let bias_set = if key.bias {
                    set_desc(
                        p.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias_ptr,
                    )
                } else {
                    Ok(())
                };
                bias_set.and_then(|()| {
                    result::matmul(
                        state.handle,
                        p.desc,
                        (&alpha as *const f32).cast(),
                        (&beta as *const f32).cast(),
                        pa as *const _,
                        p.a,
                        pb as *const _,
                        p.b,
                        pc as *const _,
                        p.c,
                        pd as *mut _,
                        p.c,
                        &p.algo,
                        pw as *mut _,
                        ws_bytes,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                })
            };
            if let Err(e) = enqueued {
                // Planned but refused when enqueued: nothing ran; this shape goes back to
                // today's path for good, said once.
                eprintln!(
                    "sdserve: cuBLASLt cannot plan linear {key:?}: enqueuing failed: {}; cuBLAS + bias pass runs it",
                    lt_err("matmul", e)
                );
                *plan = None;
                return Ok(None);
            }
            drop((_ra, _rb, _rd, pbias, pcr, _rw));
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F16 => go!(f16),
        _ => go!(f32),
    };
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(out),
        out_dims,
        BackpropOp::none(),
        false,
    )))
}

/// Whether `t` has `x`'s dtype and device.
fn like(t: &Tensor, x: &Tensor) -> bool {
    t.dtype() == x.dtype() && t.device().same_device(x.device())
}

/// f16 or f32, and `w` a contiguous `[n, k]` matrix like `x`: `(n, k)`.
fn weight(x: &Tensor, w: &Tensor) -> Result<Option<(usize, usize)>> {
    if !matches!(x.dtype(), DType::F16 | DType::F32) || w.rank() != 2 {
        return Ok(None);
    }
    if !like(w, x) || !w.is_contiguous() || w.elem_count() == 0 {
        return Ok(None);
    }
    w.dims2().map(Some)
}

/// `x W^T + bias (+ residual)` over the last dim of `x` (`[.., k]`, `w` `[n, k]` as stored,
/// `bias` `[n]`, `residual` shaped like the output), f16 or f32, every operand of that dtype on
/// the same GPU; `None` where it does not apply (other dtypes or layouts, a shape cuBLASLt has
/// no algorithm for: said once on stderr), and the caller runs its own path.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight(x, w)? else {
        return Ok(None);
    };
    if x.rank() == 0 || x.dims()[x.rank() - 1] != k || x.elem_count() == 0 {
        return Ok(None);
    }
    let rows = x.elem_count() / k;
    let mut dims = x.dims().to_vec();
    let last = dims.len() - 1;
    dims[last] = n;
    if bias.is_some_and(|b| !like(b, x) || b.elem_count() != n)
        || residual.is_some_and(|r| !like(r, x) || r.dims() != dims.as_slice())
    {
        return Ok(None);
    }
    let g = Gemm::linear(rows, n, k);
    let bias = bias.map(|b| b.flatten_all()?.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    run(
        g,
        w,
        &x.contiguous()?,
        bias.as_ref(),
        residual.as_ref(),
        dims,
    )
}

/// A transformer's `proj_in` over its NCHW input: `x` `[B, k, H, W]` -> `[B, H*W, n]` `=
/// x_b^T W^T + bias`, reading the image in place (no NCHW -> tokens copy); `None` as
/// [`linear`].
pub fn linear_from_nchw(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight(x, w)? else {
        return Ok(None);
    };
    if x.rank() != 4 || x.dim(1)? != k || bias.is_some_and(|b| !like(b, x) || b.elem_count() != n) {
        return Ok(None);
    }
    let (batch, _, h, wd) = x.dims4()?;
    let hw = h * wd;
    if hw == 0 || batch == 0 {
        return Ok(None);
    }
    let g = Gemm::from_nchw(batch, k, hw, n);
    let bias = bias.map(|b| b.flatten_all()?.contiguous()).transpose()?;
    run(
        g,
        w,
        &x.contiguous()?,
        bias.as_ref(),
        None,
        vec![batch, hw, n],
    )
}

/// A transformer's `proj_out` back to NCHW plus the residual, without its bias: `t`
/// `[B, H*W, k]`, `residual` `[B, n, H, W]` -> `residual + (t_b W^T)^T` as `[B, n, H, W]`
/// (no tokens -> NCHW copy, no separate residual add). The bias is per column of this GEMM,
/// which cuBLASLt's epilogue does not offer: the caller adds it over the image. `None` as
/// [`linear`].
pub fn linear_to_nchw(t: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight(t, w)? else {
        return Ok(None);
    };
    if t.rank() != 3 || residual.rank() != 4 || !like(residual, t) {
        return Ok(None);
    }
    let (batch, hw, tk) = t.dims3()?;
    let (rb, rc, h, wd) = residual.dims4()?;
    if tk != k || rb != batch || rc != n || h * wd != hw || hw == 0 || batch == 0 {
        return Ok(None);
    }
    let g = Gemm::to_nchw(batch, hw, k, n);
    run(
        g,
        &t.contiguous()?,
        w,
        None,
        Some(&residual.contiguous()?),
        residual.dims().to_vec(),
    )
}

/// [`linear_to_nchw`] (booked as `gemm_lt` when profiling), then the bias over the image (our
/// `bias_add` in a convolution's layout, booked as `bias_add`).
pub fn linear_to_nchw_add(
    t: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    let n = w.dims().first().copied().unwrap_or(0);
    if bias.is_some_and(|b| !like(b, t) || b.elem_count() != n) {
        return Ok(None);
    }
    let Some(y) = super::profiled(t.device(), "gemm_lt", || linear_to_nchw(t, w, residual))? else {
        return Ok(None);
    };
    let Some(b) = bias else {
        return Ok(Some(y));
    };
    let hw = y.dim(2)? * y.dim(3)?;
    if let Some(out) = super::bias_add(&y, b, hw, None)? {
        return Ok(Some(out));
    }
    y.broadcast_add(&b.reshape((1, n, 1, 1))?).map(Some)
}

#[cfg(test)]
#[path = "lt_tests.rs"]
mod tests;
