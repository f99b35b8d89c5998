//! The extension's Depth Anything modules (the legacy `depth_anything` and
//! `depth_anything_v2` of `scripts/preprocessor/legacy/processor.py`,
//! `annotator/depth_anything.py` and `annotator/depth_anything_v2.py`; the `depth_anything`
//! package's `dpt.py` with facebookresearch/dinov2's ViT, the `depth_anything_v2` package's
//! `dpt.py`, `dinov2.py`, `dinov2_layers/`, `util/`). The two versions are one network and
//! one detector; they differ only in which blocks feed the head ([`Version`]).
//! - [`DepthAnythingNetwork`]: `DPT_DINOv2` / `DepthAnythingV2`. A DINOv2 ViT (`pretrained`; its blocks in
//!   `vit.rs`, on our CPU kernels for f32): 14x14 patches
//!   (a strided conv), the class token, the learnt position embedding (a square grid; resized
//!   bicubically to the patch grid unless that is the grid itself, the sizes offset by 0.1 as
//!   `interpolate_pos_encoding` does), blocks of pre-norm attention and GELU MLP, each branch
//!   times its layer scale. Four blocks' outputs (v1: the last four, `get_intermediate_layers(x,
//!   4)`; v2: by depth, `intermediate_layer_idx`), through
//!   the final norm, the class token dropped, feed the DPT head (`depth_head`): a 1x1 projection
//!   each, resized to 4x, 2x, 1x and 1/2 of the patch grid, a 3x3 `layerN_rn` each, fused
//!   coarse to fine by `refinenet4..1` (residual conv units, a bilinear resize with corners
//!   aligned, a 1x1), `output_conv1`, a resize to the input's size, `output_conv2` (3x3 to 32,
//!   ReLU, 1x1 to 1, ReLU). Widths and depth are read from the weights; the heads are
//!   DINOv2's 64 wide.
//! - [`depth_anything_depth`] (`DepthAnythingDetector.__call__`, `DepthAnythingV2Detector.__call__`:
//!   the same steps, the same transform, up to the model): the padded
//!   image with its channels swapped (`COLOR_BGR2RGB` of an RGB image), / 255, resized with
//!   OpenCV's cubic so its shorter side is at least 518 and both are multiples of 14 (the
//!   transform's `Resize`), ImageNet-normalised; the model's depth.
//! - [`depth_anything_map`]: that depth resized bilinearly to the padded image, min-max scaled
//!   to 0..=255 in f32 and truncated to u8 (a flat depth, 0/0, is all 0).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::LayerNorm;

use super::lineart_anime::resize_cubic_f32;
use super::networks::{AnnotatorFile, HubFile};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::Result;

mod state;
pub(super) mod vit;
pub(super) use state::State;
use vit::Block;

/// The file the extension loads Depth Anything (v1) from (`annotator/downloads/depth_anything/`).
pub const DEPTH_ANYTHING_FILE: &str = "depth_anything_vitl14.pth";

/// The v1 network's weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static DEPTH_ANYTHING: AnnotatorFile = AnnotatorFile {
    name: DEPTH_ANYTHING_FILE,
    subfolder: "depth_anything",
    // `DepthAnythingDetector`'s remote_url: the LiheYoung/Depth-Anything space's checkpoints/
    // (not in lllyasviel/Annotators).
    hub: HubFile {
        repo: "spaces/LiheYoung/Depth-Anything",
        path: "checkpoints/depth_anything_vitl14.pth",
    },
    load: |path| {
        Ok(Arc::new(DepthAnythingNetwork::load(
            path,
            &Device::Cpu,
            Version::V1,
        )?))
    },
};

/// The file the extension loads the V2 network from (`annotator/downloads/depth_anything_v2/`).
pub const DEPTH_ANYTHING_V2_FILE: &str = "depth_anything_v2_vitl.safetensors";

/// [`DepthAnythingNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static DEPTH_ANYTHING_V2: AnnotatorFile = AnnotatorFile {
    name: DEPTH_ANYTHING_V2_FILE,
    subfolder: "depth_anything_v2",
    // `DepthAnythingV2Detector`'s remote_url (not in lllyasviel/Annotators).
    hub: HubFile {
        repo: "MackinationsAi/Depth-Anything-V2_Safetensors",
        path: DEPTH_ANYTHING_V2_FILE,
    },
    load: |path| {
        Ok(Arc::new(DepthAnythingNetwork::load(
            path,
            &Device::Cpu,
            Version::V2,
        )?))
    },
};

/// Which Depth Anything: the one difference the networks have is the blocks the head takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `DPT_DINOv2`: `get_intermediate_layers(x, 4)`, dinov2's "the n last blocks".
    V1,
    /// `DepthAnythingV2`: `intermediate_layer_idx[encoder]`, spread over the depth.
    V2,
}

/// DINOv2's attention heads are 64 wide in every size (vits 6, vitb 12, vitl 16, vitg 24).
const HEAD_WIDTH: usize = 64;
/// `DinoVisionTransformer`'s `norm_layer`: `partial(nn.LayerNorm, eps=1e-6)`.
const NORM_EPS: f64 = 1e-6;
/// `DINOv2(...)`'s `interpolate_offset`.
const POS_OFFSET: f64 = 0.1;
/// The transform's `Resize(width=518, height=518, ensure_multiple_of=14, "lower_bound")`.
const INPUT_SIDE: f64 = 518.0;
const INPUT_MULTIPLE: f64 = 14.0;
/// `NormalizeImage`'s ImageNet mean and std.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The four blocks whose outputs feed the head: v1 the last four; v2
/// `DepthAnythingV2.intermediate_layer_idx`, by the encoder's depth (vits and vitb: 12
/// blocks, vitl 24, vitg 40).
fn taken_blocks(version: Version, depth: usize) -> Option<[usize; 4]> {
    match (version, depth) {
        (Version::V1, 4..) => Some(std::array::from_fn(|i| depth - 4 + i)),
        (Version::V2, 12) => Some([2, 5, 8, 11]),
        (Version::V2, 24) => Some([4, 11, 17, 23]),
        (Version::V2, 40) => Some([9, 19, 29, 39]),
        _ => None,
    }
}

/// `ResidualConvUnit` (no batch norm): `x + conv2(relu(conv1(relu(x))))`; MiDaS's
/// `ResidualConvUnit_custom` without batch norm is the same.
pub(super) struct Rcu([Conv2d; 2]);

impl Rcu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.0[0].forward(&x.relu()?)?;
        Ok((self.0[1].forward(&y.relu()?)? + x)?)
    }
}

/// `FeatureFusionBlock`: the finer level's unit added (not for refinenet4), the second unit,
/// the bilinear resize (corners aligned), the 1x1 `out_conv`. MiDaS's
/// `FeatureFusionBlock_custom` (no batch norm, no expand) is the same with twice the size.
pub(super) struct Fusion {
    unit1: Option<Rcu>,
    unit2: Rcu,
    out_conv: Conv2d,
}

impl Fusion {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        skip: Option<&Tensor>,
        size: (usize, usize),
    ) -> Result<Tensor> {
        let x = match (skip, &self.unit1) {
            (Some(s), Some(u)) => (x + u.forward(s)?)?,
            _ => x.clone(),
        };
        let x = self.unit2.forward(&x)?;
        let x = bilinear(&x, size.0, size.1, true)?;
        Ok(self.out_conv.forward(&x)?)
    }
}

/// How `resize_layers[i]` brings a projection to its level.
enum Resize {
    /// A transposed conv with kernel = stride (4x, 2x).
    Up {
        weight: Tensor,
        bias: Tensor,
        k: usize,
    },
    Same,
    /// A 3x3, stride 2, pad 1 conv.
    Down(Conv2d),
}

/// `DPT_DINOv2` (v1) or `DepthAnythingV2` with its weights, on one device in f32.
pub struct DepthAnythingNetwork {
    patch: Conv2d,
    patch_size: usize,
    cls_token: Tensor,
    /// The position embedding: the class token's, then the `grid x grid` patches' (row-major).
    pos_embed: Tensor,
    grid: usize,
    heads: usize,
    blocks: Vec<Block>,
    taken: [usize; 4],
    norm: LayerNorm,
    projects: Vec<Conv2d>,
    resize: Vec<Resize>,
    layer_rn: Vec<Conv2d>,
    /// refinenet1..4.
    fusion: Vec<Fusion>,
    output_conv1: Conv2d,
    output_conv2: [Conv2d; 2],
}

impl std::fmt::Debug for DepthAnythingNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepthAnythingNetwork")
            .field("blocks", &self.blocks.len())
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

impl DepthAnythingNetwork {
    /// The network of a `depth_anything_vitl14.pth` (v1) or `depth_anything_v2_*.safetensors`
    /// file (either a safetensors file or a torch pickle of the state dict: the two have one
    /// key layout), onto `device` in f32, with DINOv2's 64-wide heads (one head for a
    /// narrower network: the reduced test ones).
    pub fn load(path: &Path, device: &Device, version: Version) -> Result<Self> {
        Self::load_with_heads(path, device, version, None)
    }

    /// The same with `heads` attention heads (the weights do not say; `None`: 64 wide each).
    pub fn load_with_heads(
        path: &Path,
        device: &Device,
        version: Version,
        heads: Option<usize>,
    ) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state(path)?,
            device,
            what: "Depth Anything",
        };
        let pw = s.any("pretrained.patch_embed.proj.weight")?;
        let (d, _, p, _) = pw.dims4()?;
        let patch = s.conv("pretrained.patch_embed.proj", [d, 3, p, p], p, true)?;
        // The patch conv has no padding (its `p / 2` from `conv` is for the 3x3s).
        let patch = Conv2d::new(patch.weight().clone(), patch.bias().cloned(), p, 0);
        let (pos_embed, grid) = s.pos_embed("pretrained.pos_embed", d)?;
        let heads = s.heads(heads, d, HEAD_WIDTH)?;
        let depth = (0..)
            .take_while(|i| {
                s.tensors
                    .contains_key(&format!("pretrained.blocks.{i}.ls1.gamma"))
            })
            .count();
        let taken = taken_blocks(version, depth).ok_or_else(|| {
            s.bad(format!(
                "{depth} blocks: not a DINOv2 size for {version:?} (12, 24, 40)"
            ))
        })?;
        let blocks = (0..depth)
            .map(|i| s.vit_block(&format!("pretrained.blocks.{i}"), d, NORM_EPS, true))
            .collect::<Result<Vec<_>>>()?;
        let h = "depth_head";
        let outs: Vec<usize> = (0..4)
            .map(|i| Ok(s.any(&format!("{h}.projects.{i}.weight"))?.dim(0)?))
            .collect::<Result<_>>()?;
        let projects = (0..4)
            .map(|i| s.conv(&format!("{h}.projects.{i}"), [outs[i], d, 1, 1], 1, true))
            .collect::<Result<Vec<_>>>()?;
        let up = |i: usize, k: usize| -> Result<Resize> {
            let key = format!("{h}.resize_layers.{i}");
            Ok(Resize::Up {
                weight: s.get(&format!("{key}.weight"), &[outs[i], outs[i], k, k])?,
                bias: s.get(&format!("{key}.bias"), &[outs[i]])?,
                k,
            })
        };
        let resize = vec![
            up(0, 4)?,
            up(1, 2)?,
            Resize::Same,
            Resize::Down(s.conv(
                &format!("{h}.resize_layers.3"),
                [outs[3], outs[3], 3, 3],
                2,
                true,
            )?),
        ];
        let f = s.any(&format!("{h}.scratch.layer1_rn.weight"))?.dim(0)?;
        let layer_rn = (0..4)
            .map(|i| {
                s.conv(
                    &format!("{h}.scratch.layer{}_rn", i + 1),
                    [f, outs[i], 3, 3],
                    1,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (1..=4)
            .map(|i| s.fusion(&format!("{h}.scratch.refinenet{i}"), f, i == 4))
            .collect::<Result<Vec<_>>>()?;
        let sc = format!("{h}.scratch");
        let output_conv1 = s.conv(&format!("{sc}.output_conv1"), [f / 2, f, 3, 3], 1, true)?;
        let f2 = s.any(&format!("{sc}.output_conv2.0.weight"))?.dim(0)?;
        let output_conv2 = [
            s.conv(&format!("{sc}.output_conv2.0"), [f2, f / 2, 3, 3], 1, true)?,
            s.conv(&format!("{sc}.output_conv2.2"), [1, f2, 1, 1], 1, true)?,
        ];
        Ok(Self {
            patch,
            patch_size: p,
            cls_token: s.get("pretrained.cls_token", &[1, 1, d])?,
            pos_embed,
            grid,
            heads,
            blocks,
            taken,
            norm: s.norm("pretrained.norm", d, NORM_EPS)?,
            projects,
            resize,
            layer_rn,
            fusion,
            output_conv1,
            output_conv2,
        })
    }

    /// The patch side (14).
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// `interpolate_pos_encoding` for a `rows x cols` patch grid: `[1, 1 + rows * cols, D]`.
    fn pos_embed(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let g = self.grid;
        if (rows, cols) == (g, g) {
            return Ok(self.pos_embed.clone());
        }
        let d = self.pos_embed.dim(2)?;
        let cls = self.pos_embed.narrow(1, 0, 1)?;
        let grid = self
            .pos_embed
            .narrow(1, 1, g * g)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // torch's bicubic (A = -0.75, taps clamped at the edges) with `scale_factor` given:
        // the source of `i` is `(i + 0.5) / scale - 0.5`, the scale being `(n + 0.1) / g`.
        let taps = |n: usize| -> Vec<([usize; 4], [f32; 4])> {
            let inv = (1.0 / ((n as f64 + POS_OFFSET) / g as f64)) as f32;
            (0..n)
                .map(|i| {
                    let real = inv * (i as f32 + 0.5) - 0.5;
                    let base = real.floor();
                    let t = real - base;
                    let idx = std::array::from_fn(|k| {
                        (base as isize - 1 + k as isize).clamp(0, g as isize - 1) as usize
                    });
                    (idx, torch_cubic(t))
                })
                .collect()
        };
        let (ry, rx) = (taps(rows), taps(cols));
        let mut out = vec![0f32; rows * cols * d];
        for (y, (iy, wy)) in ry.iter().enumerate() {
            for (x, (ix, wx)) in rx.iter().enumerate() {
                let o = &mut out[(y * cols + x) * d..][..d];
                for (a, &sy) in iy.iter().enumerate() {
                    for (b, &sx) in ix.iter().enumerate() {
                        let w = wy[a] * wx[b];
                        let src = &grid[(sy * g + sx) * d..][..d];
                        o.iter_mut().zip(src).for_each(|(o, &v)| *o += w * v);
                    }
                }
            }
        }
        let patches = Tensor::from_vec(out, (1, rows * cols, d), self.pos_embed.device())?;
        Ok(Tensor::cat(&[cls, patches], 1)?)
    }

    /// `DPT_DINOv2.forward` / `DepthAnythingV2.forward` of a `[1, 3, H, W]` input (sides
    /// multiples of the patch): the `[1, 1, H, W]` depth. (v1's second resize, to the input's
    /// size with corners aligned, is to the size the head already gives: the identity.)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, hh, ww) = x.dims4()?;
        let (rows, cols) = (hh / self.patch_size, ww / self.patch_size);
        let tokens = self.patch.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let mut t = Tensor::cat(&[&self.cls_token, &tokens], 1)?;
        t = t.broadcast_add(&self.pos_embed(rows, cols)?)?;
        let mut features = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(&t, self.heads)?;
            if self.taken.contains(&i) {
                let n = self.norm.forward(&t)?;
                features.push(n.narrow(1, 1, rows * cols)?);
            }
        }
        let mut levels = Vec::with_capacity(4);
        for (i, f) in features.iter().enumerate() {
            let d = f.dim(2)?;
            let x = f.transpose(1, 2)?.reshape((1, d, rows, cols))?;
            let x = self.projects[i].forward(&x)?;
            let x = match &self.resize[i] {
                Resize::Up { weight, bias, k } => {
                    match crate::kernels::conv_transpose_unpatch(&x, weight, Some(bias))? {
                        Some(y) => y,
                        None => x
                            .conv_transpose2d(weight, 0, 0, *k, 1)?
                            .broadcast_add(&bias.reshape((1, (), 1, 1))?)?,
                    }
                }
                Resize::Same => x,
                Resize::Down(conv) => conv.forward(&x)?,
            };
            levels.push(self.layer_rn[i].forward(&x)?);
        }
        let size = |t: &Tensor| -> Result<(usize, usize)> { Ok((t.dim(2)?, t.dim(3)?)) };
        let path4 = self.fusion[3].forward(&levels[3], None, size(&levels[2])?)?;
        let path3 = self.fusion[2].forward(&path4, Some(&levels[2]), size(&levels[1])?)?;
        let path2 = self.fusion[1].forward(&path3, Some(&levels[1]), size(&levels[0])?)?;
        let (h1, w1) = size(&levels[0])?;
        let path1 = self.fusion[0].forward(&path2, Some(&levels[0]), (2 * h1, 2 * w1))?;
        let out = self.output_conv1.forward(&path1)?;
        let out = bilinear(&out, hh, ww, true)?;
        let out = self.output_conv2[0].forward(&out)?.relu()?;
        // output_conv2's last ReLU; `forward`'s own `F.relu` after it changes nothing.
        Ok(self.output_conv2[1].forward(&out)?.relu()?)
    }
}

/// `upsample_bilinear2d` through the parallel CPU kernel where it applies (the same values).
pub(super) fn bilinear(x: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    match crate::kernels::upsample::upsample_bilinear(x, h, w, align_corners)? {
        Some(y) => Ok(y),
        None => Ok(x.upsample_bilinear2d(h, w, align_corners)?),
    }
}

/// torch's `get_cubic_upsample_coefficients` (A = -0.75) at fraction `t`, in f32.
fn torch_cubic(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// numpy's `round` to a multiple of 14, at least 518 (`Resize.constrain_to_multiple_of` with
/// `min_val`).
fn constrain(x: f64) -> usize {
    let m = INPUT_MULTIPLE;
    let mut y = (x / m).round_ties_even() * m;
    if y < INPUT_SIDE {
        y = (x / m).ceil() * m;
    }
    y as usize
}

/// The transform's size for a `w x h` image: scaled by the larger of 518 / side (the aspect
/// kept), each side to a multiple of 14 and at least 518.
pub fn depth_anything_input_size(w: usize, h: usize) -> (usize, usize) {
    let scale = (INPUT_SIDE / w as f64).max(INPUT_SIDE / h as f64);
    (constrain(scale * w as f64), constrain(scale * h as f64))
}

/// The model's depth of the padded image, at the transform's size: `(width, height, depth)`.
pub fn depth_anything_depth(
    net: &DepthAnythingNetwork,
    padded: &RgbImage,
) -> Result<(usize, usize, Vec<f32>)> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let (nw, nh) = depth_anything_input_size(w, h);
    let mut input = Vec::with_capacity(3 * nw * nh);
    for c in 0..3 {
        // `COLOR_BGR2RGB` of the RGB image: the network's channel c is the image's 2 - c.
        let plane: Vec<f32> = padded.pixels[2 - c..]
            .iter()
            .step_by(3)
            .map(|&v| (f64::from(v) / 255.0) as f32)
            .collect();
        let resized = resize_cubic_f32(&plane, w, h, nw, nh);
        input.extend(
            resized
                .iter()
                .map(|&v| ((f64::from(v) - MEAN[c]) / STD[c]) as f32),
        );
    }
    let device = net.patch.weight().device();
    let x = Tensor::from_vec(input, (1, 3, nh, nw), device)?;
    let depth = net.forward(&x)?.flatten_all()?.to_device(&Device::Cpu)?;
    Ok((nw, nh, depth.to_vec1::<f32>()?))
}

/// The legacy `depth_anything` / `depth_anything_v2` (colored=False) on the padded image: its depth resized back
/// (bilinear, pixel centres), min-max scaled to 0..=255, truncated.
pub fn depth_anything_map(net: &DepthAnythingNetwork, padded: &RgbImage) -> Result<Vec<u8>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let (nw, nh, depth) = depth_anything_depth(net, padded)?;
    let depth = Tensor::from_vec(depth, (1, 1, nh, nw), &Device::Cpu)?;
    let depth = bilinear(&depth, h, w, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (lo, hi) = depth
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    // `as u8` takes 0/0's NaN to 0.
    Ok(depth
        .iter()
        .map(|&v| ((v - lo) / (hi - lo) * 255.0) as u8)
        .collect())
}
