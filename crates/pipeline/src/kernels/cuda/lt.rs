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

/// One GEMM shape: `[rows, k] x [n, k]^T -> [rows, n]`, row-major.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    half: bool,
    rows: usize,
    n: usize,
    k: usize,
    bias: bool,
    pedantic: bool,
    /// The largest power of two (at most 256) dividing the addresses of A, B, C and D: the
    /// heuristic's pick must work at that alignment (it assumes 256 unless told).
    align: u32,
}

/// Descriptor, layouts and algorithm of one [`Key`].
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// The weight: column-major `k x n` (the row-major `[n, k]` as stored), transposed.
    a: sys::cublasLtMatrixLayout_t,
    /// The input: column-major `k x rows`.
    b: sys::cublasLtMatrixLayout_t,
    /// Output and residual: column-major `n x rows`.
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
    let mut plan = Plan {
        desc: std::ptr::null_mut(),
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    let (rows, n, k) = (key.rows as u64, key.n as u64, key.k as u64);
    plan.desc = result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)?;
    // cublasOperation_t: 1 = CUBLAS_OP_T, 0 = CUBLAS_OP_N.
    let epilogue = if key.bias {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
    } else {
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
    };
    // SAFETY: a live descriptor; each value has its attribute's type (int32 operations, uint32
    // epilogue, a device pointer).
    unsafe {
        set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        set_desc(
            plan.desc,
            D::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &(epilogue as u32),
        )?;
        if key.bias {
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
        }
    }
    plan.a = result::create_matrix_layout(ty, k, n, k as i64)?;
    plan.b = result::create_matrix_layout(ty, k, rows, k as i64)?;
    plan.c = result::create_matrix_layout(ty, n, rows, n as i64)?;
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
    stream.context().bind_to_thread().w()?;
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
    let dtype = x.dtype();
    if !matches!(dtype, DType::F16 | DType::F32) || x.rank() == 0 || w.rank() != 2 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.dims()[x.rank() - 1] != k || k == 0 || n == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let same = |t: &Tensor| t.dtype() == dtype && t.device().same_device(x.device());
    if !same(w) || !w.is_contiguous() {
        return Ok(None);
    }
    let rows = x.elem_count() / k;
    let mut dims = x.dims().to_vec();
    let last = dims.len() - 1;
    dims[last] = n;
    if bias.is_some_and(|b| !same(b) || b.elem_count() != n)
        || residual.is_some_and(|r| !same(r) || r.dims() != dims.as_slice())
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let bias = bias.map(|b| b.flatten_all()?.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let bg = bias.as_ref().map(|b| b.storage_and_layout());
    let rg = residual.as_ref().map(|r| r.storage_and_layout());
    let xs = cuda(&xg)?;
    let dev = xs.device().clone();
    let stream = dev.cuda_stream();
    let pedantic = super::arch::blas_pedantic(&dev)?;
    macro_rules! run {
        ($t:ty) => {{
            let xv = super::imp::view::<$t>(xs, xl)?;
            let wv = super::imp::view::<$t>(cuda(&wg)?, wl)?;
            let bv = match &bg {
                Some((g, l)) => Some(super::imp::view::<$t>(cuda(g)?, l)?),
                None => None,
            };
            let rv = match &rg {
                Some((g, l)) => Some(super::imp::view::<$t>(cuda(g)?, l)?),
                None => None,
            };
            // SAFETY: cuBLASLt writes every element of D (beta * C reads only the residual).
            let out = unsafe { dev.alloc::<$t>(rows * n)? };
            let (pa, _ra) = wv.device_ptr(&stream);
            let (pb, _rb) = xv.device_ptr(&stream);
            let (pd, _rd) = out.device_ptr(&stream);
            let bp = bv.as_ref().map(|v| v.device_ptr(&stream));
            let rp = rv.as_ref().map(|v| v.device_ptr(&stream));
            let pc = rp.as_ref().map_or(pd, |p| p.0);
            // The epilogue reads the bias in 16-byte pieces on some GPUs: a bias elsewhere
            // keeps today's path.
            if bp.as_ref().is_some_and(|p| p.0 % 16 != 0) {
                return Ok(None);
            }
            let align = [pa, pb, pc, pd]
                .iter()
                .map(|p| 1u64 << p.trailing_zeros().min(8))
                .min()
                .unwrap_or(256) as u32;
            let key = Key {
                half: dtype == DType::F16,
                rows,
                n,
                k,
                bias: bp.is_some(),
                pedantic,
                align,
            };
            let bias_ptr = bp.as_ref().map_or(0, |p| p.0);
            let mut map = STATE.get_or_init(Default::default).lock().unwrap();
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
            let (alpha, beta) = (1f32, if rp.is_some() { 1f32 } else { 0f32 });
            // SAFETY: the plan was made for exactly these shapes, dtype and alignment; the
            // pointers hold rows*k, n*k, n (bias) and rows*n (C, D) elements; the descriptor
            // is only touched under the lock, and cuBLASLt reads the bias pointer when the
            // GEMM is enqueued.
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
            drop((_ra, _rb, _rd, bp, rp, _rw));
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F16 => run!(f16),
        _ => run!(f32),
    };
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(out),
        dims,
        BackpropOp::none(),
        false,
    )))
}

#[cfg(test)]
#[path = "lt_tests.rs"]
mod tests;
