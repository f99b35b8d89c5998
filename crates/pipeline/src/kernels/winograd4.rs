//! 3x3 stride-1 padding-1 convolution by Winograd's minimal filtering F(4x4, 3x3).
//!
//! Each 4x4 block of output comes from a 6x6 block of input through 36 element-wise products in
//! the transformed domain instead of 144 multiply-adds, so the 36 GEMMs
//! `M_xi[cout, tiles] = U_xi[cout, cin] * V_xi[cin, tiles]` do 1/4 of direct convolution's work
//! (F(2x2, 3x3) in [`super::winograd`] does 4/9). `U = G g G^T`, `V = B^T d B`,
//! `Y = A^T M A` from Toom-Cook at the points 0, 1, -1, 1/2, -2, inf rather than Lavin & Gray's
//! 0, +-1, +-2, inf: in f32 at 320 channels the worst error drops from 3.1e-5 to 2e-5 of the
//! output's rms (rms error 2.5e-6; F(2x2) 6e-7, direct 4e-7; Barabasz et al. 2018 recommend the
//! same points). With
//! `G = [1 0 0; 1/3 1/3 1/3; -1/3 1/3 -1/3; -16/15 -8/15 -4/15; 1/15 -2/15 4/15; 0 0 1]`,
//! `B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0; 0 -2 -1 2 1 0;
//!         0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]`,
//! `A^T = [1 1 1 1 1 0; 0 1 -1 1/2 -2 0; 0 1 1 1/4 4 0; 0 1 -1 1/8 -8 1]`.
//!
//! Work goes in chunks of whole tile rows (of all images, so small feature maps with many
//! channels make one chunk and the weights are read once). Per chunk: all input channels are
//! transformed in parallel into `V`; then rayon tasks take blocks of output channels, transform
//! just their filters (`U` for 1280x2560 channels would be 470 MB; a block is a few MB and
//! stays in cache), run the 36 GEMMs against the shared `V` and write their own output channels
//! through the output transform. Every transform runs along rows of tiles, split into unit-stride
//! streams so that it vectorises.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::ConvShape;
use super::math::with_scratch;

/// Target size of one chunk's transformed input `V` (bytes).
const CHUNK_BYTES: usize = 16 << 20;

thread_local! {
    static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv3x3_f32`] handles this shape.
pub fn applies(s: &ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.padding == 1 && s.h >= 1 && s.w >= 1
}

/// `B^T d` for six inputs.
#[inline(always)]
fn bt6(d: [f32; 6]) -> [f32; 6] {
    [
        d[0] - 1.5 * d[1] - 2.0 * d[2] + 1.5 * d[3] + d[4],
        0.5 * d[2] - d[1] + 2.5 * d[3] + d[4],
        d[1] - 2.5 * d[2] + 0.5 * d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        0.5 * (d[1] - d[3]) - d[2] + d[4],
        d[1] - 1.5 * d[2] - 2.0 * d[3] + 1.5 * d[4] + d[5],
    ]
}

/// `A^T m` for six inputs.
#[inline(always)]
fn at6(m: [f32; 6]) -> [f32; 4] {
    let (p1, q1) = (m[1] + m[2], m[1] - m[2]);
    [
        m[0] + p1 + m[3] + m[4],
        q1 + 0.5 * m[3] - 2.0 * m[4],
        p1 + 0.25 * m[3] + 4.0 * m[4],
        q1 + 0.125 * m[3] - 8.0 * m[4] + m[5],
    ]
}

/// `G` as a 6x3 matrix.
const G: [[f64; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
    [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
    [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
    [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// The filter transform as one linear map from the 9 taps to the 36 products:
/// `t[ky * 3 + kx][i * 6 + j] = G[i][ky] * G[j][kx]`, so that `U^T[filters, 36] = W[filters, 9] t`
/// runs as a GEMM (a loop over the 1.6M filters of a 1280-channel conv would dominate it).
fn filter_transform_matrix() -> [f32; 9 * 36] {
    std::array::from_fn(|e| {
        let (k, xi) = (e / 36, e % 36);
        (G[xi / 6][k / 3] * G[xi % 6][k % 3]) as f32
    })
}

super::math::dispatch! {
    /// One row of tiles of one channel, first half of `B^T d B`: `c[(r * 6 + j) * stride + off +
    /// tx] = (d B)[r][j]` where `d` is the 6x6 block at padded columns `4tx..4tx+6` of the six
    /// padded rows in `p` (each `4 * (tw + 1)` long). `ph` (`24 * (tw + 1)` values) takes the rows
    /// split into the four column phases, so that the loops run unit-stride and vectorise.
    fn input_columns(p: &[f32], tw: usize, ph: &mut [f32], c: &mut [f32], stride: usize, off: usize) {
        let n = tw + 1;
        assert!(p.len() >= 24 * n && ph.len() >= 24 * n && 35 * stride + off + tw <= c.len());
        for r in 0..6 {
            let row = &p[r * 4 * n..(r + 1) * 4 * n];
            let dst = &mut ph[r * 4 * n..(r + 1) * 4 * n];
            for (t, q) in row.chunks_exact(4).enumerate() {
                for k in 0..4 {
                    dst[k * n + t] = q[k];
                }
            }
        }
        for r in 0..6 {
            let f = &ph[r * 4 * n..(r + 1) * 4 * n];
            for t in 0..tw {
                let d = [f[t], f[n + t], f[2 * n + t], f[3 * n + t], f[t + 1], f[n + t + 1]];
                for (j, val) in bt6(d).into_iter().enumerate() {
                    c[(r * 6 + j) * stride + off + t] = val;
                }
            }
        }
    }
}

super::math::dispatch! {
    /// Second half of `B^T d B` for all `nt` tiles of a chunk at once: `v[i * 6 + j][t] =
    /// (B^T c)[i][j]` from the streams `c[(r * 6 + j) * nt + t]` of [`input_columns`].
    fn input_rows(c: &[f32], nt: usize, v: &mut [&mut [f32]]) {
        assert!(c.len() >= 36 * nt && v.len() == 36 && v.iter().all(|s| s.len() == nt));
        for j in 0..6 {
            for t in 0..nt {
                let d: [f32; 6] = std::array::from_fn(|r| c[(r * 6 + j) * nt + t]);
                for (i, val) in bt6(d).into_iter().enumerate() {
                    v[i * 6 + j][t] = val;
                }
            }
        }
    }
}

super::math::dispatch! {
    /// `A^T M A + bias` for all `nt` tiles of one channel of a chunk: `ys[(a * 4 + b) * nt + t]`
    /// is output pixel (a, b) of tile t, from `m[xi * stride + off + t]`; `s` holds `24 * nt`.
    fn output_transform(
        m: &[f32],
        stride: usize,
        off: usize,
        nt: usize,
        bias: f32,
        s: &mut [f32],
        ys: &mut [f32]
    ) {
        assert!(35 * stride + off + nt <= m.len() && s.len() >= 24 * nt && ys.len() >= 16 * nt);
        // A^T along rows: s[a][j][t].
        for j in 0..6 {
            for t in 0..nt {
                let d: [f32; 6] = std::array::from_fn(|i| m[(i * 6 + j) * stride + off + t]);
                for (a, val) in at6(d).into_iter().enumerate() {
                    s[(a * 6 + j) * nt + t] = val;
                }
            }
        }
        // (.) A along columns: ys[a][b][t].
        for a in 0..4 {
            for t in 0..nt {
                let d: [f32; 6] = std::array::from_fn(|j| s[(a * 6 + j) * nt + t]);
                for (b, val) in at6(d).into_iter().enumerate() {
                    ys[(a * 4 + b) * nt + t] = val + bias;
                }
            }
        }
    }
}

super::math::dispatch! {
    /// Output row `a` of the `tw` tiles starting at `ys[.. + off]` (see [`output_transform`]),
    /// interleaved into `y` (`4 * tw` wide).
    fn interleave_row(ys: &[f32], nt: usize, a: usize, off: usize, tw: usize, y: &mut [f32]) {
        assert!((a * 4 + 3) * nt + off + tw <= ys.len() && y.len() >= 4 * tw);
        for (t, q) in y[..4 * tw].chunks_exact_mut(4).enumerate() {
            for (b, v) in q.iter_mut().enumerate() {
                *v = ys[(a * 4 + b) * nt + off + t];
            }
        }
    }
}

/// `out = conv3x3(x, weight, padding 1) + bias` over contiguous NCHW tensors (see
/// [`super::conv::conv2d_f32`] for the layout); `s` must satisfy [`applies`].
pub fn conv3x3_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    out: &mut [f32],
) {
    assert!(
        applies(s),
        "winograd F(4x4,3x3) needs a 3x3 stride-1 pad-1 conv"
    );
    s.assert_slices(x, weight, out);
    let (h, w, cin, cout) = (s.h, s.w, s.cin, s.cout);
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let n = tw + 1;

    // Chunks of global tile rows (image-major), of about equal size.
    let total_rows = s.batch * th;
    let by_mem = (CHUNK_BYTES / (4 * 36 * cin * tw)).clamp(1, total_rows);
    let chunks = total_rows.div_ceil(by_mem);
    let rows = total_rows.div_ceil(chunks);
    // Output-channel blocks: several per thread for balance, but tall enough for the GEMM.
    let threads = rayon::current_num_threads().max(1);
    let cob = cout.div_ceil(4 * threads).next_multiple_of(16).min(cout);
    let blocks = cout.div_ceil(cob);

    let t = filter_transform_matrix();
    let mut v = vec![0f32; 36 * cin * rows * tw];
    let out_ptr = out.as_mut_ptr() as usize;
    for chunk in 0..chunks {
        let gr0 = chunk * rows;
        let nrows = rows.min(total_rows - gr0);
        let nt = nrows * tw;
        // V[xi][ci][j] for the tiles j of this chunk; tasks own disjoint (ci) rows of every plane.
        let v_ptr = v.as_mut_ptr() as usize;
        (0..cin).into_par_iter().for_each(|ci| {
            with_scratch(&BUF, 48 * n + 36 * nt, |buf| {
                let (p, rest) = buf.split_at_mut(24 * n);
                let (ph, c) = rest.split_at_mut(24 * n);
                for r in 0..nrows {
                    let (b, ty) = ((gr0 + r) / th, (gr0 + r) % th);
                    let plane = &x[(b * cin + ci) * h * w..][..h * w];
                    // The six input rows under tile row ty, zero-padded left, right and outside.
                    for (q, row) in p.chunks_exact_mut(4 * n).enumerate() {
                        let iy = 4 * ty + q; // input row + 1
                        if iy >= 1 && iy <= h {
                            row[0] = 0.0;
                            row[1..=w].copy_from_slice(&plane[(iy - 1) * w..iy * w]);
                            row[w + 1..].fill(0.0);
                        } else {
                            row.fill(0.0);
                        }
                    }
                    input_columns(p, tw, ph, c, nt, r * tw);
                }
                // SAFETY: row ci of each plane xi belongs to this task; the 36 are disjoint.
                let mut dst: [&mut [f32]; 36] = std::array::from_fn(|xi| unsafe {
                    std::slice::from_raw_parts_mut(
                        (v_ptr as *mut f32).add((xi * cin + ci) * nt),
                        nt,
                    )
                });
                input_rows(c, nt, &mut dst);
            });
        });
        let v = &v[..36 * cin * nt];
        (0..blocks).into_par_iter().for_each(|blk| {
            let co0 = blk * cob;
            let nb = cob.min(cout - co0);
            let need = 36 * nb * cin + 36 * nb * nt + 40 * nt + 4 * tw;
            with_scratch(&BUF, need, |buf| {
                let (u, rest) = buf.split_at_mut(36 * nb * cin);
                let (m, rest) = rest.split_at_mut(36 * nb * nt);
                let (sc, rest) = rest.split_at_mut(24 * nt);
                let (ys, y) = rest.split_at_mut(16 * nt);
                // U[xi][co - co0][ci] for this block: row (co - co0) * cin + ci of W times t.
                // SAFETY: the block's filters are rows co0 * cin .. (co0 + nb) * cin of `weight`
                // (9 apart); the output rows stride 1 and its columns nb * cin through `u`.
                unsafe {
                    super::math::sgemm(
                        (nb * cin, 36, 9),
                        u.as_mut_ptr(),
                        (1, (nb * cin) as isize),
                        weight.as_ptr().add(co0 * cin * 9),
                        (9, 1),
                        t.as_ptr(),
                        (36, 1),
                        false,
                        1.0f32,
                        Parallelism::None,
                    );
                }
                super::winograd::plane_products(36, (nb, nt, cin), u, v, m);
                for c in 0..nb {
                    let co = co0 + c;
                    let bv = bias.map_or(0.0, |bs| bs[co]);
                    output_transform(m, nb * nt, c * nt, nt, bv, sc, ys);
                    for r in 0..nrows {
                        let (b, ty) = ((gr0 + r) / th, (gr0 + r) % th);
                        for a in 0..4 {
                            let oy = 4 * ty + a;
                            if oy < h {
                                interleave_row(ys, nt, a, r * tw, tw, y);
                                // SAFETY: channel co of every image belongs to this task.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        (out_ptr as *mut f32).add(((b * cout + co) * h + oy) * w),
                                        w,
                                    )
                                };
                                dst.copy_from_slice(&y[..w]);
                            }
                        }
                    }
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::conv2d_im2col_f32;
    use crate::test_util::{lcg, max_abs_diff_f32};

    /// Plain reference in f64: direct summation.
    fn reference(x: &[f32], wt: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f64> {
        let (h, w) = (s.h as isize, s.w as isize);
        let mut out = vec![0f64; s.batch * s.cout * s.h * s.w];
        for b in 0..s.batch {
            for co in 0..s.cout {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.cin {
                            for ky in 0..3isize {
                                for kx in 0..3isize {
                                    let (iy, ix) = (oy + ky - 1, ox + kx - 1);
                                    if iy < 0 || ix < 0 || iy >= h || ix >= w {
                                        continue;
                                    }
                                    let xv = x[((b * s.cin + ci) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = wt[(co * s.cin + ci) * 9 + (ky * 3 + kx) as usize];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * s.cout + co) * s.h + oy as usize) * s.w + ox as usize] = acc;
                    }
                }
            }
        }
        out
    }

    fn shape(batch: usize, cin: usize, h: usize, w: usize, cout: usize) -> ConvShape {
        ConvShape {
            batch,
            cin,
            h,
            w,
            cout,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
        }
    }

    #[test]
    fn matches_reference_on_odd_sizes_and_channels() {
        // Sizes not multiples of 4 exercise partial output blocks; 1x1 and 2x3 maps are all
        // padding; channel counts off the vector width and odd output-channel blocks.
        for &(batch, cin, h, w, cout) in &[
            (1, 1, 1, 1, 1),
            (1, 2, 2, 3, 3),
            (2, 5, 7, 9, 3),
            (2, 17, 13, 11, 37),
            (3, 16, 12, 16, 8),
            (1, 3, 41, 6, 4),
        ] {
            let s = shape(batch, cin, h, w, cout);
            let x = lcg(batch * cin * h * w, 1);
            let wt = lcg(cout * cin * 9, 2);
            let bias = lcg(cout, 3);
            let want = reference(&x, &wt, &bias, &s);
            let mut got = vec![f32::NAN; batch * cout * h * w];
            conv3x3_f32(&x, &wt, Some(&bias), &s, &mut got);
            let d = want
                .iter()
                .zip(&got)
                .map(|(a, &b)| (a - b as f64).abs())
                .fold(0f64, f64::max);
            assert!(d < 1e-4, "{s:?}: {d}");
            let mut nobias = vec![0f32; got.len()];
            conv3x3_f32(&x, &wt, None, &s, &mut nobias);
            let d = got
                .iter()
                .zip(&nobias)
                .enumerate()
                .map(|(i, (a, b))| (a - b - bias[(i / (h * w)) % cout]).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{s:?} without bias: {d}");
        }
    }

    #[test]
    fn several_chunks_match_im2col() {
        // 36 * 8 ch * 4 B * 70 tiles per row is ~80 KB; 120 rows of 280 columns make several
        // 16 MB chunks only at larger sizes, so use many channels on a tall, wide map.
        let s = shape(2, 64, 150, 280, 24);
        let rows_bytes = 4 * 36 * s.cin * s.w.div_ceil(4) * s.batch * s.h.div_ceil(4);
        assert!(rows_bytes > 2 * CHUNK_BYTES, "test must cover chunking");
        let x = lcg(s.batch * s.cin * s.h * s.w, 4);
        let wt = lcg(s.cout * s.cin * 9, 5);
        let bias = lcg(s.cout, 6);
        let mut want = vec![0f32; s.batch * s.cout * s.h * s.w];
        let mut got = want.clone();
        conv2d_im2col_f32(&x, &wt, Some(&bias), &s, &mut want);
        conv3x3_f32(&x, &wt, Some(&bias), &s, &mut got);
        let d = max_abs_diff_f32(&want, &got);
        assert!(d < 1e-4 * (9.0 * s.cin as f32 / 3.0).sqrt(), "{d}");
    }

    /// Relative error at SD channel counts with realistic scales (unit inputs, weights of
    /// std 1/sqrt(9 cin)), against f64 direct summation, next to the im2col path's own error.
    #[test]
    fn relative_error_at_sd_channel_counts() {
        for &(cin, hw, cout) in &[(320, 12, 16), (1280, 8, 8)] {
            let s = shape(1, cin, hw, hw, cout);
            let x = lcg(cin * hw * hw, 7);
            let scale = 1.0 / (9.0 * cin as f32 / 3.0).sqrt(); // lcg has variance 1/3
            let wt: Vec<f32> = lcg(cout * cin * 9, 8).iter().map(|v| v * scale).collect();
            let bias = vec![0f32; cout];
            let want = reference(&x, &wt, &bias, &s);
            let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
            // (max, rms) of the error over the output's rms.
            let err = |got: &[f32]| {
                let d = want.iter().zip(got).map(|(a, &b)| (a - b as f64).abs());
                let max = d.clone().fold(0f64, f64::max);
                let sq = d.map(|e| e * e).sum::<f64>() / want.len() as f64;
                (max / rms, sq.sqrt() / rms)
            };
            let mut got = vec![0f32; want.len()];
            conv3x3_f32(&x, &wt, Some(&bias), &s, &mut got);
            let e4 = err(&got);
            conv2d_im2col_f32(&x, &wt, Some(&bias), &s, &mut got);
            let e_direct = err(&got);
            crate::kernels::winograd::conv3x3_f32(&x, &wt, Some(&bias), &s, &mut got);
            let e2 = err(&got);
            // Measured: max 2e-5 / rms 2.5e-6 (F(2x2): 2e-6 / 6e-7, direct 2e-6 / 4e-7).
            eprintln!("cin {cin}: F(4x4) {e4:?} F(2x2) {e2:?} direct {e_direct:?}");
            assert!(
                e4.0 < 1e-4 && e4.1 < 1e-5,
                "cin {cin}: F(4x4) error {e4:?} of rms (direct {e_direct:?})"
            );
        }
    }
}
