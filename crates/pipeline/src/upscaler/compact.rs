//! SRVGGNetCompact, "Real-ESRGAN Compact" (realesr-general-x4v3, realesr-animevideov3 and
//! the many 1x/2x/4x community "compact" models), as spandrel's `Compact` architecture
//! builds and runs it (`spandrel/architectures/Compact`):
//!
//! `body.0` conv (input to features) -> PReLU `body.1` -> `num_conv` times (conv, PReLU) ->
//! the last conv to `3 * scale^2` channels -> pixel shuffle by `scale`, plus the input
//! upsampled by `scale` (nearest), so the network learns the residual.
//!
//! Everything is read from the weights as spandrel's loader reads it: the feature width from
//! `body.0.weight`, the body's length from the highest `body.N` index, the scale from the
//! last conv's outputs (`scale^2 * out_channels`, out_channels the input's first).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// One conv and the PReLU after it.
struct Stage {
    conv: Conv2d,
    /// The PReLU's slopes, `[1, C, 1, 1]`.
    slope: Tensor,
}

/// A loaded SRVGGNetCompact.
pub struct Compact {
    stages: Vec<Stage>,
    last: Conv2d,
    scale: usize,
    pub features: usize,
}

impl std::fmt::Debug for Compact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact")
            .field("scale", &self.scale)
            .field("convs", &self.convs())
            .field("features", &self.features)
            .finish()
    }
}

/// PReLU with per-channel slopes: `x` where positive, `slope * x` below.
fn prelu(x: &Tensor, slope: &Tensor) -> candle_core::Result<Tensor> {
    let positive = x.relu()?;
    let negative = (x - &positive)?;
    positive + negative.broadcast_mul(slope)?
}

/// torch's `pixel_shuffle`: `[B, C r^2, H, W]` -> `[B, C, H r, W r]`, the pixel at
/// `(y r + i, x r + j)` of channel `c` from channel `c r^2 + i r + j`.
pub(super) fn pixel_shuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c = c / (r * r);
    x.reshape((b, c, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c, h * r, w * r))
}

/// spandrel's `get_scale_and_output_channels(x, in_channels)`: the first of the input's
/// channels, 3, 4 and 1 that divides `x` leaving a square, and that square's root.
fn scale_and_out_channels(x: usize, in_channels: usize) -> Option<(usize, usize)> {
    [in_channels, 3, 4, 1].into_iter().find_map(|c| {
        if c == 0 || !x.is_multiple_of(c) {
            return None;
        }
        let root = ((x / c) as f64).sqrt() as usize;
        (root * root == x / c).then_some((root, c))
    })
}

impl Compact {
    /// spandrel's detection (`CompactArch`).
    pub(super) fn detect(has: &dyn Fn(&str) -> bool) -> bool {
        has("body.0.weight") && has("body.1.weight")
    }

    pub(super) fn from_state(
        path: &Path,
        state: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let get = |key: String, shape: Option<&[usize]>| -> Result<Tensor> {
            Ok(super::state::checked_tensor(path, state, &key, shape)?.clone())
        };
        let first = get("body.0.weight".into(), None)?;
        let (features, in_channels) = match first.dims() {
            &[f, c, 3, 3] => (f, c),
            d => {
                return Err(bad(format!(
                    "body.0.weight has shape {d:?}, not a 3x3 conv's"
                )))
            }
        };
        // spandrel: get_seq_len(state, "body") - 1, the last conv's index.
        let highest = state
            .keys()
            .filter_map(|k| k.strip_prefix("body.")?.split('.').next()?.parse().ok())
            .max()
            .unwrap_or(0usize);
        if highest < 2 || !highest.is_multiple_of(2) {
            return Err(bad(format!(
                "body.{highest} is the last layer; a compact network ends on a conv at an \
                 even index past body.1"
            )));
        }
        let convs = (highest - 2) / 2;
        let shuffled = get(format!("body.{highest}.bias"), None)?.dims1()?;
        let (scale, out_channels) =
            scale_and_out_channels(shuffled, in_channels).ok_or_else(|| {
                bad(format!(
                    "body.{highest} has {shuffled} outputs, not scale^2 times 1, 3 or 4 channels"
                ))
            })?;
        if in_channels != 3 || out_channels != 3 {
            return Err(bad(format!(
                "a compact network of {in_channels} input and {out_channels} output channels; \
                 upscalers of RGB images take and give 3"
            )));
        }
        let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let conv = |i: usize, cout: usize, cin: usize| -> Result<Conv2d> {
            let weight = on(get(format!("body.{i}.weight"), Some(&[cout, cin, 3, 3]))?)?;
            let bias = on(get(format!("body.{i}.bias"), Some(&[cout]))?)?;
            Ok(Conv2d::new(weight, Some(bias), 1, 1))
        };
        let stages = (0..=convs)
            .map(|n| -> Result<Stage> {
                let cin = if n == 0 { in_channels } else { features };
                Ok(Stage {
                    conv: conv(2 * n, features, cin)?,
                    slope: on(
                        get(format!("body.{}.weight", 2 * n + 1), Some(&[features]))?
                            .reshape((1, features, 1, 1))?,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stages,
            last: conv(highest, shuffled, features)?,
            scale,
            features,
        })
    }

    /// The factor the image grows by.
    pub fn scale(&self) -> usize {
        self.scale
    }

    /// The convs of the body between the first and the last (spandrel's `num_conv`).
    pub fn convs(&self) -> usize {
        self.stages.len() - 1
    }

    pub fn device(&self) -> &Device {
        self.last.weight().device()
    }

    pub fn dtype(&self) -> DType {
        self.last.weight().dtype()
    }

    /// `[B, 3, H, W]` -> `[B, 3, H * scale, W * scale]`, unclamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut out = x.clone();
        for stage in &self.stages {
            out = prelu(&stage.conv.forward(&out)?, &stage.slope)?;
        }
        let out = pixel_shuffle(&self.last.forward(&out)?, self.scale)?;
        let base = x.upsample_nearest2d(h * self.scale, w * self.scale)?;
        Ok((out + base)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_and_channels_are_spandrels_guess() {
        assert_eq!(scale_and_out_channels(48, 3), Some((4, 3)));
        assert_eq!(scale_and_out_channels(12, 3), Some((2, 3)));
        assert_eq!(scale_and_out_channels(3, 3), Some((1, 3)));
        // Not a multiple of 3 with a square: 4 channels, refused by the caller.
        assert_eq!(scale_and_out_channels(64, 3), Some((4, 4)));
        assert_eq!(scale_and_out_channels(7, 3), None);
    }

    #[test]
    fn pixel_shuffle_is_torchs() {
        // One channel of 4 = 2^2, 1x1 pixel: the four values land at (0,0) (0,1) (1,0) (1,1).
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 1, 1))
            .unwrap();
        let y = pixel_shuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1., 2., 3., 4.]
        );
    }
}
