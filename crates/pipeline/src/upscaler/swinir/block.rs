//! One Swin transformer block of SwinIR (spandrel's `SwinTransformerBlock` with its
//! `WindowAttention` and `Mlp`): LayerNorm, multi-head self-attention inside windows of
//! `window x window` tokens with a learned bias per relative position, every other block on
//! windows shifted by half a window (a cyclic roll, with a mask keeping apart the tokens the
//! roll brought together), then LayerNorm and a GELU MLP, each with a residual.

use candle_core::{DType, Device, Tensor};

use crate::kernels::dense::Dense;
use crate::Result;

/// A LayerNorm over the last dim (torch's default eps, 1e-5).
pub(super) struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = crate::kernels::norm::layer_norm(x, &self.weight, &self.bias, 1e-5)? {
            return Ok(y);
        }
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, 1e-5)
    }
}

/// `relative_position_index` of a `window x window` window (the buffer spandrel registers,
/// computed here rather than read: the files store it as int64): for tokens `i = (yi, xi)`
/// and `j = (yj, xj)`, `(yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)`.
pub(super) fn relative_position_index(window: usize) -> Vec<u32> {
    let n = window * window;
    let span = 2 * window - 1;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dy = (i / window) as i64 - (j / window) as i64 + window as i64 - 1;
            let dx = (i % window) as i64 - (j % window) as i64 + window as i64 - 1;
            out.push((dy * span as i64 + dx) as u32);
        }
    }
    out
}

/// spandrel's `calculate_mask((h, w))` for shifted windows: the `h x w` image cut into the
/// three bands each way the roll by `shift` makes, `-100` between tokens of a window from
/// different regions, else 0; `[h / window * w / window, N, N]`, `N = window^2`.
pub(super) fn shift_mask(h: usize, w: usize, window: usize, shift: usize) -> Vec<f32> {
    let region = |v: usize, side: usize| -> usize {
        if v < side - window {
            0
        } else if v < side - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw, n) = (h / window, w / window, window * window);
    let mut out = Vec::with_capacity(nh * nw * n * n);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> = (0..n)
                .map(|t| {
                    let (y, x) = (wy * window + t / window, wx * window + t % window);
                    3 * region(y, h) + region(x, w)
                })
                .collect();
            for &a in &ids {
                for &b in &ids {
                    out.push(if a == b { 0.0 } else { -100.0 });
                }
            }
        }
    }
    out
}

/// Window attention: `qkv`, the heads' scaled dot products plus the relative position bias
/// (and the shift mask), softmax, the values, `proj`.
pub(super) struct Attention {
    pub qkv: Dense,
    pub proj: Dense,
    /// The bias table gathered by [`relative_position_index`]: `[1, heads, N, N]`.
    pub bias: Tensor,
    pub heads: usize,
}

impl Attention {
    /// `x`: `[windows, N, C]`; `mask`: `[windows per image, N, N]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x, None)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (hd as f64).powf(-0.5))?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut attn = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .broadcast_add(&self.bias)?;
        if let Some(mask) = mask {
            let nw = mask.dim(0)?;
            attn = attn
                .reshape((b / nw, nw, self.heads, n, n))?
                .broadcast_add(&mask.unsqueeze(1)?.unsqueeze(0)?)?
                .reshape((b, self.heads, n, n))?;
        }
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let out = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        Ok(self.proj.forward(&out, None)?)
    }
}

/// One block; `window` and `shift` as spandrel sets them (an `img_size` no larger than the
/// window makes the window `img_size` and the shift 0).
pub(super) struct Block {
    pub norm1: Norm,
    pub attn: Attention,
    pub norm2: Norm,
    pub fc1: Dense,
    pub fc2: Dense,
    pub window: usize,
    pub shift: usize,
}

/// `[B, H, W, C]` -> `[B * H/w * W/w, w*w, C]` (spandrel's `window_partition`).
fn partition(x: &Tensor, window: usize) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / window, window, w / window, window, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (h / window) * (w / window), window * window, c))
}

/// The inverse of [`partition`] (`window_reverse`).
fn reverse(x: &Tensor, window: usize, b: usize, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let c = x.dim(2)?;
    x.reshape((b, h / window, w / window, window, window, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, h, w, c))
}

impl Block {
    /// `x`: `[B, H*W, C]` tokens of an `h x w` image; `mask`: this block's shift mask.
    pub fn forward(&self, x: &Tensor, h: usize, w: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let s = self.shift as i32;
        let mut y = self.norm1.forward(x)?.reshape((b, h, w, c))?;
        if s > 0 {
            y = y.roll(-s, 1)?.roll(-s, 2)?;
        }
        let windows = self.attn.forward(&partition(&y, self.window)?, mask)?;
        let mut y = reverse(&windows, self.window, b, h, w)?;
        if s > 0 {
            y = y.roll(s, 1)?.roll(s, 2)?;
        }
        let x = (x + y.reshape((b, l, c))?)?;
        let hidden = self
            .fc1
            .forward(&self.norm2.forward(&x)?, None)?
            .gelu_erf()?;
        Ok(self.fc2.forward(&hidden, Some(&x))?)
    }
}

/// The shift mask of an `h x w` image as a tensor on `device` in `dtype`, `[nW, N, N]`.
pub(super) fn mask_tensor(
    h: usize,
    w: usize,
    window: usize,
    shift: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let n = window * window;
    let m = shift_mask(h, w, window, shift);
    Ok(
        Tensor::from_vec(m, ((h / window) * (w / window), n, n), &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relative_position_index_is_swins() {
        // Window 2: tokens (0,0) (0,1) (1,0) (1,1); span 3; (0,0) vs (1,1) is dy -1, dx -1.
        assert_eq!(
            relative_position_index(2),
            [4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
    }

    #[test]
    fn the_shift_mask_keeps_the_rolled_regions_apart() {
        // 4x4 image, window 2, shift 1: the last window (rows 2-3, cols 2-3) holds tokens of
        // regions (1,1) (1,2) (2,1) (2,2): all apart; the first window is one region.
        let m = shift_mask(4, 4, 2, 1);
        assert_eq!(m.len(), 4 * 16);
        assert!(m[..16].iter().all(|&v| v == 0.0));
        let last = &m[48..];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(last[i * 4 + j], if i == j { 0.0 } else { -100.0 });
            }
        }
    }
}
