//! The extension's M-LSD module (`annotator/mlsd/`, the legacy `mlsd` of
//! `scripts/preprocessor/legacy/processor.py`):
//! - [`MlsdNetwork`]: `MobileV2_MLSD_Large`. A MobileNetV2 backbone cut after its 96-wide
//!   stage: a 3x3 stride-2 conv from 4 channels, then 13 inverted residuals (a 1x1 expansion
//!   unless the first, a 3x3 depthwise conv, a linear 1x1; ReLU6 after the first two; the
//!   input added where the stride is 1 and the width kept), a stride-2 conv padded on the
//!   right and bottom only (TFLite's padding). Features 1, 3, 6, 10, 13 (at 1/2, 1/4, 1/8,
//!   1/16, 1/16) feed the decoder: four `BlockTypeA` (a 1x1 conv, BN and ReLU on each input,
//!   the deeper one upsampled 2x bilinearly with corners aligned except in the first, the two
//!   concatenated) each followed by a `BlockTypeB` (a 3x3 conv with the input added, a 3x3
//!   conv, each with BN and ReLU), then `BlockTypeC` (a 3x3 conv dilated 5, a 3x3 conv, a
//!   1x1 conv to 16 channels) of which channels 7.. are the output at half the image's size:
//!   the centre logits, then the displacements to the segment's start and end (x, y). The
//!   widths are read from the weights' shapes; each BatchNorm is folded into its conv.
//! - [`mlsd_lines`] (`pred_lines` at the image's own size): the padded image and a channel of
//!   ones, each `v / 127.5 - 1`, through the network; the centres the sigmoid's 3x3 max keeps,
//!   the 200 highest; a centre with a score above the value threshold and a segment longer
//!   than the distance threshold (at half size) gives its segment, doubled.
//! - [`mlsd_map`] (`apply_mlsd`): each segment's ends truncated to integers and drawn with
//!   `cv2.line` (width 1) in white on black.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::line::draw_line;
use super::networks::{lllyasviel, AnnotatorFile};
use crate::kernels::conv::wide::dilated_conv2d;
use crate::kernels::{depthwise_conv2d, Conv2d};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file the extension loads the network from (`annotator/downloads/mlsd/`).
pub const MLSD_FILE: &str = "mlsd_large_512_fp32.pth";

/// [`MlsdNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static MLSD: AnnotatorFile = AnnotatorFile {
    name: MLSD_FILE,
    subfolder: "mlsd",
    hub: lllyasviel(MLSD_FILE),
    load: |path| Ok(Arc::new(MlsdNetwork::load(path, &Device::Cpu)?)),
};

/// The strides of backbone features 1..=13 (MobileNetV2's `inverted_residual_setting`, its
/// last two stages dropped: n = 1, 2, 3, 4, 3; s = 1, 2, 2, 2, 1 on each stage's first).
const STRIDES: [usize; 13] = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1];

/// The backbone features the decoder takes (`fpn_selected`).
const FPN: [usize; 5] = [1, 3, 6, 10, 13];

/// `pred_lines`' `deccode_output_score_and_ptss(outputs, 200, 3)`: centres kept, max-pool size.
const TOP_K: usize = 200;
const POOL: usize = 3;

/// `nn.BatchNorm2d`'s default epsilon (the file keeps none).
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    None,
    Relu,
    Relu6,
}

/// A conv with its BatchNorm folded in (or a plain conv with a bias).
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
    act: Act,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride == 2 {
            // `F.pad(x, (0, 1, 0, 1))`: TFLite's padding, on the right and bottom.
            x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?
        } else {
            x.clone()
        };
        // candle's grouped conv runs one conv per channel and its conv2d copies the whole
        // im2col: the depthwise ones take our per-channel kernel, the plain ones our tiled
        // im2col/Winograd, the dilated one a GEMM per tap (kernels::conv::wide).
        let y = if self.groups > 1 {
            depthwise_conv2d(
                &x,
                &self.weight,
                Some(&self.bias),
                self.stride,
                self.padding,
                self.dilation,
            )?
        } else if self.dilation == 1 {
            Conv2d::new(
                self.weight.clone(),
                Some(self.bias.clone()),
                self.stride,
                self.padding,
            )
            .forward(&x)?
        } else if self.stride == 1 {
            dilated_conv2d(
                &x,
                &self.weight,
                Some(&self.bias),
                self.padding,
                self.dilation,
            )?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, self.dilation, 1)?
                .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?
        };
        Ok(match self.act {
            Act::None => y,
            Act::Relu => y.relu()?,
            Act::Relu6 => y.clamp(0f32, 6f32)?,
        })
    }
}

/// `InvertedResidual`.
struct Inverted {
    layers: Vec<Conv>,
    residual: bool,
}

/// `BlockTypeA`: `conv1` on the deeper input, `conv2` on the shallower; `upscale`.
struct BlockA {
    deep: Conv,
    shallow: Conv,
    upscale: bool,
}

/// `BlockTypeB`.
struct BlockB {
    conv1: Conv,
    conv2: Conv,
}

/// `MobileV2_MLSD_Large` with its weights, on one device in f32.
pub struct MlsdNetwork {
    first: Conv,
    features: Vec<Inverted>,
    decoder: Vec<(BlockA, BlockB)>,
    /// `BlockTypeC`'s three convs.
    head: [Conv; 3],
}

impl std::fmt::Debug for MlsdNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsdNetwork")
            .field("widths", &self.widths())
            .finish()
    }
}

/// Reads convs (and their BatchNorms) out of a state dict.
struct Reader<'a> {
    state: &'a HashMap<String, Tensor>,
    path: &'a Path,
    device: &'a Device,
}

impl Reader<'_> {
    fn bad(&self, message: String) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.state
            .get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing (not an M-LSD large network)")))
    }

    fn has(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    /// The conv `{conv}.weight` (and `{conv}.bias` where `bias`), then the BatchNorm `bn`
    /// folded in where given. The kernel's size sets the padding (`(k - 1) / 2`, or none at
    /// stride 2), a one-channel input per output makes it depthwise.
    fn conv(
        &self,
        conv: &str,
        bias: bool,
        bn: Option<&str>,
        stride: usize,
        dilation: usize,
        act: Act,
    ) -> Result<Conv> {
        let w = self.get(&format!("{conv}.weight"))?.to_dtype(DType::F32)?;
        let (o, i, k, k2) = w
            .dims4()
            .map_err(|_| self.bad(format!("{conv}.weight is not a conv's [O, I, k, k]")))?;
        if k != k2 {
            return Err(self.bad(format!("{conv}.weight is not square: {:?}", w.dims())));
        }
        let vec = |key: String| -> Result<Vec<f32>> {
            let t = self.get(&key)?;
            if t.dims() != [o] {
                return Err(self.bad(format!("{key} has shape {:?}, needs [{o}]", t.dims())));
            }
            Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let mut b = if bias {
            vec(format!("{conv}.bias"))?
        } else {
            vec![0.0; o]
        };
        let mut w = w.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bn) = bn {
            let gamma = vec(format!("{bn}.weight"))?;
            let beta = vec(format!("{bn}.bias"))?;
            let mean = vec(format!("{bn}.running_mean"))?;
            let var = vec(format!("{bn}.running_var"))?;
            let per = w.len() / o;
            for c in 0..o {
                let s = f64::from(gamma[c]) / (f64::from(var[c]) + BN_EPS).sqrt();
                for v in &mut w[c * per..(c + 1) * per] {
                    *v = (f64::from(*v) * s) as f32;
                }
                b[c] = ((f64::from(b[c]) - f64::from(mean[c])) * s + f64::from(beta[c])) as f32;
            }
        }
        let groups = if i == 1 && o > 1 { o } else { 1 };
        let padding = if stride == 2 {
            0
        } else {
            dilation * (k - 1) / 2
        };
        Ok(Conv {
            weight: Tensor::from_vec(w, (o, i, k, k), self.device)?,
            bias: Tensor::from_vec(b, o, self.device)?,
            stride,
            padding,
            dilation,
            groups,
            act,
        })
    }

    /// A `Sequential(Conv2d, BatchNorm2d, ReLU)` of the decoder at `prefix`.
    fn conv_bn_relu(&self, prefix: &str, dilation: usize) -> Result<Conv> {
        let bn = format!("{prefix}.1");
        self.conv(
            &format!("{prefix}.0"),
            true,
            Some(&bn),
            1,
            dilation,
            Act::Relu,
        )
    }
}

impl MlsdNetwork {
    /// The network of an `mlsd_large_512_fp32.pth` (a torch pickle of the state dict, read
    /// without running it) or a `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let r = Reader {
            state: &state,
            path,
            device,
        };
        let relu6 = |conv: String, bn: String, stride: usize| {
            r.conv(&conv, false, Some(&bn), stride, 1, Act::Relu6)
        };
        let first = relu6(
            "backbone.features.0.0".into(),
            "backbone.features.0.1".into(),
            2,
        )?;
        let mut features = Vec::with_capacity(STRIDES.len());
        let mut width = first.weight.dims()[0];
        for (n, &stride) in STRIDES.iter().enumerate() {
            let p = format!("backbone.features.{}.conv", n + 1);
            // With an expansion (`expand_ratio != 1`) the sequence is one layer longer.
            let expand = r.has(&format!("{p}.3.weight"));
            let mut layers = Vec::with_capacity(3);
            let mut at = 0;
            if expand {
                layers.push(relu6(format!("{p}.0.0"), format!("{p}.0.1"), 1)?);
                at = 1;
            }
            layers.push(relu6(format!("{p}.{at}.0"), format!("{p}.{at}.1"), stride)?);
            let bn = format!("{p}.{}", at + 2);
            layers.push(r.conv(
                &format!("{p}.{}", at + 1),
                false,
                Some(&bn),
                1,
                1,
                Act::None,
            )?);
            let out = layers.last().expect("the linear 1x1").weight.dims()[0];
            features.push(Inverted {
                layers,
                residual: stride == 1 && out == width,
            });
            width = out;
        }
        let mut decoder = Vec::with_capacity(4);
        for (n, upscale) in [(15, false), (17, true), (19, true), (21, true)] {
            let a = BlockA {
                deep: r.conv_bn_relu(&format!("block{n}.conv1"), 1)?,
                shallow: r.conv_bn_relu(&format!("block{n}.conv2"), 1)?,
                upscale,
            };
            let b = BlockB {
                conv1: r.conv_bn_relu(&format!("block{}.conv1", n + 1), 1)?,
                conv2: r.conv_bn_relu(&format!("block{}.conv2", n + 1), 1)?,
            };
            decoder.push((a, b));
        }
        let head = [
            r.conv_bn_relu("block23.conv1", 5)?,
            r.conv_bn_relu("block23.conv2", 1)?,
            r.conv("block23.conv3", true, None, 1, 1, Act::None)?,
        ];
        if head[2].weight.dims()[0] < 12 {
            return Err(r.bad("block23.conv3 gives fewer than 12 channels".into()));
        }
        Ok(Self {
            first,
            features,
            decoder,
            head,
        })
    }

    /// The first conv's, the last feature's and the decoder's widths (32, 96, 64 for the
    /// extension's file).
    pub fn widths(&self) -> (usize, usize, usize) {
        let last = self.features.last().and_then(|f| f.layers.last());
        (
            self.first.weight.dims()[0],
            last.map_or(0, |c| c.weight.dims()[0]),
            self.head[0].weight.dims()[0],
        )
    }

    /// The network's output for `image` (its sides multiples of 16, as a padded image's are):
    /// `[9, h / 2, w / 2]` values (the centre logits, then x, y of the start and the end),
    /// with `(w / 2, h / 2)`.
    pub fn output(&self, image: &RgbImage) -> Result<(usize, usize, Vec<f32>)> {
        let (w, h) = (image.width as usize, image.height as usize);
        let device = self.first.weight.device();
        // The image and a channel of ones, each `v / 127.5 - 1` in f32.
        let scale = |v: f32| v / 127.5 - 1.0;
        let mut input = vec![0f32; 4 * w * h];
        for (i, p) in image.pixels.chunks(3).enumerate() {
            for c in 0..3 {
                input[c * w * h + i] = scale(f32::from(p[c]));
            }
            input[3 * w * h + i] = scale(1.0);
        }
        let mut x = self
            .first
            .forward(&Tensor::from_vec(input, (1, 4, h, w), device)?)?;
        let mut fpn = Vec::with_capacity(FPN.len());
        for (n, f) in self.features.iter().enumerate() {
            let mut y = x.clone();
            for layer in &f.layers {
                y = layer.forward(&y)?;
            }
            x = if f.residual { (y + x)? } else { y };
            if FPN.contains(&(n + 1)) {
                fpn.push(x.clone());
            }
        }
        // block15 takes c4 and c5, each next BlockTypeA the shallower feature and the output.
        let mut x = fpn[4].clone();
        for ((a, b), shallow) in self
            .decoder
            .iter()
            .zip([&fpn[3], &fpn[2], &fpn[1], &fpn[0]])
        {
            let mut deep = a.deep.forward(&x)?;
            if a.upscale {
                deep = upsample2_aligned(&deep)?;
            }
            let y = Tensor::cat(&[&a.shallow.forward(shallow)?, &deep], 1)?;
            let y = (b.conv1.forward(&y)? + y)?;
            x = b.conv2.forward(&y)?;
        }
        for conv in &self.head {
            x = conv.forward(&x)?;
        }
        let out = x.narrow(1, 7, 9)?;
        let (_, _, oh, ow) = out.dims4()?;
        Ok((ow, oh, out.flatten_all()?.to_vec1::<f32>()?))
    }
}

/// `F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)` as torch computes
/// it on the CPU: source `i * (n - 1) / (2n - 1)` in f32, along the width then the height.
fn upsample2_aligned(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let device = x.device();
    let taps = |n: usize| -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let out = 2 * n;
        let scale = if out > 1 {
            (n - 1) as f32 / (out - 1) as f32
        } else {
            0.0
        };
        let (mut i0, mut i1, mut l0, mut l1) = (vec![], vec![], vec![], vec![]);
        for i in 0..out {
            let real = scale * i as f32;
            let lo = (real.floor() as usize).min(n - 1);
            let l = (real - lo as f32).clamp(0.0, 1.0);
            i0.push(lo as u32);
            i1.push((lo + usize::from(lo < n - 1)) as u32);
            l0.push(1.0 - l);
            l1.push(l);
        }
        Ok((
            Tensor::from_vec(i0, out, device)?,
            Tensor::from_vec(i1, out, device)?,
            Tensor::from_vec(l0, out, device)?,
            Tensor::from_vec(l1, out, device)?,
        ))
    };
    let (w0, w1, wl0, wl1) = taps(w)?;
    let (h0, h1, hl0, hl1) = taps(h)?;
    let xw = (x
        .index_select(&w0, 3)?
        .broadcast_mul(&wl0.reshape((1, 1, 1, ()))?)?
        + x.index_select(&w1, 3)?
            .broadcast_mul(&wl1.reshape((1, 1, 1, ()))?)?)?;
    Ok((xw
        .index_select(&h0, 2)?
        .broadcast_mul(&hl0.reshape((1, 1, (), 1))?)?
        + xw.index_select(&h1, 2)?
            .broadcast_mul(&hl1.reshape((1, 1, (), 1))?)?)?)
}

/// `pred_lines(image, model, image's size, value_threshold, distance_threshold)` from the
/// network's output (`[9, oh, ow]`, as [`MlsdNetwork::output`] gives it): the segments
/// `[x0, y0, x1, y1]` at the image's scale, highest centre first.
pub fn decode_lines(
    output: &[f32],
    ow: usize,
    oh: usize,
    value_threshold: f64,
    distance_threshold: f64,
) -> Vec<[f64; 4]> {
    let n = ow * oh;
    let heat: Vec<f32> = output[..n]
        .iter()
        .map(|&v| 1.0 / (1.0 + (-v).exp()))
        .collect();
    // `max_pool2d(heat, 3, stride=1, padding=1) == heat`: a centre is its window's largest.
    let r = (POOL / 2) as isize;
    let mut peaks: Vec<(f32, usize)> = Vec::new();
    for y in 0..oh as isize {
        for x in 0..ow as isize {
            let v = heat[y as usize * ow + x as usize];
            let mut max = v;
            for yy in (y - r).max(0)..=(y + r).min(oh as isize - 1) {
                for xx in (x - r).max(0)..=(x + r).min(ow as isize - 1) {
                    max = max.max(heat[yy as usize * ow + xx as usize]);
                }
            }
            if max == v {
                peaks.push((v, y as usize * ow + x as usize));
            }
        }
    }
    // `topk(200)` of the kept map (those not kept are 0 there, below any threshold).
    peaks.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    peaks.truncate(TOP_K);
    let d = |c: usize, i: usize| output[(1 + c) * n + i];
    peaks
        .into_iter()
        .filter_map(|(score, i)| {
            let (dx0, dy0, dx1, dy1) = (d(0, i), d(1, i), d(2, i), d(3, i));
            // numpy's f32 `sqrt(sum((start - end) ** 2))`.
            let (ex, ey) = (dx0 - dx1, dy0 - dy1);
            let distance = (ex * ex + ey * ey).sqrt();
            if f64::from(score) > value_threshold && f64::from(distance) > distance_threshold {
                let (x, y) = ((i % ow) as f64, (i / ow) as f64);
                // Found at half size: `2 * segment` (the ratio to the image's size is 1).
                Some([dx0, dy0, dx1, dy1].map(f64::from)).map(|[a, b, c, e]| {
                    [2.0 * (x + a), 2.0 * (y + b), 2.0 * (x + c), 2.0 * (y + e)]
                })
            } else {
                None
            }
        })
        .collect()
}

/// `pred_lines` on the padded image: its segments.
pub fn mlsd_lines(
    net: &MlsdNetwork,
    padded: &RgbImage,
    value_threshold: f64,
    distance_threshold: f64,
) -> Result<Vec<[f64; 4]>> {
    let (ow, oh, output) = net.output(padded)?;
    Ok(decode_lines(
        &output,
        ow,
        oh,
        value_threshold,
        distance_threshold,
    ))
}

/// `apply_mlsd(padded, value_threshold, distance_threshold)`: the segments drawn white on
/// black, one pixel wide, the padded image's size.
pub fn mlsd_map(
    net: &MlsdNetwork,
    padded: &RgbImage,
    value_threshold: f64,
    distance_threshold: f64,
) -> Result<Vec<u8>> {
    let lines = mlsd_lines(net, padded, value_threshold, distance_threshold)?;
    Ok(draw_segments(
        &lines,
        padded.width as usize,
        padded.height as usize,
    ))
}

/// Segments drawn as `apply_mlsd` draws them: each end `int()`-truncated, `cv2.line` in 255.
pub fn draw_segments(lines: &[[f64; 4]], w: usize, h: usize) -> Vec<u8> {
    let mut map = vec![0u8; w * h];
    for l in lines {
        let [x0, y0, x1, y1] = l.map(|v| v.trunc() as i64);
        draw_line(&mut map, w, h, (x0, y0), (x1, y1), 255);
    }
    map
}
