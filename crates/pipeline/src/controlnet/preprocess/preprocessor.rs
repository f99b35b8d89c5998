//! [`Preprocessor`]: a module with its settings as a request names it, what it needs (its
//! network's file, the mask) and how it runs on an image.

use serde::{Deserialize, Serialize};

use super::*;

/// A preprocessor with its settings, as a request names it. The settings are the extension's
/// sliders (`threshold_a`, `threshold_b`, `processor_res`); the float sliders keep their
/// value as given (the infotext writes it), though compared with 8-bit values only its
/// integer part counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Preprocessor {
    /// `PreprocessorCanny`: OpenCV's Canny at the processor resolution (the extension's
    /// sliders: thresholds 1..=255, 100 and 200 by default; resolution 512). The thresholds
    /// are the float sliders' values; Canny runs on their integer parts (`int(slider_1)`).
    Canny {
        low_threshold: f64,
        high_threshold: f64,
        resolution: u32,
    },
    /// `PreprocessorInvert`: `255 - image` at the image's size (no resolution).
    Invert,
    /// The legacy `threshold`: white where every channel is above `threshold` (0..=255, 127).
    Threshold {
        threshold: f64,
        resolution: u32,
    },
    /// The legacy `lineart_standard`: dark lines on a light ground as white lines.
    LineartStandard {
        resolution: u32,
    },
    /// `PreprocessorScribbleXdog`: the XDoG edges above `threshold` (1..=64, 32).
    ScribbleXdog {
        threshold: f64,
        resolution: u32,
    },
    /// `PreprocessorBlurGaussian`: OpenCV's Gaussian blur with `sigma` (0.01..=64, 9).
    BlurGaussian {
        sigma: f64,
        resolution: u32,
    },
    /// The legacy `tile_resample`: the image shrunk by `down_sampling_rate` (1..=8, 1; below
    /// 1.1 unchanged), at the image's size otherwise (no resolution).
    TileResample {
        down_sampling_rate: f64,
    },
    /// The legacy `color` (`t2ia_color_grid`): the image scaled so its shorter side is the
    /// resolution (no pad), as a grid of 64-pixel colour cells.
    Color {
        resolution: u32,
    },
    /// `PreprocessorShuffle`: the image warped by a random flow drawn from numpy's generator
    /// seeded with `seed` (the extension's resolution slider is hidden: 512).
    Shuffle {
        resolution: u32,
        seed: u32,
    },
    /// The legacy `hed` (`softedge_hed`): the HED network's soft edges.
    SoftedgeHed {
        resolution: u32,
    },
    /// The legacy `hed_safe` (`softedge_hedsafe`): the same quantized to 0, 127, 255.
    SoftedgeHedsafe {
        resolution: u32,
    },
    /// The legacy `scribble_hed`: HED's edges thinned and thickened to white strokes.
    ScribbleHed {
        resolution: u32,
    },
    /// The legacy `lineart` (`lineart_realistic`): the `sk_model.pth` generator's lines,
    /// white on black.
    LineartRealistic {
        resolution: u32,
    },
    /// The legacy `lineart_coarse`: the same with `sk_model2.pth`.
    LineartCoarse {
        resolution: u32,
    },
    /// The legacy `lineart_anime`: the `netG.pth` U-Net's lines, white on black.
    LineartAnime {
        resolution: u32,
    },
    /// The legacy `lineart_anime_denoise`: the `erika.pth` network's (manga_line's) lines of
    /// the grey image, white on black.
    LineartAnimeDenoise {
        resolution: u32,
    },
    /// The legacy `pidinet` (`softedge_pidinet`): the PiDiNet network's soft edges.
    SoftedgePidinet {
        resolution: u32,
    },
    /// The legacy `pidinet_safe` (`softedge_pidisafe`): the same quantized to 0, 127, 255.
    SoftedgePidisafe {
        resolution: u32,
    },
    /// The legacy `pidinet_scribble` (`scribble_pidinet`): PiDiNet's edges thinned and
    /// thickened as scribble_hed's.
    ScribblePidinet {
        resolution: u32,
    },
    /// `PreprocessorTEED` (`softedge_teed`): the TEED network's soft edges, quantized by
    /// `safe_step` to `safe_steps` + 1 levels (its slider: 0..=10, 2; 0 leaves them soft; its
    /// integer part counts, `int(slider_1)`).
    SoftedgeTeed {
        safe_steps: f64,
        resolution: u32,
    },
    /// `PreprocessorAnyline` (`softedge_anyline`): TEED's soft edges with MistoLine's
    /// `MTEED.pth` (`safe_steps` as softedge_teed's), the faint lines of lineart_standard
    /// (value 1) that form components of 12 pixels or more set to 1. Its resolution slider
    /// defaults to 1280; it must be a multiple of 64 (the extension fails otherwise).
    SoftedgeAnyline {
        safe_steps: f64,
        resolution: u32,
    },
    /// The legacy `mlsd`: the M-LSD network's straight segments, white on black, those with
    /// a centre score above `value_threshold` (0.01..=2, 0.1) and longer than
    /// `distance_threshold` (0.01..=20, 0.1; in pixels at half the padded image's size).
    Mlsd {
        value_threshold: f64,
        distance_threshold: f64,
        resolution: u32,
    },
    /// The legacy `depth_anything` (colored=False): Depth Anything (v1)'s relative depth, near
    /// light, min-max scaled (the extension hides its resolution slider: 512).
    DepthAnything {
        resolution: u32,
    },
    /// The legacy `depth_anything_v2` (colored=False): Depth Anything V2's relative depth,
    /// near light, min-max scaled (the extension hides its resolution slider: 512).
    DepthAnythingV2 {
        resolution: u32,
    },
    /// The legacy `midas` (`depth_midas`): MiDaS DPT-Hybrid's relative depth, near light,
    /// min-max scaled.
    DepthMidas {
        resolution: u32,
    },
    /// The legacy `midas_normal` (`normal_midas`): a normal map from the same depth's Sobel
    /// slopes, flat where the scaled depth is below `background_threshold` (0..=1, 0.4).
    NormalMidas {
        background_threshold: f64,
        resolution: u32,
    },
    /// The legacy `normal_bae`: Bae et al.'s surface normals (NNET on EfficientNet-B5,
    /// scannet.pt), x, y, z as R, G, B.
    NormalBae {
        resolution: u32,
    },
    /// The legacy `leres` with boost=False (`depth_leres`): LeReS's relative depth, near
    /// light, with Remove Near % (`remove_near`: values not above that share of 255 zeroed
    /// before the map is inverted, so the nearest turn white) and Remove Background %
    /// (`remove_background`: the same after, the farthest black), both 0..=100, 0 (off).
    DepthLeres {
        remove_near: f64,
        remove_background: f64,
        resolution: u32,
    },
    /// The legacy `openpose` (include_body only): OpenPose's body keypoints of each person
    /// found, drawn as coloured limbs and joints on black.
    Openpose {
        resolution: u32,
    },
    /// The legacy `openpose_hand`: the bodies and each one's hands (hand_pose_model.pth).
    OpenposeHand {
        resolution: u32,
    },
    /// The legacy `openpose_face`: the bodies and each one's face (facenet.pth).
    OpenposeFace {
        resolution: u32,
    },
    /// The legacy `openpose_faceonly`: the faces alone (the bodies found but not drawn).
    OpenposeFaceonly {
        resolution: u32,
    },
    /// The legacy `openpose_full`: bodies, hands and faces.
    OpenposeFull {
        resolution: u32,
    },
    /// The legacy `recolor_luminance`: the image's Lab L (converted as if it were BGR, as the
    /// extension does) raised to `gamma` (0.1..=2, 1), grey, at the image's size. A unit with it
    /// also has its images' L replaced by its map after decoding ([`Self::recolor_channel`]).
    RecolorLuminance {
        gamma: f64,
    },
    /// The legacy `recolor_intensity`: the same with HSV's V.
    RecolorIntensity {
        gamma: f64,
    },
    /// `inpaint` (inpaint_global_harmonious): the image passed through; the unit's mask
    /// (white repaints) marks its pixels for an inpaint ControlNet, which sees
    /// `c * (1 - m) - m` (the extension's "ControlNet inpaint protocol").
    Inpaint,
    /// `inpaint_only`: as `inpaint`, and after every UNet evaluation the prediction outside
    /// the mask is restored to the image's, after decoding the image outside the mask too
    /// (on inpainting with a mask of the request's own it falls back to `inpaint`, as the
    /// extension does on A1111's img2img inpainting).
    InpaintOnly,
    /// `inpaint_only+lama`: the image's masked area painted by LaMa first (at 256 on its
    /// shorter side, [`inpaint_only_lama`]: `ControlNetLama.pth`), then as `inpaint_only`
    /// (restore and post-processing, also on inpainting: the extension falls back only for
    /// `inpaint_only` by name), and the first pass's starting noise carries the image's latents
    /// (the extension's `noise_modifier`: `q_sample(x0, 999, noise)`).
    #[serde(rename = "inpaint_only+lama")]
    InpaintOnlyLama,
    /// The reference units (no ControlNet model; `crate::controlnet::ReferenceUnit`): the
    /// image passed through (the extension's `identity`) to steer the UNet's self-attentions
    /// (`reference_only`), its blocks' statistics (`reference_adain`) or both, with the
    /// extension's Style Fidelity (`threshold_a`, 0..=1, 0.5).
    ReferenceOnly {
        style_fidelity: f64,
    },
    ReferenceAdain {
        style_fidelity: f64,
    },
    #[serde(rename = "reference_adain+attn")]
    ReferenceAdainAttn {
        style_fidelity: f64,
    },
}

impl Preprocessor {
    /// The extension's module name (`module` of a unit, `Module:` of the infotext).
    pub fn module(&self) -> &'static str {
        match self {
            Self::Canny { .. } => "canny",
            Self::Invert => "invert",
            Self::Threshold { .. } => "threshold",
            Self::LineartStandard { .. } => "lineart_standard",
            Self::ScribbleXdog { .. } => "scribble_xdog",
            Self::BlurGaussian { .. } => "blur_gaussian",
            Self::TileResample { .. } => "tile_resample",
            Self::Color { .. } => "color",
            Self::Shuffle { .. } => "shuffle",
            Self::SoftedgeHed { .. } => "softedge_hed",
            Self::SoftedgeHedsafe { .. } => "softedge_hedsafe",
            Self::ScribbleHed { .. } => "scribble_hed",
            Self::LineartRealistic { .. } => "lineart_realistic",
            Self::LineartCoarse { .. } => "lineart_coarse",
            Self::LineartAnime { .. } => "lineart_anime",
            Self::LineartAnimeDenoise { .. } => "lineart_anime_denoise",
            Self::SoftedgePidinet { .. } => "softedge_pidinet",
            Self::SoftedgePidisafe { .. } => "softedge_pidisafe",
            Self::ScribblePidinet { .. } => "scribble_pidinet",
            Self::SoftedgeTeed { .. } => "softedge_teed",
            Self::SoftedgeAnyline { .. } => "softedge_anyline",
            Self::Mlsd { .. } => "mlsd",
            Self::DepthAnything { .. } => "depth_anything",
            Self::DepthAnythingV2 { .. } => "depth_anything_v2",
            Self::DepthMidas { .. } => "depth_midas",
            Self::NormalMidas { .. } => "normal_midas",
            Self::NormalBae { .. } => "normal_bae",
            Self::DepthLeres { .. } => "depth_leres",
            Self::Openpose { .. } => "openpose",
            Self::OpenposeHand { .. } => "openpose_hand",
            Self::OpenposeFace { .. } => "openpose_face",
            Self::OpenposeFaceonly { .. } => "openpose_faceonly",
            Self::OpenposeFull { .. } => "openpose_full",
            Self::RecolorLuminance { .. } => "recolor_luminance",
            Self::RecolorIntensity { .. } => "recolor_intensity",
            Self::Inpaint => "inpaint",
            Self::InpaintOnly => "inpaint_only",
            Self::InpaintOnlyLama => "inpaint_only+lama",
            Self::ReferenceOnly { .. } => "reference_only",
            Self::ReferenceAdain { .. } => "reference_adain",
            Self::ReferenceAdainAttn { .. } => "reference_adain+attn",
        }
    }

    /// A reference module's kind and style fidelity; `None` for the others.
    pub fn reference(&self) -> Option<(crate::controlnet::ReferenceKind, f64)> {
        use crate::controlnet::ReferenceKind;
        match *self {
            Self::ReferenceOnly { style_fidelity } => Some((ReferenceKind::Only, style_fidelity)),
            Self::ReferenceAdain { style_fidelity } => Some((ReferenceKind::Adain, style_fidelity)),
            Self::ReferenceAdainAttn { style_fidelity } => {
                Some((ReferenceKind::AdainAttn, style_fidelity))
            }
            _ => None,
        }
    }

    /// The reference module of `kind` with `style_fidelity`.
    pub fn of_reference(kind: crate::controlnet::ReferenceKind, style_fidelity: f64) -> Self {
        use crate::controlnet::ReferenceKind;
        match kind {
            ReferenceKind::Only => Self::ReferenceOnly { style_fidelity },
            ReferenceKind::Adain => Self::ReferenceAdain { style_fidelity },
            ReferenceKind::AdainAttn => Self::ReferenceAdainAttn { style_fidelity },
        }
    }

    /// The channel a recolor module's post-processing replaces in each decoded image (the
    /// extension's `'recolor' in unit.module`); `None` for the other modules.
    pub fn recolor_channel(&self) -> Option<RecolorChannel> {
        match self {
            Self::RecolorLuminance { .. } => Some(RecolorChannel::Luminance),
            Self::RecolorIntensity { .. } => Some(RecolorChannel::Intensity),
            _ => None,
        }
    }

    /// Whether a unit with it takes a mask (the extension's `accepts_mask` and
    /// `requires_mask`): the inpaint modules.
    pub fn takes_mask(&self) -> bool {
        matches!(
            self,
            Self::Inpaint | Self::InpaintOnly | Self::InpaintOnlyLama
        )
    }

    /// Whether it runs `inpaint_only`'s restore and post-processing (the extension's
    /// `'inpaint_only' in module`).
    pub fn restores(&self) -> bool {
        matches!(self, Self::InpaintOnly | Self::InpaintOnlyLama)
    }

    /// The preprocessor named `module` (as [`Self::module`] names it) at `resolution`, for the
    /// modules whose one setting is the resolution; `None` for the others. The request
    /// dialects build these from this one table and spell out only the modules with sliders.
    pub fn resolution_only(module: &str, resolution: u32) -> Option<Self> {
        Some(match module {
            "lineart_standard" => Self::LineartStandard { resolution },
            "color" => Self::Color { resolution },
            "softedge_hed" => Self::SoftedgeHed { resolution },
            "softedge_hedsafe" => Self::SoftedgeHedsafe { resolution },
            "scribble_hed" => Self::ScribbleHed { resolution },
            "lineart_realistic" => Self::LineartRealistic { resolution },
            "lineart_coarse" => Self::LineartCoarse { resolution },
            "lineart_anime" => Self::LineartAnime { resolution },
            "lineart_anime_denoise" => Self::LineartAnimeDenoise { resolution },
            "softedge_pidinet" => Self::SoftedgePidinet { resolution },
            "softedge_pidisafe" => Self::SoftedgePidisafe { resolution },
            "scribble_pidinet" => Self::ScribblePidinet { resolution },
            "depth_anything" => Self::DepthAnything { resolution },
            "depth_anything_v2" => Self::DepthAnythingV2 { resolution },
            "depth_midas" => Self::DepthMidas { resolution },
            "normal_bae" => Self::NormalBae { resolution },
            "openpose" => Self::Openpose { resolution },
            "openpose_hand" => Self::OpenposeHand { resolution },
            "openpose_face" => Self::OpenposeFace { resolution },
            "openpose_faceonly" => Self::OpenposeFaceonly { resolution },
            "openpose_full" => Self::OpenposeFull { resolution },
            _ => return None,
        })
    }

    /// The weights file a model-based module runs (the extension's name for it); `None` for
    /// the model-free ones.
    pub fn model_file(&self) -> Option<&'static str> {
        self.annotator_file().map(|f| f.name)
    }

    /// The weights file a model-based module runs; `None` for the model-free ones.
    pub fn annotator_file(&self) -> Option<&'static AnnotatorFile> {
        match self {
            Self::SoftedgeHed { .. } | Self::SoftedgeHedsafe { .. } | Self::ScribbleHed { .. } => {
                Some(&HED)
            }
            Self::LineartRealistic { .. } => Some(&LINEART),
            Self::LineartCoarse { .. } => Some(&LINEART_COARSE),
            Self::LineartAnime { .. } => Some(&LINEART_ANIME),
            Self::LineartAnimeDenoise { .. } => Some(&MANGA_LINE),
            Self::SoftedgePidinet { .. }
            | Self::SoftedgePidisafe { .. }
            | Self::ScribblePidinet { .. } => Some(&PIDINET),
            Self::SoftedgeTeed { .. } => Some(&TEED),
            Self::SoftedgeAnyline { .. } => Some(&MTEED),
            Self::Mlsd { .. } => Some(&MLSD),
            Self::DepthAnything { .. } => Some(&DEPTH_ANYTHING),
            Self::DepthAnythingV2 { .. } => Some(&DEPTH_ANYTHING_V2),
            Self::DepthMidas { .. } | Self::NormalMidas { .. } => Some(&MIDAS),
            Self::NormalBae { .. } => Some(&NORMAL_BAE),
            Self::DepthLeres { .. } => Some(&LERES),
            Self::Openpose { .. }
            | Self::OpenposeHand { .. }
            | Self::OpenposeFace { .. }
            | Self::OpenposeFaceonly { .. }
            | Self::OpenposeFull { .. } => Some(&BODY_POSE),
            Self::InpaintOnlyLama => Some(&LAMA),
            _ => None,
        }
    }

    /// Every weights file a model-based module runs (the OpenPose ones run two or three).
    pub fn annotator_files(&self) -> Vec<&'static AnnotatorFile> {
        let mut files: Vec<_> = self.annotator_file().into_iter().collect();
        if let Some(include) = self.openpose_include() {
            if include.hand {
                files.push(&HAND_POSE);
            }
            if include.face {
                files.push(&FACENET);
            }
        }
        files
    }

    /// What an OpenPose module detects and draws (`None` for the others).
    pub fn openpose_include(&self) -> Option<Include> {
        let (body, hand, face) = match self {
            Self::Openpose { .. } => (true, false, false),
            Self::OpenposeHand { .. } => (true, true, false),
            Self::OpenposeFace { .. } => (true, false, true),
            Self::OpenposeFaceonly { .. } => (false, false, true),
            Self::OpenposeFull { .. } => (true, true, true),
            _ => return None,
        };
        Some(Include { body, hand, face })
    }

    /// The processor resolution (the shorter side of the image the map is made at), for the
    /// modules that take one.
    pub fn resolution(&self) -> Option<u32> {
        match *self {
            Self::Canny { resolution, .. }
            | Self::Threshold { resolution, .. }
            | Self::LineartStandard { resolution }
            | Self::ScribbleXdog { resolution, .. }
            | Self::BlurGaussian { resolution, .. }
            | Self::Color { resolution }
            | Self::Shuffle { resolution, .. }
            | Self::SoftedgeHed { resolution }
            | Self::SoftedgeHedsafe { resolution }
            | Self::ScribbleHed { resolution }
            | Self::LineartRealistic { resolution }
            | Self::LineartCoarse { resolution }
            | Self::LineartAnime { resolution }
            | Self::LineartAnimeDenoise { resolution }
            | Self::SoftedgePidinet { resolution }
            | Self::SoftedgePidisafe { resolution }
            | Self::ScribblePidinet { resolution }
            | Self::SoftedgeTeed { resolution, .. }
            | Self::SoftedgeAnyline { resolution, .. }
            | Self::DepthAnything { resolution }
            | Self::DepthAnythingV2 { resolution }
            | Self::DepthMidas { resolution }
            | Self::NormalMidas { resolution, .. }
            | Self::NormalBae { resolution }
            | Self::DepthLeres { resolution, .. }
            | Self::Openpose { resolution }
            | Self::OpenposeHand { resolution }
            | Self::OpenposeFace { resolution }
            | Self::OpenposeFaceonly { resolution }
            | Self::OpenposeFull { resolution } => Some(resolution),
            Self::Mlsd { resolution, .. } => Some(resolution),
            Self::Invert
            | Self::TileResample { .. }
            | Self::RecolorLuminance { .. }
            | Self::RecolorIntensity { .. }
            | Self::Inpaint
            | Self::InpaintOnly
            | Self::InpaintOnlyLama
            | Self::ReferenceOnly { .. }
            | Self::ReferenceAdain { .. }
            | Self::ReferenceAdainAttn { .. } => None,
        }
    }

    /// The same preprocessor at `resolution` (pixel perfect); unchanged for those taking none.
    pub fn with_resolution(self, resolution: u32) -> Self {
        let mut p = self;
        match &mut p {
            Self::Canny { resolution: r, .. }
            | Self::Threshold { resolution: r, .. }
            | Self::LineartStandard { resolution: r }
            | Self::ScribbleXdog { resolution: r, .. }
            | Self::BlurGaussian { resolution: r, .. }
            | Self::Color { resolution: r }
            | Self::Shuffle { resolution: r, .. }
            | Self::SoftedgeHed { resolution: r }
            | Self::SoftedgeHedsafe { resolution: r }
            | Self::ScribbleHed { resolution: r }
            | Self::LineartRealistic { resolution: r }
            | Self::LineartCoarse { resolution: r }
            | Self::LineartAnime { resolution: r }
            | Self::LineartAnimeDenoise { resolution: r }
            | Self::SoftedgePidinet { resolution: r }
            | Self::SoftedgePidisafe { resolution: r }
            | Self::ScribblePidinet { resolution: r }
            | Self::SoftedgeTeed { resolution: r, .. }
            | Self::SoftedgeAnyline { resolution: r, .. }
            | Self::DepthAnything { resolution: r }
            | Self::DepthAnythingV2 { resolution: r }
            | Self::DepthMidas { resolution: r }
            | Self::NormalMidas { resolution: r, .. }
            | Self::NormalBae { resolution: r }
            | Self::DepthLeres { resolution: r, .. }
            | Self::Openpose { resolution: r }
            | Self::OpenposeHand { resolution: r }
            | Self::OpenposeFace { resolution: r }
            | Self::OpenposeFaceonly { resolution: r }
            | Self::OpenposeFull { resolution: r } => *r = resolution,
            Self::Mlsd { resolution: r, .. } => *r = resolution,
            Self::Invert
            | Self::TileResample { .. }
            | Self::RecolorLuminance { .. }
            | Self::RecolorIntensity { .. }
            | Self::Inpaint
            | Self::InpaintOnly
            | Self::InpaintOnlyLama
            | Self::ReferenceOnly { .. }
            | Self::ReferenceAdain { .. }
            | Self::ReferenceAdainAttn { .. } => {}
        }
        p
    }

    /// The size of the map of a `width` x `height` image (the resize `resize_image_with_pad`
    /// makes, or the module's own).
    pub fn map_size(&self, width: u32, height: u32) -> (u64, u64) {
        match (self, self.resolution()) {
            (Self::TileResample { down_sampling_rate }, _) => {
                let (w, h) = tile_resample_size(width, height, *down_sampling_rate);
                (u64::from(w), u64::from(h))
            }
            (Self::Color { resolution }, _) => {
                let (w, h) = color_size(width, height, *resolution);
                (u64::from(w), u64::from(h))
            }
            (_, Some(resolution)) => {
                let (w, h) = (f64::from(width), f64::from(height));
                let k = f64::from(resolution) / w.min(h);
                let side = |s: f64| (s * k).round_ties_even().min(u64::MAX as f64) as u64;
                (side(w), side(h))
            }
            (_, None) => (u64::from(width), u64::from(height)),
        }
    }
}
