//! Depthwise 2-D convolution (one kernel per channel, `groups == channels`) for f32 NCHW on the
//! CPU: the annotators' MobileNet blocks (M-LSD) and PiDiNet's / TEED's grouped convs.
//!
//! Why not candle's: its grouped conv2d runs one conv per group (a narrow, an im2col and a
//! one-row GEMM each, then a concatenation), so a 3x3 over a few hundred channels is a few
//! hundred tiny calls and copies (M-LSD's MobileNetV2 at 512 spent most of its time there).
//! Here each channel plane is one rayon task: for every output row and kernel tap, a
//! multiply-add of a contiguous input run into the output row.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Shape and hyper-parameters of one depthwise call (square padding, any stride and dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseShape {
    pub batch: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl DepthwiseShape {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.dilation * (self.kh - 1) - 1) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.dilation * (self.kw - 1) - 1) / self.stride + 1
    }
}

/// `out = depthwise_conv(x, weight) + bias` over NCHW `x`, `[channels, 1, kh, kw]` `weight` and
/// NCHW `out`, on the current rayon pool.
pub fn depthwise_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &DepthwiseShape,
    out: &mut [f32],
) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let (ihw, ohw, k) = (s.h * s.w, oh * ow, s.kh * s.kw);
    assert_eq!(x.len(), s.batch * s.channels * ihw, "depthwise input size");
    assert_eq!(weight.len(), s.channels * k, "depthwise weight size");
    assert_eq!(
        out.len(),
        s.batch * s.channels * ohw,
        "depthwise output size"
    );
    let pad = s.padding as isize;
    out.par_chunks_mut(ohw)
        .enumerate()
        .for_each(|(plane, dst)| {
            let c = plane % s.channels;
            let src = &x[plane * ihw..(plane + 1) * ihw];
            let wc = &weight[c * k..(c + 1) * k];
            dst.fill(bias.map_or(0.0, |b| b[c]));
            for oy in 0..oh {
                let row = &mut dst[oy * ow..(oy + 1) * ow];
                for ky in 0..s.kh {
                    let iy = (oy * s.stride) as isize - pad + (ky * s.dilation) as isize;
                    if iy < 0 || iy >= s.h as isize {
                        continue;
                    }
                    let input = &src[iy as usize * s.w..(iy as usize + 1) * s.w];
                    for kx in 0..s.kw {
                        let wv = wc[ky * s.kw + kx];
                        // Input column of output column ox: ox * stride + off; the output columns
                        // whose input lies inside the row.
                        let off = (kx * s.dilation) as isize - pad;
                        let first = if off < 0 {
                            ((-off) as usize).div_ceil(s.stride)
                        } else {
                            0
                        };
                        let end = if s.w as isize - off <= 0 {
                            0
                        } else {
                            ((s.w as isize - off) as usize).div_ceil(s.stride).min(ow)
                        };
                        if first >= end {
                            continue;
                        }
                        if s.stride == 1 {
                            let i0 = (first as isize + off) as usize;
                            let inp = &input[i0..i0 + (end - first)];
                            for (o, &v) in row[first..end].iter_mut().zip(inp) {
                                *o += wv * v;
                            }
                        } else {
                            for (ox, o) in row.iter_mut().enumerate().take(end).skip(first) {
                                *o += wv * input[((ox * s.stride) as isize + off) as usize];
                            }
                        }
                    }
                }
            }
        });
}

/// A depthwise conv of `x` (`[n, c, h, w]`) with `weight` `[c, 1, kh, kw]` and an optional bias
/// `[c]`: [`depthwise_f32`] for f32 on the CPU, candle's grouped conv2d otherwise.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (batch, channels, h, w) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != channels || one != 1 {
        candle_core::bail!(
            "depthwise conv: weight {:?} for {channels} channels",
            weight.dims()
        );
    }
    let on_cpu = matches!(x.device(), Device::Cpu);
    if !on_cpu || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        let y = x.conv2d(weight, padding, stride, dilation, channels)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let s = DepthwiseShape {
        batch,
        channels,
        h,
        w,
        kh,
        kw,
        stride,
        padding,
        dilation,
    };
    if h + 2 * padding < dilation * (kh - 1) + 1 || w + 2 * padding < dilation * (kw - 1) + 1 {
        candle_core::bail!("depthwise conv: input {h}x{w} smaller than its kernel");
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ws = weight.flatten_all()?.to_vec1::<f32>()?;
    let bs = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let mut out = vec![0f32; batch * channels * s.out_h() * s.out_w()];
    depthwise_f32(&xs, &ws, bs.as_deref(), &s, &mut out);
    Tensor::from_vec(out, (batch, channels, s.out_h(), s.out_w()), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Against candle's grouped conv2d (plus the bias) on every geometry the annotators use:
    /// 3x3 and 5x5, strides 1 and 2, paddings 0..2, dilations 1 and 2, odd sizes.
    #[test]
    fn depthwise_matches_candles_grouped_conv() {
        let dev = Device::Cpu;
        for &(c, h, w, k, stride, padding, dilation) in &[
            (5, 9, 11, 3, 1, 1, 1),
            (4, 10, 7, 3, 2, 0, 1),
            (3, 8, 8, 3, 2, 1, 1),
            (6, 12, 13, 5, 1, 2, 1),
            (2, 9, 9, 3, 1, 2, 2),
            (3, 7, 6, 3, 1, 0, 1),
        ] {
            let x = Tensor::from_vec(values(2 * c * h * w, 1), (2, c, h, w), &dev).unwrap();
            let wt = Tensor::from_vec(values(c * k * k, 2), (c, 1, k, k), &dev).unwrap();
            let b = Tensor::from_vec(values(c, 3), c, &dev).unwrap();
            let ours = depthwise_conv2d(&x, &wt, Some(&b), stride, padding, dilation).unwrap();
            let candle = x
                .conv2d(&wt, padding, stride, dilation, c)
                .unwrap()
                .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(
                ours.dims(),
                candle.dims(),
                "{c} {h}x{w} k{k} s{stride} p{padding}"
            );
            let diff = (ours - candle)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-5,
                "{c} {h}x{w} k{k} s{stride} p{padding} d{dilation}: {diff}"
            );
        }
    }

    /// One value by hand: a corner of a stride-2 padded conv sees only the in-image taps.
    #[test]
    fn a_corner_sums_only_the_taps_inside_the_image() {
        let s = DepthwiseShape {
            batch: 1,
            channels: 1,
            h: 4,
            w: 4,
            kh: 3,
            kw: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
        };
        let x: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let w: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let mut out = vec![0f32; 4];
        depthwise_f32(&x, &w, Some(&[0.5]), &s, &mut out);
        // Output (0, 0): taps (1,1), (1,2), (2,1), (2,2) of the kernel on x[0][0], x[0][1],
        // x[1][0], x[1][1].
        assert_eq!(out[0], 0.5 + 5.0 * 1.0 + 6.0 * 2.0 + 8.0 * 5.0 + 9.0 * 6.0);
    }
}
