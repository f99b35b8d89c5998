//! The "black image" guard: a half-precision VAE decode that overflows yields NaN/Inf (diffusers
//! then saves an all-black PNG). We check the decoded image and redo the decode in f32.

use candle_core::{DType, Tensor};

use crate::Result;

/// True when `t` holds any NaN or infinity. One reduction: `sum(t * 0)` is 0 for finite values
/// and NaN as soon as one value is NaN or infinite.
pub fn has_non_finite(t: &Tensor) -> Result<bool> {
    let s = (t.to_dtype(DType::F32)? * 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(!s.is_finite())
}

/// A decode to fall back to (the f32 VAE).
pub type Fallback<'a> = &'a mut dyn FnMut(&Tensor) -> Result<Tensor>;

/// How a checked decode went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeOutcome {
    /// The first decode was finite.
    Clean,
    /// The first decode had NaN/Inf; the f32 retry is what was returned.
    RetriedInF32,
}

/// Runs `primary`; if its result holds NaN/Inf and `fallback` is given (an f32 decode), returns
/// the fallback's result instead. Without a fallback a non-finite image is returned as is.
pub fn decode_checked(
    z: &Tensor,
    primary: impl FnOnce(&Tensor) -> Result<Tensor>,
    fallback: Option<Fallback<'_>>,
) -> Result<(Tensor, DecodeOutcome)> {
    let image = primary(z)?;
    match fallback {
        Some(retry) if has_non_finite(&image)? => {
            drop(image); // free the half-precision image before the f32 decode
            let image = retry(&z.to_dtype(DType::F32)?)?;
            Ok((image, DecodeOutcome::RetriedInF32))
        }
        _ => Ok((image, DecodeOutcome::Clean)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_inf() {
        let dev = Device::Cpu;
        let ok = Tensor::new(&[1f32, -2.0, 65504.0], &dev).unwrap();
        assert!(!has_non_finite(&ok).unwrap());
        assert!(!has_non_finite(&ok.to_dtype(DType::F16).unwrap()).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1f32, bad, 3.0], &dev).unwrap();
            assert!(has_non_finite(&t).unwrap(), "{bad}");
        }
        // f16 overflow: 70000 is +inf in half precision.
        let t = Tensor::new(&[70000f32], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert!(has_non_finite(&t).unwrap());
    }

    #[test]
    fn retries_only_when_needed() {
        let dev = Device::Cpu;
        let z = Tensor::ones((1, 1, 2, 2), DType::F16, &dev).unwrap();
        let mut calls = 0;
        let mut retry = |z: &Tensor| -> Result<Tensor> {
            calls += 1;
            assert_eq!(z.dtype(), DType::F32, "the retry gets f32 latents");
            Ok(z.clone())
        };
        let (_, how) = decode_checked(&z, |z| Ok(z.clone()), Some(&mut retry)).unwrap();
        assert_eq!(how, DecodeOutcome::Clean);
        let nan = |z: &Tensor| -> Result<Tensor> { Ok((z.to_dtype(DType::F32)? * f64::NAN)?) };
        let (img, how) = decode_checked(&z, nan, Some(&mut retry)).unwrap();
        assert_eq!(how, DecodeOutcome::RetriedInF32);
        assert!(!has_non_finite(&img).unwrap());
        assert_eq!(calls, 1);
        // No fallback (already f32): the image is returned, NaN and all.
        let (img, how) = decode_checked(&z, nan, None).unwrap();
        assert_eq!(how, DecodeOutcome::Clean);
        assert!(has_non_finite(&img).unwrap());
    }
}
