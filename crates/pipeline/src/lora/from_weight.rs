//! Deltas that depend on the weight they go into. IA3 (`network_ia3.py`) scales the weight:
//! its `updown` is `W * w`, `w` over the output rows (or, with `on_input`, the input columns);
//! GLoRA's (`network_glora.py`) is `b2 @ b1 + (W @ a2) @ a1`; OFT's the rotated `W` minus `W`
//! (`oft`).
//! DoRA (`dora_scale` beside any type's keys) is A1111's `NetworkModule.apply_weight_decompose`:
//! with `M = W + updown` (the type's delta times `calc_scale`), the weight becomes
//! `M * (dora_scale / norm(M))`, the norm taken over each input channel (all outputs and kernel
//! positions), and the delta `(that - W) * multiplier`. `W` is the weight as the earlier LoRAs
//! of the set left it (A1111 merges them in order), so such a delta is kept as the set's steps
//! and made when the weight is merged, from the weight as loaded (see [`Delta`]); every other
//! delta is a sum made from the files alone.

use std::borrow::Cow;

use candle_core::{DType, Tensor};

use super::oft::Rotation;
use crate::{PipelineError, Result};

/// A weight's delta from a set of LoRAs.
#[derive(Debug, Clone)]
pub(crate) enum Delta {
    /// Added to the weight as it is (in the weights' dtype; see `compute_deltas`).
    Sum(Tensor),
    /// Made from the weight when it is merged: the set's contributions in order (f32, in the
    /// weight's canonical dims).
    FromWeight(Vec<Step>),
}

/// One LoRA's contribution to a weight whose delta is made from it.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// A delta that does not depend on the weight.
    Add(Tensor),
    /// A layer whose delta does (IA3, GLoRA, OFT, DoRA).
    Weighted(Weighted),
}

/// A layer's `updown` (A1111's, times `calc_scale`, in the weight's dims).
#[derive(Debug, Clone)]
pub(crate) enum Updown {
    /// Made from the file alone.
    Fixed(Tensor),
    /// IA3's `W * w * scale`: `w` `[out, 1]`, or `[1, in]` with `on_input`.
    Ia3 { w: Tensor, scale: f64 },
    /// GLoRA's `(b2 @ b1 + (W @ a2) @ a1) * scale` (`fixed`: `b2 @ b1`).
    Glora {
        fixed: Tensor,
        a2: Tensor,
        a1: Tensor,
        scale: f64,
    },
    /// OFT's and BOFT's rotated weight minus `W` (its scale is 1; `oft`).
    Oft(Rotation),
}

#[derive(Debug, Clone)]
pub(crate) struct Weighted {
    pub updown: Updown,
    /// `dora_scale`, shaped to broadcast over the weight as `[out, in, rest]`: `[1, in, 1]` (the
    /// per-input-channel magnitude A1111 assumes) or `[out, 1, 1]` (LyCORIS's `wd_on_out`, which
    /// A1111 broadcasts against the input channels' norms all the same).
    pub dora_scale: Option<Tensor>,
    pub multiplier: f64,
    /// The LoRA and the layer, for errors.
    pub lora: String,
    pub layer: String,
}

/// How a layer's `dora_scale` of shape `scale` lines up with a weight of canonical dims
/// `weight` (`[out, in]` or `[out, in, kh, kw]`): the shape it takes as `[out, in, rest]`, or
/// why it does not fit. Trailing 1s are allowed (a 1x1 convolution's is `[1, in, 1, 1]`; the
/// model may build it as a linear layer).
pub(crate) fn dora_scale_dims(
    scale: &[usize],
    weight: &[usize],
) -> std::result::Result<[usize; 3], String> {
    let (out, inp) = (weight[0], weight[1]);
    let fits = scale.len() >= 2 && scale[2..].iter().all(|&d| d == 1);
    match (fits, scale.first(), scale.get(1)) {
        (true, Some(1), Some(&i)) if i == inp => Ok([1, inp, 1]),
        (true, Some(&o), Some(1)) if o == out => Ok([out, 1, 1]),
        _ => Err(format!(
            "dora_scale has shape {scale:?}; for the weight {weight:?} it must be [1, {inp}] or [{out}, 1] (trailing 1s allowed)"
        )),
    }
}

impl Delta {
    pub(crate) fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Delta::Sum(t) => size(t),
            Delta::FromWeight(steps) => steps
                .iter()
                .map(|s| match s {
                    Step::Add(t) => size(t),
                    Step::Weighted(w) => {
                        let updown = match &w.updown {
                            Updown::Fixed(t) | Updown::Ia3 { w: t, .. } => size(t),
                            Updown::Glora { fixed, a2, a1, .. } => {
                                size(fixed) + size(a2) + size(a1)
                            }
                            Updown::Oft(r) => r.tensors().map(size).sum(),
                        };
                        updown + w.dora_scale.as_ref().map_or(0, size)
                    }
                })
                .sum(),
        }
    }

    /// The tensor to add to a weight: a sum as it is, else made from `base` (the weight before
    /// the set, canonical dims; read only for a delta that needs it).
    pub(crate) fn for_weight(
        &self,
        base: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Cow<'_, Tensor>> {
        let steps = match self {
            Delta::Sum(t) => return Ok(Cow::Borrowed(t)),
            Delta::FromWeight(steps) => steps,
        };
        let base = base()?.to_dtype(DType::F32)?;
        let mut total: Option<Tensor> = None;
        for step in steps {
            let add = match step {
                Step::Add(d) => d.clone(),
                Step::Weighted(layer) => {
                    let current = match &total {
                        Some(t) => (&base + t)?,
                        None => base.clone(),
                    };
                    layer.delta(&current)?
                }
            };
            total = Some(match total {
                Some(t) => (t + add)?,
                None => add,
            });
        }
        let total = total.ok_or_else(|| {
            PipelineError::InvalidRequest("a weight's LoRA steps are empty".into())
        })?;
        Ok(Cow::Owned(total))
    }
}

impl Weighted {
    /// A1111's `finalize_updown` from the `updown`: `apply_weight_decompose(updown, current)`
    /// with a `dora_scale`, times the multiplier.
    fn delta(&self, current: &Tensor) -> Result<Tensor> {
        let updown = match &self.updown {
            Updown::Fixed(t) => t.clone(),
            Updown::Ia3 { w, scale } => (current.broadcast_mul(w)? * *scale)?,
            Updown::Glora {
                fixed,
                a2,
                a1,
                scale,
            } => ((fixed + current.matmul(a2)?.matmul(a1)?)? * *scale)?,
            Updown::Oft(r) => r.updown(current)?,
        };
        let delta = match &self.dora_scale {
            None => (updown * self.multiplier)?,
            Some(dora_scale) => {
                let dims = current.dims().to_vec();
                let (out, inp) = (dims[0], dims[1]);
                let merged = (current + updown)?.reshape((out, inp, ()))?;
                let norm = merged.sqr()?.sum_keepdim(2)?.sum_keepdim(0)?.sqrt()?;
                let ratio = dora_scale.broadcast_div(&norm)?;
                let decomposed = merged.broadcast_mul(&ratio)?.reshape(dims)?;
                ((decomposed - current)? * self.multiplier)?
            }
        };
        // An input channel of W + updown that is all zeros divides by a zero norm; IA3 can
        // overflow f32.
        let total = delta.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !total.is_finite() {
            return Err(PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {}: its delta is not finite for this model's weight (with DoRA, an input channel of the weight plus the delta has norm 0; or the values are too large)",
                self.lora, self.layer
            )));
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn dora_scale_lines_up_with_the_input_or_output_channels() {
        assert_eq!(dora_scale_dims(&[1, 8], &[4, 8]), Ok([1, 8, 1]));
        assert_eq!(dora_scale_dims(&[1, 8, 1, 1], &[4, 8]), Ok([1, 8, 1]));
        assert_eq!(dora_scale_dims(&[1, 8, 1, 1], &[4, 8, 3, 3]), Ok([1, 8, 1]));
        assert_eq!(dora_scale_dims(&[4, 1], &[4, 8]), Ok([4, 1, 1]));
        for bad in [&[8][..], &[1, 4], &[8, 1], &[1, 8, 3, 1], &[2, 8]] {
            let why = dora_scale_dims(bad, &[4, 8]).unwrap_err();
            assert!(why.contains("[1, 8] or [4, 1]"), "{why}");
        }
    }

    /// An input channel whose weight plus delta is zero is refused naming the LoRA and layer,
    /// not merged as NaN.
    #[test]
    fn a_zero_norm_is_refused() {
        let zeros = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let delta = Delta::FromWeight(vec![Step::Weighted(Weighted {
            updown: Updown::Fixed(zeros.clone()),
            dora_scale: Some(Tensor::ones((1, 3, 1), DType::F32, &Device::Cpu).unwrap()),
            multiplier: 1.0,
            lora: "d".into(),
            layer: "m".into(),
        })]);
        let why = delta
            .for_weight(|| Ok(zeros.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("LoRA \"d\": layer m: its delta is not finite"),
            "{why}"
        );
    }
}
