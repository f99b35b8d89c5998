//! 2-D convolution for f32 NCHW tensors on the CPU, as tiled im2col feeding the `gemm` crate.
//!
//! Why not candle's conv2d: its CPU path copies the whole im2col matrix, multiplies with a
//! transposed kernel and then transposes the result back to NCHW (three full-size copies). Here
//! each rayon task builds the im2col rows of one tile of output pixels into a reused per-thread
//! buffer (a few MB, so it stays in cache for the gemm's packing) and multiplies
//! `W[cout, cin*kh*kw] x col[cin*kh*kw, tile]` straight into the NCHW output. 1x1 stride-1
//! convolutions skip the im2col copy entirely: the input plane already is the right matrix.
//!
//! `circular.rs` holds A1111's circular padding (`tiling`), `layer.rs` the [`Conv2d`] layer that
//! runs these kernels on the CPU and candle's (or cuDNN's) elsewhere, `depthwise.rs` the
//! one-kernel-per-channel convs of the annotators' MobileNet-style blocks, `grouped.rs` grouped
//! convs (ResNeXt's), `wide.rs` the
//! stride-1 convs with kernels of 5x5 and more (OpenPose's 7x7 stages) without im2col.

mod circular;
mod depthwise;
mod grouped;
mod layer;
#[cfg(test)]
mod tests;
mod unpatch;
pub mod wide;

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

pub use circular::{circular_padding, circular_padding_on, wrap_pad, CircularPadding};
pub use depthwise::{depthwise_conv2d, depthwise_f32, DepthwiseShape};
pub use grouped::grouped_conv2d_f32;
pub use layer::{conv2d, Conv2d};
pub use unpatch::conv_transpose_unpatch;

/// Shape and hyper-parameters of one convolution call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Panics unless the slices are the NCHW input, OIHW weights and NCHW output of this shape.
    pub(super) fn assert_slices(&self, x: &[f32], weight: &[f32], out: &[f32]) {
        assert_eq!(
            x.len(),
            self.batch * self.cin * self.h * self.w,
            "conv input size"
        );
        let k = self.cin * self.kh * self.kw;
        assert_eq!(weight.len(), self.cout * k, "conv weight size");
        let ohw = self.out_h() * self.out_w();
        assert_eq!(out.len(), self.batch * self.cout * ohw, "conv output size");
    }
}

/// Target size of one im2col tile (bytes): small enough to stay in L2/L3 while gemm packs it.
const TILE_BYTES: usize = 2 << 20;
/// Fewest output pixels per image sent to Winograd. At 8x8 (a 1280-channel conv of a 512 UNet)
/// there are too few tiles to pay for transforming the filters on every call: im2col was 1.7x
/// faster than F(4x4) there, F(4x4) 1.9-2.9x faster than im2col from 16x16 up (benches/stages.rs
/// --kernels-only, b2 1280 and 2560 channels).
const WINOGRAD_MIN_PIXELS: usize = 65;
/// Fewest output pixels per tile, so that the weight packing is amortised over enough columns.
const MIN_TILE_PIXELS: usize = 64;

thread_local! {
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Fills `col[(ci*kh + ky)*kw + kx][j]` for output pixels `p0 + j` of one image.
fn im2col_tile(x: &[f32], s: &ConvShape, p0: usize, np: usize, col: &mut [f32]) {
    let (ow, hw) = (s.out_w(), s.h * s.w);
    let pad = s.padding as isize;
    for ci in 0..s.cin {
        let plane = &x[ci * hw..(ci + 1) * hw];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let row = ((ci * s.kh + ky) * s.kw + kx) * np;
                let dst = &mut col[row..row + np];
                let mut j = 0;
                while j < np {
                    let p = p0 + j;
                    let (oy, ox) = (p / ow, p % ow);
                    // The rest of this output row, at most.
                    let run = (ow - ox).min(np - j);
                    let iy = (oy * s.stride) as isize - pad + ky as isize;
                    let d = &mut dst[j..j + run];
                    if iy < 0 || iy >= s.h as isize {
                        d.fill(0.0);
                    } else {
                        let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                        let ix0 = (ox * s.stride) as isize - pad + kx as isize;
                        if s.stride == 1 && ix0 >= 0 && ix0 + run as isize <= s.w as isize {
                            d.copy_from_slice(&src[ix0 as usize..ix0 as usize + run]);
                        } else {
                            for (t, v) in d.iter_mut().enumerate() {
                                let ix = ix0 + (t * s.stride) as isize;
                                *v = if ix >= 0 && ix < s.w as isize {
                                    src[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                    j += run;
                }
            }
        }
    }
}

/// `out = conv2d(x, weight) + bias` over contiguous NCHW `x` (`[batch, cin, h, w]`), OIHW `weight`
/// and `out` (`[batch, cout, out_h, out_w]`). Runs on the current rayon pool; 3x3 stride-1 "same"
/// convolutions of all but small maps go through Winograd F(4x4, 3x3), the rest through tiled
/// im2col. (F(4x4) beat F(2x2) on every SD shape: 1.2-1.75x, most at 32x32.)
pub fn conv2d_f32(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: &ConvShape, out: &mut [f32]) {
    match algo_override() {
        Some(Algo::Im2col) => {}
        Some(Algo::Wino2) => {
            // The routing before F(4x4): F(2x2) while its per-call filters stay under 64 MB.
            if super::winograd::applies(s) && s.cin * s.cout <= 1 << 20 {
                return super::winograd::conv3x3_f32(x, weight, bias, s, out);
            }
        }
        Some(Algo::NoWide) => {
            // The routing before the wide-kernel path.
            if super::winograd4::applies(s) && s.h * s.w >= WINOGRAD_MIN_PIXELS {
                return super::winograd4::conv3x3_f32(x, weight, bias, s, out);
            }
        }
        None => {
            if super::winograd4::applies(s) && s.h * s.w >= WINOGRAD_MIN_PIXELS {
                return super::winograd4::conv3x3_f32(x, weight, bias, s, out);
            }
            if wide::applies(s) {
                return wide::conv_f32(x, weight, bias, s, out);
            }
        }
    }
    conv2d_im2col_f32(x, weight, bias, s, out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    Im2col,
    Wino2,
    NoWide,
}

/// `SDSERVE_CONV=im2col|wino2|nowide` forces a path for A/B measurements of whole stages in one
/// build (`wino2` is the routing before F(4x4), `nowide` the one before the wide-kernel path);
/// unset or anything else routes by shape.
fn algo_override() -> Option<Algo> {
    static ALGO: std::sync::OnceLock<Option<Algo>> = std::sync::OnceLock::new();
    *ALGO.get_or_init(|| match std::env::var("SDSERVE_CONV").as_deref() {
        Ok("im2col") => Some(Algo::Im2col),
        Ok("wino2") => Some(Algo::Wino2),
        Ok("nowide") => Some(Algo::NoWide),
        _ => None,
    })
}

/// [`conv2d_f32`] by tiled im2col + GEMM, for any kernel size, stride and padding.
pub fn conv2d_im2col_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    out: &mut [f32],
) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let (ohw, ihw) = (oh * ow, s.h * s.w);
    let k = s.cin * s.kh * s.kw;
    s.assert_slices(x, weight, out);
    let direct = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0;

    // Tiles of output pixels: about TILE_BYTES of im2col each, and at least one per thread.
    let threads = rayon::current_num_threads().max(1);
    let by_cache = (TILE_BYTES / (4 * k)).max(MIN_TILE_PIXELS);
    let mut tiles = ohw.div_ceil(by_cache.min(ohw));
    while s.batch * tiles < threads && tiles < ohw {
        tiles += 1;
    }
    // Round the task count up to a multiple of the thread count so no thread idles at the end.
    let total = s.batch * tiles;
    if !total.is_multiple_of(threads) && s.batch == 1 {
        tiles = (total.div_ceil(threads) * threads).min(ohw);
    }
    let tile = ohw.div_ceil(tiles);
    let tiles = ohw.div_ceil(tile);

    // Each task writes a disjoint column range of its image's `[cout, ohw]` output matrix.
    let out_ptr = out.as_mut_ptr() as usize;
    (0..s.batch * tiles).into_par_iter().for_each(|task| {
        let (b, t) = (task / tiles, task % tiles);
        let p0 = t * tile;
        let np = tile.min(ohw - p0);
        let xb = &x[b * s.cin * ihw..(b + 1) * s.cin * ihw];
        // SAFETY: rows `co` of columns `p0..p0+np` of image `b` belong to this task only.
        let dst = unsafe { (out_ptr as *mut f32).add(b * s.cout * ohw + p0) };
        if let Some(bias) = bias {
            for (co, &bv) in bias.iter().enumerate() {
                unsafe { std::slice::from_raw_parts_mut(dst.add(co * ohw), np) }.fill(bv);
            }
        }
        let mul = |rhs: *const f32, rhs_rs: isize| unsafe {
            // dst[cout, np] (+)= W[cout, k] * rhs[k, np]
            super::math::sgemm(
                (s.cout, np, k),
                dst,
                (ohw as isize, 1),
                weight.as_ptr(),
                (k as isize, 1),
                rhs,
                (rhs_rs, 1),
                bias.is_some(),
                1.0f32,
                Parallelism::None,
            )
        };
        if direct {
            mul(xb[p0..].as_ptr(), ihw as isize);
        } else {
            super::math::with_scratch(&COL, k * np, |col| {
                im2col_tile(xb, s, p0, np, col);
                mul(col.as_ptr(), np as isize);
            });
        }
    });
}
