//! The encoder of Bae et al.'s normal network: the vendored geffnet's `tf_efficientnet_b5_ap`
//! (`gen_efficientnet.py` / `efficientnet_builder.py` / `conv2d_layers.py`) up to its
//! `conv_head`, which is all the decoder reads. Every conv is bias-free with a BatchNorm after
//! it (eps 1e-3, TF's), folded into the conv at load (eval mode: a fixed per-channel affine).
//! 'same' padding: a stride-1 conv pads `(k - 1) / 2` on each side (`_is_static_pad`), a
//! stride-2 one is `Conv2dSame` (TF's split, the smaller half before). The stem (3x3 stride 2,
//! BN, swish), then stages of blocks: the first stage's `DepthwiseSeparableConv` (depthwise,
//! BN, swish, squeeze-excite, 1x1, BN), the others' `InvertedResidual` (1x1 expansion, BN,
//! swish, depthwise, BN, swish, squeeze-excite, 1x1, BN), each with the residual where the
//! stride is 1 and the width kept. Squeeze-excite: the spatial mean, a 1x1 with bias, swish,
//! a 1x1 with bias, sigmoid, times the input. Widths, kernel sizes, block counts and
//! expansions are read from the file; the strides are the architecture's.

use candle_core::{Module, Tensor};

use super::super::depth_anything::State;
use super::super::midas::resnet::pad_same;
use crate::kernels::{depthwise_conv2d, Conv2d};
use crate::Result;

/// `_gen_efficientnet`'s arch_def strides (`s1`, `s2`, `s2`, `s2`, `s1`, `s2`, `s1`), carried
/// by each stage's first block; the file does not hold them.
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
/// `BN_EPS_TF_DEFAULT` (tf_efficientnet_b5_ap's `bn_eps`).
const BN_EPS: f64 = 1e-3;

/// The state dict's prefix of the geffnet model (`Encoder.original_model`).
const PREFIX: &str = "encoder.original_model";

/// `1 / sqrt(var + eps)` times the BN weight, and its bias less the mean times that: the
/// eval-mode BN `key` as a per-channel scale and shift (in f64, rounded once).
pub(super) fn batch_norm(s: &State, key: &str, c: usize, eps: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let read = |n: &str| -> Result<Vec<f64>> {
        let t = s.get(&format!("{key}.{n}"), &[c])?;
        Ok(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    };
    let (w, b, mean, var) = (
        read("weight")?,
        read("bias")?,
        read("running_mean")?,
        read("running_var")?,
    );
    let scale: Vec<f64> = (0..c).map(|i| w[i] / (var[i] + eps).sqrt()).collect();
    let shift = (0..c).map(|i| (b[i] - mean[i] * scale[i]) as f32).collect();
    Ok((scale.into_iter().map(|v| v as f32).collect(), shift))
}

/// The conv `conv` (of `shape`, with a bias where `bias`) with the BN `bn` folded in.
pub(super) fn conv_bn(
    s: &State,
    conv: &str,
    bn: &str,
    shape: [usize; 4],
    bias: bool,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let w = s.get(&format!("{conv}.weight"), &shape)?;
    let b = match bias {
        true => s
            .get(&format!("{conv}.bias"), &shape[..1])?
            .to_vec1::<f32>()?,
        false => vec![0.0; shape[0]],
    };
    let (scale, shift) = batch_norm(s, bn, shape[0], eps)?;
    let per = shape[1] * shape[2] * shape[3];
    let w: Vec<f32> = w
        .flatten_all()?
        .to_vec1::<f32>()?
        .chunks_exact(per)
        .zip(&scale)
        .flat_map(|(row, &k)| row.iter().map(move |&v| v * k))
        .collect();
    let b: Vec<f32> = (0..shape[0]).map(|o| b[o] * scale[o] + shift[o]).collect();
    let dev = s.device;
    Ok((
        Tensor::from_vec(w, &shape, dev)?,
        Tensor::from_vec(b, shape[0], dev)?,
    ))
}

/// A conv with its BN folded in: a full one (1x1 here, or the stem) or a depthwise one, with
/// geffnet's 'same' padding.
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    depthwise: bool,
    /// Conv2d's own padding where it is static (stride 1), else `Conv2dSame`'s at run time.
    conv: Conv2d,
}

impl ConvBn {
    fn load(s: &State, conv: &str, bn: &str, shape: [usize; 4], stride: usize) -> Result<Self> {
        // A depthwise weight is `[c, 1, k, k]` (geffnet's `groups = out_chs`).
        let depthwise = shape[1] == 1 && shape[2] > 1;
        let (weight, bias) = conv_bn(s, conv, bn, shape, false, BN_EPS)?;
        let k = shape[2];
        let pad = if stride == 1 { (k - 1) / 2 } else { 0 };
        Ok(Self {
            conv: Conv2d::new(weight.clone(), Some(bias.clone()), stride, pad),
            weight,
            bias,
            k,
            stride,
            depthwise,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, pad) = match self.stride {
            1 => (x.clone(), (self.k - 1) / 2),
            s => (pad_same(x, self.k, s, 0.0)?, 0),
        };
        Ok(match self.depthwise {
            true => depthwise_conv2d(&x, &self.weight, Some(&self.bias), self.stride, pad, 1)?,
            false => self.conv.forward(&x)?,
        })
    }
}

/// geffnet's swish (`nn.SiLU`), in parallel where it can be.
fn swish(x: &Tensor) -> Result<Tensor> {
    match crate::kernels::act::silu(x)? {
        Some(y) => Ok(y),
        None => Ok(x.silu()?),
    }
}

/// `SqueezeExcite` of a block's `c`-wide depthwise output.
struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
}

impl SqueezeExcite {
    fn load(s: &State, key: &str, c: usize) -> Result<Self> {
        let reduced = s.any(&format!("{key}.conv_reduce.weight"))?.dim(0)?;
        Ok(Self {
            reduce: s.conv(&format!("{key}.conv_reduce"), [reduced, c, 1, 1], 1, true)?,
            expand: s.conv(&format!("{key}.conv_expand"), [c, reduced, 1, 1], 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let se = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let se = swish(&self.reduce.forward(&se)?)?;
        let gate = candle_nn::ops::sigmoid(&self.expand.forward(&se)?)?;
        Ok(x.broadcast_mul(&gate)?)
    }
}

/// One block: `DepthwiseSeparableConv` (no expansion) or `InvertedResidual`.
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    residual: bool,
}

impl Block {
    fn load(s: &State, key: &str, cin: usize, stride: usize) -> Result<Self> {
        let k = |n: &str| format!("{key}.{n}");
        let has = |n: &str| s.tensors.contains_key(&k(n));
        // InvertedResidual has `conv_pwl` (its `conv_pw` expands); DepthwiseSeparableConv's
        // `conv_pw` projects.
        let inverted = has("conv_pwl.weight");
        let (expand, mid) = match inverted {
            true => {
                let mid = s.any(&k("conv_pw.weight"))?.dim(0)?;
                let c = ConvBn::load(s, &k("conv_pw"), &k("bn1"), [mid, cin, 1, 1], 1)?;
                (Some(c), mid)
            }
            false => (None, cin),
        };
        let dw = s.any(&k("conv_dw.weight"))?;
        let ks = dw.dim(2)?;
        let (dw_bn, se_key, proj, proj_bn) = match inverted {
            true => ("bn2", "se", "conv_pwl", "bn3"),
            false => ("bn1", "se", "conv_pw", "bn2"),
        };
        let depthwise = ConvBn::load(s, &k("conv_dw"), &k(dw_bn), [mid, 1, ks, ks], stride)?;
        let se = has(&format!("{se_key}.conv_reduce.weight"))
            .then(|| SqueezeExcite::load(s, &k(se_key), mid))
            .transpose()?;
        let out = s.any(&k(&format!("{proj}.weight")))?.dim(0)?;
        let project = ConvBn::load(s, &k(proj), &k(proj_bn), [out, mid, 1, 1], 1)?;
        Ok(Self {
            expand,
            depthwise,
            se,
            project,
            residual: stride == 1 && cin == out,
        })
    }

    fn out(&self) -> usize {
        self.project.weight.dims()[0]
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.expand {
            Some(c) => swish(&c.forward(x)?)?,
            None => x.clone(),
        };
        y = swish(&self.depthwise.forward(&y)?)?;
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        y = self.project.forward(&y)?;
        Ok(match self.residual {
            true => (y + x)?,
            false => y,
        })
    }
}

/// `tf_efficientnet_b5_ap` without its pooling and classifier.
pub(super) struct EfficientNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: Conv2d,
    /// Each stage's output width, and the head's.
    pub(super) widths: Vec<usize>,
    pub(super) head_width: usize,
}

impl EfficientNet {
    pub(super) fn load(s: &State) -> Result<Self> {
        let p = PREFIX;
        let stem_w = s.any(&format!("{p}.conv_stem.weight"))?;
        let (mut width, cin, k, _) = stem_w.dims4()?;
        let stem = ConvBn::load(
            s,
            &format!("{p}.conv_stem"),
            &format!("{p}.bn1"),
            [width, cin, k, k],
            2,
        )?;
        let has = |key: String| s.tensors.contains_key(&key);
        let mut stages = Vec::new();
        let mut widths = Vec::new();
        while has(format!("{p}.blocks.{}.0.conv_dw.weight", stages.len())) {
            let i = stages.len();
            let Some(&stride) = STAGE_STRIDES.get(i) else {
                return Err(s.bad(format!(
                    "more than {} EfficientNet stages",
                    STAGE_STRIDES.len()
                )));
            };
            let mut blocks: Vec<Block> = Vec::new();
            while has(format!("{p}.blocks.{i}.{}.conv_dw.weight", blocks.len())) {
                let key = format!("{p}.blocks.{i}.{}", blocks.len());
                let stride = if blocks.is_empty() { stride } else { 1 };
                let block = Block::load(s, &key, width, stride)?;
                width = block.out();
                blocks.push(block);
            }
            widths.push(width);
            stages.push(blocks);
        }
        if stages.len() != STAGE_STRIDES.len() {
            return Err(s.bad(format!(
                "{} EfficientNet stages, tf_efficientnet_b5_ap has {}",
                stages.len(),
                STAGE_STRIDES.len()
            )));
        }
        let head_width = s.any(&format!("{p}.conv_head.weight"))?.dim(0)?;
        let head = s.conv(
            &format!("{p}.conv_head"),
            [head_width, width, 1, 1],
            1,
            false,
        )?;
        Ok(Self {
            stem,
            stages,
            head,
            widths,
            head_width,
        })
    }

    /// The stages' outputs of a `[1, 3, H, W]` input, then `conv_head`'s (before its BN: the
    /// decoder takes `features[11]`).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = swish(&self.stem.forward(x)?)?;
        let mut outs = Vec::with_capacity(self.stages.len() + 1);
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            outs.push(x.clone());
        }
        outs.push(self.head.forward(&x)?);
        Ok(outs)
    }
}
