//! The native `controlnets` entries (the ControlNets a request uses, their preprocessors and
//! hires passes) in the request and the metadata.

use sdserve_pipeline::controlnet::{ControlMode, HiresOption};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One ControlNet of a request and its control image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlNetUse {
    /// A ControlNet of CONTROLNET_DIR by name (`GET /controlnets`): a file's stem or a
    /// diffusers folder's name. 1..=255 characters. Required, except with the reference
    /// preprocessors, which take none (absent or null; a name there is a 422).
    #[schema(min_length = 1, example = "control_v11p_sd15_canny", nullable = true)]
    pub model: Option<String>,
    /// The control image (an edge map, a pose, a depth map: already preprocessed), or with
    /// `preprocessor` the photo it is made from; base64 PNG, JPEG or WebP (a
    /// `data:image/...;base64,` prefix is allowed), at most 4096 pixels a side and 16 MP. The
    /// control map is resized (Lanczos) to the request's width and height and given to the
    /// ControlNet as RGB in [0, 1], as diffusers' control image processor does.
    #[schema(example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub image: String,
    /// Makes the control map from `image` before use, as the sd-webui-controlnet extension's
    /// preprocessor of that name; absent or null: `image` is the map.
    #[schema(nullable = true)]
    pub preprocessor: Option<ControlNetPreprocessor>,
    /// diffusers' `controlnet_conditioning_scale`: the residuals' weight.
    #[schema(minimum = 0.0, maximum = 2.0, default = 1.0, nullable = true)]
    pub scale: Option<f64>,
    /// diffusers' `control_guidance_start`: the fraction of the steps before which it does
    /// not steer (below `guidance_end`).
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.0, nullable = true)]
    pub guidance_start: Option<f64>,
    /// diffusers' `control_guidance_end`: the fraction of the steps after which it does not
    /// steer.
    #[schema(minimum = 0.0, maximum = 1.0, default = 1.0, nullable = true)]
    pub guidance_end: Option<f64>,
    /// With `hires`: the passes it steers (the sd-webui-controlnet extension's `hr_option`):
    /// `both` (the default: the second pass with the image resized to the hires size),
    /// `low_res_only`, `high_res_only`. Without `hires` it steers the one pass.
    #[schema(nullable = true, default = "both")]
    pub hr_option: Option<HiresOptionName>,
    /// With `inpaint.area` `only_masked` (A1111's "only masked" inpainting): true crops the
    /// control image as the init image is cropped (resized to the init image's size, cut to
    /// the mask's region, fitted to the request's size as A1111's resize and fill), the
    /// sd-webui-controlnet extension's `inpaint_crop_input_image`; false uses it whole (a map
    /// already made for the region). Otherwise it changes nothing.
    #[schema(nullable = true, default = true)]
    pub inpaint_crop: Option<bool>,
    /// The sd-webui-controlnet extension's control mode: `balanced` (the default; diffusers'
    /// semantics: every residual times `scale`, on the prompt's and the negative prompt's
    /// UNet rows), `prompt` ("My prompt is more important": residual `i` of the 13, the skip
    /// connections from the top and the mid block last, times `scale * 0.825^(12 - i)`), or
    /// `controlnet` ("ControlNet is more important": those weights, on the prompt's rows
    /// only; without guidance it is `prompt`). A ControlNet whose config pools its residuals
    /// (`global_pool_conditions`, shuffle) steers the prompt's rows only in every mode. In the
    /// hires pass a unit with the `canny` preprocessor takes the `prompt` weights, as the
    /// extension forces there.
    #[schema(nullable = true, default = "balanced")]
    pub control_mode: Option<ControlModeName>,
    /// With the `inpaint`, `inpaint_only` and `inpaint_only+lama` preprocessors (only with
    /// them): the mask of `image`, of its size; white repaints (its first channel above 127
    /// once resized with the image to the request's size). Absent: with `init_image` and
    /// `mask_image`, the request's mask (as the extension takes A1111's inpainting mask),
    /// else a 422.
    #[schema(nullable = true, example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub mask: Option<String>,
}

/// The extension's control modes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ControlModeName {
    #[default]
    Balanced,
    Prompt,
    #[serde(rename = "controlnet")]
    ControlNet,
}

/// The passes of a hires request a ControlNet steers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub enum HiresOptionName {
    #[default]
    #[serde(rename = "both")]
    Both,
    #[serde(rename = "low_res_only")]
    LowResOnly,
    #[serde(rename = "high_res_only")]
    HighResOnly,
}

/// A model-free ControlNet preprocessor, as the sd-webui-controlnet extension runs it; each
/// broken rule is a 422 naming `controlnets[i].preprocessor.<key>`. Each type takes only its
/// own keys.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlNetPreprocessor {
    /// What makes the map (the image is first scaled so its shorter side is `resolution`:
    /// OpenCV's cubic enlarging, area shrinking, as the extension does, except for `invert`
    /// and `tile_resample`): `canny`: OpenCV's Canny edges, white on black; `invert`: `255 -
    /// image` (white lines on black from black lines on white); `threshold`: white where every
    /// channel is above `threshold`; `lineart_standard`: dark lines on a light ground as white
    /// lines (the image minus its Gaussian blur, σ 6, scaled by the median line strength);
    /// `scribble_xdog`: XDoG edges (the difference of Gaussian blurs σ 0.5 and 5) above
    /// `threshold`; `blur_gaussian`: OpenCV's Gaussian blur with `sigma` (for tile
    /// ControlNets); `tile_resample`: the image shrunk by `down_sampling_rate` (area
    /// resampling; below 1.1 unchanged); `color`: the extension's `t2ia_color_grid`, the
    /// image scaled (OpenCV's area resize) so its shorter side is `resolution`, as a grid of
    /// 64-pixel colour cells (for T2I-Adapter color); `shuffle`: the image (at `resolution`)
    /// warped by a smooth random flow drawn from numpy's generator seeded with `seed`, as the
    /// extension's `ContentShuffleDetector` (for shuffle ControlNets); `softedge_hed`: the HED
    /// network's soft edges, `softedge_hedsafe` the same quantized to 0, 127, 255,
    /// `scribble_hed` them thinned to white strokes (these three need `ControlNetHED.pth` in
    /// the server's ANNOTATOR_DIR); `lineart_realistic`, `lineart_coarse`, `lineart_anime`:
    /// the extension's lineart networks' lines, white on black (they need `sk_model.pth`,
    /// `sk_model2.pth`, `netG.pth` in ANNOTATOR_DIR); `lineart_anime_denoise`: the
    /// extension's manga_line network's lines of the grey image, white on black (`erika.pth`
    /// in ANNOTATOR_DIR); `softedge_pidinet`, `softedge_pidisafe`,
    /// `scribble_pidinet`: the three HED ones' kinds from the PiDiNet network
    /// (`table5_pidinet.pth` in ANNOTATOR_DIR); `softedge_teed`: the TEED network's soft edges,
    /// quantized to `safe_steps` + 1 levels (`7_model.pth` in ANNOTATOR_DIR);
    /// `softedge_anyline`: the same network with MistoLine's weights (`MTEED.pth` in
    /// ANNOTATOR_DIR), the faint lines lineart_standard finds (its value 1, in components of 12
    /// pixels or more) set to 1; `mlsd`: the M-LSD
    /// network's straight line segments, one pixel wide, white on black
    /// (`mlsd_large_512_fp32.pth` in ANNOTATOR_DIR); `depth_anything_v2`: Depth Anything V2's
    /// relative depth, near light, min-max scaled to 0..255, grey
    /// (`depth_anything_v2_vitl.safetensors` in ANNOTATOR_DIR); `depth_anything`: the same from
    /// Depth Anything (v1) (`depth_anything_vitl14.pth` in ANNOTATOR_DIR); `depth_midas`: the
    /// same from MiDaS DPT-Hybrid (`dpt_hybrid-midas-501f0c75.pt` in ANNOTATOR_DIR);
    /// `normal_midas`: a normal map (RGB) from that depth's slopes, flat below
    /// `background_threshold`; `normal_bae`: Bae et al.'s surface normals (x, y, z as R, G,
    /// B; `scannet.pt` in ANNOTATOR_DIR);
    /// `depth_leres`: LeReS's relative depth, near light, min-max
    /// scaled, the nearest flattened to white by `remove_near` and the farthest to black by
    /// `remove_background` (`res101.pth` in ANNOTATOR_DIR); `openpose`: OpenPose's body
    /// keypoints of each person found, coloured limbs and joints on black
    /// (`body_pose_model.pth` in ANNOTATOR_DIR); `openpose_hand`: with each body's hands
    /// (21 keypoints, rainbow bones, blue joints; also `hand_pose_model.pth`);
    /// `openpose_face`: with each body's face (70 landmarks as white dots; also
    /// `facenet.pth`); `openpose_faceonly`: the faces alone; `openpose_full`: bodies, hands
    /// and faces (all three files); `recolor_luminance`: the image's lightness (Lab's L, the
    /// RGB image converted as if it were BGR, as the extension does) raised to `gamma`, grey,
    /// at the image's own size; `recolor_intensity`: the same with HSV's V (for the recolor
    /// ControlNets, which colour a grey image). A unit with a recolor preprocessor also
    /// recolours the result as the extension does: after decoding, each image's L (or V) is
    /// replaced by the unit's control map at the request's size (the hires size with `hires`),
    /// so the result keeps the grey image's lightness exactly and takes only its colours from
    /// the model; `inpaint` (the extension's inpaint_global_harmonious) and `inpaint_only`:
    /// the image as it is, with the unit's `mask` (for an inpaint ControlNet such as
    /// control_v11p_sd15_inpaint: the masked pixels reach it as -1); `inpaint_only` also
    /// keeps everything outside the mask: after each step the prediction there is the image's
    /// (its VAE latents, the mask max-pooled to the latent grid, by `scale` up to 1), and
    /// after decoding the image outside the mask (dilated and blurred by 7 pixels) is the
    /// unit's image; on inpainting with `mask_image` it acts as `inpaint`, as the extension
    /// does; `inpaint_only+lama`: the masked area of the image first painted by LaMa
    /// (`ControlNetLama.pth` in ANNOTATOR_DIR; at 256 on the shorter side, resized back and
    /// blended by the mask), that image then as `inpaint_only` (also on inpainting), and the
    /// starting noise of the first pass carries its VAE latents (`sqrt(ac) * latents +
    /// sqrt(1 - ac) * noise` at timestep 999, the extension's noise modifier);
    /// `reference_only`, `reference_adain`, `reference_adain+attn`: no ControlNet model (the
    /// unit has no `model`): the image (resized to each pass's size, VAE-encoded) steers the
    /// UNet itself, as the extension's reference modules: before each step the unit steers,
    /// the UNet runs once on the image's latents noised to the step, banking each
    /// self-attention's input (`reference_only`), its blocks' mean and variance
    /// (`reference_adain`) or both, for the modules whose threshold is below `scale`; the
    /// step then attends over its own and the banked tokens and renormalises those blocks to
    /// the banked statistics, the negative prompt's rows mixed back by `style_fidelity` (0 in
    /// `prompt` control mode and in the hires pass, 1 in `controlnet` mode); `none`: the
    /// image is the map.
    /// Other model-based preprocessors (depth_leres++, depth_zoe, dw_openpose_full, ...) are not run
    /// here: send their map as `image`.
    #[serde(rename = "type")]
    pub kind: PreprocessorType,
    /// `canny`: the hysteresis's low threshold on the L1 gradient (the extension's slider).
    /// A number, as the extension's float slider: kept as sent (the infotext writes it),
    /// Canny runs on its integer part.
    #[schema(minimum = 1.0, maximum = 255.0, default = 100.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_threshold: Option<f64>,
    /// `canny`: the high threshold (a pixel above it starts an edge; swapped with
    /// `low_threshold` when below it, as OpenCV does); a number as `low_threshold`.
    #[schema(minimum = 1.0, maximum = 255.0, default = 200.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_threshold: Option<f64>,
    /// `threshold`: 0..=255, default 127 (a pixel is white when its darkest channel is above
    /// it); `scribble_xdog`: 1..=64, default 32 (an edge is white when twice its strength,
    /// in 8 bits, is above it). A number, as the extension's float sliders: kept as sent (the
    /// infotext writes it), only its integer part counts.
    #[schema(minimum = 0.0, maximum = 255.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// `blur_gaussian`: the blur's standard deviation in pixels at the processor resolution.
    #[schema(minimum = 0.01, maximum = 64.0, default = 9.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
    /// `tile_resample`: the image's sides are divided by it (`int(side / rate)`; a side
    /// shrunk to nothing is refused); below 1.1 the image is the map.
    #[schema(minimum = 1.0, maximum = 8.0, default = 1.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_sampling_rate: Option<f64>,
    /// `mlsd`: a segment is drawn where its centre's score (a sigmoid, 0..1) is above it (the
    /// extension's `MLSD Value Threshold`).
    #[schema(minimum = 0.01, maximum = 2.0, default = 0.1, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_threshold: Option<f64>,
    /// `mlsd`: and where it is longer than this, in pixels of the half-size map the network
    /// makes at the processor resolution (the extension's `MLSD Distance Threshold`).
    #[schema(minimum = 0.01, maximum = 20.0, default = 0.1, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_threshold: Option<f64>,
    /// `shuffle`: the seed of numpy's legacy generator (`np.random.seed`), which draws the
    /// flow. Default: the one the extension sets before each unit (`set_numpy_seed`), the
    /// request's `seed` plus its `variation_seed` (the seed again without one), modulo 2^32.
    /// A request without `seed` has its seed drawn at submit, so the map follows it too and
    /// the metadata's `seed` reproduces the image. The metadata carries the one used.
    #[schema(minimum = 0, maximum = 4294967295_u32, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// `softedge_teed`, `softedge_anyline`: the edges are quantized by the extension's `safe_step` to this many
    /// steps above 0 (0: left soft). A number, as the extension's slider: kept as sent (the
    /// infotext writes it), only its integer part counts.
    #[schema(minimum = 0.0, maximum = 10.0, default = 2.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_steps: Option<f64>,
    /// `normal_midas`: where the depth, min-max scaled to 0..1, is below it, the normal
    /// faces the viewer (the extension's `Normal Background Threshold`).
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.4, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_threshold: Option<f64>,
    /// `recolor_luminance`, `recolor_intensity`: the extension's Gamma Correction, the
    /// exponent the 0..1 level is raised to (below 1 lightens, above darkens).
    #[schema(minimum = 0.1, maximum = 2.0, default = 1.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// `depth_leres`: Remove Near %: on the map before it is inverted (far light), the values
    /// not above this share of 255 (its integer part) become 0, so the nearest turn white in
    /// the result. A number, as the extension's slider (step 0.1); 0: off.
    #[schema(minimum = 0.0, maximum = 100.0, default = 0.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_near: Option<f64>,
    /// `depth_leres`: Remove Background %: the same on the inverted map (near light), so the
    /// farthest become black. 0: off.
    #[schema(minimum = 0.0, maximum = 100.0, default = 0.0, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_background: Option<f64>,
    /// The reference preprocessors: the extension's Style Fidelity (only for Balanced mode):
    /// how far the negative prompt's rows keep their own attention and statistics (1: wholly,
    /// 0: they take the reference's as the prompt's rows do).
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.5, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_fidelity: Option<f64>,
    /// All but `invert`, `tile_resample`, the recolor ones and `none`: the processor resolution (`color`: at
    /// least 64, one cell), the shorter
    /// side of the image the map is made at (the map is then resized to the request's size);
    /// the scaled image must keep the image rule (at most 4096 pixels a side, 16 MP).
    /// `softedge_anyline`: 1280 by default (its own slider's), and a multiple of 64 (the
    /// extension fails at any other).
    #[schema(minimum = 64, maximum = 2048, default = 512, nullable = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
}

/// The preprocessors this server runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PreprocessorType {
    None,
    Canny,
    Invert,
    Threshold,
    LineartStandard,
    ScribbleXdog,
    BlurGaussian,
    TileResample,
    Color,
    Shuffle,
    SoftedgeHed,
    SoftedgeHedsafe,
    ScribbleHed,
    LineartRealistic,
    LineartCoarse,
    LineartAnime,
    LineartAnimeDenoise,
    SoftedgePidinet,
    SoftedgePidisafe,
    ScribblePidinet,
    SoftedgeTeed,
    SoftedgeAnyline,
    Mlsd,
    DepthAnything,
    DepthAnythingV2,
    DepthMidas,
    NormalMidas,
    NormalBae,
    DepthLeres,
    Openpose,
    OpenposeHand,
    OpenposeFace,
    OpenposeFaceonly,
    OpenposeFull,
    RecolorLuminance,
    RecolorIntensity,
    Inpaint,
    InpaintOnly,
    #[serde(rename = "inpaint_only+lama")]
    InpaintOnlyLama,
    ReferenceOnly,
    ReferenceAdain,
    #[serde(rename = "reference_adain+attn")]
    ReferenceAdainAttn,
}

/// A ControlNet a result was made with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ControlNetMetadata {
    /// Its name; "None" for a reference unit (as the extension writes it).
    pub model: String,
    /// The preprocessor that made the control map from the upload, with every setting;
    /// absent when the upload was the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessor: Option<ControlNetPreprocessor>,
    pub scale: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// The passes of a hires request it steered (`both` without one).
    #[serde(default)]
    pub hr_option: HiresOptionName,
    /// How its residuals were weighted (`control_mode`).
    #[serde(default)]
    pub control_mode: ControlModeName,
}

impl From<HiresOption> for HiresOptionName {
    fn from(o: HiresOption) -> Self {
        match o {
            HiresOption::Both => Self::Both,
            HiresOption::LowResOnly => Self::LowResOnly,
            HiresOption::HighResOnly => Self::HighResOnly,
        }
    }
}

impl From<ControlMode> for ControlModeName {
    fn from(m: ControlMode) -> Self {
        match m {
            ControlMode::Balanced => Self::Balanced,
            ControlMode::Prompt => Self::Prompt,
            ControlMode::ControlNet => Self::ControlNet,
        }
    }
}
