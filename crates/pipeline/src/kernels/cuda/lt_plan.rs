//! The cuBLASLt side of [`super`]: GEMM descriptions, the plans made once per shape (descriptor,
//! layouts, the heuristic's algorithm), and each device's handle and workspace.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{sys::CUdevice_attribute, CudaSlice};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::Result;

/// One cuBLASLt problem in its own column-major terms: `batch` times
/// `D[m x n] = op(A)[m x k] op(B)[k x n] (+ C) (+ bias[m])`, `A` stored `k x m` when
/// `trans_a` (else `m x k`) with leading dimension `lda`, `B` likewise, `C` and `D` `m x n`
/// with `ldd`; strides in elements between the batch's matrices (0: the same one for all).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct Gemm {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) trans_a: bool,
    pub(super) lda: usize,
    pub(super) trans_b: bool,
    pub(super) ldb: usize,
    pub(super) ldd: usize,
    pub(super) batch: usize,
    pub(super) stride_a: usize,
    pub(super) stride_b: usize,
    pub(super) stride_d: usize,
}

impl Gemm {
    /// Row-major `[rows, n] = x [rows, k] W^T` is column-major `n x rows = W^T' x'`: A the
    /// weight (stored `k x n`, transposed), B the input (`k x rows`), bias per row of D.
    pub(super) fn linear(rows: usize, n: usize, k: usize) -> Self {
        Gemm {
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
        }
    }

    /// Per image of `[batch, k, hw]` (NCHW): column-major `n x hw` (the tokens, row-major
    /// `[hw, n]`) `= W x_b`, with `x_b` stored as column-major `hw x k` and transposed; the
    /// weight shared (batch stride 0), bias per row of D.
    pub(super) fn from_nchw(batch: usize, k: usize, hw: usize, n: usize) -> Self {
        Gemm {
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
        }
    }

    /// Per image of tokens `[batch, hw, k]`: column-major `hw x n` (NCHW, row-major `[n, hw]`)
    /// `= t_b W^T`: A the tokens (stored `k x hw`, transposed), B the weight (`k x n`, shared),
    /// C the residual image.
    pub(super) fn to_nchw(batch: usize, hw: usize, k: usize, n: usize) -> Self {
        Gemm {
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
        }
    }

    /// What cuBLASLt computes for this description, on the CPU in f64 (the tests' check that
    /// the descriptions above say what the callers mean): `D = op(A) op(B) + C + bias`.
    #[cfg(test)]
    pub(super) fn emulate(
        &self,
        a: &[f32],
        b: &[f32],
        c: Option<&[f32]>,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let g = self;
        let count = g.batch * g.stride_d.max(g.ldd * g.n);
        let mut d = vec![0f32; count];
        for bt in 0..g.batch {
            let (a, b) = (&a[bt * g.stride_a..], &b[bt * g.stride_b..]);
            for j in 0..g.n {
                for i in 0..g.m {
                    let mut acc = 0f64;
                    for l in 0..g.k {
                        let av = if g.trans_a {
                            a[l + i * g.lda]
                        } else {
                            a[i + l * g.lda]
                        };
                        let bv = if g.trans_b {
                            b[j + l * g.ldb]
                        } else {
                            b[l + j * g.ldb]
                        };
                        acc += av as f64 * bv as f64;
                    }
                    let at = bt * g.stride_d + i + j * g.ldd;
                    acc += c.map_or(0.0, |c| c[at] as f64) + bias.map_or(0.0, |v| v[i] as f64);
                    d[at] = acc as f32;
                }
            }
        }
        d
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct Key {
    pub(super) half: bool,
    pub(super) gemm: Gemm,
    pub(super) bias: bool,
    pub(super) pedantic: bool,
    /// The largest power of two (at most 256) dividing the addresses of A, B, C and D and the
    /// batch strides in bytes: the heuristic's pick must work at that alignment (it assumes
    /// 256 unless told).
    pub(super) align: u32,
}

/// Descriptor, layouts and algorithm of one [`Key`].
pub(super) struct Plan {
    pub(super) desc: sys::cublasLtMatmulDesc_t,
    pub(super) a: sys::cublasLtMatrixLayout_t,
    pub(super) b: sys::cublasLtMatrixLayout_t,
    /// `C` and `D`.
    pub(super) c: sys::cublasLtMatrixLayout_t,
    pub(super) algo: sys::cublasLtMatmulAlgo_t,
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
pub(super) struct Lt {
    pub(super) handle: sys::cublasLtHandle_t,
    pub(super) workspace: CudaSlice<u8>,
    /// `None`: cuBLASLt has no algorithm for that shape; today's path runs it.
    pub(super) plans: HashMap<Key, Option<Plan>>,
}

// SAFETY: the raw handles are only used under the mutex that holds them (one thread at a time);
// cuBLASLt handles and descriptors may be used from any thread, just not concurrently.
unsafe impl Send for Lt {}

pub(super) static STATE: OnceLock<Mutex<HashMap<DeviceId, Lt>>> = OnceLock::new();

pub(super) fn lt_err(what: &str, e: result::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets one attribute of a matmul descriptor.
///
/// # Safety
/// `desc` is a live descriptor and `T` the attribute's type.
pub(super) unsafe fn set_desc<T>(
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

pub(super) fn make_plan(
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
pub(super) fn device_state<'a>(
    map: &'a mut HashMap<DeviceId, Lt>,
    dev: &CudaDevice,
) -> Result<&'a mut Lt> {
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
