//! Stride-1 convolutions with large kernels (OpenPose's 7x7 CPM stages) without im2col.
//!
//! The input is copied once, zero-padded and channel-last: `padded[(y * wp + x) * cin + ci]`.
//! Outputs are computed on the padded width (`wp` columns a row, the last `kw - 1` of them
//! thrown away), so output `q = oy * wp + ox` reads, for kernel row `ky`, the `kw * cin`
//! consecutive values from `(q + ky * wp) * cin`: each kernel row is one GEMM
//! `W_ky[cout, kw * cin] x padded[kw * cin, q..]` reading the padded copy in place (row stride
//! 1, column stride `cin`), accumulated over the `kh` rows. im2col instead writes and reads
//! `cin * kh * kw` values per output pixel (6272 for the CPM convs), more memory traffic than
//! the GEMM's own.

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::ConvShape;

/// Fewest taps per kernel row for this path (smaller kernels go through im2col / Winograd).
const MIN_KERNEL: usize = 5;
/// Output columns (on the padded width) per task: enough to amortise packing the weights.
const TILE_COLUMNS: usize = 512;

/// Whether [`conv_f32`] takes `s`: stride 1, a square kernel of [`MIN_KERNEL`] or more.
pub fn applies(s: &ConvShape) -> bool {
    s.stride == 1 && s.kh == s.kw && s.kh >= MIN_KERNEL
}

/// `out = conv2d(x, weight) + bias` for NCHW `x`, OIHW `weight` and NCHW `out`, as
/// [`super::conv2d_f32`]; `s` must satisfy [`applies`].
pub fn conv_f32(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: &ConvShape, out: &mut [f32]) {
    assert!(applies(s), "wide-kernel conv: stride 1, kernel 5+ only");
    conv_dilated_f32(x, weight, bias, s, 1, out)
}

/// The same with the kernel's taps `dilation` apart (M-LSD's 3x3 dilated 5), any kernel,
/// stride 1: each tap is then its own GEMM over `cin` values (`dilation` 1 merges a kernel
/// row's taps into one).
pub fn conv_dilated_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    dilation: usize,
    out: &mut [f32],
) {
    assert!(s.stride == 1 && dilation >= 1, "wide-kernel conv: stride 1");
    let (cin, cout, kh, kw, p, d) = (s.cin, s.cout, s.kh, s.kw, s.padding, dilation);
    let (hp, wp) = (s.h + 2 * p, s.w + 2 * p);
    assert!(
        hp > d * (kh - 1) && wp > d * (kw - 1),
        "wide-kernel conv: input smaller than its kernel"
    );
    let (oh, ow) = (hp - d * (kh - 1), wp - d * (kw - 1));
    assert_eq!(x.len(), s.batch * cin * s.h * s.w, "conv input size");
    assert_eq!(weight.len(), cout * cin * kh * kw, "conv weight size");
    assert_eq!(out.len(), s.batch * cout * oh * ow, "conv output size");
    // [cout, cin, kh, kw] -> [cout, kh, kw, cin]: tap (ky, kx) is then a [cout, cin] block and
    // kernel row ky a [cout, kw * cin] one, in the padded copy's (x, ci) order.
    let k_all = kh * kw * cin;
    let mut wr = vec![0f32; weight.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    wr[co * k_all + (ky * kw + kx) * cin + ci] =
                        weight[((co * cin + ci) * kh + ky) * kw + kx];
                }
            }
        }
    }
    // (weight offset, input offset in pixels, K) of each GEMM: a kernel row, or a tap.
    let parts: Vec<(usize, usize, usize)> = if d == 1 {
        (0..kh)
            .map(|ky| (ky * kw * cin, ky * wp, kw * cin))
            .collect()
    } else {
        (0..kh * kw)
            .map(|t| (t * cin, d * ((t / kw) * wp + t % kw), cin))
            .collect()
    };
    // Spare rows: the thrown-away columns of the last output row read past `hp` rows.
    let spare = (d * (kw - 1)).div_ceil(wp);
    let mut padded = vec![0f32; (hp + spare) * wp * cin];
    let wide_n = oh * wp;
    let mut wide = vec![0f32; cout * wide_n];
    let threads = rayon::current_num_threads().max(1);
    let tiles = wide_n.div_ceil(TILE_COLUMNS).div_ceil(threads) * threads;
    let tile = wide_n.div_ceil(tiles);
    let tiles = wide_n.div_ceil(tile);
    let (ihw, ohw) = (s.h * s.w, oh * ow);
    for b in 0..s.batch {
        let xb = &x[b * cin * ihw..(b + 1) * cin * ihw];
        padded
            .par_chunks_mut(wp * cin)
            .enumerate()
            .for_each(|(py, row)| {
                let y = py as isize - p as isize;
                if y < 0 || y >= s.h as isize {
                    return;
                }
                let y = y as usize;
                for xx in 0..s.w {
                    let px = &mut row[(xx + p) * cin..(xx + p + 1) * cin];
                    for (ci, v) in px.iter_mut().enumerate() {
                        *v = xb[ci * ihw + y * s.w + xx];
                    }
                }
            });
        let wide_ptr = wide.as_mut_ptr() as usize;
        (0..tiles).into_par_iter().for_each(|t| {
            let q0 = t * tile;
            let nq = tile.min(wide_n - q0);
            for (i, &(w0, shift, k)) in parts.iter().enumerate() {
                // SAFETY: columns q0..q0+nq of `wide` belong to this task only; the reads of
                // `padded` end within its spare rows (see above), those of `wr` within a row.
                unsafe {
                    super::super::math::sgemm(
                        (cout, nq, k),
                        (wide_ptr as *mut f32).add(q0),
                        (wide_n as isize, 1),
                        wr.as_ptr().add(w0),
                        (k_all as isize, 1),
                        padded.as_ptr().add((q0 + shift) * cin),
                        (1, cin as isize),
                        i > 0,
                        1.0,
                        Parallelism::None,
                    )
                }
            }
        });
        out[b * cout * ohw..(b + 1) * cout * ohw]
            .par_chunks_mut(ohw)
            .enumerate()
            .for_each(|(co, plane)| {
                let bv = bias.map_or(0.0, |bias| bias[co]);
                let src = &wide[co * wide_n..(co + 1) * wide_n];
                for oy in 0..oh {
                    let row = &src[oy * wp..oy * wp + ow];
                    for (o, &v) in plane[oy * ow..(oy + 1) * ow].iter_mut().zip(row) {
                        *o = v + bv;
                    }
                }
            });
    }
}

/// A stride-1 dilated conv of `x` (`[n, cin, h, w]`) with `weight` `[cout, cin, kh, kw]` and an
/// optional bias: [`conv_dilated_f32`] for f32 on the CPU, candle's conv2d otherwise.
pub fn dilated_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (batch, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin {
        candle_core::bail!("dilated conv: input has {cin} channels, weight expects {wcin}");
    }
    let on_cpu = matches!(x.device(), Device::Cpu);
    if !on_cpu || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        let y = x.conv2d(weight, padding, 1, dilation, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    if hp <= dilation * (kh - 1) || wp <= dilation * (kw - 1) {
        candle_core::bail!("dilated conv: input {h}x{w} smaller than its kernel");
    }
    let s = ConvShape {
        batch,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        stride: 1,
        padding,
    };
    let (oh, ow) = (hp - dilation * (kh - 1), wp - dilation * (kw - 1));
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ws = weight.flatten_all()?.to_vec1::<f32>()?;
    let bs = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let mut out = vec![0f32; batch * cout * oh * ow];
    conv_dilated_f32(&xs, &ws, bs.as_deref(), &s, dilation, &mut out);
    Tensor::from_vec(out, (batch, cout, oh, ow), &Device::Cpu)
}
