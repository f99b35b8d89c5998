//! The extension's MiDaS modules (the legacy `midas` = depth_midas and `midas_normal` =
//! normal_midas of `scripts/preprocessor/legacy/processor.py`; `annotator/midas/`: `api.py`'s
//! `dpt_hybrid`, `midas/dpt_depth.py`, `midas/vit.py`, `midas/blocks.py`, `__init__.py`).
//! - [`MidasNetwork`]: `DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)`. timm's
//!   R50+ViT-B/16 hybrid: the ResNetV2 (`resnet.rs`), its last stage projected to tokens
//!   (`HybridEmbed`'s conv), the class token, the position embedding resized bilinearly from
//!   its square grid to the patch grid (`_resize_pos_embed`), ViT blocks (DINOv2's block of
//!   `depth_anything/vit.rs` without layer scale; LayerNorm eps 1e-6). `forward_vit` takes the
//!   first two ResNet stages' outputs as they are and blocks 8 and 11 (no final norm), each
//!   with `ProjectReadout` (the patches beside the class token, a linear, GELU), a 1x1 conv,
//!   and for the last a 3x3 stride 2 conv. The DPT scratch: a 3x3 `layerN_rn` each, fused
//!   coarse to fine by `refinenet4..1` (Depth Anything's fusion block, each doubling the size),
//!   the head (3x3 to half, bilinear 2x with corners aligned, 3x3 to 32, ReLU, 1x1 to 1, ReLU).
//!   Widths and depths are read from the file; the heads are 64 wide.
//! - [`midas_depth`] (`apply_midas`): the padded image as it is, `/ 127.5 - 1`, no resize.
//! - [`depth_midas_map`]: the depth less its minimum, over its (new) maximum, times 255,
//!   truncated. [`normal_midas_map`]: OpenCV's 3x3 Sobel of the depth in x and y (reflect-101
//!   borders), both 0 where the scaled depth is below the background threshold, with z = 2 pi,
//!   normalised, `* 127.5 + 127.5` truncated, the channels reversed (z, y, x).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;

use super::depth_anything::vit::Block;
use super::depth_anything::{bilinear, Fusion, State};
use super::networks::{AnnotatorFile, HubFile};
use super::resize::Padded;
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::Result;

pub(super) mod resnet;
use resnet::ResNet;

/// The file the extension loads DPT-Hybrid from (`annotator/downloads/midas/`).
pub const MIDAS_FILE: &str = "dpt_hybrid-midas-501f0c75.pt";

/// [`MidasNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static MIDAS: AnnotatorFile = AnnotatorFile {
    name: MIDAS_FILE,
    subfolder: "midas",
    // `api.py`'s remote_model_path (lllyasviel/ControlNet, not lllyasviel/Annotators).
    hub: HubFile {
        repo: "lllyasviel/ControlNet",
        path: "annotator/ckpts/dpt_hybrid-midas-501f0c75.pt",
    },
    load: |path| Ok(Arc::new(MidasNetwork::load(path, &Device::Cpu)?)),
};

/// timm's ViT-B heads are 64 wide (768 / 12).
const HEAD_WIDTH: usize = 64;
/// timm's `VisionTransformer` norm layer: `partial(nn.LayerNorm, eps=1e-6)`.
const NORM_EPS: f64 = 1e-6;
/// `_make_vit_b_rn50_backbone`'s `pretrained.model.patch_size = [16, 16]`: the token grid
/// (and the position embedding's size) is the input's over 16.
const PATCH: usize = 16;
/// DPT's `hooks["vitb_rn50_384"]` = [0, 1, 8, 11]: the first two are the ResNet stages (the
/// hybrid's `use_vit_only=False`), these the blocks.
const HOOKS: [usize; 2] = [8, 11];
/// `processor.py`'s `a=np.pi * 2.0`: the normal's z before normalising.
const NORMAL_Z: f32 = std::f32::consts::TAU;

/// `DPTDepthModel` (DPT-Hybrid) with its weights, on one device in f32.
pub struct MidasNetwork {
    backbone: ResNet,
    proj: Conv2d,
    cls_token: Tensor,
    /// The class token's position embedding, then the `grid x grid` patches' (row-major).
    pos_embed: Tensor,
    grid: usize,
    heads: usize,
    /// The blocks up to the last hook.
    blocks: Vec<Block>,
    /// `act_postprocess3/4`: the readout projection and the 1x1 conv each.
    readout: [Linear; 2],
    post: [Conv2d; 2],
    /// `act_postprocess4`'s 3x3 stride 2.
    down: Conv2d,
    layer_rn: Vec<Conv2d>,
    /// refinenet1..4.
    fusion: Vec<Fusion>,
    head: [Conv2d; 3],
}

impl std::fmt::Debug for MidasNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MidasNetwork")
            .field("blocks", &self.blocks.len())
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

impl MidasNetwork {
    /// The network of a `dpt_hybrid-midas-501f0c75.pt` (a torch pickle of the state dict, or
    /// a safetensors file of the same keys), onto `device` in f32, with 64-wide heads.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_heads(path, device, None)
    }

    /// The same with `heads` attention heads (the file does not say; `None`: 64 wide each,
    /// one for a narrower network).
    pub fn load_with_heads(path: &Path, device: &Device, heads: Option<usize>) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state(path)?,
            device,
            what: "MiDaS DPT-Hybrid",
        };
        let m = "pretrained.model";
        let backbone = ResNet::load(&s, &format!("{m}.patch_embed.backbone"))?;
        let pw = s.any(&format!("{m}.patch_embed.proj.weight"))?;
        let (d, _, k, _) = pw.dims4()?;
        let proj = s.conv(
            &format!("{m}.patch_embed.proj"),
            [d, backbone.width, k, k],
            k,
            true,
        )?;
        let proj = Conv2d::new(proj.weight().clone(), proj.bias().cloned(), k, 0);
        let (pos_embed, grid) = s.pos_embed(&format!("{m}.pos_embed"), d)?;
        let heads = s.heads(heads, d, HEAD_WIDTH)?;
        let depth = (0..)
            .take_while(|i| {
                s.tensors
                    .contains_key(&format!("{m}.blocks.{i}.norm1.weight"))
            })
            .count();
        if depth <= HOOKS[1] {
            return Err(s.bad(format!("{depth} blocks: DPT-Hybrid takes blocks {HOOKS:?}")));
        }
        // timm's ViT-B has no layer scale.
        let blocks = (0..=HOOKS[1])
            .map(|i| s.vit_block(&format!("{m}.blocks.{i}"), d, NORM_EPS, false))
            .collect::<Result<Vec<_>>>()?;
        let p = |n: usize| format!("pretrained.act_postprocess{n}");
        let outs: Vec<usize> = [3, 4]
            .iter()
            .map(|&n| Ok(s.any(&format!("{}.3.weight", p(n)))?.dim(0)?))
            .collect::<Result<_>>()?;
        let readout = [3, 4].map(|n| s.linear(&format!("{}.0.project.0", p(n)), d, 2 * d));
        let post = [0, 1].map(|i| s.conv(&format!("{}.3", p(i + 3)), [outs[i], d, 1, 1], 1, true));
        let down = s.conv(&format!("{}.4", p(4)), [outs[1], outs[1], 3, 3], 2, true)?;
        let [r3, r4] = readout;
        let [p3, p4] = post;
        let f = s.any("scratch.layer1_rn.weight")?.dim(0)?;
        let stage_width = |i: usize| -> Result<usize> {
            Ok(s.any(&format!("scratch.layer{}_rn.weight", i + 1))?
                .dim(1)?)
        };
        let ins = [stage_width(0)?, stage_width(1)?, outs[0], outs[1]];
        let layer_rn = (0..4)
            .map(|i| {
                s.conv(
                    &format!("scratch.layer{}_rn", i + 1),
                    [f, ins[i], 3, 3],
                    1,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (1..=4)
            .map(|i| s.fusion(&format!("scratch.refinenet{i}"), f, i == 4))
            .collect::<Result<Vec<_>>>()?;
        let h = "scratch.output_conv";
        let mid = s.any(&format!("{h}.2.weight"))?.dim(0)?;
        let head = [
            s.conv(&format!("{h}.0"), [f / 2, f, 3, 3], 1, true)?,
            s.conv(&format!("{h}.2"), [mid, f / 2, 3, 3], 1, true)?,
            s.conv(&format!("{h}.4"), [1, mid, 1, 1], 1, true)?,
        ];
        let net = Self {
            backbone,
            proj,
            cls_token: s.get(&format!("{m}.cls_token"), &[1, 1, d])?,
            pos_embed,
            grid,
            heads,
            blocks,
            readout: [r3?, r4?],
            post: [p3?, p4?],
            down,
            layer_rn,
            fusion,
            head,
        };
        Ok(net)
    }

    /// `_resize_pos_embed` for a `rows x cols` grid: the patches' part resized bilinearly
    /// (`F.interpolate`, corners not aligned), after the class token's.
    fn pos_embed(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let (g, d) = (self.grid, self.pos_embed.dim(2)?);
        let cls = self.pos_embed.narrow(1, 0, 1)?;
        let grid = self
            .pos_embed
            .narrow(1, 1, g * g)?
            .transpose(1, 2)?
            .reshape((1, d, g, g))?;
        let grid = bilinear(&grid.contiguous()?, rows, cols, false)?
            .reshape((1, d, rows * cols))?
            .transpose(1, 2)?;
        Ok(Tensor::cat(&[&cls, &grid], 1)?)
    }

    /// `DPTDepthModel.forward` of a `[1, 3, H, W]` input (sides multiples of 32): the
    /// `[H, W]` depth.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, hh, ww) = x.dims4()?;
        let (rows, cols) = (hh / PATCH, ww / PATCH);
        let stages = self.backbone.forward(x)?;
        let last = stages.last().expect("at least two stages");
        let tokens = self.proj.forward(last)?;
        if tokens.dims()[2..] != [rows, cols] {
            return Err(candle_core::Error::Msg(format!(
                "MiDaS: a {ww}x{hh} input makes {:?} tokens, not {rows}x{cols}",
                tokens.dims()
            ))
            .into());
        }
        let d = tokens.dim(1)?;
        let tokens = tokens.flatten_from(2)?.transpose(1, 2)?;
        let mut t = Tensor::cat(&[&self.cls_token, &tokens], 1)?;
        t = t.broadcast_add(&self.pos_embed(rows, cols)?)?;
        let mut layers = vec![stages[0].clone(), stages[1].clone()];
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(&t, self.heads)?;
            let Some(j) = HOOKS.iter().position(|&h| h == i) else {
                continue;
            };
            // ProjectReadout: each patch beside the class token, projected, GELU (erf).
            let patches = t.narrow(1, 1, rows * cols)?;
            let cls = t.narrow(1, 0, 1)?.broadcast_as(patches.shape())?;
            let f = Tensor::cat(&[&patches, &cls.contiguous()?], 2)?;
            let f = self.readout[j].forward(&f)?.gelu_erf()?;
            let f = f.transpose(1, 2)?.reshape((1, d, rows, cols))?;
            let mut f = self.post[j].forward(&f)?;
            if j == 1 {
                f = self.down.forward(&f)?;
            }
            layers.push(f);
        }
        let levels = layers
            .iter()
            .zip(&self.layer_rn)
            .map(|(l, conv)| conv.forward(l))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Each fusion block doubles its input's size (`scale_factor=2`, corners aligned).
        let double = |t: &Tensor| -> Result<(usize, usize)> { Ok((2 * t.dim(2)?, 2 * t.dim(3)?)) };
        let mut path = self.fusion[3].forward(&levels[3], None, double(&levels[3])?)?;
        for i in (0..3).rev() {
            path = self.fusion[i].forward(&path, Some(&levels[i]), double(&path)?)?;
        }
        let out = self.head[0].forward(&path)?;
        let out = bilinear(&out, 2 * out.dim(2)?, 2 * out.dim(3)?, true)?;
        let out = self.head[1].forward(&out)?.relu()?;
        // non_negative: the last ReLU.
        let out = self.head[2].forward(&out)?.relu()?;
        Ok(out.squeeze(1)?.squeeze(0)?)
    }
}

/// `apply_midas`'s depth of the padded image (its sides multiples of 64): the image as it is,
/// `/ 127.5 - 1` in f32, the model's `[H, W]` depth, row-major.
pub fn midas_depth(net: &MidasNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let mut input = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        input.extend(
            padded.pixels[c..]
                .iter()
                .step_by(3)
                .map(|&v| f32::from(v) / 127.5 - 1.0),
        );
    }
    let device = net.proj.weight().device();
    let x = Tensor::from_vec(input, (1, 3, h, w), device)?;
    let depth = net.forward(&x)?.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(depth.to_vec1::<f32>()?)
}

/// `depth_pt`: the depth less its minimum, over the maximum of that (f32, as torch).
fn scaled(depth: &[f32]) -> Vec<f32> {
    let lo = depth.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let shifted: Vec<f32> = depth.iter().map(|&v| v - lo).collect();
    let hi = shifted.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    shifted.iter().map(|&v| v / hi).collect()
}

/// depth_midas's map: `(depth_pt * 255).clip(0, 255)` truncated (a flat depth's 0/0 is 0).
pub fn depth_midas_map(depth: &[f32]) -> Vec<u8> {
    scaled(depth).iter().map(|&v| (v * 255.0) as u8).collect()
}

/// normal_midas's RGB map of a `w x h` depth with background threshold `bg_th` (pixels whose
/// scaled depth is below it, compared in f32, get a flat normal).
pub fn normal_midas_map(depth: &[f32], w: usize, h: usize, bg_th: f64) -> Vec<u8> {
    let scaled = scaled(depth);
    let bg = bg_th as f32;
    // BORDER_REFLECT_101.
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let i = if i < 0 { -i } else { i };
        (if i >= n { 2 * (n - 1) - i } else { i }).clamp(0, n - 1) as usize
    };
    let at = |x: isize, y: isize| depth[reflect(y, h) * w + reflect(x, w)];
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h as isize {
        for x in 0..w as isize {
            // OpenCV's separable 3x3 Sobel: the row filter, then the column one (the
            // symmetric [1, 2, 1] as the outer pair's sum plus twice the centre).
            let dx = |yy: isize| at(x + 1, yy) - at(x - 1, yy);
            let gx = dx(y - 1) + dx(y + 1) + 2.0 * dx(y);
            let sy = |yy: isize| at(x - 1, yy) + at(x + 1, yy) + 2.0 * at(x, yy);
            let gy = sy(y + 1) - sy(y - 1);
            let (gx, gy) = match scaled[y as usize * w + x as usize] < bg {
                true => (0.0, 0.0),
                false => (gx, gy),
            };
            let norm = (gx * gx + gy * gy + NORMAL_Z * NORMAL_Z).sqrt();
            let level = |v: f32| ((v / norm) * 127.5 + 127.5).clamp(0.0, 255.0) as u8;
            out.extend([level(NORMAL_Z), level(gy), level(gx)]);
        }
    }
    out
}

/// depth_midas's map of the padded image (normal_midas's with `background`: its threshold),
/// the pad removed.
pub fn midas_module(
    net: &MidasNetwork,
    padded: &Padded,
    background: Option<f64>,
) -> Result<RgbImage> {
    let depth = midas_depth(net, &padded.image)?;
    let Some(bg) = background else {
        return Ok(padded.crop_gray_to_rgb(&depth_midas_map(&depth)));
    };
    let (w, h) = (padded.image.width, padded.image.height);
    let normal = Padded {
        image: RgbImage {
            width: w,
            height: h,
            pixels: normal_midas_map(&depth, w as usize, h as usize, bg),
        },
        ..padded.clone()
    };
    Ok(normal.crop_rgb())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_depth_is_black_and_faces_the_viewer() {
        let depth = vec![3.0f32; 4 * 3];
        assert!(depth_midas_map(&depth).iter().all(|&v| v == 0));
        // No slope: (z, y, x) = (1, 0, 0) normalised: 255, 127, 127.
        let normal = normal_midas_map(&depth, 4, 3, 0.0);
        assert!(normal.chunks(3).all(|p| p == [255, 127, 127]), "{normal:?}");
    }

    #[test]
    fn a_slope_in_x_tilts_the_normal_where_the_depth_is_above_the_threshold() {
        // Depth rising to the right: Sobel x = 8 per unit step inside, 0 at reflected edges.
        let (w, h) = (5, 3);
        let depth: Vec<f32> = (0..w * h).map(|i| (i % w) as f32).collect();
        let normal = normal_midas_map(&depth, w, h, 0.3);
        let px = |x: usize, y: usize| &normal[(y * w + x) * 3..][..3];
        let n = (64.0f32 + NORMAL_Z * NORMAL_Z).sqrt();
        let want = [
            ((NORMAL_Z / n) * 127.5 + 127.5) as u8,
            127,
            ((8.0 / n) * 127.5 + 127.5) as u8,
        ];
        assert_eq!(px(2, 1), want);
        assert_eq!(px(3, 0), want);
        // Column 1 is 0.25 of the range: below 0.3, flat.
        assert_eq!(px(1, 1), [255, 127, 127]);
        assert_eq!(px(4, 1), [255, 127, 127], "reflect-101 edge: no slope");
        let depth_map = depth_midas_map(&depth);
        assert_eq!(&depth_map[..5], &[0, 63, 127, 191, 255]);
    }
}
