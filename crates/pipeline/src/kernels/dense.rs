//! [`Dense`]: a linear layer in the layout the CPU kernels of [`super::linear`] want, loaded
//! from the file transposed, or transposed at first use when its weight lives in the mapped
//! file (`weights::mapped`).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{f32_cpu, linear, transposes, with_slice};

/// `w^T` of an f32 CPU matrix `[rows, cols]` as a new contiguous `[cols, rows]` tensor: tiled
/// and parallel (candle's strided copy moves one element at a time on one thread).
fn transpose(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    with_slice(w, |src| {
        let out = crate::weights::transpose_f32(rows, cols, src);
        Tensor::from_vec(out, (cols, rows), &Device::Cpu)
    })?
}

/// A linear layer whose weight is stored transposed (`[in, out]`, contiguous) for f32 on the
/// CPU: the gemm then streams it row by row instead of gathering columns, about 1.4x faster on
/// CLIP's cold 154-row products. Elsewhere it is candle's `Linear`, unchanged.
///
/// Read through strides as the file stores it (`[out, in]`), the product is bit for bit the
/// same but slower wherever the weight is large against the rows it meets (gemm then packs it
/// on every call; `kernels::linear_timing`, 2 threads): CLIP 1.3-1.75x, the UNet's 1280-channel
/// level and mid block 1.1-1.4x at 512x512 and up to 3x at 256x256, its 320-channel level
/// 1.0-1.1x, the time embedding's 2-row products 8.7x. So the transposed layout stays; a
/// weight whose storage is its mapped file (`weights::mapped`) is transposed at its first use
/// instead of at load ([`Dense::Deferred`]): start-up maps the files and does not copy them.
#[derive(Debug, Clone)]
pub enum Dense {
    Transposed {
        wt: Tensor,
        bias: Option<Tensor>,
    },
    /// As `Transposed`, the transpose made at first use from the weight as stored.
    Deferred {
        weight: Arc<DeferredTranspose>,
        bias: Option<Tensor>,
    },
    Candle(candle_nn::Linear),
}

/// A linear weight as stored (`[out, in]`, its storage the mapped file) until its transpose is
/// first asked for; then only the transpose is kept, and the stored weight's pages leave the
/// resident set.
#[derive(Debug)]
pub struct DeferredTranspose {
    stored: Mutex<Option<Tensor>>,
    wt: OnceLock<Tensor>,
    /// `(out, in)`.
    dims: (usize, usize),
}

impl DeferredTranspose {
    fn new(stored: Tensor) -> Result<Self> {
        let dims = stored.dims2()?;
        Ok(Self {
            stored: Mutex::new(Some(stored)),
            wt: OnceLock::new(),
            dims,
        })
    }

    /// `W^T` `[in, out]`, made on the first call (one caller makes it, the others wait).
    fn wt(&self) -> Result<&Tensor> {
        if let Some(wt) = self.wt.get() {
            return Ok(wt);
        }
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wt) = self.wt.get() {
            return Ok(wt);
        }
        let Some(w) = stored.as_ref() else {
            candle_core::bail!("a deferred linear weight lost its stored values");
        };
        let wt = transpose(w)?;
        let _ = self.wt.set(wt);
        if let Some(w) = stored.take() {
            // SAFETY: `stored` held the only handle on the weight as stored (`Dense::load`
            // made it; nothing else sees it), and it is never read again.
            unsafe { crate::weights::discard_storage(w) };
        }
        Ok(self.wt.get().expect("set above"))
    }
}

impl Dense {
    pub fn new(l: candle_nn::Linear) -> Result<Self> {
        if !f32_cpu(l.weight()) || l.weight().rank() != 2 {
            return Ok(Self::Candle(l));
        }
        Ok(Self::Transposed {
            wt: transpose(l.weight())?,
            bias: l.bias().cloned(),
        })
    }

    /// Loads a linear layer's `weight` `[out, in]` and, with `bias`, its `bias` `[out]`.
    /// Where the layer is stored transposed: a weight whose storage is its mapped file is
    /// transposed at first use ([`Dense::Deferred`]); otherwise, when the loader can write a
    /// weight transposed straight from the file (the safetensors loader, see
    /// [`crate::weights::TRANSPOSED`]), it is read that way: written once, with no
    /// untransposed copy made and dropped.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Self::load_stored_as(in_dim, out_dim, bias, &[out_dim, in_dim], vb)
    }

    /// A 1x1 convolution (`weight` `[out, in, 1, 1]`, `bias` `[out]`) as the equivalent linear
    /// layer over `[.., in]`, loaded as [`Dense::load`] does.
    pub fn load_conv1x1(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_stored_as(in_dim, out_dim, true, &[out_dim, in_dim, 1, 1], vb)
    }

    fn load_stored_as(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        stored: &[usize],
        vb: VarBuilder,
    ) -> Result<Self> {
        // candle_nn::linear's initialisers, for builders that create variables (a VarMap).
        let load_bias = |vb: &VarBuilder| -> Result<Option<Tensor>> {
            if !bias {
                return Ok(None);
            }
            let bound = 1. / (in_dim as f64).sqrt();
            let init = candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            vb.get_with_hints(out_dim, "bias", init).map(Some)
        };
        let transposed = format!("weight{}", crate::weights::TRANSPOSED);
        let from_file = transposes(vb.dtype(), vb.device()) && vb.contains_tensor(&transposed);
        if from_file && crate::weights::mapped::enabled() {
            let weight = vb.get(stored, "weight")?.reshape((out_dim, in_dim))?;
            if crate::weights::in_mapping(&weight) {
                let bias = load_bias(&vb)?;
                return Ok(Self::Deferred {
                    weight: Arc::new(DeferredTranspose::new(weight)?),
                    bias,
                });
            }
            let bias = load_bias(&vb)?;
            return Self::new(candle_nn::Linear::new(weight, bias));
        }
        if from_file {
            let wt = vb.get((in_dim, out_dim), &transposed)?;
            let bias = load_bias(&vb)?;
            return Ok(Self::Transposed { wt, bias });
        }
        let weight = vb
            .get_with_hints(stored, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?
            .reshape((out_dim, in_dim))?;
        let bias = load_bias(&vb)?;
        Self::new(candle_nn::Linear::new(weight, bias))
    }

    /// `(out, in)`, as the files write the weight.
    pub fn out_in_dims(&self) -> (usize, usize) {
        match self {
            Self::Transposed { wt, .. } => {
                let d = wt.dims();
                (d[1], d[0])
            }
            Self::Deferred { weight, .. } => weight.dims,
            Self::Candle(l) => {
                let d = l.weight().dims();
                (d[0], d[1])
            }
        }
    }

    /// The bias `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Transposed { bias, .. } | Self::Deferred { bias, .. } => bias.as_ref(),
            Self::Candle(l) => l.bias(),
        }
    }

    /// The tensor holding the weight: `[in, out]` when transposed (a deferred transpose is
    /// made now), else `[out, in]`.
    pub fn weight_storage(&self) -> Result<&Tensor> {
        match self {
            Self::Transposed { wt, .. } => Ok(wt),
            Self::Deferred { weight, .. } => weight.wt(),
            Self::Candle(l) => Ok(l.weight()),
        }
    }

    pub fn is_transposed(&self) -> bool {
        !matches!(self, Self::Candle(_))
    }

    /// `W^T` `[in, out]` and the bias when stored transposed (for the NCHW projections).
    pub fn transposed(&self) -> Result<Option<(&Tensor, Option<&Tensor>)>> {
        match self {
            Self::Transposed { wt, bias } => Ok(Some((wt, bias.as_ref()))),
            Self::Deferred { weight, bias } => Ok(Some((weight.wt()?, bias.as_ref()))),
            Self::Candle(_) => Ok(None),
        }
    }

    /// The weight `[out, in]` and bias as candle's `Linear` holds them (the layout on GPUs),
    /// for the NCHW projections of `kernels::cuda`; `None` when stored transposed.
    pub fn stored(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match self {
            Self::Candle(l) => Some((l.weight(), l.bias())),
            _ => None,
        }
    }

    /// `x W^T + bias (+ residual)`.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = match self {
            Self::Candle(l) if !x.device().is_cpu() => {
                return gpu_linear(l, x, residual);
            }
            Self::Candle(l) => candle_core::Module::forward(l, x)?,
            _ => {
                let Some((wt, bias)) = self.transposed()? else {
                    unreachable!("only Candle is not transposed")
                };
                if let Some(y) = linear(x, wt, bias, residual)? {
                    return Ok(y);
                }
                let y = x.broadcast_matmul(wt)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// candle's `Linear::forward`, or on a GPU with `SDSERVE_CUDA_LINEAR=lt` one cuBLASLt GEMM
/// with the bias in its epilogue (the time embedding and ResNets' `time_emb_proj`).
pub fn linear_forward(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::cuda::linear(x, l.weight(), l.bias(), None)? {
        return Ok(y);
    }
    candle_core::Module::forward(l, x)
}

/// `x W^T + bias (+ residual)` on a GPU: one GEMM over all rows (candle's `Linear` would run a
/// batched GEMM over a broadcast weight), then bias and residual in one pass
/// (`kernels::cuda::bias_add`) instead of two broadcast element-wise ops; with
/// `SDSERVE_CUDA_LINEAR=lt`, all of it in one cuBLASLt GEMM (`kernels::cuda::linear`).
fn gpu_linear(l: &candle_nn::Linear, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let w = l.weight();
    if let Some(y) = super::cuda::linear(x, w, l.bias(), residual)? {
        return Ok(y);
    }
    let k = x.dim(candle_core::D::Minus1)?;
    let mut dims = x.dims().to_vec();
    let y = super::cuda::profiled(x.device(), "gemm", || {
        x.contiguous()?
            .reshape((x.elem_count() / k.max(1), k))?
            .matmul(&w.t()?)
    })?;
    let last = dims.len() - 1;
    dims[last] = y.dim(1)?;
    let y = y.reshape(dims)?;
    let Some(b) = l.bias() else {
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    };
    if let Some(out) = super::cuda::bias_add(&y, b, 1, residual)? {
        return Ok(out);
    }
    let y = y.broadcast_add(b)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn loading_transposed_from_the_file_equals_transposing_after() -> Result<()> {
        let dev = Device::Cpu;
        let mut ts = std::collections::HashMap::new();
        ts.insert(
            "a.weight".to_string(),
            Tensor::randn(0f32, 1.0, (40, 24), &dev)?,
        );
        ts.insert("a.bias".to_string(), Tensor::randn(0f32, 1.0, 40, &dev)?);
        ts.insert(
            "c.weight".to_string(),
            Tensor::randn(0f32, 1.0, (16, 12, 1, 1), &dev)?,
        );
        ts.insert("c.bias".to_string(), Tensor::randn(0f32, 1.0, 16, &dev)?);
        let dir = std::env::temp_dir().join(format!("sdserve-dense-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("w.safetensors");
        candle_core::safetensors::save(&ts, &file)?;
        let checked =
            crate::single_file::checked_var_builder(std::slice::from_ref(&file), DType::F32, &dev)
                .expect("loader");
        let plain = VarBuilder::from_tensors(ts.clone(), DType::F32, &dev);
        let cases = [
            (
                Dense::load(24, 40, true, checked.pp("a"))?,
                Dense::load(24, 40, true, plain.pp("a"))?,
            ),
            (
                Dense::load(24, 40, false, checked.pp("a"))?,
                Dense::load(24, 40, false, plain.pp("a"))?,
            ),
            (
                Dense::load_conv1x1(12, 16, checked.pp("c"))?,
                Dense::load_conv1x1(12, 16, plain.pp("c"))?,
            ),
        ];
        for (from_file, after) in &cases {
            let (wt, b) = from_file.transposed()?.expect("transposed");
            let (wt2, b2) = after.transposed()?.expect("transposed");
            assert_eq!(wt.to_vec2::<f32>()?, wt2.to_vec2::<f32>()?);
            assert_eq!(b.is_some(), b2.is_some());
            if let (Some(b), Some(b2)) = (b, b2) {
                assert_eq!(b.to_vec1::<f32>()?, b2.to_vec1::<f32>()?);
            }
        }
        let w = ts["a.weight"].t()?.contiguous()?;
        assert_eq!(
            cases[0].0.transposed()?.unwrap().0.to_vec2::<f32>()?,
            w.to_vec2::<f32>()?
        );
        let err = Dense::load(40, 24, true, checked.pp("a"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`a.weight` has shape [40, 24], the config implies [24, 40]"),
            "{err}"
        );
        let err = Dense::load_conv1x1(16, 12, checked.pp("c"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`c.weight` has shape [16, 12, 1, 1], the config implies [12, 16, 1, 1]"),
            "{err}"
        );
        // Half precision keeps candle's layout, from the same file.
        let half =
            crate::single_file::checked_var_builder(&[file], DType::F16, &dev).expect("loader");
        assert!(Dense::load(24, 40, true, half.pp("a"))?
            .transposed()?
            .is_none());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn tiled_transpose_equals_candles() -> Result<()> {
        // Shapes off the tile size both ways, a single row and a single column.
        for (r, c) in [(130, 67), (64, 64), (1, 200), (200, 1), (3, 5)] {
            let w = Tensor::randn(0f32, 1.0, (r, c), &Device::Cpu)?;
            let got = transpose(&w)?;
            assert_eq!(got.dims(), &[c, r]);
            let want = w.t()?.contiguous()?;
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{r}x{c}");
        }
        Ok(())
    }
}
