//! RetinaFace ResNet-50 (`detection_Resnet50_Final.pth`) as facexlib 0.3.0 builds and runs it
//! (`facexlib/detection/retinaface.py`, `retinaface_net.py`): the network alone, from the
//! mean-subtracted BGR picture to each anchor's box and landmark regressions and face score;
//! [`super::detect`] decodes them.
//!
//! - The body: torchvision's `resnet50()` through `IntermediateLayerGetter` up to `layer4`
//!   (the 7x7 stride-2 stem, BatchNorm, ReLU, a 3x3 stride-2 max pool, four stages of
//!   bottlenecks with the stride on the 3x3), the outputs of `layer2`, `layer3`, `layer4` kept.
//! - The `FPN`: a 1x1 conv (no bias), BatchNorm and activation per level; the coarser level
//!   upsampled (nearest, torch's index rule) to the finer one's size and added, then a 3x3
//!   `merge` conv, BatchNorm and activation (level 3 to 2, then 2 to 1).
//! - An `SSH` per level: a 3x3 conv to half the width, a 3x3 conv to a quarter (activated)
//!   followed by one more (the "5x5") and by two more (the "7x7"), each with its BatchNorm;
//!   the three concatenated, ReLU.
//! - Per level, 1x1 heads (with bias): `BboxHead` (4 per anchor), `ClassHead` (2: background,
//!   face; softmaxed), `LandmarkHead` (10), each laid out per position then anchor.
//!
//! facexlib's activation in the FPN and SSH is `LeakyReLU(0.1)` when `out_channel <= 64` and
//! a plain ReLU (slope 0) otherwise (the real file's 256). Every BatchNorm runs in eval mode
//! (eps 1e-5) and is folded into the conv before it. Widths and block counts are read from the
//! weights (the file's `module.` prefix is dropped as facexlib drops it).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Module, Tensor};

use crate::kernels::Conv2d;
use crate::upscaler::state::checked_tensor;
use crate::{PipelineError, Result};

/// `nn.BatchNorm2d`'s default eps.
const BN_EPS: f64 = 1e-5;
/// The FPN levels facexlib builds (`fpn_num=3`), each with its SSH and heads.
pub const LEVELS: usize = 3;
/// facexlib's `leaky` where `out_channel <= 64`.
const NARROW_LEAKY: f32 = 0.1;

struct Weights<'a> {
    path: &'a Path,
    state: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    fn bad(&self, message: impl std::fmt::Display) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    fn get(&self, key: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        Ok(checked_tensor(self.path, self.state, key, shape)?.to_device(self.device)?)
    }

    /// The conv `conv` (`[out, cin, k, k]`, `out` and `k` read from the file) with the
    /// eval-mode BatchNorm `bn` folded in, padding `k / 2`.
    fn conv_bn(&self, conv: &str, bn: &str, cin: usize, stride: usize) -> Result<Conv2d> {
        let w = self.get(&format!("{conv}.weight"), None)?;
        let (out, i, k, k2) = w
            .dims4()
            .map_err(|_| self.bad(format!("{conv}.weight is not a conv's [O, I, k, k]")))?;
        if i != cin || k != k2 {
            return Err(self.bad(format!(
                "{conv}.weight {:?} does not take {cin} channels",
                w.dims()
            )));
        }
        let v = |n: &str| self.get(&format!("{bn}.{n}"), Some(&[out]));
        let scale = v("weight")?.div(&(v("running_var")? + BN_EPS)?.sqrt()?)?;
        let shift = v("bias")?.sub(&v("running_mean")?.mul(&scale)?)?;
        let w = w.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
        Ok(Conv2d::new(w, Some(shift), stride, k / 2))
    }

    /// A 1x1 head `{name}` with its bias, `[out, cin, 1, 1]`.
    fn head(&self, name: &str, cin: usize) -> Result<Conv2d> {
        let w = self.get(&format!("{name}.weight"), None)?;
        let out = w.dim(0)?;
        let w = self.get(&format!("{name}.weight"), Some(&[out, cin, 1, 1]))?;
        let b = self.get(&format!("{name}.bias"), Some(&[out]))?;
        Ok(Conv2d::new(w, Some(b), 1, 0))
    }
}

fn cout(conv: &Conv2d) -> usize {
    conv.weight().dims()[0]
}

/// `x > 0 ? x : x * slope` (ReLU at slope 0).
fn activate(x: &Tensor, slope: f32) -> Result<Tensor> {
    if slope == 0.0 {
        return Ok(x.relu()?);
    }
    match crate::kernels::act::leaky_relu(x, slope)? {
        Some(y) => Ok(y),
        None => Ok(x.maximum(&(x * f64::from(slope))?)?),
    }
}

/// torchvision's `Bottleneck` (stride on the 3x3), BatchNorms folded.
struct Bottleneck {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    downsample: Option<Conv2d>,
}

impl Bottleneck {
    fn load(w: &Weights, key: &str, cin: usize, stride: usize) -> Result<Self> {
        let k = |n: &str| format!("{key}.{n}");
        let conv1 = w.conv_bn(&k("conv1"), &k("bn1"), cin, 1)?;
        let conv2 = w.conv_bn(&k("conv2"), &k("bn2"), cout(&conv1), stride)?;
        let conv3 = w.conv_bn(&k("conv3"), &k("bn3"), cout(&conv2), 1)?;
        let downsample = match w.has(&k("downsample.0.weight")) {
            true => Some(w.conv_bn(&k("downsample.0"), &k("downsample.1"), cin, stride)?),
            false => None,
        };
        if downsample.is_none() && (stride != 1 || cin != cout(&conv3)) {
            return Err(w.bad(format!("{key} needs a downsample shortcut")));
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

/// facexlib's `SSH`.
struct Ssh {
    conv3x3: Conv2d,
    conv5x5_1: Conv2d,
    conv5x5_2: Conv2d,
    conv7x7_2: Conv2d,
    conv7x7_3: Conv2d,
    slope: f32,
}

impl Ssh {
    fn load(w: &Weights, key: &str, cin: usize, slope: f32) -> Result<Self> {
        let c = |n: &str, cin: usize| {
            w.conv_bn(&format!("{key}.{n}.0"), &format!("{key}.{n}.1"), cin, 1)
        };
        let conv5x5_1 = c("conv5X5_1", cin)?;
        let quarter = cout(&conv5x5_1);
        let conv7x7_2 = c("conv7X7_2", quarter)?;
        Ok(Self {
            conv3x3: c("conv3X3", cin)?,
            conv5x5_2: c("conv5X5_2", quarter)?,
            conv7x7_3: c("conv7x7_3", cout(&conv7x7_2))?,
            conv5x5_1,
            conv7x7_2,
            slope,
        })
    }

    fn width(&self) -> usize {
        cout(&self.conv3x3) + cout(&self.conv5x5_2) + cout(&self.conv7x7_3)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.conv3x3.forward(x)?;
        let b1 = activate(&self.conv5x5_1.forward(x)?, self.slope)?;
        let b = self.conv5x5_2.forward(&b1)?;
        let c = activate(&self.conv7x7_2.forward(&b1)?, self.slope)?;
        let c = self.conv7x7_3.forward(&c)?;
        Ok(Tensor::cat(&[&a, &b, &c], 1)?.relu()?)
    }
}

/// `F.interpolate(x, size=(h, w), mode='nearest')`: source index `floor(i * (in / out))`,
/// the scale and product in f32 as torch computes them, clamped to the last.
pub fn nearest_indices(input: usize, output: usize) -> Vec<u32> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
        .collect()
}

fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let rows = Tensor::new(nearest_indices(ih, h).as_slice(), x.device())?;
    let cols = Tensor::new(nearest_indices(iw, w).as_slice(), x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Each anchor's raw outputs, flattened over the levels in facexlib's order (level, row,
/// column, anchor): `loc` 4 per anchor, `conf` the softmaxed [background, face], `landm` 10.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub loc: Vec<f32>,
    pub conf: Vec<f32>,
    pub landm: Vec<f32>,
    /// Each level's feature map `(height, width)` and anchors per position.
    pub maps: Vec<(usize, usize, usize)>,
}

/// A loaded RetinaFace (f32, on the device it was loaded to).
pub struct RetinaNet {
    stem: Conv2d,
    stages: Vec<Vec<Bottleneck>>,
    /// `output1..3` (1x1) and `merge1`, `merge2` (3x3) of the FPN.
    fpn_out: Vec<Conv2d>,
    fpn_merge: [Conv2d; 2],
    ssh: Vec<Ssh>,
    /// Per level: box, class and landmark heads.
    heads: Vec<[Conv2d; 3]>,
    /// facexlib's FPN/SSH activation slope (0 above 64 channels).
    pub slope: f32,
    /// The FPN's width (`cfg['out_channel']`: 256 in the real file).
    pub out_channel: usize,
    /// Each stage's block count (3, 4, 6, 3 for ResNet-50).
    pub blocks: Vec<usize>,
}

impl std::fmt::Debug for RetinaNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetinaNet")
            .field("out_channel", &self.out_channel)
            .field("blocks", &self.blocks)
            .field("slope", &self.slope)
            .finish()
    }
}

impl RetinaNet {
    /// The network of a `.pth` (facexlib's plain state dict, `module.` prefixes dropped) or
    /// `.safetensors` file, in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let w = Weights {
            path,
            state: &state,
            device,
        };
        if !w.has("body.conv1.weight") || !w.has("ClassHead.0.conv1x1.weight") {
            return Err(w.bad("not a RetinaFace ResNet: body.conv1 or ClassHead.0 is missing"));
        }
        let stem = w.conv_bn("body.conv1", "body.bn1", 3, 2)?;
        let mut cin = cout(&stem);
        let mut stages = Vec::new();
        for stage in 1..=4 {
            let n = crate::upscaler::state::seq_len(&state, &format!("body.layer{stage}"));
            if n == 0 {
                return Err(w.bad(format!("body.layer{stage} is missing")));
            }
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let stride = if stage > 1 && b == 0 { 2 } else { 1 };
                let block = Bottleneck::load(&w, &format!("body.layer{stage}.{b}"), cin, stride)?;
                cin = cout(&block.conv3);
                blocks.push(block);
            }
            stages.push(blocks);
        }
        let widths: Vec<usize> = stages[1..]
            .iter()
            .map(|s| cout(&s[s.len() - 1].conv3))
            .collect();
        let out_channel = w.get("fpn.output1.0.weight", None)?.dim(0)?;
        let slope = if out_channel <= 64 { NARROW_LEAKY } else { 0.0 };
        let fpn_out = (0..LEVELS)
            .map(|i| {
                let key = format!("fpn.output{}", i + 1);
                w.conv_bn(&format!("{key}.0"), &format!("{key}.1"), widths[i], 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let merge = |n: usize| {
            w.conv_bn(
                &format!("fpn.merge{n}.0"),
                &format!("fpn.merge{n}.1"),
                out_channel,
                1,
            )
        };
        let fpn_merge = [merge(1)?, merge(2)?];
        let ssh = (0..LEVELS)
            .map(|i| Ssh::load(&w, &format!("ssh{}", i + 1), out_channel, slope))
            .collect::<Result<Vec<_>>>()?;
        let heads = (0..LEVELS)
            .map(|i| {
                let c = ssh[i].width();
                Ok([
                    w.head(&format!("BboxHead.{i}.conv1x1"), c)?,
                    w.head(&format!("ClassHead.{i}.conv1x1"), c)?,
                    w.head(&format!("LandmarkHead.{i}.conv1x1"), c)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, [b, c, l]) in heads.iter().enumerate() {
            let anchors = cout(c) / 2;
            if cout(c) != anchors * 2 || cout(b) != anchors * 4 || cout(l) != anchors * 10 {
                return Err(w.bad(format!(
                    "level {i}'s heads give {}, {} and {} outputs, not 4, 2 and 10 per anchor",
                    cout(b),
                    cout(c),
                    cout(l)
                )));
            }
        }
        Ok(Self {
            blocks: stages.iter().map(Vec::len).collect(),
            stem,
            stages,
            fpn_out,
            fpn_merge,
            ssh,
            heads,
            slope,
            out_channel,
        })
    }

    pub fn device(&self) -> &Device {
        self.stem.weight().device()
    }

    /// The raw outputs of `x`, `[1, 3, H, W]` (BGR less facexlib's mean).
    pub fn forward(&self, x: &Tensor) -> Result<Outputs> {
        let x = self.stem.forward(x)?.relu()?;
        // The 3x3 stride-2 max pool, padding 1: after the ReLU every value is >= 0, so a zero
        // pad never wins over torch's -inf one.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut kept = Vec::with_capacity(LEVELS);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x)?;
            }
            if i > 0 {
                kept.push(x.clone());
            }
        }
        let out: Vec<Tensor> = self
            .fpn_out
            .iter()
            .zip(&kept)
            .map(|(c, x)| activate(&c.forward(x)?, self.slope))
            .collect::<Result<_>>()?;
        let (_, _, h2, w2) = out[1].dims4()?;
        let o2 = (&out[1] + upsample_nearest(&out[2], h2, w2)?)?;
        let o2 = activate(&self.fpn_merge[1].forward(&o2)?, self.slope)?;
        let (_, _, h1, w1) = out[0].dims4()?;
        let o1 = (&out[0] + upsample_nearest(&o2, h1, w1)?)?;
        let o1 = activate(&self.fpn_merge[0].forward(&o1)?, self.slope)?;
        let fpn = [o1, o2, out[2].clone()];

        let mut outputs = Outputs {
            loc: Vec::new(),
            conf: Vec::new(),
            landm: Vec::new(),
            maps: Vec::new(),
        };
        for ((feature, ssh), heads) in fpn.iter().zip(&self.ssh).zip(&self.heads) {
            let f = ssh.forward(feature)?;
            let (_, _, h, w) = f.dims4()?;
            // [1, A * n, H, W] -> per position, per anchor, n values.
            let flat = |head: &Conv2d| -> Result<Vec<f32>> {
                Ok(head
                    .forward(&f)?
                    .permute((0, 2, 3, 1))?
                    .flatten_all()?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f32>()?)
            };
            outputs.loc.extend(flat(&heads[0])?);
            let logits = flat(&heads[1])?;
            outputs
                .conf
                .extend(logits.chunks_exact(2).flat_map(softmax2));
            outputs.landm.extend(flat(&heads[2])?);
            outputs.maps.push((h, w, cout(&heads[1]) / 2));
        }
        Ok(outputs)
    }
}

/// `F.softmax` over two logits in f32 as torch computes it: each less their max, exp'd, times
/// the reciprocal of the sum.
fn softmax2(l: &[f32]) -> [f32; 2] {
    let m = l[0].max(l[1]);
    let (a, b) = ((l[0] - m).exp(), (l[1] - m).exp());
    let inv = 1.0 / (a + b);
    [a * inv, b * inv]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_indices_follow_torch() {
        // Doubling repeats each source; 25 -> 49 (a 775-pixel side's layer4 to layer3) takes
        // floor(i * 25/49): the last source index is reached once only.
        assert_eq!(nearest_indices(2, 4), vec![0, 0, 1, 1]);
        let idx = nearest_indices(25, 49);
        assert_eq!(idx.len(), 49);
        assert_eq!(idx[48], 24);
        assert_eq!(idx.iter().filter(|&&i| i == 24).count(), 1);
        assert_eq!(idx[2], 1);
    }

    #[test]
    fn softmax_of_two_sums_to_one() {
        let [a, b] = softmax2(&[1.0, 4.0]);
        assert!((a + b - 1.0).abs() < 1e-7);
        assert!((b - 1.0 / (1.0 + (-3f32).exp())).abs() < 1e-7);
    }
}
