//! LeReS's encoder, `leres/Resnext_torch.py`'s `ResNet(Bottleneck, [3, 4, 23, 3], groups=32,
//! width_per_group=8)` (torchvision's ResNeXt-101 32x8d without its pooling and classifier):
//! the 7x7 stride-2 stem with its BatchNorm and ReLU, a 3x3 stride-2 max pool, four stages of
//! bottlenecks (1x1, grouped 3x3 carrying the stage's stride, 1x1 to four times the planes,
//! each with a BatchNorm; the first block's shortcut a strided 1x1 and a BatchNorm), each
//! stage's output kept. The extension never puts the network in eval mode, so every
//! BatchNorm normalises by the image's own statistics (training mode; its running ones are
//! not read). Widths, groups and block counts are read from the file.

use candle_core::{Module, Tensor};

use super::super::depth_anything::State;
use super::super::lineart::batch_norm_of_batch;
use crate::kernels::Conv2d;
use crate::Result;

/// A conv (grouped or not), then its BatchNorm where it has one.
pub(super) struct ConvBn {
    /// The conv, grouped where the weight reads fewer channels than the input has.
    conv: Conv2d,
    /// The BatchNorm's weight and bias.
    bn: Option<(Vec<f32>, Vec<f32>)>,
}

impl ConvBn {
    /// The conv `conv` (`[out, in / groups, k, k]`, bias where `bias`), then the BatchNorm
    /// `bn` where given; `groups` is the input's channels over the weight's.
    pub(super) fn load(
        s: &State,
        conv: &str,
        bn: Option<&str>,
        cin: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = s.any(&format!("{conv}.weight"))?;
        let (o, i, k, k2) = w
            .dims4()
            .map_err(|_| s.bad(format!("{conv}.weight is not a conv's [O, I, k, k]")))?;
        if k != k2 || i == 0 || !cin.is_multiple_of(i) || !o.is_multiple_of(cin / i) {
            return Err(s.bad(format!(
                "{conv}.weight {:?} does not take {cin} channels",
                w.dims()
            )));
        }
        let groups = cin / i;
        let b = match bias {
            true => Some(s.get(&format!("{conv}.bias"), &[o])?),
            false => None,
        };
        let bn = match bn {
            Some(bn) => {
                let v = |n: &str| -> Result<Vec<f32>> {
                    Ok(s.get(&format!("{bn}.{n}"), &[o])?.to_vec1::<f32>()?)
                };
                Some((v("weight")?, v("bias")?))
            }
            None => None,
        };
        let conv = Conv2d::grouped(w.contiguous()?, b, stride, k / 2, groups);
        Ok(Self { conv, bn })
    }

    pub(super) fn device(&self) -> &candle_core::Device {
        self.conv.weight().device()
    }

    pub(super) fn cout(&self) -> usize {
        self.conv.weight().dims()[0]
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        match &self.bn {
            Some((weight, bias)) => batch_norm_of_batch(&y, weight, bias),
            None => Ok(y),
        }
    }
}

/// `Bottleneck` (torchvision's: the stride on the grouped 3x3).
struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn load(s: &State, key: &str, cin: usize, stride: usize) -> Result<Self> {
        let k = |n: &str| format!("{key}.{n}");
        let conv1 = ConvBn::load(s, &k("conv1"), Some(&k("bn1")), cin, 1, false)?;
        let width = conv1.cout();
        let conv2 = ConvBn::load(s, &k("conv2"), Some(&k("bn2")), width, stride, false)?;
        let conv3 = ConvBn::load(s, &k("conv3"), Some(&k("bn3")), width, 1, false)?;
        let downsample = match s.tensors.contains_key(&k("downsample.0.weight")) {
            true => Some(ConvBn::load(
                s,
                &k("downsample.0"),
                Some(&k("downsample.1")),
                cin,
                stride,
                false,
            )?),
            false => None,
        };
        if downsample.is_none() && (stride != 1 || cin != conv3.cout()) {
            return Err(s.bad(format!("{key} needs a downsample shortcut")));
        }
        Ok(Self {
            conv1,
            conv2,
            conv3,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?.relu()?;
        let y = self.conv2.forward(&y)?.relu()?;
        let y = self.conv3.forward(&y)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        Ok((y + identity)?.relu()?)
    }
}

/// The encoder: the stem and four stages.
pub(super) struct ResNext {
    stem: ConvBn,
    stages: Vec<Vec<Bottleneck>>,
}

impl ResNext {
    /// Under `prefix` (`depth_model.encoder_modules.encoder`).
    pub(super) fn load(s: &State, prefix: &str) -> Result<Self> {
        let stem = ConvBn::load(
            s,
            &format!("{prefix}.conv1"),
            Some(&format!("{prefix}.bn1")),
            3,
            2,
            false,
        )?;
        let mut cin = stem.cout();
        let mut stages = Vec::new();
        for stage in 1..=4 {
            let blocks = (0..)
                .take_while(|b| {
                    s.tensors
                        .contains_key(&format!("{prefix}.layer{stage}.{b}.conv1.weight"))
                })
                .count();
            if blocks == 0 {
                return Err(s.bad(format!("{prefix}.layer{stage} has no blocks")));
            }
            let mut layer = Vec::with_capacity(blocks);
            for b in 0..blocks {
                let stride = if stage > 1 && b == 0 { 2 } else { 1 };
                let block =
                    Bottleneck::load(s, &format!("{prefix}.layer{stage}.{b}"), cin, stride)?;
                cin = block.conv3.cout();
                layer.push(block);
            }
            stages.push(layer);
        }
        Ok(Self { stem, stages })
    }

    /// Each stage's output channels.
    pub(super) fn widths(&self) -> Vec<usize> {
        self.stages
            .iter()
            .map(|l| l.last().map_or(0, |b| b.conv3.cout()))
            .collect()
    }

    /// The four stages' outputs (1/4 to 1/32 of the input's size).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(x)?.relu()?;
        // `MaxPool2d(3, stride=2, padding=1)` pads with -inf; after the ReLU every value is
        // at least 0, so zeros pick the same maxima.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut features = Vec::with_capacity(4);
        for layer in &self.stages {
            for block in layer {
                x = block.forward(&x)?;
            }
            features.push(x.clone());
        }
        Ok(features)
    }
}
