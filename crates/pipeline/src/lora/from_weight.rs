//! Deltas that depend on the weight they go into. DoRA (`dora_scale` beside any type's keys)
//! is A1111's `NetworkModule.apply_weight_decompose`: with `M = W + updown` (the type's delta
//! times `calc_scale`), the weight becomes `M * (dora_scale / norm(M))`, the norm taken over
//! each input channel (all outputs and kernel positions), and the delta `(that - W) *
//! multiplier`. `W` is the weight as the earlier LoRAs of the set left it (A1111 merges them in
//! order), so such a delta is kept as the set's steps and made when the weight is merged, from
//! the weight as loaded (see [`Delta`]); every other delta is a sum made from the files alone.

use std::borrow::Cow;

use candle_core::{DType, Tensor};

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
    /// DoRA's decomposition of `W + updown`.
    Dora(Dora),
}

#[derive(Debug, Clone)]
pub(crate) struct Dora {
    /// The type's delta times `calc_scale` (not the multiplier), in the weight's dims.
    pub updown: Tensor,
    /// `dora_scale`, shaped to broadcast over the weight as `[out, in, rest]`: `[1, in, 1]` (the
    /// per-input-channel magnitude A1111 assumes) or `[out, 1, 1]` (LyCORIS's `wd_on_out`, which
    /// A1111 broadcasts against the input channels' norms all the same).
    pub scale: Tensor,
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
                    Step::Dora(d) => size(&d.updown) + size(&d.scale),
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
                Step::Dora(dora) => {
                    let current = match &total {
                        Some(t) => (&base + t)?,
                        None => base.clone(),
                    };
                    dora.delta(&current)?
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

impl Dora {
    /// `apply_weight_decompose(updown, current) * multiplier`.
    fn delta(&self, current: &Tensor) -> Result<Tensor> {
        let dims = current.dims().to_vec();
        let (out, inp) = (dims[0], dims[1]);
        let merged = (current + &self.updown)?.reshape((out, inp, ()))?;
        let norm = merged.sqr()?.sum_keepdim(2)?.sum_keepdim(0)?.sqrt()?;
        let ratio = self.scale.broadcast_div(&norm)?;
        let decomposed = merged.broadcast_mul(&ratio)?.reshape(dims)?;
        let delta = ((decomposed - current)? * self.multiplier)?;
        // An input channel of W + updown that is all zeros divides by a zero norm.
        let total = delta.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !total.is_finite() {
            return Err(PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {}: DoRA's weight decomposition is not finite for this model's weight (an input channel of the weight plus the delta has norm 0, or the values are too large)",
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
        let delta = Delta::FromWeight(vec![Step::Dora(Dora {
            updown: zeros.clone(),
            scale: Tensor::ones((1, 3, 1), DType::F32, &Device::Cpu).unwrap(),
            multiplier: 1.0,
            lora: "d".into(),
            layer: "m".into(),
        })]);
        let why = delta
            .for_weight(|| Ok(zeros.clone()))
            .unwrap_err()
            .to_string();
        assert!(why.contains("LoRA \"d\": layer m: DoRA"), "{why}");
    }
}
