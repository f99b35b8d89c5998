//! The CUDA side of [`super`]: NVRTC compilation, function cache, launches as candle custom ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result,
    Shape, Tensor,
};
use half::f16;

use super::arch::kernel_arch;

use super::source::SOURCE;

pub fn prepare_device(device: &Device) {
    let Ok(cuda) = device.as_cuda_device() else {
        return;
    };
    if std::env::var("SDSERVE_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
        // SAFETY: candle runs every op of a device on its one stream, so no tensor is used on
        // another stream, which is all the events would order.
        unsafe { cuda.disable_event_tracking() };
    }
    let keep = match std::env::var("SDSERVE_CUDA_POOL_KEEP_MB").map(|s| s.parse::<u64>()) {
        Ok(Ok(mb)) => mb << 20,
        _ => u64::MAX,
    };
    crate::memory::set_pool_release_threshold(device, keep);
    if let Err(e) = super::arch::prepare(cuda) {
        // A library setting that failed leaves that library's defaults: slower or faster,
        // never wrong.
        eprintln!("sdserve: CUDA library settings: {e}");
    }
}

/// PTX of kernels.cu for `arch`, compiled once per process and architecture (or the file
/// `SDSERVE_CUDA_KERNELS_PTX` names, whose target `kernel_arch` then is).
fn ptx(arch: u32) -> Result<Arc<String>> {
    if let Some(file) = super::arch::kernels_ptx_file()? {
        return Ok(Arc::new(file.1.clone()));
    }
    static CACHE: OnceLock<Mutex<HashMap<u32, Arc<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap().get(&arch) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{arch}"),
            "-std=c++17".into(),
        ],
        name: Some("sdserve_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC compute_{arch}: {e:?}")))?;
    let p = Arc::new(ptx.to_src());
    cache.lock().unwrap().insert(arch, p.clone());
    Ok(p)
}

/// A kernel of kernels.cu on `dev`, loaded once (with `smem` bytes of dynamic shared memory
/// allowed when above the default 48 KiB).
pub(super) fn function(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction> {
    type Key = (DeviceId, String);
    static FUNCS: OnceLock<Mutex<HashMap<Key, CudaFunction>>> = OnceLock::new();
    let funcs = FUNCS.get_or_init(Default::default);
    let key = (dev.id(), name.to_string());
    if let Some(f) = funcs.lock().unwrap().get(&key) {
        return Ok(f.clone());
    }
    let arch = kernel_arch(dev)?;
    let ptx = ptx(arch)?;
    let f = dev
        .get_or_load_custom_func(name, &format!("sdserve_kernels_{arch}"), &ptx)?
        .into_cuda_function();
    if smem > 48 << 10 {
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    funcs.lock().unwrap().insert(key, f.clone());
    Ok(f)
}

pub(super) fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        bail!("sdserve CUDA kernel: non-contiguous input");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

pub(super) fn cfg(grid: (u32, u32), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

pub(super) fn not_on_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name}: CUDA only")
}

// ------------------------------------------------------------------------------- norms, GEGLU

fn f32_param(t: &Tensor, len: usize) -> Result<Option<Tensor>> {
    if t.elem_count() != len {
        return Ok(None);
    }
    Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?))
}

/// Groups of at least this many values are normalised by many blocks (two kernels); smaller
/// ones by one block each.
const GROUP_SPLIT_MIN: usize = 16 << 10;
/// Values per block in the split group norm (rounded to whole channels).
const GROUP_CHUNK: usize = 8 << 10;

/// `SDSERVE_CUDA_GROUP_NORM=single` keeps one block per group at every size (A/B runs).
fn split_groups() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("SDSERVE_CUDA_GROUP_NORM").map_or(true, |v| v.trim() != "single")
    })
}

/// x with two f32 parameter vectors (weight, bias): group norm and layer norm.
struct Norm {
    kind: NormKind,
    eps: f32,
}

#[derive(Clone, Copy)]
enum NormKind {
    Group { groups: usize, silu: bool },
    Layer,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "sdserve-norm"
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
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (w, b) = (view::<f32>(ws, wl)?, view::<f32>(bs, bl)?);
        let dims = xl.shape().dims();
        let count = xl.shape().elem_count();
        let suffix = match xs.dtype() {
            DType::F16 => "f16",
            DType::F32 => "f32",
            other => bail!("sdserve norm: unsupported dtype {other:?}"),
        };
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty) => {{
                let x = view::<$t>(xs, xl)?;
                let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(count)? };
                match self.kind {
                    NormKind::Group { groups, silu } => {
                        let (batch, channels) = (dims[0], dims[1]);
                        let spatial = count / (batch * channels);
                        let (c, s, g, a) =
                            (channels as i32, spatial as i32, groups as i32, silu as i32);
                        let per_group = channels / groups * spatial;
                        if per_group >= GROUP_SPLIT_MIN && batch * groups <= 65535 && split_groups() {
                            // Chunks of whole channels, about GROUP_CHUNK values each.
                            let cg = channels / groups;
                            let cpc = GROUP_CHUNK.div_ceil(spatial).clamp(1, cg);
                            let chunks = cg.div_ceil(cpc);
                            let part: CudaSlice<f32> =
                                unsafe { dev.alloc::<f32>(batch * groups * chunks * 3)? };
                            let grid = (chunks as u32, (batch * groups) as u32);
                            let cpc32 = cpc as i32;
                            let f = function(dev, &format!("group_norm_stats_{suffix}"), 0)?;
                            let mut l = stream.launch_builder(&f);
                            l.arg(&x).arg(&part).arg(&c).arg(&s).arg(&g).arg(&cpc32);
                            // SAFETY: matches group_norm_stats_*; part holds 3 floats per
                            // (batch, group, chunk).
                            unsafe { l.launch(cfg(grid, 256, 0)) }.w()?;
                            let f = function(dev, &format!("group_norm_apply_{suffix}"), 0)?;
                            let mut l = stream.launch_builder(&f);
                            l.arg(&x).arg(&out).arg(&part).arg(&w).arg(&b);
                            l.arg(&c).arg(&s).arg(&g).arg(&cpc32).arg(&self.eps).arg(&a);
                            // SAFETY: matches group_norm_apply_*; same grid as the stats.
                            unsafe { l.launch(cfg(grid, 256, 0)) }.w()?;
                        } else {
                            let f = function(dev, &format!("group_norm_{suffix}"), 0)?;
                            let mut l = stream.launch_builder(&f);
                            l.arg(&x).arg(&out).arg(&w).arg(&b);
                            l.arg(&c).arg(&s).arg(&g).arg(&self.eps).arg(&a);
                            // SAFETY: matches group_norm_*'s signature; sizes checked by the caller.
                            unsafe { l.launch(cfg(((batch * groups) as u32, 1), 512, 0)) }.w()?;
                        }
                    }
                    NormKind::Layer => {
                        let dim = dims[dims.len() - 1];
                        let rows = count / dim;
                        let f = function(dev, &format!("layer_norm_{suffix}"), 0)?;
                        let (r, d) = (rows as i32, dim as i32);
                        let mut l = stream.launch_builder(&f);
                        l.arg(&x).arg(&out).arg(&w).arg(&b);
                        l.arg(&r).arg(&d).arg(&self.eps);
                        // SAFETY: matches layer_norm_*'s signature; 8 rows (warps) per block.
                        unsafe { l.launch(cfg((rows.div_ceil(8) as u32, 1), 256, 0)) }.w()?;
                    }
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F16 => run!(f16),
            _ => run!(f32),
        };
        Ok((out, xl.shape().clone()))
    }
}

fn float_dtype(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F16 | DType::F32)
}

pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !float_dtype(x) || x.rank() < 3 || groups == 0 {
        return Ok(None);
    }
    let (b, c) = (x.dims()[0], x.dims()[1]);
    if !c.is_multiple_of(groups) || x.elem_count() == 0 || b * groups > u32::MAX as usize {
        return Ok(None);
    }
    let (Some(w), Some(bs)) = (f32_param(weight, c)?, f32_param(bias, c)?) else {
        return Ok(None);
    };
    let op = Norm {
        kind: NormKind::Group { groups, silu },
        eps: eps as f32,
    };
    x.contiguous()?.apply_op3_no_bwd(&w, &bs, &op).map(Some)
}

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !float_dtype(x) || x.rank() == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let d = x.dims()[x.rank() - 1];
    let (Some(w), Some(bs)) = (f32_param(weight, d)?, f32_param(bias, d)?) else {
        return Ok(None);
    };
    let op = Norm {
        kind: NormKind::Layer,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op3_no_bwd(&w, &bs, &op).map(Some)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdserve-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu(self.name())
    }

    fn cuda_fwd(&self, hs: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = hs.device();
        let mut dims = hl.shape().dims().to_vec();
        let last = dims.len() - 1;
        let inner = dims[last] / 2;
        let rows = hl.shape().elem_count() / dims[last];
        dims[last] = inner;
        let count = rows * inner;
        let stream = dev.cuda_stream();
        let grid = (count.div_ceil(256).min(1 << 20) as u32, 1);
        macro_rules! run {
            ($t:ty, $name:expr) => {{
                let h = view::<$t>(hs, hl)?;
                let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(count)? };
                let f = function(dev, $name, 0)?;
                let (r, i) = (rows as i64, inner as i32);
                let mut l = stream.launch_builder(&f);
                l.arg(&h).arg(&out).arg(&r).arg(&i);
                // SAFETY: matches geglu_*'s signature (grid-stride loop over rows * inner).
                unsafe { l.launch(cfg(grid, 256, 0)) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match hs.dtype() {
            DType::F16 => run!(f16, "geglu_f16"),
            DType::F32 => run!(f32, "geglu_f32"),
            other => bail!("sdserve geglu: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from(dims)))
    }
}

pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    if !float_dtype(h) || h.rank() == 0 || h.elem_count() == 0 {
        return Ok(None);
    }
    let last = h.dims()[h.rank() - 1];
    if !last.is_multiple_of(2) {
        return Ok(None);
    }
    h.contiguous()?.apply_op1_no_bwd(&Geglu).map(Some)
}

// ------------------------------------------------------------------------------- bias (+ residual)

struct BiasAdd {
    inner: usize,
}

impl BiasAdd {
    fn run(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        res: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = ys.device();
        let n = yl.shape().elem_count();
        let bias_len = bl.shape().elem_count();
        // [rows, cols]: a bias per row (inner > 1: rows of `inner` values) or per column.
        let (rows, cols, per_row) = if self.inner > 1 {
            (n / self.inner, self.inner, 1i32)
        } else {
            (n / bias_len, bias_len, 0i32)
        };
        let stream = dev.cuda_stream();
        // Pairs of halves need even rows starting at even offsets (4-byte words).
        let even = |l: &Layout| l.start_offset().is_multiple_of(2);
        let pairs = ys.dtype() == DType::F16
            && cols % 2 == 0
            && even(yl)
            && res.is_none_or(|(_, rl)| even(rl));
        let width = if pairs { cols / 2 } else { cols };
        let block = if width >= 256 {
            256
        } else {
            width.div_ceil(32) * 32
        };
        let grid = (
            width.div_ceil(block).min(1024) as u32,
            rows.min(65535) as u32,
        );
        let launch = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows64, cols32, blen32) = (rows as i64, width as i32, bias_len as i32);
        macro_rules! run {
            ($t:ty, $name:expr) => {{
                let y = view::<$t>(ys, yl)?;
                let b = view::<$t>(bs, bl)?;
                let r = match res {
                    Some((rs, rl)) => Some(view::<$t>(rs, rl)?),
                    None => None,
                };
                let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n)? };
                let f = function(dev, $name, 0)?;
                let null = 0u64;
                let mut l = stream.launch_builder(&f);
                l.arg(&y).arg(&b);
                match &r {
                    Some(r) => l.arg(r),
                    None => l.arg(&null),
                };
                l.arg(&out)
                    .arg(&rows64)
                    .arg(&cols32)
                    .arg(&blen32)
                    .arg(&per_row);
                // SAFETY: matches bias_rows_*'s signature (the x2 kernel reads the same buffers
                // as 32-bit words: even lengths and offsets checked above); a null residual is
                // skipped; rows * cols = n.
                unsafe { l.launch(launch) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match ys.dtype() {
            DType::F16 if pairs => run!(f16, "bias_rows_f16x2"),
            DType::F16 => run!(f16, "bias_rows_f16"),
            DType::F32 => run!(f32, "bias_rows_f32"),
            other => bail!("sdserve bias_add: unsupported dtype {other:?}"),
        };
        Ok((out, yl.shape().clone()))
    }
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "sdserve-bias-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu("sdserve-bias-add")
    }

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(ys, yl, bs, bl, None)
    }
}

impl CustomOp3 for BiasAdd {
    fn name(&self) -> &'static str {
        "sdserve-bias-add-residual"
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
        not_on_cpu("sdserve-bias-add")
    }

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(ys, yl, bs, bl, Some((rs, rl)))
    }
}

pub fn bias_add(
    y: &Tensor,
    bias: &Tensor,
    inner: usize,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let n = y.elem_count();
    let blen = bias.elem_count();
    if !float_dtype(y) || bias.dtype() != y.dtype() || n == 0 || inner == 0 || blen == 0 {
        return Ok(None);
    }
    // The bias must repeat exactly: n = outer * blen * inner; rows of at most i32::MAX.
    if !n.is_multiple_of(blen * inner) || inner.max(blen) > i32::MAX as usize {
        return Ok(None);
    }
    if let Some(r) = residual {
        if r.dims() != y.dims() || r.dtype() != y.dtype() {
            return Ok(None);
        }
    }
    let op = BiasAdd { inner };
    let (y, b) = (y.contiguous()?, bias.flatten_all()?.contiguous()?);
    match residual {
        Some(r) => y.apply_op3_no_bwd(&b, &r.contiguous()?, &op),
        None => y.apply_op2_no_bwd(&b, &op),
    }
    .map(Some)
}

#[cfg(test)]
#[path = "tests.rs"]
pub(super) mod tests;
