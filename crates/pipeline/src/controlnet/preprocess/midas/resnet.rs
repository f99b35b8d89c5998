//! The ResNetV2 of timm's R50+ViT-B/16 hybrid (`vit_base_r50_s16_384`'s `_resnetv2`, as
//! MiDaS's DPT-Hybrid uses it): not pre-activation, every conv a `StdConv2dSame` (the weight
//! standardised per output channel, eps 1e-8, then TF 'same' padding), `GroupNormAct` with 32
//! groups after each; the 'same' stem (7x7 stride 2, norm, ReLU, a 3x3 stride 2 max pool padded
//! the same way with -inf) and stages of `Bottleneck`s (1x1, 3x3 carrying the stage's stride,
//! 1x1 without ReLU, plus the shortcut: `DownsampleConv` where the file has one, then ReLU).

use candle_core::{Module, Tensor};

use super::super::depth_anything::State;
use crate::kernels::Conv2d;
use crate::Result;

/// `_resnetv2`'s `partial(StdConv2dSame, eps=1e-8)`.
const STD_EPS: f64 = 1e-8;
/// `GroupNormAct`'s defaults: `num_groups=32`, `eps=1e-5`.
const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-5;

/// TF 'same' padding of one side (`pad_same`): the total that makes `ceil(i / s)` outputs,
/// the smaller half before.
fn same_pad(i: usize, k: usize, s: usize) -> (usize, usize) {
    let total = ((i.div_ceil(s) - 1) * s + k).saturating_sub(i);
    (total / 2, total - total / 2)
}

/// `x` padded by `same_pad` on both sides with `value` (EfficientNet's `Conv2dSame` too).
pub(in super::super) fn pad_same(x: &Tensor, k: usize, s: usize, value: f32) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_pad(h, k, s);
    let (left, right) = same_pad(w, k, s);
    if top + bottom + left + right == 0 {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return Ok(x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?);
    }
    let pad = |x: &Tensor, dim: usize, before: usize, after: usize| -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let mut parts = Vec::with_capacity(3);
        for n in [before, after] {
            dims[dim] = n;
            parts.push((n > 0).then(|| Tensor::full(value, dims.as_slice(), x.device())));
        }
        let (a, b) = (parts[0].take().transpose()?, parts[1].take().transpose()?);
        let all: Vec<&Tensor> = a.iter().chain([x]).chain(b.iter()).collect();
        Ok(Tensor::cat(&all, dim)?)
    };
    pad(&pad(x, 2, top, bottom)?, 3, left, right)
}

/// `StdConv2dSame` without bias: the standardised weight is fixed, so it is computed once.
struct StdConv {
    conv: Conv2d,
    k: usize,
    stride: usize,
}

impl StdConv {
    fn load(s: &State, key: &str, shape: [usize; 4], stride: usize) -> Result<Self> {
        let w = s.get(&format!("{key}.weight"), &shape)?;
        let per = shape[1] * shape[2] * shape[3];
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        // `F.batch_norm(w.reshape(1, out, -1), training=True)`: each output's weights less
        // their mean, over the root of their biased variance plus eps.
        let standard: Vec<f32> = values
            .chunks_exact(per)
            .flat_map(|c| {
                let mean = c.iter().map(|&v| f64::from(v)).sum::<f64>() / per as f64;
                let var = c
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / per as f64;
                let inv = 1.0 / (var + STD_EPS).sqrt();
                c.iter()
                    .map(move |&v| ((f64::from(v) - mean) * inv) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let w = Tensor::from_vec(standard, &shape, w.device())?;
        Ok(Self {
            conv: Conv2d::new(w, None, stride, 0),
            k: shape[2],
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(&pad_same(x, self.k, self.stride, 0.0)?)?)
    }
}

/// `GroupNormAct` (ReLU when `act`).
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    act: bool,
}

impl GroupNorm {
    fn load(s: &State, key: &str, c: usize, act: bool) -> Result<Self> {
        Ok(Self {
            weight: s.get(&format!("{key}.weight"), &[c])?,
            bias: s.get(&format!("{key}.bias"), &[c])?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        let y = match crate::kernels::group_norm(x, GROUPS, w, b, GN_EPS, false)? {
            Some(y) => y,
            None => {
                let c = w.dim(0)?;
                candle_nn::GroupNorm::new(w.clone(), b.clone(), c, GROUPS, GN_EPS)?.forward(x)?
            }
        };
        Ok(if self.act { y.relu()? } else { y })
    }
}

/// timm's non-pre-activation `Bottleneck`.
struct Bottleneck {
    downsample: Option<(StdConv, GroupNorm)>,
    convs: [(StdConv, GroupNorm); 3],
}

impl Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        let mut y = x.clone();
        for (conv, norm) in &self.convs {
            y = norm.forward(&conv.forward(&y)?)?;
        }
        Ok((y + shortcut)?.relu()?)
    }
}

/// The backbone: the stem, then the stages (each one's output kept: MiDaS hooks the first two).
pub(super) struct ResNet {
    stem: (StdConv, GroupNorm),
    stages: Vec<Vec<Bottleneck>>,
    /// The last stage's width (the patch projection's input).
    pub(super) width: usize,
}

impl ResNet {
    /// The backbone under `prefix` (`...patch_embed.backbone`): its stages and blocks counted
    /// and every width read from the file.
    pub(super) fn load(s: &State, prefix: &str) -> Result<Self> {
        let stem_w = s.any(&format!("{prefix}.stem.conv.weight"))?;
        let (mut width, cin, k, _) = stem_w.dims4()?;
        let stem = (
            StdConv::load(s, &format!("{prefix}.stem.conv"), [width, cin, k, k], 2)?,
            GroupNorm::load(s, &format!("{prefix}.stem.norm"), width, true)?,
        );
        let has = |key: String| s.tensors.contains_key(&key);
        let mut stages = Vec::new();
        while has(format!(
            "{prefix}.stages.{}.blocks.0.conv1.weight",
            stages.len()
        )) {
            let i = stages.len();
            let mut blocks = Vec::new();
            while has(format!(
                "{prefix}.stages.{i}.blocks.{}.conv1.weight",
                blocks.len()
            )) {
                let key = format!("{prefix}.stages.{i}.blocks.{}", blocks.len());
                // ResNetV2: the first stage keeps the stem's stride, the others halve; the
                // first block of a stage carries it.
                let stride = if i > 0 && blocks.is_empty() { 2 } else { 1 };
                let mid = s.any(&format!("{key}.conv1.weight"))?.dim(0)?;
                let out = s.any(&format!("{key}.conv3.weight"))?.dim(0)?;
                let downsample = if has(format!("{key}.downsample.conv.weight")) {
                    let c = StdConv::load(
                        s,
                        &format!("{key}.downsample.conv"),
                        [out, width, 1, 1],
                        stride,
                    )?;
                    Some((
                        c,
                        GroupNorm::load(s, &format!("{key}.downsample.norm"), out, false)?,
                    ))
                } else {
                    None
                };
                let conv = |n: usize, shape: [usize; 4], stride: usize, act: bool| {
                    Ok::<_, crate::PipelineError>((
                        StdConv::load(s, &format!("{key}.conv{n}"), shape, stride)?,
                        GroupNorm::load(s, &format!("{key}.norm{n}"), shape[0], act)?,
                    ))
                };
                blocks.push(Bottleneck {
                    downsample,
                    convs: [
                        conv(1, [mid, width, 1, 1], 1, true)?,
                        conv(2, [mid, mid, 3, 3], stride, true)?,
                        conv(3, [out, mid, 1, 1], 1, false)?,
                    ],
                });
                width = out;
            }
            stages.push(blocks);
        }
        if stages.len() < 2 {
            return Err(s.bad(format!(
                "{} ResNet stages: MiDaS hooks the first two",
                stages.len()
            )));
        }
        Ok(Self {
            stem,
            stages,
            width,
        })
    }

    /// Each stage's output of a `[1, 3, H, W]` input.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = self.stem.1.forward(&self.stem.0.forward(x)?)?;
        // `MaxPool2dSame`: padded with -inf, so the pad never wins.
        let mut x = pad_same(&x, 3, 2, f32::NEG_INFINITY)?.max_pool2d_with_stride(3, 2)?;
        let mut outs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_is_tf_s() {
        // 7x7 stride 2: 64 -> 32 needs 5 (2 before, 3 after); 65 -> 33 needs 6.
        assert_eq!(same_pad(64, 7, 2), (2, 3));
        assert_eq!(same_pad(65, 7, 2), (3, 3));
        // 3x3 stride 2 on an even side pads after only; stride 1 keeps the size.
        assert_eq!(same_pad(32, 3, 2), (0, 1));
        assert_eq!(same_pad(32, 3, 1), (1, 1));
        assert_eq!(same_pad(32, 1, 2), (0, 0));
    }
}
