//! `torch.nn.functional.interpolate(x, size=(h, w), mode=..., antialias=...)` as torch 2.11
//! computes it on the CPU for float32 NCHW tensors (`align_corners=False`, no
//! `scale_factor`): the latent upscalers of A1111's hires fix (`shared.latent_upscale_modes`).
//!
//! Per axis, each output index reads a few input indices with weights (torch's
//! `compute_indices_weights`, in float32 as torch does them). Without antialias the two axes
//! are combined at once, `sum_h wh * (sum_w ww * x)` (torch's `upsample_generic_Nd_kernel`);
//! with it, width first into a buffer, then height (torch's separable `_aa` kernels), each axis
//! only when its size changes. Checked against torch (`tools/make_interpolate_fixtures.py`,
//! `tests/integration/hires.rs`): the nearest modes exactly; bilinear and bicubic to a few float32 ulps,
//! since torch's vectorised kernels order and fuse the same products otherwise.

use candle_core::{DType, Tensor};

use crate::{PipelineError, Result};

/// torch's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterpolationMode {
    /// `nearest`: `floor(i * in / out)`.
    Nearest,
    /// `nearest-exact`: `floor((i + 0.5) * in / out)`, as PIL's nearest.
    NearestExact,
    Bilinear,
    /// Keys' cubic with A = -0.75 (A = -0.5 with antialias, as PIL).
    Bicubic,
}

/// A mode and torch's `antialias` (bilinear and bicubic only; it matters when shrinking, and
/// for bicubic always, since torch then uses PIL's cubic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interpolation {
    pub mode: InterpolationMode,
    pub antialias: bool,
}

/// One output index: the input indices it reads and their weights.
struct Taps {
    index: Vec<usize>,
    weight: Vec<f32>,
}

/// `interpolate(x, size=(height, width), ...)` of a `[N, C, H, W]` tensor, in f32 on the host
/// (the result goes back to `x`'s device, in f32).
pub fn interpolate(x: &Tensor, height: usize, width: usize, how: Interpolation) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if height == 0 || width == 0 || h == 0 || w == 0 {
        return Err(PipelineError::InvalidRequest(format!(
            "interpolate: {h}x{w} to {height}x{width}"
        )));
    }
    if how.antialias
        && matches!(
            how.mode,
            InterpolationMode::Nearest | InterpolationMode::NearestExact
        )
    {
        return Err(PipelineError::InvalidRequest(
            "interpolate: antialias is for bilinear and bicubic only (as torch)".into(),
        ));
    }
    let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let planes = n * c;
    let out = match (how.mode, how.antialias) {
        (InterpolationMode::Nearest | InterpolationMode::NearestExact, _) => {
            let rows: Vec<usize> = (0..height)
                .map(|i| nearest(how.mode, i, h, height))
                .collect();
            let cols: Vec<usize> = (0..width).map(|i| nearest(how.mode, i, w, width)).collect();
            let mut out = Vec::with_capacity(planes * height * width);
            for p in 0..planes {
                let plane = &data[p * h * w..(p + 1) * h * w];
                for &r in &rows {
                    out.extend(cols.iter().map(|&col| plane[r * w + col]));
                }
            }
            out
        }
        (mode, false) => {
            let taps = |input, output| match mode {
                InterpolationMode::Bilinear => linear_taps(input, output),
                _ => cubic_taps(input, output),
            };
            let (rows, cols) = (taps(h, height), taps(w, width));
            let mut out = Vec::with_capacity(planes * height * width);
            for p in 0..planes {
                let plane = &data[p * h * w..(p + 1) * h * w];
                for row in &rows {
                    for col in &cols {
                        out.push(weighted(row, |k| {
                            let line = &plane[row.index[k] * w..];
                            weighted(col, |j| line[col.index[j]])
                        }));
                    }
                }
            }
            out
        }
        (mode, true) => {
            let interp_size = match mode {
                InterpolationMode::Bilinear => 2,
                _ => 4,
            };
            let mut cur = data;
            let mut cur_w = w;
            if width != w {
                let cols = aa_taps(w, width, interp_size, mode);
                let mut next = Vec::with_capacity(planes * h * width);
                for line in cur.chunks_exact(w) {
                    next.extend(cols.iter().map(|col| weighted(col, |j| line[col.index[j]])));
                }
                cur = next;
                cur_w = width;
            }
            if height != h {
                let rows = aa_taps(h, height, interp_size, mode);
                let mut next = Vec::with_capacity(planes * height * cur_w);
                for plane in cur.chunks_exact(h * cur_w) {
                    for row in &rows {
                        next.extend(
                            (0..cur_w).map(|x| weighted(row, |k| plane[row.index[k] * cur_w + x])),
                        );
                    }
                }
                cur = next;
            }
            cur
        }
    };
    Ok(Tensor::from_vec(out, (n, c, height, width), x.device())?)
}

/// `t0 * w0 + t1 * w1 + ...`, accumulated left to right in f32 as torch's loops do.
fn weighted(taps: &Taps, value: impl Fn(usize) -> f32) -> f32 {
    let mut acc = value(0) * taps.weight[0];
    for k in 1..taps.index.len() {
        acc += value(k) * taps.weight[k];
    }
    acc
}

/// torch's `nearest_idx` / `nearest_exact_idx` with `scale = (float)in / out`.
fn nearest(mode: InterpolationMode, i: usize, input: usize, output: usize) -> usize {
    let scale = input as f32 / output as f32;
    let src = match mode {
        InterpolationMode::Nearest if output == input => return i,
        InterpolationMode::Nearest if output == 2 * input => return i >> 1,
        InterpolationMode::Nearest => (i as f32 * scale).floor(),
        _ => (((i as f64 + 0.5) * f64::from(scale)) as f32).floor(),
    };
    (src as usize).min(input - 1)
}

/// torch's `area_pixel_compute_source_index` (align_corners=False) in f32, then
/// `guard_index_and_lambda`: the index at or below it and the fraction past it.
fn source_index(i: usize, input: usize, output: usize, cubic: bool) -> (i64, f32) {
    let scale = input as f32 / output as f32;
    let mut real = scale * (i as f32 + 0.5) - 0.5;
    if !cubic && real < 0.0 {
        real = 0.0;
    }
    let index = (real.floor() as i64).min(input as i64 - 1);
    let lambda = (real - index as f32).clamp(0.0, 1.0);
    (index, lambda)
}

fn linear_taps(input: usize, output: usize) -> Vec<Taps> {
    (0..output)
        .map(|i| {
            if input == output {
                return Taps {
                    index: vec![i, i],
                    weight: vec![1.0, 0.0],
                };
            }
            let (i0, l1) = source_index(i, input, output, false);
            let i0 = i0 as usize;
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            Taps {
                index: vec![i0, i1],
                weight: vec![1.0 - l1, l1],
            }
        })
        .collect()
}

/// Keys' cubic convolution for |x| <= 1 and 1 < |x| < 2.
fn cubic1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// torch's `HelperInterpCubic`: four taps around the source index (clamped to the edge), A =
/// -0.75 (`get_cubic_upsample_coefficients`).
fn cubic_taps(input: usize, output: usize) -> Vec<Taps> {
    const A: f32 = -0.75;
    (0..output)
        .map(|i| {
            let (index, t) = source_index(i, input, output, true);
            let x2 = 1.0 - t;
            Taps {
                index: (0..4)
                    .map(|j| (index - 1 + j).clamp(0, input as i64 - 1) as usize)
                    .collect(),
                weight: vec![
                    cubic2(t + 1.0, A),
                    cubic1(t, A),
                    cubic1(x2, A),
                    cubic2(x2 + 1.0, A),
                ],
            }
        })
        .collect()
}

/// torch's `_compute_indices_min_size_weights_aa` (PIL's resampling): the filter stretched by
/// the scale when shrinking, its taps inside the input, normalised to sum to 1.
fn aa_taps(input: usize, output: usize, interp_size: usize, mode: InterpolationMode) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    let half = interp_size as f64 * 0.5;
    let support = if scale >= 1.0 {
        (half * f64::from(scale)) as f32
    } else {
        half as f32
    };
    let max_taps = support.ceil() as i64 * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let filter = |x: f32| -> f32 {
        let x = x.abs();
        match mode {
            InterpolationMode::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            _ => {
                const A: f32 = -0.5;
                if x < 1.0 {
                    cubic1(x, A)
                } else if x < 2.0 {
                    cubic2(x, A)
                } else {
                    0.0
                }
            }
        }
    };
    (0..output)
        .map(|i| {
            let center = (f64::from(scale) * (i as f64 + 0.5)) as f32;
            let xmin = ((f64::from(center - support) + 0.5) as i64).max(0);
            let xsize = (((f64::from(center + support) + 0.5) as i64).min(input as i64) - xmin)
                .clamp(0, max_taps);
            let mut weight: Vec<f32> = (0..xsize)
                .map(|j| {
                    let d = ((j + xmin) as f32 - center) as f64 + 0.5;
                    filter((d * f64::from(invscale)) as f32)
                })
                .collect();
            let total: f32 = weight.iter().fold(0.0, |a, w| a + w);
            if total != 0.0 {
                for w in &mut weight {
                    *w /= total;
                }
            }
            Taps {
                index: (0..xsize).map(|j| (xmin + j) as usize).collect(),
                weight,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(
        values: Vec<f32>,
        shape: (usize, usize),
        out: (usize, usize),
        how: Interpolation,
    ) -> Vec<f32> {
        let x = Tensor::from_vec(values, (1, 1, shape.0, shape.1), &Device::Cpu).unwrap();
        interpolate(&x, out.0, out.1, how)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn nearest_doubles_each_value_and_bilinear_blends_neighbours() {
        let nearest = Interpolation {
            mode: InterpolationMode::Nearest,
            antialias: false,
        };
        assert_eq!(
            run(vec![1.0, 2.0], (1, 2), (1, 4), nearest),
            vec![1.0, 1.0, 2.0, 2.0]
        );
        let bilinear = Interpolation {
            mode: InterpolationMode::Bilinear,
            antialias: false,
        };
        // Sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (past the end: the last value).
        assert_eq!(
            run(vec![0.0, 4.0], (1, 2), (1, 4), bilinear),
            vec![0.0, 1.0, 3.0, 4.0]
        );
    }

    #[test]
    fn antialias_applies_to_linear_modes_only() {
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let how = Interpolation {
            mode: InterpolationMode::Nearest,
            antialias: true,
        };
        assert!(interpolate(&x, 4, 4, how).is_err());
    }
}
