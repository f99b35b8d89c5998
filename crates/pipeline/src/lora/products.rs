//! The tensor products LyCORIS layers are made of, as A1111 computes them
//! (`lyco_helpers.make_weight_cp`, `rebuild_cp_decomposition`, `torch.kron`), on f32 CPU
//! tensors.

use candle_core::Tensor;

/// A1111's `lyco_helpers.make_weight_cp`: `einsum('i j k l, j r -> i r k l', t, wb)`, then
/// `einsum('i j k l, i r -> r j k l', that, wa)`: `[out, in, kh, kw]`.
pub(super) fn make_weight_cp(t: &Tensor, wa: &Tensor, wb: &Tensor) -> candle_core::Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let inp = wb.dim(1)?;
    let out = wa.dim(1)?;
    // [r1, kh, kw, r2] @ [r2, in] -> [r1, kh, kw, in] -> [r1, in, kh, kw]
    let temp = t
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((r1 * kh * kw, r2))?
        .matmul(wb)?
        .reshape((r1, kh, kw, inp))?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    // wa^T [out, r1] @ [r1, in * kh * kw]
    wa.t()?
        .contiguous()?
        .matmul(&temp.reshape((r1, inp * kh * kw))?)?
        .reshape((out, inp, kh, kw))
}

/// A1111's `lyco_helpers.rebuild_cp_decomposition(up, down, mid)`:
/// `einsum('n m k l, i n, m j -> i j k l', mid, up, down)`.
pub(super) fn cp_decomposition(
    mid: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, m, kh, kw) = mid.dims4()?;
    let (out, inp) = (up.dim(0)?, down.dim(1)?);
    // [n, kh, kw, m] @ down [m, in] -> [n, kh, kw, in]; up [out, n] @ that -> [out, kh, kw, in]
    let mid_down = mid
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((n * kh * kw, m))?
        .matmul(down)?
        .reshape((n, kh * kw * inp))?;
    up.matmul(&mid_down)?
        .reshape((out, kh, kw, inp))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `torch.kron` of two matrices: `[a, b]` and `[c, d]` make `[a * c, b * d]`, block `(i, j)`
/// being `w1[i, j] * w2`.
pub(super) fn kron(w1: &Tensor, w2: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = w1.dims2()?;
    let (c, d) = w2.dims2()?;
    w1.reshape((a, 1, b, 1))?
        .broadcast_mul(&w2.reshape((1, c, 1, d))?)?
        .reshape((a * c, b * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn values(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn kron_puts_w2_in_blocks_scaled_by_w1() {
        let w1 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let w2 = Tensor::new(&[[0f32, 1.0, 2.0]], &Device::Cpu).unwrap();
        // torch.kron([[1,2],[3,4]], [[0,1,2]])
        let want = [0f32, 1., 2., 0., 2., 4., 0., 3., 6., 0., 4., 8.];
        assert_eq!(values(&kron(&w1, &w2).unwrap()), want);
    }

    /// The einsums written out as sums, index by index.
    #[test]
    fn tucker_forms_match_their_einsums() {
        let (r1, r2, kh, kw, out, inp) = (3, 2, 3, 2, 4, 5);
        let core = t(&[r1, r2, kh, kw], 0.0);
        let (wa, wb) = (t(&[r1, out], 1.0), t(&[r2, inp], 2.0));
        let got = values(&make_weight_cp(&core, &wa, &wb).unwrap());
        let (c, a, b) = (values(&core), values(&wa), values(&wb));
        for (o, i, y, x) in indices4(out, inp, kh, kw) {
            let mut s = 0f32;
            for p in 0..r1 {
                for q in 0..r2 {
                    s += c[((p * r2 + q) * kh + y) * kw + x] * b[q * inp + i] * a[p * out + o];
                }
            }
            let g = got[((o * inp + i) * kh + y) * kw + x];
            assert!((g - s).abs() < 1e-5, "{g} vs {s}");
        }
        // rebuild_cp_decomposition: mid [n, m, kh, kw], up [out, n], down [m, in].
        let (n, m) = (3, 2);
        let (mid, up, down) = (
            t(&[n, m, kh, kw], 3.0),
            t(&[out, n], 4.0),
            t(&[m, inp], 5.0),
        );
        let got = values(&cp_decomposition(&mid, &up, &down).unwrap());
        let (c, u, d) = (values(&mid), values(&up), values(&down));
        for (o, i, y, x) in indices4(out, inp, kh, kw) {
            let mut s = 0f32;
            for p in 0..n {
                for q in 0..m {
                    s += c[((p * m + q) * kh + y) * kw + x] * u[o * n + p] * d[q * inp + i];
                }
            }
            let g = got[((o * inp + i) * kh + y) * kw + x];
            assert!((g - s).abs() < 1e-5, "{g} vs {s}");
        }
    }

    fn indices4(
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| {
            (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l))))
        })
    }
}
