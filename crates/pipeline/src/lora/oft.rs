//! OFT and BOFT as A1111's `network_oft.py` applies them. The file's blocks rotate the weight's
//! output rows, block by block: kohya's and the newer LyCORIS's `oft_blocks` `[k, n, n]` (OFT)
//! or `[m, k, b, b]` (BOFT) are made orthogonal by the Cayley transform, `R = (I + Q)(I - Q)^-1`
//! with `Q = B - B^T`, `Q`'s norm over all blocks first clamped to the constraint
//! (`alpha * out` when alpha is there and not 0); the old LyCORIS `oft_diag` `[k, n, n]` is `R`
//! itself. OFT makes `R_k^T W_k` of each block of `n` rows; BOFT runs its `m` butterfly steps
//! (rows regrouped in pairs of strides `2^i * b/2`, each group times `R`). A `rescale` scales
//! the rows after. A1111's `updown` is that minus `W`, where `W` is the weight as the LoRAs
//! before in the set left it (so the delta is made when the weight is merged: `from_weight`),
//! times 1 (OFT sets its `scale` to 1: the file's `scale` and alpha as a rank are not used)
//! and the LoRA's weight.

use candle_core::Tensor;

/// A layer's rotation, made from the file alone.
#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    /// `R` of each block, f32: `[k, n, n]`, or `[m, k, b, b]` for BOFT.
    pub r: Tensor,
    /// `[out, 1]` or `[1, 1]`: the rows' factors.
    pub rescale: Option<Tensor>,
}

/// What is wrong with OFT blocks of shape `blocks` (`oft_diag`: `is_r`), or the number of
/// output rows they rotate. A1111's layouts: the blocks square, `k * n` rows; for BOFT blocks
/// of an even size (its steps pair rows at strides `2^i * b/2`, which must divide the rows).
pub(super) fn rows_of(blocks: &[usize], is_r: bool) -> Result<usize, String> {
    let name = if is_r { "oft_diag" } else { "oft_blocks" };
    match *blocks {
        [k, n, n2] if n == n2 => Ok(k * n),
        [m, k, b, b2] if b == b2 && !is_r => {
            let rows = k * b;
            let half = b / 2;
            let fits = half > 0 && m <= 16 && (0..m).all(|i| rows.is_multiple_of((2 * half) << i));
            if !fits {
                return Err(format!(
                    "BOFT's {name} {blocks:?} ([steps, blocks, b, b]) do not make a butterfly of {rows} rows (b even, {rows} a multiple of b * 2^(steps - 1), at most 16 steps)"
                ));
            }
            Ok(rows)
        }
        _ => Err(format!(
            "{name} has shape {blocks:?}; it must be [blocks, n, n]{}",
            if is_r {
                ""
            } else {
                " (OFT) or [steps, blocks, b, b] (BOFT)"
            }
        )),
    }
}

/// A1111's rotation from `oft_blocks` (the Cayley transform; `constraint`: alpha times the rows,
/// clamping `Q`'s norm when not 0) or `oft_diag` (`is_r`: the blocks are `R`).
pub(crate) fn rotation(
    blocks: &Tensor,
    is_r: bool,
    constraint: f32,
    rescale: Option<Tensor>,
) -> candle_core::Result<Rotation> {
    let blocks = blocks.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let r = if is_r {
        blocks
    } else {
        let dims = blocks.dims().to_vec();
        let n = dims[dims.len() - 1];
        let values = cayley(&blocks.flatten_all()?.to_vec1::<f32>()?, n, constraint);
        Tensor::from_vec(values, dims, blocks.device())?
    };
    Ok(Rotation { r, rescale })
}

/// `R = (I + Q)(I - Q)^-1` of each `n x n` block, `Q = B - B^T` scaled as A1111 does:
/// `Q * ((min(|Q|, c) + 1e-8) / (|Q| + 1e-8))` with `|Q|` the norm over all blocks, when the
/// constraint `c` is not 0. (`I - Q` of a skew-symmetric `Q` is never singular; NaN in the
/// file gives NaN, refused by the caller.)
fn cayley(blocks: &[f32], n: usize, constraint: f32) -> Vec<f32> {
    let mut q: Vec<f32> = vec![0.0; blocks.len()];
    for (b, block) in blocks.chunks(n * n).enumerate() {
        for i in 0..n {
            for j in 0..n {
                q[b * n * n + i * n + j] = block[i * n + j] - block[j * n + i];
            }
        }
    }
    if constraint != 0.0 {
        let norm = q
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt() as f32;
        // torch.clamp(norm, max=c): NaN stays NaN.
        let clamped = if norm > constraint { constraint } else { norm };
        let factor = (clamped + 1e-8) / (norm + 1e-8);
        q.iter_mut().for_each(|v| *v *= factor);
    }
    let mut out = Vec::with_capacity(q.len());
    for block in q.chunks(n * n) {
        let at = |i: usize, j: usize| f64::from(block[i * n + j]);
        let eye = |i: usize, j: usize| if i == j { 1.0 } else { 0.0 };
        let inv = inverse(
            (0..n * n)
                .map(|x| eye(x / n, x % n) - at(x / n, x % n))
                .collect(),
            n,
        );
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n)
                    .map(|l| (eye(i, l) + at(i, l)) * inv[l * n + j])
                    .sum();
                out.push(s as f32);
            }
        }
    }
    out
}

/// The inverse of the `n x n` matrix `a` (Gauss-Jordan with partial pivoting; a zero pivot
/// gives NaN).
fn inverse(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    let mut inv: Vec<f64> = (0..n * n)
        .map(|x| if x / n == x % n { 1.0 } else { 0.0 })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs()))
            .unwrap_or(col);
        if pivot != col {
            for j in 0..n {
                a.swap(col * n + j, pivot * n + j);
                inv.swap(col * n + j, pivot * n + j);
            }
        }
        let p = a[col * n + col];
        let p = if p == 0.0 { f64::NAN } else { p };
        for j in 0..n {
            a[col * n + j] /= p;
            inv[col * n + j] /= p;
        }
        for row in (0..n).filter(|&r| r != col) {
            let f = a[row * n + col];
            if f != 0.0 {
                for j in 0..n {
                    a[row * n + j] -= f * a[col * n + j];
                    inv[row * n + j] -= f * inv[col * n + j];
                }
            }
        }
    }
    inv
}

impl Rotation {
    /// A1111's `updown` before the scale and multiplier: the rotated (and rescaled) weight
    /// minus `weight` (f32, `[out, ...]`).
    pub(crate) fn updown(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let dims = weight.dims().to_vec();
        let out = dims[0];
        let w = weight.reshape((out, ()))?;
        let cols = w.dim(1)?;
        let merged = match *self.r.dims() {
            // einsum('k n m, k n ... -> k m ...', R, W): each block times R^T.
            [k, n, _] => self
                .r
                .transpose(1, 2)?
                .contiguous()?
                .matmul(&w.reshape((k, n, cols))?)?
                .reshape((out, cols))?,
            [m, k, b, _] => {
                let half = b / 2;
                let mut x = w;
                for i in 0..m {
                    let stride = half << i;
                    let groups = out / (2 * stride);
                    // (c g k) -> (c k g), g = 2, k = stride; then each block of b rows times
                    // R_i's block; then back.
                    let y = x
                        .reshape((groups, 2, stride, cols))?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((k, b, cols))?;
                    let y = self.r.get(i)?.contiguous()?.matmul(&y)?;
                    x = y
                        .reshape((groups, stride, 2, cols))?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((out, cols))?;
                }
                x
            }
            _ => candle_core::bail!("OFT blocks of shape {:?}", self.r.dims()),
        };
        let merged = match &self.rescale {
            Some(s) => merged.broadcast_mul(s)?,
            None => merged,
        };
        (merged.reshape(dims)? - weight)?.contiguous()
    }

    pub(crate) fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.r).chain(&self.rescale)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The Cayley transform of a skew-symmetric matrix is orthogonal: `R R^T = I`, and with
    /// the constraint the rotation is smaller.
    #[test]
    fn cayley_blocks_are_orthogonal() {
        let n = 5;
        let b: Vec<f32> = (0..2 * n * n)
            .map(|i| (i as f32 * 0.37).sin() * 0.3)
            .collect();
        for c in [0.0, 0.5] {
            let r = Tensor::from_vec(cayley(&b, n, c), (2, n, n), &Device::Cpu).unwrap();
            let rrt = r.matmul(&r.transpose(1, 2).unwrap()).unwrap();
            for (x, v) in values(&rrt).into_iter().enumerate() {
                let want = if (x % (n * n)) / n == x % n { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-5, "{c}: {x} {v}");
            }
        }
        let off = |c| {
            let r = cayley(&b, n, c);
            r.iter()
                .enumerate()
                .filter(|(x, _)| (x % (n * n)) / n != x % n)
                .map(|(_, v)| v.abs())
                .sum::<f32>()
        };
        assert!(off(0.5) < off(0.0) * 0.9, "{} {}", off(0.5), off(0.0));
    }

    #[test]
    fn layouts_are_checked() {
        assert_eq!(rows_of(&[4, 8, 8], false), Ok(32));
        assert_eq!(rows_of(&[4, 8, 8], true), Ok(32));
        assert_eq!(rows_of(&[2, 8, 4, 4], false), Ok(32));
        assert_eq!(rows_of(&[3, 8, 4, 4], false), Ok(32));
        // 2 steps of blocks of 4 need rows a multiple of 8; blocks of 1 make no pairs.
        assert!(rows_of(&[2, 3, 4, 4], false)
            .unwrap_err()
            .contains("butterfly"));
        assert!(rows_of(&[1, 4, 1, 1], false).is_err());
        assert!(rows_of(&[2, 8, 4, 4], true).is_err());
        assert!(rows_of(&[4, 8, 7], false)
            .unwrap_err()
            .contains("[blocks, n, n]"));
    }
}
