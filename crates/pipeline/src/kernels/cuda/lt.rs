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
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{sys::CUdevice_attribute, CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use half::f16;

/// One cuBLASLt problem in its own column-major terms: `batch` times
/// `D[m x n] = op(A)[m x k] op(B)[k x n] (+ C) (+ bias[m])`, `A` stored `k x m` when
/// `trans_a` (else `m x k`) with leading dimension `lda`, `B` likewise, `C` and `D` `m x n`
/// with `ldd`; strides in elements between the batch's matrices (0: the same one for all).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    lda: usize,
    trans_b: bool,
    ldb: usize,
    ldd: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    stride_d: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    half: bool,
    gemm: Gemm,
    bias: bool,
    pedantic: bool,
    /// The largest power of two (at most 256) dividing the addresses of A, B, C and D and the
    /// batch strides in bytes: the heuristic's pick must work at that alignment (it assumes
    /// 256 unless told).
    align: u32,
}

/// Descriptor, layouts and algorithm of one [`Key`].
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    /// `C` and `D`.
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by `make_plan` (null when it failed first) and is
        // destroyed once, here.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// cuBLASLt state of one device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// `None`: cuBLASLt has no algorithm for that shape; today's path runs it.
    plans: HashMap<Key, Option<Plan>>,
}

// SAFETY: the raw handles are only used under the mutex that holds them (one thread at a time);
// cuBLASLt handles and descriptors may be used from any thread, just not concurrently.
unsafe impl Send for Lt {}

static STATE: OnceLock<Mutex<HashMap<DeviceId, Lt>>> = OnceLock::new();

fn lt_err(what: &str, e: result::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets one attribute of a matmul descriptor.
///
/// # Safety
/// `desc` is a live descriptor and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> std::result::Result<(), result::CublasError> {
    result::set_matmul_desc_attribute(desc, attr, (v as *const T).cast(), size_of::<T>())
}

/// A matrix layout of `rows x cols` (column-major, leading dimension `ld`), `batch` of them
/// `stride` elements apart.
fn layout(
    ty: sys::cudaDataType,
    (rows, cols, ld): (usize, usize, usize),
    batch: usize,
    stride: usize,
) -> std::result::Result<sys::cublasLtMatrixLayout_t, result::CublasError> {
    use sys::cublasLtMatrixLayoutAttribute_t as L;
    let l = result::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)?;
    if batch > 1 {
        let (count, stride) = (batch as i32, stride as i64);
        // SAFETY: a live layout; int32 count, int64 stride, the attributes' types.
        let set = unsafe {
            result::set_matrix_layout_attribute(
                l,
                L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                4,
            )
            .and_then(|()| {
                result::set_matrix_layout_attribute(
                    l,
                    L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    (&stride as *const i64).cast(),
                    8,
                )
            })
        };
        if let Err(e) = set {
            // SAFETY: made above, not used after.
            unsafe {
                let _ = result::destroy_matrix_layout(l);
            }
            return Err(e);
        }
    }
    Ok(l)
}

fn make_plan(
    handle: sys::cublasLtHandle_t,
    key: &Key,
    workspace: usize,
    bias_ptr: u64,
) -> std::result::Result<Plan, result::CublasError> {
    use sys::cublasLtMatmulDescAttributes_t as D;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let ty = if key.half {
        sys::cudaDataType_t::CUDA_R_16F
    } else {
        sys::cudaDataType_t::CUDA_R_32F
    };
    let compute = if key.pedantic {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let g = key.gemm;
    let mut plan = Plan {
        desc: std::ptr::null_mut(),
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    plan.desc = result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)?;
    let epilogue = if key.bias {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
    } else {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
    };
    // SAFETY: a live descriptor; each value has its attribute's type (int32 operations:
    // 1 = CUBLAS_OP_T, 0 = CUBLAS_OP_N; uint32 epilogue; a device pointer).
    unsafe {
        set_desc(
            plan.desc,
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            &(g.trans_a as i32),
        )?;
        set_desc(
            plan.desc,
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            &(g.trans_b as i32),
        )?;
        set_desc(
            plan.desc,
            D::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &(epilogue as u32),
        )?;
        if key.bias {
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
        }
    }
    let a = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
    let b = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
    plan.a = layout(ty, (a.0, a.1, g.lda), g.batch, g.stride_a)?;
    plan.b = layout(ty, (b.0, b.1, g.ldb), g.batch, g.stride_b)?;
    plan.c = layout(ty, (g.m, g.n, g.ldd), g.batch, g.stride_d)?;
    let pref = result::create_matmul_pref()?;
    // SAFETY: a live preference of the documented attribute types (uint64 bytes, uint32
    // alignments), destroyed right after the heuristic.
    let found = unsafe {
        let set = |attr: P, v: *const std::ffi::c_void, size: usize| {
            result::set_matmul_pref_attribute(pref, attr, v, size)
        };
        let bytes = workspace as u64;
        let mut r = set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes as *const u64).cast(),
            8,
        );
        for attr in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            r = r.and_then(|()| set(attr, (&key.align as *const u32).cast(), 4));
        }
        let found = r.and_then(|()| {
            result::get_matmul_algo_heuristic(
                handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref,
            )
        });
        let _ = result::destroy_matmul_pref(pref);
        found?
    };
    if found.workspaceSize > workspace {
        return Err(result::CublasError(
            sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
        ));
    }
    plan.algo = found.algo;
    Ok(plan)
}

/// The device's cuBLASLt handle and workspace, made at its first use.
fn device_state<'a>(map: &'a mut HashMap<DeviceId, Lt>, dev: &CudaDevice) -> Result<&'a mut Lt> {
    let slot = match map.entry(dev.id()) {
        Entry::Occupied(e) => return Ok(e.into_mut()),
        Entry::Vacant(e) => e,
    };
    let stream = dev.cuda_stream();
    let major = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
    // SAFETY: only cuBLASLt writes it, as scratch space.
    let workspace = unsafe { dev.alloc::<u8>(bytes)? };
    let handle = result::create_handle().map_err(|e| lt_err("create", e))?;
    Ok(slot.insert(Lt {
        handle,
        workspace,
        plans: HashMap::new(),
    }))
}

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
            let Some(plan) = plan else {
                return Ok(None);
            };
            let (alpha, beta) = (1f32, if pcr.is_some() { 1f32 } else { 0f32 });
            // SAFETY: the plan was made for exactly these shapes, strides, dtype and
            // alignment, and the callers checked that the buffers hold what they describe; the
            // descriptor is only touched under the lock, and cuBLASLt reads the bias pointer
            // when the GEMM is enqueued.
            unsafe {
                if key.bias {
                    set_desc(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias_ptr,
                    )
                    .map_err(|e| lt_err("bias pointer", e))?;
                }
                result::matmul(
                    state.handle,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    pa as *const _,
                    plan.a,
                    pb as *const _,
                    plan.b,
                    pc as *const _,
                    plan.c,
                    pd as *mut _,
                    plan.c,
                    &plan.algo,
                    pw as *mut _,
                    ws_bytes,
                    stream.cu_stream() as sys::cudaStream_t,
                )
                .map_err(|e| lt_err("matmul", e))?;
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
    // Row-major `[rows, n] = x [rows, k] W^T` is column-major `n x rows = W^T' x'`: A the
    // weight (`k x n`, transposed), B the input (`k x rows`), bias per row of D.
    let g = Gemm {
        m: n,
        n: rows,
        k,
        trans_a: true,
        lda: k,
        trans_b: false,
        ldb: k,
        ldd: n,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_d: 0,
    };
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
    // Per image, column-major `n x hw` (the tokens, row-major `[hw, n]`) `= W x_b`, with
    // x_b stored as column-major `hw x k` (row-major `[k, hw]`, NCHW) and transposed.
    let g = Gemm {
        m: n,
        n: hw,
        k,
        trans_a: true,
        lda: k,
        trans_b: true,
        ldb: hw,
        ldd: n,
        batch,
        stride_a: 0,
        stride_b: k * hw,
        stride_d: hw * n,
    };
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
    // Per image, column-major `hw x n` (NCHW, row-major `[n, hw]`) `= t_b W^T`: A the tokens
    // (column-major `k x hw`, transposed), B the weight (`k x n`), C the residual image.
    let g = Gemm {
        m: hw,
        n,
        k,
        trans_a: true,
        lda: k,
        trans_b: false,
        ldb: k,
        ldd: hw,
        batch,
        stride_a: hw * k,
        stride_b: 0,
        stride_d: n * hw,
    };
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
