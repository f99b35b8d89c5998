//! 3x3 stride-1 padding-1 convolution by Winograd's minimal filtering F(2x2, 3x3).
//!
//! Each 2x2 block of output comes from a 4x4 block of input through 16 element-wise products in
//! the transformed domain instead of 36 multiply-adds, so the 16 GEMMs
//! `M_xi[cout, tiles] = U_xi[cout, cin] * V_xi[cin, tiles]` do 16/36 of direct convolution's
//! work (4/9). F(2x2, 3x3) only adds and halves, so its rounding stays close to direct
//! summation (the larger F(4x4, 3x3) would not). Transforms (Lavin & Gray, 2015):
//! `U = G g G^T`, `V = B^T d B`, `Y = A^T M A` with
//! `G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]`,
//! `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `A^T = [1 1 1 0; 0 1 -1 -1]`.
//!
//! The filter transform is redone per call (1/(2*tiles) of the GEMM work) rather than kept, so
//! weights do not take 16/9 of their memory twice. Rayon tasks take chunks of tiles of one image
//! with per-thread buffers of about [`CHUNK_BYTES`] (whole rows of tiles, so the transforms
//! run vectorised along rows), so nothing image-sized is ever transformed at once.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::ConvShape;
use super::math::with_scratch;

/// Target size of one task's transformed input + product buffers (bytes). Measured on SD shapes
/// (benches/stages.rs --kernels-only): 2 MB loses to im2col at 640x32x32; 6-48 MB are within
/// noise of each other, 24 MB was best on 3 of 4 shapes.
const CHUNK_BYTES: usize = 24 << 20;

thread_local! {
    static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv3x3_f32`] handles this shape.
pub fn applies(s: &ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.padding == 1 && s.h >= 2 && s.w >= 2
}

/// `U[xi][co][ci]` from OIHW 3x3 weights.
fn transform_filters(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    let plane = cout * cin;
    let u_ptr = u.as_mut_ptr() as usize;
    (0..cout).into_par_iter().for_each(|co| {
        let u = u_ptr as *mut f32;
        for ci in 0..cin {
            let g = &weight[(co * cin + ci) * 9..][..9];
            // G g: 4x3
            let mut t = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[0][c] = g0;
                t[1][c] = 0.5 * (g0 + g1 + g2);
                t[2][c] = 0.5 * (g0 - g1 + g2);
                t[3][c] = g2;
            }
            // (G g) G^T: 4x4
            for (r, row) in t.iter().enumerate() {
                let (a, b, c) = (row[0], row[1], row[2]);
                let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (col, v) in vals.into_iter().enumerate() {
                    // SAFETY: each task writes row `co` of every plane only.
                    unsafe { *u.add((r * 4 + col) * plane + co * cin + ci) = v };
                }
            }
        }
    });
    u
}

/// `M_xi = U_xi V_xi` for the `planes` points of a Winograd transform, one single-threaded GEMM
/// each: `u` holds `planes` row-major `m x k` matrices back to back, `v` `planes` `k x n` and
/// `out` `planes` `m x n`.
#[inline]
pub(super) fn plane_products(
    planes: usize,
    (m, n, k): (usize, usize, usize),
    u: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    assert!(u.len() >= planes * m * k && v.len() >= planes * k * n);
    assert!(out.len() >= planes * m * n);
    for xi in 0..planes {
        // SAFETY: the asserts keep every plane's matrix inside its slice.
        unsafe {
            super::math::sgemm(
                (m, n, k),
                out.as_mut_ptr().add(xi * m * n),
                (n as isize, 1),
                u.as_ptr().add(xi * m * k),
                (k as isize, 1),
                v.as_ptr().add(xi * k * n),
                (n as isize, 1),
                false,
                1.0f32,
                Parallelism::None,
            );
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
        "winograd F(2x2,3x3) needs a 3x3 stride-1 pad-1 conv"
    );
    s.assert_slices(x, weight, out);
    let (h, w, cin, cout) = (s.h, s.w, s.cin, s.cout);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let u = transform_filters(weight, cout, cin);

    // Tasks take whole rows of tiles of one image, so the transforms run along contiguous rows.
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = 4 * 16 * (cin + cout) * tw;
    let mut rows = (CHUNK_BYTES / row_bytes).clamp(1, th);
    while s.batch * th.div_ceil(rows) < 2 * threads && rows > 1 {
        rows = rows.div_ceil(2);
    }
    let chunks = th.div_ceil(rows);
    let pw = 2 * tw + 2;
    let out_ptr = out.as_mut_ptr() as usize;
    (0..s.batch * chunks).into_par_iter().for_each(|task| {
        let (b, c) = (task / chunks, task % chunks);
        let ty0 = c * rows;
        let nrows = rows.min(th - ty0);
        let nt = nrows * tw;
        let xb = &x[b * cin * h * w..(b + 1) * cin * h * w];
        let need = 16 * (cin + cout) * nt + 4 * pw + 24 * (tw + 1);
        with_scratch(&BUF, need, |buf| {
            let (v, rest) = buf.split_at_mut(16 * cin * nt);
            let (m, rest) = rest.split_at_mut(16 * cout * nt);
            let (prow, scratch) = rest.split_at_mut(4 * pw);
            // V[xi][ci][j] = (B^T d B)[xi] for tile j of this chunk.
            for ci in 0..cin {
                let plane = &xb[ci * h * w..(ci + 1) * h * w];
                for r in 0..nrows {
                    // The 4 input rows under tile row ty, zero-padded left, right and outside.
                    let ty = ty0 + r;
                    for (q, p) in prow.chunks_exact_mut(pw).take(4).enumerate() {
                        let iy = 2 * ty + q; // input row + 1
                        p.fill(0.0);
                        if iy >= 1 && iy <= h {
                            p[1..=w].copy_from_slice(&plane[(iy - 1) * w..iy * w]);
                        }
                    }
                    input_transform_row(prow, pw, tw, scratch, v, cin * nt, ci * nt + r * tw);
                }
            }
            plane_products(16, (cout, nt, cin), &u, v, m);
            // Y = A^T M A + bias, two output rows per tile row.
            let mut yrows = vec![0f32; 4 * tw];
            let ob = (out_ptr as *mut f32).wrapping_add(b * cout * h * w);
            for co in 0..cout {
                let bv = bias.map_or(0.0, |bs| bs[co]);
                for r in 0..nrows {
                    output_transform_row(m, cout * nt, co * nt + r * tw, tw, bv, &mut yrows);
                    for a in 0..2 {
                        let oy = 2 * (ty0 + r) + a;
                        if oy < h {
                            // SAFETY: row oy of channel co of image b belongs to this task.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(ob.add((co * h + oy) * w), w)
                            };
                            dst.copy_from_slice(&yrows[a * 2 * tw..a * 2 * tw + w]);
                        }
                    }
                }
            }
        });
    });
}

super::math::dispatch! {
    /// One row of tiles: `v[xi * stride + off + tx] = (B^T d B)[xi]` where `d` is the 4x4 block
    /// at columns `2tx..2tx+4` of the 4 padded rows in `p` (each `pw` long). `scratch` holds
    /// `24 * (tw + 1)` values: the rows split into even and odd columns (so every later loop is
    /// unit-stride and vectorises), then the 16 column-transformed rows.
    fn input_transform_row(
        p: &[f32],
        pw: usize,
        tw: usize,
        scratch: &mut [f32],
        v: &mut [f32],
        stride: usize,
        off: usize
    ) {
        let n = tw + 1;
        let (eo, c) = scratch[..24 * n].split_at_mut(8 * n);
        for r in 0..4 {
            let row = &p[r * pw..r * pw + 2 * n];
            let (e, o) = eo[r * 2 * n..(r + 1) * 2 * n].split_at_mut(n);
            for ((ev, ov), pair) in e.iter_mut().zip(o.iter_mut()).zip(row.chunks_exact(2)) {
                *ev = pair[0];
                *ov = pair[1];
            }
        }
        // d B along columns: c[r][q][tx] from even e[k] = d[2k], odd o[k] = d[2k+1].
        for r in 0..4 {
            let (e, o) = eo[r * 2 * n..(r + 1) * 2 * n].split_at(n);
            let (e0, e1, o0, o1) = (&e[..tw], &e[1..=tw], &o[..tw], &o[1..=tw]);
            let cr = &mut c[r * 4 * n..(r + 1) * 4 * n];
            let (c0, rest) = cr.split_at_mut(n);
            let (c1, rest) = rest.split_at_mut(n);
            let (c2, c3) = rest.split_at_mut(n);
            for t in 0..tw {
                c0[t] = e0[t] - e1[t];
                c1[t] = o0[t] + e1[t];
                c2[t] = e1[t] - o0[t];
                c3[t] = o0[t] - o1[t];
            }
        }
        // B^T (.) along rows, into the 16 output streams.
        let row = |r: usize, q: usize| &c[(r * 4 + q) * n..(r * 4 + q) * n + tw];
        for q in 0..4 {
            let (r0, r1, r2, r3) = (row(0, q), row(1, q), row(2, q), row(3, q));
            let out = |xi: usize| (xi * stride + off, xi * stride + off + tw);
            let (a, b) = out(q);
            for ((d, &x), &y) in v[a..b].iter_mut().zip(r0).zip(r2) {
                *d = x - y;
            }
            let (a, b) = out(4 + q);
            for ((d, &x), &y) in v[a..b].iter_mut().zip(r1).zip(r2) {
                *d = x + y;
            }
            let (a, b) = out(8 + q);
            for ((d, &x), &y) in v[a..b].iter_mut().zip(r2).zip(r1) {
                *d = x - y;
            }
            let (a, b) = out(12 + q);
            for ((d, &x), &y) in v[a..b].iter_mut().zip(r1).zip(r3) {
                *d = x - y;
            }
        }
    }
}

super::math::dispatch! {
    /// One row of tiles: the two output rows `A^T M A + bias` (each `2*tw` wide) into `y`, from
    /// `m[xi * stride + off + tx]`.
    fn output_transform_row(m: &[f32], stride: usize, off: usize, tw: usize, bias: f32, y: &mut [f32]) {
        assert!(15 * stride + off + tw <= m.len() && y.len() >= 4 * tw);
        let (y0, y1) = y.split_at_mut(2 * tw);
        for tx in 0..tw {
            let mv = |xi: usize| m[xi * stride + off + tx];
            let r: [[f32; 4]; 2] = [
                std::array::from_fn(|q| mv(q) + mv(4 + q) + mv(8 + q)),
                std::array::from_fn(|q| mv(4 + q) - mv(8 + q) - mv(12 + q)),
            ];
            y0[2 * tx] = r[0][0] + r[0][1] + r[0][2] + bias;
            y0[2 * tx + 1] = r[0][1] - r[0][2] - r[0][3] + bias;
            y1[2 * tx] = r[1][0] + r[1][1] + r[1][2] + bias;
            y1[2 * tx + 1] = r[1][1] - r[1][2] - r[1][3] + bias;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::conv2d_im2col_f32;
    use crate::test_util::{lcg, max_abs_diff_f32};

    #[test]
    fn matches_im2col_conv_on_even_and_odd_sizes() {
        // Odd sizes exercise partial 2x2 output blocks; 40 tiles x batch 3 exercise chunking.
        for &(batch, cin, h, w, cout) in &[
            (1, 1, 2, 2, 1),
            (2, 5, 7, 9, 3),
            (3, 16, 12, 13, 8),
            (1, 3, 1 + 2 * 20, 6, 4),
        ] {
            let s = ConvShape {
                batch,
                cin,
                h,
                w,
                cout,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            let x = lcg(batch * cin * h * w, 1);
            let wt = lcg(cout * cin * 9, 2);
            let bias = lcg(cout, 3);
            let mut want = vec![0f32; batch * cout * h * w];
            let mut got = want.clone();
            conv2d_im2col_f32(&x, &wt, Some(&bias), &s, &mut want);
            conv3x3_f32(&x, &wt, Some(&bias), &s, &mut got);
            let d = max_abs_diff_f32(&want, &got);
            assert!(d < 2e-5, "{s:?}: {d}");
        }
    }

    #[test]
    fn only_3x3_stride_1_pad_1() {
        let mut s = ConvShape {
            batch: 1,
            cin: 1,
            h: 4,
            w: 4,
            cout: 1,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
        };
        assert!(applies(&s));
        s.stride = 2;
        assert!(!applies(&s));
        s.stride = 1;
        s.padding = 0;
        assert!(!applies(&s));
    }
}
