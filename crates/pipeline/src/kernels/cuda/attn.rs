//! The attention kernels of kernels.cu as a candle op: which one runs for a dtype, architecture
//! and layout, its launch geometry and shared memory.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use super::arch::{kernel_arch, MMA_ATTENTION};
use super::imp::{cfg, function, not_on_cpu, view};

/// Head dims with an attention kernel instance (kernels.cu's FLASH_ENTRY, FLASH_MMA_ENTRY and
/// FLASH_TILED_ENTRY lines).
pub(super) const HEAD_DIMS: [usize; 6] = [32, 40, 64, 80, 128, 160];

/// Which attention kernel. f16: the best for the architecture (`Auto`: tensor cores on sm_80+,
/// the register-tiled CUDA-core kernel below), the first tensor-core kernel (`Mma1`, no double
/// buffering), the register-tiled CUDA-core kernel everywhere (`Simt`, what pre-Ampere GPUs
/// run), or the first CUDA-core kernel, one warp per query row (`SimtWarp`); A/B runs and the
/// tests compare them all. f32 always runs the register-tiled kernel in f32 (no TF32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Auto,
    Mma1,
    Simt,
    SimtWarp,
}

impl Variant {
    /// `SDSERVE_CUDA_ATTENTION`'s value (unset or unknown: `Auto`).
    pub fn parse(s: Option<&str>) -> Variant {
        match s.map(str::trim) {
            Some("simt") => Variant::Simt,
            Some("simt_warp") => Variant::SimtWarp,
            Some("mma1") => Variant::Mma1,
            _ => Variant::Auto,
        }
    }
}

/// kernels.cu's `TiledShape<D>`: query rows per block and dynamic shared memory (bytes) of
/// `flash_tiled_*_d{D}` (128 threads, tiles of 32 keys; Q^T, one K^T/V tile, P^T, all f32).
pub(super) fn tiled_shape(d: usize) -> (usize, usize) {
    const KEYS: usize = 32;
    let rows = if d <= 80 { 64 } else { 32 };
    (rows, (d * rows + d * KEYS + KEYS * (rows + 4)) * 4)
}

struct Attention {
    heads: usize,
    scale: f32,
    variant: Variant,
}

/// The kernel for this call: its name, query rows per block and shared memory bytes. `off4`,
/// `off8`: every input starts at a multiple of 4 (8) values (the tiled kernels read 4 values at
/// a time; the double-buffered tensor-core kernel copies 16-byte rows).
fn choose(
    dev: &CudaDevice,
    dtype: DType,
    d: usize,
    (off4, off8): (bool, bool),
    variant: Variant,
) -> Result<(String, usize, usize)> {
    let (tiled_rows, tiled_smem) = tiled_shape(d);
    if dtype == DType::F32 {
        return Ok((format!("flash_tiled_f32_d{d}"), tiled_rows, tiled_smem));
    }
    let tensor_cores =
        matches!(variant, Variant::Auto | Variant::Mma1) && kernel_arch(dev)? >= MMA_ATTENTION;
    let dp = d.div_ceil(16) * 16;
    Ok(if tensor_cores && variant == Variant::Auto && off8 {
        // Q tile plus two K and two V tiles of 64 rows, each row dp + 8 halves.
        (format!("flash_mma2_d{d}"), 64, 5 * 64 * (dp + 8) * 2)
    } else if tensor_cores {
        let smem = (2 * 64 * (dp + 8) + dp * (64 + 8)) * 2;
        (format!("flash_mma_d{d}"), 64, smem)
    } else if variant != Variant::SimtWarp && off4 {
        (format!("flash_tiled_f16_d{d}"), tiled_rows, tiled_smem)
    } else {
        let smem = 16 * d * 4 + 2 * 32 * (d + 2) * 2;
        (format!("flash_simt_d{d}"), 16, smem)
    })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sdserve-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device();
        let (b, n, c) = ql.shape().dims3()?;
        let (_, m, _) = kl.shape().dims3()?;
        let d = c / self.heads;
        let layouts = [ql, kl, vl];
        let off = |n: usize| {
            layouts.iter().all(|l| l.start_offset().is_multiple_of(n)) && d.is_multiple_of(n)
        };
        let (name, rows, smem) = choose(dev, qs.dtype(), d, (off(4), off(8)), self.variant)?;
        let f = function(dev, &name, smem)?;
        let (n32, m32, h32) = (n as i32, m as i32, self.heads as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let grid = (n.div_ceil(rows) as u32, (b * self.heads) as u32);
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty) => {{
                let (q, k, v) = (
                    view::<$t>(qs, ql)?,
                    view::<$t>(ks, kl)?,
                    view::<$t>(vs, vl)?,
                );
                let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(b * n * c)? };
                let mut l = stream.launch_builder(&f);
                l.arg(&q).arg(&k).arg(&v).arg(&out);
                l.arg(&n32).arg(&m32).arg(&h32).arg(&scale_log2);
                // SAFETY: argument types and counts match kernels.cu's flash_*_d{d} for this
                // dtype; buffers hold b*n*c (q, out) and b*m*c (k, v) values, as checked by
                // `attention`; the tiled kernels' 4-value reads are aligned (checked above).
                unsafe { l.launch(cfg(grid, 128, smem)) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match qs.dtype() {
            DType::F32 => run!(f32),
            _ => run!(f16),
        };
        Ok((out, ql.shape().clone()))
    }
}

pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    variant: Variant,
) -> Result<Option<Tensor>> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F16 | DType::F32)
        || [q, k, v]
            .iter()
            .any(|t| t.dtype() != dtype || t.rank() != 3)
        || heads == 0
    {
        return Ok(None);
    }
    let (b, _, c) = q.dims3()?;
    let (kb, m, kc) = k.dims3()?;
    if v.dims() != k.dims() || kb != b || kc != c || m == 0 || !c.is_multiple_of(heads) {
        return Ok(None);
    }
    if !HEAD_DIMS.contains(&(c / heads)) || b * heads > 65535 {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // f32 reads rows as 16-byte vectors: a view starting off a 4-value boundary (never the
    // projections' fresh outputs) keeps candle's path.
    if dtype == DType::F32
        && [&q, &k, &v]
            .iter()
            .any(|t| t.layout().start_offset() % 4 != 0)
    {
        return Ok(None);
    }
    let op = Attention {
        heads,
        scale: scale as f32,
        variant,
    };
    q.apply_op3_no_bwd(&k, &v, &op).map(Some)
}
