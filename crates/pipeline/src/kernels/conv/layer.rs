//! The [`Conv2d`] layer: the CPU kernels of [`super::conv2d_f32`] for f32, candle's conv2d (or
//! the CUDA plans of `kernels::cuda::conv2d`) for other dtypes and devices.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{circular_padding_on, conv2d_f32, grouped_conv2d_f32, wrap_pad, ConvShape};

/// A 2-D convolution layer (square kernel, symmetric padding, no dilation; groups where made
/// with [`Conv2d::grouped`]) whose f32 CPU forward runs [`super::conv2d_f32`] (each group's
/// through [`super::grouped_conv2d_f32`]); other dtypes and devices use candle's `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self::grouped(weight, bias, stride, padding, 1)
    }

    /// A conv of `groups` groups: `weight` is `[cout, cin / groups, k, k]`, each group's
    /// `cout / groups` filters reading its `cin / groups` input channels.
    pub fn grouped(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            groups,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub(super) fn candle_forward(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        let algo = if x.device().is_cpu() {
            None
        } else {
            cudnn_algo()
        };
        let planned = match self.groups {
            1 => crate::kernels::cuda::conv2d(x, &self.weight, self.stride, padding)?,
            _ => None,
        };
        let y = match planned {
            Some(y) => y,
            None => {
                let (stride, groups) = (self.stride, self.groups);
                x.conv2d_with_algo(&self.weight, padding, stride, 1, groups, algo)?
            }
        };
        match &self.bias {
            Some(b) if !y.device().is_cpu() && y.rank() == 4 => {
                let hw = y.dim(2)? * y.dim(3)?;
                match crate::kernels::cuda::bias_add(&y, b, hw, None)? {
                    Some(out) => Ok(out),
                    None => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
                }
            }
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// The cuDNN forward algorithm when a convolution goes through candle's own cuDNN call (the
/// per-shape plans of `kernels::cuda::conv2d` normally take it: without cuDNN, or when
/// `SDSERVE_CUDNN_ALGO` is set for an A/B run). candle asks cuDNN's heuristics on every call
/// when none is given, which on an H200 cost more host time than the f16 convolutions of a step
/// themselves (docs/GPU.md). Implicit precomputed GEMM handles every shape SD uses.
/// `SDSERVE_CUDNN_ALGO` picks another (implicit_gemm, gemm, direct, fft, fft_tiling, winograd,
/// winograd_nonfused) or `heuristic` for candle's per-call choice.
fn cudnn_algo() -> Option<candle_core::conv::CudnnFwdAlgo> {
    use candle_core::conv::CudnnFwdAlgo as A;
    static ALGO: std::sync::OnceLock<Option<A>> = std::sync::OnceLock::new();
    *ALGO.get_or_init(|| {
        let name = std::env::var("SDSERVE_CUDNN_ALGO").unwrap_or_default();
        match name.as_str() {
            "heuristic" => None,
            "implicit_gemm" => Some(A::ImplicitGemm),
            "gemm" => Some(A::Gemm),
            "direct" => Some(A::Direct),
            "fft" => Some(A::Fft),
            "fft_tiling" => Some(A::FftTiling),
            "winograd" => Some(A::Winograd),
            "winograd_nonfused" => Some(A::WinogradNonFused),
            _ => Some(A::ImplicitPrecompGemm),
        }
    })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding > 0 && circular_padding_on() {
            return self.forward_padded(&wrap_pad(x, self.padding)?, 0);
        }
        self.forward_padded(x, self.padding)
    }
}

impl Conv2d {
    /// The convolution with `padding` zeros on each side (the layer's own, or 0 after a wrap).
    fn forward_padded(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        if x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
            || !matches!(x.device(), Device::Cpu)
        {
            return self.candle_forward(x, padding);
        }
        let (batch, cin, h, w) = x.dims4()?;
        let (cout, wcin, kh, kw) = self.weight.dims4()?;
        if wcin * self.groups != cin {
            let groups = self.groups;
            candle_core::bail!(
                "conv2d: input has {cin} channels, weight expects {wcin} x {groups}"
            );
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: input {h}x{w} smaller than kernel {kh}x{kw}");
        }
        let s = ConvShape {
            batch,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride: self.stride,
            padding,
        };
        let x = x.contiguous()?;
        // Borrow the storage rather than copying it out.
        let (xs_guard, xs_layout) = x.storage_and_layout();
        let xs_slice: &[f32] = match &*xs_guard {
            candle_core::Storage::Cpu(c) => {
                &c.as_slice::<f32>()?[xs_layout.start_offset()..][..x.elem_count()]
            }
            _ => unreachable!("checked cpu"),
        };
        let (w_guard, w_layout) = self.weight.storage_and_layout();
        let w_owned;
        let ws: &[f32] = match &*w_guard {
            candle_core::Storage::Cpu(c) if w_layout.is_contiguous() => {
                &c.as_slice::<f32>()?[w_layout.start_offset()..][..self.weight.elem_count()]
            }
            _ => {
                w_owned = self.weight.flatten_all()?.to_vec1::<f32>()?;
                &w_owned
            }
        };
        let bias_owned = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; batch * cout * s.out_h() * s.out_w()];
        match self.groups {
            1 => conv2d_f32(xs_slice, ws, bias_owned.as_deref(), &s, &mut out),
            groups => grouped_conv2d_f32(xs_slice, ws, bias_owned.as_deref(), &s, groups, &mut out),
        }
        drop(xs_guard);
        drop(w_guard);
        Tensor::from_vec(out, (batch, cout, s.out_h(), s.out_w()), &Device::Cpu)
    }
}

/// Loads `weight` `[cout, cin, k, k]` and `bias` `[cout]` from `vb` (as `candle_nn::conv2d`).
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((cout, cin, kernel, kernel), "weight")?;
    let bias = vb.get(cout, "bias")?;
    Ok(Conv2d::new(weight, Some(bias), stride, padding))
}
