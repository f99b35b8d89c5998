//! The extension's OpenPose body network (`annotator/openpose/model.py`'s `bodypose_model`)
//! and the run of `Body.__call__` (`body.py`) up to its two outputs:
//! - [`BodyNetwork`]: VGG-style convs with ReLU (`model0`: conv1_1..conv4_4_CPM with three
//!   2x2 max pools), then six stages of two branches, L1 (38 part affinity fields) and L2 (19
//!   heatmaps, the last the background); each later stage reads both previous outputs and
//!   `model0`'s features. The file's keys are the bare layer names (`conv1_1.weight`,
//!   `Mconv7_stage6_L2.bias`) that `util.transfer` maps onto the modules. The stages' last
//!   convs have no ReLU (`no_relu_layers`), except the heatmaps' of stage 6, which that list
//!   misses: the heatmaps come out clipped at 0.
//! - [`body_maps`]: the image (BGR) scaled by `0.5 * 368 / H` (`smart_resize_k`: area when
//!   shrinking, Lanczos-4 otherwise), padded right and down with 128 to a multiple of 8, fed
//!   as `v / 256 - 0.5`; each output channel enlarged 8 times (Lanczos-4), the pad cropped,
//!   and resized to the image (`smart_resize`).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::networks::{lllyasviel, AnnotatorFile};
use super::openpose_body::{body_pose, BodyPose};
use super::openpose_face::detect_face;
use super::openpose_hand::{detect_hands, CpmNetwork, Outputs};
use super::pose_draw::{draw_bodypose, draw_facepose, draw_handpose, Canvas};
use super::resize::{resize_area, resize_image_with_pad, Padded};
use super::resize_lanczos::{resize_area_f32, resize_lanczos4_f32, resize_lanczos4_u8};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file the extension loads the body network from (`annotator/downloads/openpose/`).
pub const BODY_POSE_FILE: &str = "body_pose_model.pth";

/// [`BodyNetwork`]'s weights file.
pub static BODY_POSE: AnnotatorFile = AnnotatorFile {
    name: BODY_POSE_FILE,
    subfolder: "openpose",
    hub: lllyasviel(BODY_POSE_FILE),
    load: |path| Ok(Arc::new(BodyNetwork::load(path, &Device::Cpu)?)),
};

/// `Body.__call__`'s constants: `boxsize`, `stride`, `padValue`, the one `scale_search`.
const BOXSIZE: f64 = 368.0;
const STRIDE: usize = 8;
const PAD_VALUE: u8 = 128;
const SCALE_SEARCH: f64 = 0.5;

/// One layer of a `make_layers` block.
pub(super) enum Layer {
    Conv(Conv2d, bool),
    Pool,
}

/// `model0`'s layers (name, kernel; `pool` for the max pools), in order.
const MODEL0: [(&str, usize); 15] = [
    ("conv1_1", 3),
    ("conv1_2", 3),
    ("pool", 2),
    ("conv2_1", 3),
    ("conv2_2", 3),
    ("pool", 2),
    ("conv3_1", 3),
    ("conv3_2", 3),
    ("conv3_3", 3),
    ("conv3_4", 3),
    ("pool", 2),
    ("conv4_1", 3),
    ("conv4_2", 3),
    ("conv4_3_CPM", 3),
    ("conv4_4_CPM", 3),
];

/// A conv of a state by its name, f32 on `device`: its padding is half its (odd, square)
/// kernel, as model.py's.
pub(super) fn conv_layer(
    state: &std::collections::HashMap<String, Tensor>,
    path: &Path,
    name: &str,
    relu: bool,
    device: &Device,
) -> Result<Layer> {
    let bad = |message: String| PipelineError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let get = |key: String| -> Result<Tensor> {
        let t = state
            .get(&key)
            .ok_or_else(|| bad(format!("{key} is missing (not this OpenPose network)")))?;
        Ok(t.to_dtype(DType::F32)?.to_device(device)?)
    };
    let weight = get(format!("{name}.weight"))?;
    let bias = get(format!("{name}.bias"))?;
    let k = match *weight.dims() {
        [o, _, k, k2] if k == k2 && k % 2 == 1 && bias.dims() == [o] => k,
        ref d => return Err(bad(format!("{name}.weight has shape {d:?}"))),
    };
    Ok(Layer::Conv(Conv2d::new(weight, Some(bias), 1, k / 2), relu))
}

/// `bodypose_model` with its weights, in f32.
pub struct BodyNetwork {
    model0: Vec<Layer>,
    /// `stages[s][b]`: stage s + 1's branch L(b + 1).
    stages: Vec<[Vec<Layer>; 2]>,
    device: Device,
}

impl std::fmt::Debug for BodyNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyNetwork")
            .field("stages", &self.stages.len())
            .finish()
    }
}

pub(super) fn run(layers: &[Layer], x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    for layer in layers {
        x = match layer {
            Layer::Conv(conv, relu) => {
                let y = conv.forward(&x)?;
                if *relu {
                    y.relu()?
                } else {
                    y
                }
            }
            Layer::Pool => x.max_pool2d((2, 2))?,
        };
    }
    Ok(x)
}

impl BodyNetwork {
    /// The network of a `body_pose_model.pth` (a torch pickle, read without running it) or a
    /// `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let conv = |name: &str, relu: bool| conv_layer(&state, path, name, relu, device);
        let mut model0 = Vec::new();
        for (name, _) in MODEL0 {
            model0.push(if name == "pool" {
                Layer::Pool
            } else {
                conv(name, true)?
            });
        }
        let mut stages = Vec::new();
        for s in 1..=6 {
            let branch = |b: usize| -> Result<Vec<Layer>> {
                let names: Vec<String> = if s == 1 {
                    (1..=5).map(|i| format!("conv5_{i}_CPM_L{b}")).collect()
                } else {
                    (1..=7).map(|i| format!("Mconv{i}_stage{s}_L{b}")).collect()
                };
                // model.py's `no_relu_layers` names every stage's last conv but stage 6's L2
                // (it lists Mconv7_stage6_L1 twice): that one keeps its ReLU.
                let last = names.len() - 1;
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| conv(n, i != last || (s, b) == (6, 2)))
                    .collect()
            };
            stages.push([branch(1)?, branch(2)?]);
        }
        let net = Self {
            model0,
            stages,
            device: device.clone(),
        };
        Ok(net)
    }

    /// The last stage's outputs for an NCHW input: (PAFs `[1, 38, h, w]`, heatmaps
    /// `[1, 19, h, w]`) at an eighth of its size.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let features = run(&self.model0, x)?;
        let mut input = features.clone();
        let mut out = None;
        for stage in &self.stages {
            let l1 = run(&stage[0], &input)?;
            let l2 = run(&stage[1], &input)?;
            input = Tensor::cat(&[&l1, &l2, &features], 1)?;
            out = Some((l1, l2));
        }
        Ok(out.expect("six stages"))
    }
}

/// A stack of one-channel f32 maps of one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Maps {
    pub width: usize,
    pub height: usize,
    /// Channel-major: channel c's map at `data[c * width * height..]`.
    pub data: Vec<f32>,
}

impl Maps {
    pub fn channels(&self) -> usize {
        self.data.len() / (self.width * self.height).max(1)
    }

    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    /// Each channel through `f(map, w, h) -> (map, w2, h2)`.
    fn map_each(&self, f: impl Fn(&[f32], usize, usize) -> (Vec<f32>, usize, usize)) -> Maps {
        let mut data = Vec::new();
        let (mut w2, mut h2) = (0, 0);
        for c in 0..self.channels() {
            let (m, w, h) = f(self.channel(c), self.width, self.height);
            (w2, h2) = (w, h);
            data.extend(m);
        }
        Maps {
            width: w2,
            height: h2,
            data,
        }
    }
}

/// The size `smart_resize_k` makes: `int(side * f)`.
fn scaled(side: usize, f: f64) -> usize {
    (side as f64 * f) as usize
}

/// `smart_resize_k` / `smart_resize` of an 8-bit image: area when `k < 1`, Lanczos-4 otherwise.
pub(super) fn smart_resize_u8(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    if (w, h) == (w0, h0) {
        return image.clone();
    }
    let k = (h as f64 + w as f64) / (h0 as f64 + w0 as f64);
    if k < 1.0 {
        resize_area(image, w, h)
    } else {
        resize_lanczos4_u8(image, w, h)
    }
}

/// The same for one f32 channel.
fn smart_resize_f32(map: &[f32], w0: usize, h0: usize, w: usize, h: usize) -> Vec<f32> {
    let k = (h as f64 + w as f64) / (h0 as f64 + w0 as f64);
    if k < 1.0 {
        resize_area_f32(map, w0, h0, w, h)
    } else {
        resize_lanczos4_f32(map, w0, h0, w, h)
    }
}

/// `padRightDownCorner(image, 8, 128)` fed as the extension feeds its networks: BGR planes
/// `[1, 3, h, w]` of `v / 256 - 0.5` (on the CPU), and the unpadded size.
pub(super) fn bgr_input(image: &RgbImage) -> Result<(Tensor, usize, usize)> {
    let (w, h) = (image.width as usize, image.height as usize);
    let pad = |s: usize| {
        if s.is_multiple_of(STRIDE) {
            0
        } else {
            STRIDE - s % STRIDE
        }
    };
    let (pw, ph) = (w + pad(w), h + pad(h));
    let mut planes = vec![f32::from(PAD_VALUE) / 256.0 - 0.5; 3 * pw * ph];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = image.pixels[(y * w + x) * 3 + 2 - c];
                planes[c * pw * ph + y * pw + x] = f32::from(v) / 256.0 - 0.5;
            }
        }
    }
    Ok((
        Tensor::from_vec(planes, (1, 3, ph, pw), &Device::Cpu)?,
        w,
        h,
    ))
}

/// The network's raw outputs for `image` (the RGB image the extension converts to BGR):
/// (PAFs, heatmaps) at an eighth of the padded scaled image, and that scaled image's size.
pub fn body_outputs(net: &BodyNetwork, image: &RgbImage) -> Result<(Maps, Maps, usize, usize)> {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let scale = SCALE_SEARCH * BOXSIZE / h0 as f64;
    let resized = smart_resize_u8(image, scaled(w0, scale), scaled(h0, scale));
    let (input, w, h) = bgr_input(&resized)?;
    let input = input.to_device(&net.device)?;
    let (paf, heat) = net.forward(&input)?;
    let to_maps = |t: &Tensor| -> Result<Maps> {
        let (_, _, oh, ow) = t.dims4()?;
        Ok(Maps {
            width: ow,
            height: oh,
            data: t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        })
    };
    Ok((to_maps(&paf)?, to_maps(&heat)?, w, h))
}

/// `Body.__call__` up to `heatmap_avg` and `paf_avg`: the network's outputs at `image`'s
/// size, (PAFs, heatmaps).
pub fn body_maps(net: &BodyNetwork, image: &RgbImage) -> Result<(Maps, Maps)> {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let (paf, heat, w, h) = body_outputs(net, image)?;
    Ok((
        outputs_to_image(&paf, w, h, w0, h0),
        outputs_to_image(&heat, w, h, w0, h0),
    ))
}

/// A stride-8 output enlarged 8 times, cropped to the scaled image's `w` x `h` (the pad off)
/// and resized to the image's `w0` x `h0`, each channel on its own.
pub fn outputs_to_image(out: &Maps, w: usize, h: usize, w0: usize, h0: usize) -> Maps {
    out.map_each(|m, ow, oh| {
        let (bw, bh) = (ow * STRIDE, oh * STRIDE);
        let big = smart_resize_f32(m, ow, oh, bw, bh);
        let cropped: Vec<f32> = (0..h)
            .flat_map(|y| big[y * bw..y * bw + w].iter().copied())
            .collect();
        (smart_resize_f32(&cropped, w, h, w0, h0), w0, h0)
    })
}

/// A person as `detect_poses` holds one: the body (keypoints in pixels), and each hand's 21
/// and the face's keypoints normalized by the image's size in float32 (`-1 / size` for a
/// point not found), `None` where not looked for or not found.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub body: BodyPose,
    pub hand_left: Option<Vec<(f32, f32)>>,
    pub hand_right: Option<Vec<(f32, f32)>>,
    pub face: Option<Vec<(f32, f32)>>,
}

/// What a module detects and draws (`include_body`, `include_hand`, `include_face`): the
/// body is always detected (hands and face are found from it), drawn only with `body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Include {
    pub body: bool,
    pub hand: bool,
    pub face: bool,
}

/// A body's keypoints in pixels, as f64.
fn body_pixels(body: &BodyPose) -> Vec<Option<(f64, f64)>> {
    body.keypoints
        .iter()
        .map(|k| k.map(|p| (p.x as f64, p.y as f64)))
        .collect()
}

/// `detect_poses` after the body: each body's hands (where `hand` is given) and face (where
/// `face` is given) found in `image` (the padded RGB image).
pub fn detect_people(
    image: &RgbImage,
    bodies: Vec<BodyPose>,
    hand: Option<Outputs>,
    face: Option<Outputs>,
) -> Result<Vec<Person>> {
    bodies
        .into_iter()
        .map(|body| {
            let pixels = body_pixels(&body);
            let (hand_left, hand_right) = match hand {
                Some(net) => detect_hands(net, image, &pixels)?,
                None => (None, None),
            };
            let face = match face {
                Some(net) => detect_face(net, image, &pixels)?,
                None => None,
            };
            Ok(Person {
                body,
                hand_left,
                hand_right,
                face,
            })
        })
        .collect()
}

/// `draw_poses(poses, H, W, draw_body, draw_hand, draw_face)` on black: per person its body
/// (keypoints normalized by the image's size), left and right hands, then face.
pub fn draw_poses(people: &[Person], width: u32, height: u32, include: Include) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let mut pixels = vec![0u8; w * h * 3];
    let mut canvas = Canvas {
        pixels: &mut pixels,
        width: w,
        height: h,
    };
    for person in people {
        if include.body {
            let keypoints: Vec<Option<(f64, f64)>> = body_pixels(&person.body)
                .iter()
                .map(|k| k.map(|(x, y)| (x / w as f64, y / h as f64)))
                .collect();
            draw_bodypose(&mut canvas, &keypoints);
        }
        if include.hand {
            for hand in [&person.hand_left, &person.hand_right]
                .into_iter()
                .flatten()
            {
                draw_handpose(&mut canvas, hand);
            }
        }
        if include.face {
            if let Some(face) = &person.face {
                draw_facepose(&mut canvas, face);
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// One person of the extension's pose JSON (`encode_poses_as_json`): the body's 18 keypoints
/// normalized by the padded image's size (`None`: not found), the hands' and the face's
/// (float32, as found).
#[derive(Debug, Clone, PartialEq)]
pub struct PoseJson {
    pub body: Vec<Option<(f64, f64)>>,
    pub hand_left: Option<Vec<(f32, f32)>>,
    pub hand_right: Option<Vec<(f32, f32)>>,
    pub face: Option<Vec<(f32, f32)>>,
}

/// The people of a map as the extension's pose JSON holds them, and the padded image's size
/// (`canvas_width`, `canvas_height`).
#[derive(Debug, Clone, PartialEq)]
pub struct Poses {
    pub people: Vec<PoseJson>,
    pub canvas_width: u32,
    pub canvas_height: u32,
}

/// The people as the pose JSON holds them, for an image of `width` x `height`.
pub fn poses_json(people: &[Person], width: u32, height: u32) -> Poses {
    let (w, h) = (f64::from(width), f64::from(height));
    Poses {
        people: people
            .iter()
            .map(|p| PoseJson {
                body: body_pixels(&p.body)
                    .iter()
                    .map(|k| k.map(|(x, y)| (x / w, y / h)))
                    .collect(),
                hand_left: p.hand_left.clone(),
                hand_right: p.hand_right.clone(),
                face: p.face.clone(),
            })
            .collect(),
        canvas_width: width,
        canvas_height: height,
    }
}

/// The networks an OpenPose module runs: the body's, and the hands' and the face's where it
/// includes them.
pub struct PoseNetworks<'a> {
    pub body: &'a BodyNetwork,
    pub hand: Option<&'a CpmNetwork>,
    pub face: Option<&'a CpmNetwork>,
}

/// The legacy OpenPose modules (`OpenposeModel.run_model`): the image padded
/// (`resize_image_with_pad`), its people and their map, the pad cropped off the map.
pub fn openpose_module(
    nets: &PoseNetworks,
    image: &RgbImage,
    resolution: u32,
    include: Include,
) -> Result<(RgbImage, Poses)> {
    let padded = resize_image_with_pad(image, resolution);
    let (paf, heat) = body_maps(nets.body, &padded.image)?;
    let hand = nets.hand.map(|n| move |x: &Tensor| n.forward(x));
    let face = nets.face.map(|n| move |x: &Tensor| n.forward(x));
    let people = detect_people(
        &padded.image,
        body_pose(&paf, &heat),
        hand.as_ref().map(|f| f as Outputs),
        face.as_ref().map(|f| f as Outputs),
    )?;
    let (w, h) = (padded.image.width, padded.image.height);
    let map = draw_poses(&people, w, h, include);
    Ok((
        Padded {
            image: map,
            ..padded
        }
        .crop_rgb(),
        poses_json(&people, w, h),
    ))
}
