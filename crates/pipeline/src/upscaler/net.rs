//! RRDBNet, the ESRGAN / Real-ESRGAN network, as spandrel's `ESRGAN` architecture runs it
//! (`spandrel/architectures/ESRGAN`, the network A1111 1.8+ and ComfyUI load):
//!
//! `conv_first` -> (RRDB blocks -> trunk conv) + shortcut -> per factor 2: nearest x2,
//! conv, LeakyReLU(0.2) -> HR conv, LeakyReLU(0.2) -> `conv_last`. An RRDB is three residual
//! dense blocks (5 convs, each seeing all earlier outputs; LeakyReLU on all but the last;
//! `x5 * 0.2 + x`), then `out * 0.2 + x`. Real-ESRGAN's x2 / x1 models take their input
//! pixel-unshuffled (reflect-padded to a multiple first, the output cropped back).
//!
//! ESRGAN+ (spandrel's `plus`, old names only) adds to each dense block a bias-free 1x1 conv of
//! its input onto the second conv's output, and that sum onto the fourth's.
//!
//! Everything is read from the weights: the layout (the "old" ESRGAN names `model.0`,
//! `model.1.sub.N.RDBk.convj.0`, ... or the Real-ESRGAN / BasicSR names `conv_first`,
//! `body.N.rdbk.convj`, `conv_body`, `conv_up1`, ... and BSRGAN's `RRDB_trunk`, `trunk_conv`,
//! `upconv1`, `HRconv`), the block count, the feature and growth widths, the number of x2
//! upsamplings and the unshuffle factor (input channels 4x or 16x the output's).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// The names of one file's layers, whichever layout it uses.
enum Layout {
    /// ESRGAN's original `nn.Sequential` names.
    Old,
    /// BasicSR / Real-ESRGAN (`body`, `rdb`, `conv_body`, `conv_up`, `conv_hr`) or BSRGAN
    /// (`RRDB_trunk`, `RDB`, `trunk_conv`, `upconv`, `HRconv`).
    New {
        trunk: &'static str,
        rdb: &'static str,
        trunk_conv: &'static str,
        up: &'static str,
        hr: &'static str,
    },
}

const NEW: Layout = Layout::New {
    trunk: "body",
    rdb: "rdb",
    trunk_conv: "conv_body",
    up: "conv_up",
    hr: "conv_hr",
};
const BSRGAN: Layout = Layout::New {
    trunk: "RRDB_trunk",
    rdb: "RDB",
    trunk_conv: "trunk_conv",
    up: "upconv",
    hr: "HRconv",
};

impl Layout {
    /// spandrel's detection (`ESRGANArch`): the keys each layout must have.
    fn detect(has_key: &dyn Fn(&str) -> bool) -> Option<Self> {
        let has = |keys: &[&str]| keys.iter().all(|k| has_key(k));
        if has(&["model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"]) {
            Some(Self::Old)
        } else if has(&[
            "conv_first.weight",
            "body.0.rdb1.conv1.weight",
            "conv_body.weight",
            "conv_last.weight",
        ]) {
            Some(NEW)
        } else if has(&[
            "conv_first.weight",
            "RRDB_trunk.0.RDB1.conv1.weight",
            "trunk_conv.weight",
            "conv_last.weight",
        ]) {
            Some(BSRGAN)
        } else {
            None
        }
    }

    fn conv_first(&self) -> String {
        match self {
            Self::Old => "model.0".into(),
            Self::New { .. } => "conv_first".into(),
        }
    }

    fn rdb_conv(&self, block: usize, rdb: usize, conv: usize) -> String {
        match self {
            Self::Old => format!("model.1.sub.{block}.RDB{rdb}.conv{conv}.0"),
            Self::New { trunk, rdb: r, .. } => format!("{trunk}.{block}.{r}{rdb}.conv{conv}"),
        }
    }

    fn trunk_conv(&self, blocks: usize) -> String {
        match self {
            Self::Old => format!("model.1.sub.{blocks}"),
            Self::New { trunk_conv, .. } => trunk_conv.to_string(),
        }
    }

    /// The `i`-th (from 0) upsampling conv.
    fn up_conv(&self, i: usize) -> String {
        match self {
            Self::Old => format!("model.{}", 3 * (i + 1)),
            Self::New { up, .. } => format!("{up}{}", i + 1),
        }
    }

    fn hr_conv(&self, ups: usize) -> String {
        match self {
            Self::Old => format!("model.{}", 3 * ups + 2),
            Self::New { hr, .. } => hr.to_string(),
        }
    }

    fn conv_last(&self, ups: usize) -> String {
        match self {
            Self::Old => format!("model.{}", 3 * ups + 4),
            Self::New { .. } => "conv_last".into(),
        }
    }

    /// Blocks in the trunk: one past the highest block index of an RDB conv (spandrel's
    /// `_get_num_blocks`); each is then required whole.
    fn blocks(&self, state: &HashMap<String, Tensor>) -> usize {
        let prefix = match self {
            Self::Old => "model.1.sub.".to_string(),
            Self::New { trunk, .. } => format!("{trunk}."),
        };
        state
            .keys()
            .filter_map(|k| {
                let rest = k.strip_prefix(&prefix)?;
                let (n, tail) = rest.split_once('.')?;
                tail.to_ascii_lowercase()
                    .starts_with("rdb")
                    .then(|| n.parse::<usize>().ok())?
            })
            .max()
            .map_or(0, |n| n + 1)
    }

    /// The x2 upsamplings. Old layout: spandrel's `(seq_len - 5) // 3` of the `model.N`
    /// sequence; new: the `conv_upN` / `upconvN` layers there are.
    fn ups(&self, state: &HashMap<String, Tensor>) -> usize {
        match self {
            Self::Old => {
                let seq_len = state
                    .keys()
                    .filter_map(|k| k.strip_prefix("model.")?.split('.').next()?.parse().ok())
                    .max()
                    .map_or(0, |n: usize| n + 1);
                seq_len.saturating_sub(5) / 3
            }
            Self::New { .. } => (0..)
                .take_while(|&i| state.contains_key(&format!("{}.weight", self.up_conv(i))))
                .count(),
        }
    }
}

/// One residual dense block: five convs, and ESRGAN+'s 1x1 conv (`conv1x1`, no bias) of
/// the block's input added to the second conv's output.
struct DenseBlock {
    convs: [Conv2d; 5],
    plus: Option<Conv2d>,
}

fn leaky_relu(x: &Tensor) -> candle_core::Result<Tensor> {
    // LeakyReLU(0.2): max(x, 0.2 x) is x where x >= 0 and 0.2 x below.
    x.maximum(&(x * 0.2)?)
}

impl DenseBlock {
    /// spandrel's `ResidualDenseBlock_5C.forward`; with ESRGAN+'s shortcuts `x2 +=
    /// conv1x1(x)` and `x4 += x2`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut features = vec![x.clone()];
        for (i, conv) in self.convs[..4].iter().enumerate() {
            let mut y = leaky_relu(&conv.forward(&Tensor::cat(&features, 1)?)?)?;
            if let Some(shortcut) = &self.plus {
                match i {
                    1 => y = (y + shortcut.forward(x)?)?,
                    3 => y = (y + &features[2])?,
                    _ => {}
                }
            }
            features.push(y);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&features, 1)?)?;
        (x5 * 0.2)? + x
    }
}

/// A loaded RRDBNet.
pub struct Esrgan {
    conv_first: Conv2d,
    blocks: Vec<[DenseBlock; 3]>,
    trunk_conv: Conv2d,
    ups: Vec<Conv2d>,
    hr_conv: Conv2d,
    conv_last: Conv2d,
    /// Real-ESRGAN's pixel-unshuffle factor of the input (2 for x2, 4 for x1 models).
    unshuffle: Option<usize>,
    /// ESRGAN+: the dense blocks' extra shortcuts.
    plus: bool,
    /// The factor the image grows by (the upsamplings' 2^n over the unshuffle).
    scale: usize,
    pub features: usize,
    pub growth: usize,
}

impl std::fmt::Debug for Esrgan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Esrgan")
            .field("scale", &self.scale)
            .field("blocks", &self.blocks.len())
            .field("features", &self.features)
            .field("growth", &self.growth)
            .field("unshuffle", &self.unshuffle)
            .field("plus", &self.plus)
            .finish()
    }
}

impl Esrgan {
    /// spandrel's detection (`ESRGANArch`): one of the layouts' names are there.
    pub(super) fn detect(has: &dyn Fn(&str) -> bool) -> bool {
        Layout::detect(has).is_some()
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
        let layout = Layout::detect(&|k| state.contains_key(k))
            .ok_or_else(|| bad("not an ESRGAN (RRDBNet) upscaler".into()))?;
        // ESRGAN+ (spandrel's `plus`): conv1x1 layers among the old names. spandrel's mapping
        // of the newer names carries none over, so there they are not read.
        let plus = matches!(layout, Layout::Old) && state.keys().any(|k| k.contains(".conv1x1."));
        // The tensor `key`, of `shape`, on the device in the dtype.
        let get = |key: String, shape: &[usize]| -> Result<Tensor> {
            let t = super::state::checked_tensor(path, state, &key, Some(shape))?;
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        // A 3x3 conv `name` with `cout` outputs and `cin` inputs, and its bias.
        let conv = |name: &str, cout: usize, cin: usize| -> Result<Conv2d> {
            let weight = get(format!("{name}.weight"), &[cout, cin, 3, 3])?;
            let bias = get(format!("{name}.bias"), &[cout])?;
            Ok(Conv2d::new(weight, Some(bias), 1, 1))
        };
        // ESRGAN+'s 1x1 conv, without a bias.
        let conv1x1 = |name: &str, cout: usize, cin: usize| -> Result<Conv2d> {
            let weight = get(format!("{name}.weight"), &[cout, cin, 1, 1])?;
            Ok(Conv2d::new(weight, None, 1, 0))
        };
        let dims = |key: String| -> Result<Vec<usize>> {
            let t = state
                .get(&key)
                .ok_or_else(|| bad(format!("{key} is missing")))?;
            match t.dims() {
                d @ [_, _, 3, 3] => Ok(d.to_vec()),
                d => Err(bad(format!("{key} has shape {d:?}, not a 3x3 conv's"))),
            }
        };
        let first = dims(format!("{}.weight", layout.conv_first()))?;
        let (features, in_channels) = (first[0], first[1]);
        let growth = dims(format!("{}.weight", layout.rdb_conv(0, 1, 1)))?[0];
        let blocks = layout.blocks(state);
        let ups = layout.ups(state);
        let out_channels = dims(format!("{}.weight", layout.conv_last(ups)))?[0];
        // spandrel: pixel-unshuffled input when the input has 4 or 16 times the channels.
        let unshuffle = match in_channels / out_channels.max(1) {
            4 | 16 if in_channels % out_channels == 0 => Some(if in_channels == 4 * out_channels {
                2
            } else {
                4
            }),
            _ => None,
        };
        let colour = in_channels / unshuffle.map_or(1, |f| f * f);
        if colour != 3 || out_channels != 3 {
            return Err(bad(format!(
                "an RRDBNet of {in_channels} input and {out_channels} output channels; \
                 upscalers of RGB images take and give 3"
            )));
        }
        let grow = 1usize << ups;
        let scale = match unshuffle {
            Some(f) if grow < f => {
                return Err(bad(format!(
                    "{ups} x2 upsamplings undo less than the input's unshuffle by {f}"
                )))
            }
            Some(f) => grow / f,
            None => grow,
        };
        let (nf, gc) = (features, growth);
        let blocks = (0..blocks)
            .map(|b| -> Result<[DenseBlock; 3]> {
                let rdb = |r: usize| -> Result<DenseBlock> {
                    let c = |j: usize, cout: usize| {
                        conv(&layout.rdb_conv(b, r, j), cout, nf + (j - 1) * gc)
                    };
                    let shortcut = plus
                        .then(|| conv1x1(&format!("model.1.sub.{b}.RDB{r}.conv1x1"), gc, nf))
                        .transpose()?;
                    Ok(DenseBlock {
                        convs: [c(1, gc)?, c(2, gc)?, c(3, gc)?, c(4, gc)?, c(5, nf)?],
                        plus: shortcut,
                    })
                };
                Ok([rdb(1)?, rdb(2)?, rdb(3)?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_first: conv(&layout.conv_first(), nf, in_channels)?,
            trunk_conv: conv(&layout.trunk_conv(blocks.len()), nf, nf)?,
            ups: (0..ups)
                .map(|i| conv(&layout.up_conv(i), nf, nf))
                .collect::<Result<_>>()?,
            hr_conv: conv(&layout.hr_conv(ups), nf, nf)?,
            conv_last: conv(&layout.conv_last(ups), 3, nf)?,
            blocks,
            unshuffle,
            plus,
            scale,
            features,
            growth,
        })
    }

    /// The factor this network grows an image's sides by (1, 2, 4, 8, ...).
    pub fn scale(&self) -> usize {
        self.scale
    }

    /// Whether this is an ESRGAN+ network (spandrel's `plus`).
    pub fn plus(&self) -> bool {
        self.plus
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The device and dtype the weights are on.
    pub fn device(&self) -> &Device {
        self.conv_first.weight().device()
    }

    pub fn dtype(&self) -> DType {
        self.conv_first.weight().dtype()
    }

    /// The network on `[B, 3, H, W]` (values 0..1, in the weights' device and dtype):
    /// `[B, 3, H * scale, W * scale]`, unclamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let input = match self.unshuffle {
            Some(f) => pixel_unshuffle(&reflect_pad_to_multiple(x, f)?, f)?,
            None => x.clone(),
        };
        let fea = self.conv_first.forward(&input)?;
        let mut trunk = fea.clone();
        for rrdb in &self.blocks {
            let mut out = trunk.clone();
            for rdb in rrdb {
                out = rdb.forward(&out)?;
            }
            trunk = ((out * 0.2)? + &trunk)?;
        }
        let mut fea = (self.trunk_conv.forward(&trunk)? + fea)?;
        for up in &self.ups {
            let (_, _, fh, fw) = fea.dims4()?;
            fea = leaky_relu(&up.forward(&fea.upsample_nearest2d(2 * fh, 2 * fw)?)?)?;
        }
        let out = self
            .conv_last
            .forward(&leaky_relu(&self.hr_conv.forward(&fea)?)?)?;
        Ok(match self.unshuffle {
            // The padding's share of the output is cut off.
            Some(_) => out
                .narrow(2, 0, h * self.scale)?
                .narrow(3, 0, w * self.scale)?,
            None => out,
        })
    }
}

/// torch's `pixel_unshuffle`: `[B, C, H, W]` -> `[B, C f^2, H / f, W / f]`, channel
/// `c f^2 + i f + j` holding the pixels at `(y f + i, x f + j)`.
fn pixel_unshuffle(x: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / f, f, w / f, f))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * f * f, h / f, w / f))
}

/// spandrel's `pad_to_multiple(x, f, mode="reflect")`: rows and columns reflected (the edge
/// not repeated) onto the bottom and right until both sides are multiples of `f`.
pub(super) fn reflect_pad_to_multiple(x: &Tensor, f: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut x = x.clone();
    for (dim, size) in [(2usize, h), (3usize, w)] {
        let pad = (f - size % f) % f;
        if pad == 0 {
            continue;
        }
        if pad >= size {
            return Err(PipelineError::InvalidRequest(format!(
                "an image side of {size} px is too small for this upscaler"
            )));
        }
        let index: Vec<u32> = (0..pad).map(|k| (size - 2 - k) as u32).collect();
        let index = Tensor::new(index.as_slice(), x.device())?;
        x = Tensor::cat(&[&x, &x.index_select(&index, dim)?], dim)?;
    }
    Ok(x)
}
