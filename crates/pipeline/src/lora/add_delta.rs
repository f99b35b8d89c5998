//! Adding a LoRA delta to an f32 CPU weight in place, in one parallel pass: the generic merge
//! (`W + delta` in a new tensor, its checks, then the copy back, plus a transposed copy of the
//! delta for weights stored transposed) made six passes over each weight, and under model offload
//! it runs at every build. Same sums as the generic path (f32 adds), so the same bits.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// Rows of the stored weight per parallel task, and the side of the tiles a transposed add
/// reads the delta in (so both stay in cache).
const ROWS_PER_TASK: usize = 32;
const TILE: usize = 32;

/// `weight += delta` where `weight` is an f32 tensor on the CPU and `delta` an f32 tensor of
/// its canonical shape (`[out, in]` or `[out, in, k, k]`); `transposed`: the weight is stored
/// `[in, out]` (our CPU linears). Returns `Ok(None)` when that fast path does not apply (another
/// device or dtype, a strided tensor), else `Ok(Some(fits))` with `fits` false when a sum is not
/// finite or above `limit` (the weight then holds some sums already: the caller restores it or
/// drops the module).
pub(super) fn add_in_place(
    weight: &Tensor,
    delta: &Tensor,
    transposed: bool,
    limit: f32,
) -> candle_core::Result<Option<bool>> {
    let applies = matches!(weight.device(), Device::Cpu)
        && matches!(delta.device(), Device::Cpu)
        && weight.dtype() == DType::F32
        && delta.dtype() == DType::F32
        && weight.elem_count() == delta.elem_count()
        && weight.is_contiguous()
        && delta.is_contiguous()
        && (!transposed || weight.rank() == 2);
    if !applies {
        return Ok(None);
    }
    let op = AddDelta {
        transposed,
        limit,
        bad: AtomicBool::new(false),
    };
    weight.inplace_op2(delta, &op)?;
    Ok(Some(!op.bad.load(Relaxed)))
}

struct AddDelta {
    transposed: bool,
    limit: f32,
    bad: AtomicBool,
}

impl InplaceOp2 for AddDelta {
    fn name(&self) -> &'static str {
        "lora-add-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(d)) = (s1, s2) else {
            candle_core::bail!("lora-add-delta: f32 tensors only");
        };
        let (Some((w0, w1)), Some((d0, d1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("lora-add-delta: contiguous tensors only");
        };
        let (w, d) = (&mut w[w0..w1], &d[d0..d1]);
        let limit = self.limit;
        let fits = |v: f32| v.abs() <= limit; // false for NaN too
        let bad = if !self.transposed {
            w.par_chunks_mut(1 << 16)
                .zip(d.par_chunks(1 << 16))
                .map(|(w, d)| {
                    let mut ok = true;
                    for (w, d) in w.iter_mut().zip(d) {
                        *w += d;
                        ok &= fits(*w);
                    }
                    !ok
                })
                .reduce(|| false, |a, b| a | b)
        } else {
            // The weight is stored [in, out]; the delta is [out, in].
            let out = l1.dims()[1];
            let inp = l1.dims()[0];
            w.par_chunks_mut(ROWS_PER_TASK * out)
                .enumerate()
                .map(|(task, rows)| {
                    let mut ok = true;
                    let i0 = task * ROWS_PER_TASK;
                    let n_rows = rows.len() / out;
                    for o0 in (0..out).step_by(TILE) {
                        for r in 0..n_rows {
                            let i = i0 + r;
                            for o in o0..(o0 + TILE).min(out) {
                                let v = &mut rows[r * out + o];
                                *v += d[o * inp + i];
                                ok &= fits(*v);
                            }
                        }
                    }
                    !ok
                })
                .reduce(|| false, |a, b| a | b)
        };
        if bad {
            self.bad.store(true, Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() * scale).collect()
    }

    #[test]
    fn adds_like_the_generic_path_stored_plain_or_transposed() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Sizes that are not multiples of the tiles or tasks.
        let (out, inp) = (70, 45);
        let delta = Tensor::from_vec(ramp(out * inp, 0.1), (out, inp), &dev)?;
        let base = Tensor::from_vec(ramp(out * inp, 1.3), (out, inp), &dev)?;
        let want = (&base + &delta)?;

        let plain = base.copy()?;
        assert_eq!(add_in_place(&plain, &delta, false, f32::MAX)?, Some(true));
        assert_eq!(
            plain.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );

        let stored = base.t()?.contiguous()?; // [in, out]
        assert_eq!(add_in_place(&stored, &delta, true, f32::MAX)?, Some(true));
        let got = stored.t()?.contiguous()?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn a_sum_past_the_limit_or_not_finite_is_reported() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &dev)?;
        let delta = Tensor::from_vec(vec![0f32, 0.0, 70000.0, 0.0], (2, 2), &dev)?;
        assert_eq!(add_in_place(&base, &delta, false, 65504.0)?, Some(false));
        let nan = Tensor::from_vec(vec![f32::NAN, 0.0, 0.0, 0.0], (2, 2), &dev)?;
        let w = Tensor::ones((2, 2), DType::F32, &dev)?;
        assert_eq!(add_in_place(&w, &nan, true, f32::MAX)?, Some(false));
        // Another dtype: not this path.
        let half = Tensor::ones((2, 2), DType::F16, &dev)?;
        assert_eq!(add_in_place(&half, &delta, false, 65504.0)?, None);
        Ok(())
    }
}
