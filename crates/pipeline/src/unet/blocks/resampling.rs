//! diffusers' `Downsample2D` and `Upsample2D` (`downsampling.py`, `upsampling.py`), with torch's
//! nearest-neighbour rule.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{conv2d, Conv2d};

/// `Downsample2D` with a convolution (stride 2).
#[derive(Debug, Clone)]
pub(crate) struct Downsample {
    pub(super) conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    pub(crate) fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            // diffusers pads (0,1,0,1) itself when the conv has no padding.
            pad_right_bottom: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour to twice the size (or to `size`), then a 3x3 convolution.
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    pub(super) conv: Conv2d,
}

/// torch's `nearest` source index for output `i`: `min(floor(i * (in/out as f32)), in-1)`.
fn nearest_indices(input: usize, output: usize, dev: &Device) -> Result<Tensor> {
    let scale = input as f32 / output as f32;
    let idx: Vec<u32> = (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
        .collect();
    Tensor::from_vec(idx, output, dev)
}

pub(crate) fn upsample_nearest(x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    match size {
        None => x.upsample_nearest2d(2 * h, 2 * w),
        Some((oh, ow)) if oh == 2 * h && ow == 2 * w => x.upsample_nearest2d(oh, ow),
        Some((oh, ow)) => {
            let x = x.index_select(&nearest_indices(h, oh, x.device())?, 2)?;
            x.index_select(&nearest_indices(w, ow, x.device())?, 3)
        }
    }
}

impl Upsample {
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let up =
            crate::kernels::cuda::profiled(x.device(), "upsample", || upsample_nearest(x, size))?;
        self.conv.forward(&up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_indices_match_torch_rule() -> Result<()> {
        // torch: F.interpolate(arange(5), size=9, mode="nearest") picks floor(i*5/9).
        let idx = nearest_indices(5, 9, &Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
        let idx = nearest_indices(3, 6, &Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2]);
        Ok(())
    }

    #[test]
    fn upsample_odd_size_equals_exact_double_when_size_is_double() -> Result<()> {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 1, 3, 4))?;
        let a = upsample_nearest(&x, None)?;
        let b = upsample_nearest(&x, Some((6, 8)))?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        let c = upsample_nearest(&x, Some((5, 7)))?;
        assert_eq!(c.dims(), &[1, 1, 5, 7]);
        // Row 4 of 5 maps to source row floor(4*3/5)=2; column 6 of 7 to floor(6*4/7)=3.
        assert_eq!(c.get(0)?.get(0)?.get(4)?.get(6)?.to_scalar::<f32>()?, 11.0);
        Ok(())
    }
}
