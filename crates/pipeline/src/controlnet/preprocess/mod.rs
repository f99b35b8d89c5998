//! ControlNet preprocessors as the sd-webui-controlnet extension runs them
//! (`scripts/preprocessor/model_free_preprocessors.py`, `scripts/preprocessor/legacy/`,
//! `scripts/utils.py`): functions from the uploaded RGB image to the control map the
//! ControlNet is given; the model-based ones (HED, lineart) take their network from an
//! [`AnnotatorNetworks`] (`networks`: any network by its weights file).
//!
//! Files: `resize` (the extension's `resize_image_with_pad`: OpenCV's cubic and area resizes,
//! the pad to 64), `gaussian` (OpenCV's Gaussian blur, 8-bit and float), one file per family
//! of modules: `canny`, `pointwise` (invert, threshold), `lines` (scribble_xdog,
//! lineart_standard), `tile` (blur_gaussian, tile_resample), `color`, `shuffle`, `hed`
//! (softedge_hed, softedge_hedsafe, scribble_hed: the network and its steps), `lineart`
//! (lineart_realistic, lineart_coarse: the generator, and the layers the anime one shares),
//! `lineart_anime`, `manga_line` (lineart_anime_denoise), `pidinet` (softedge_pidinet,
//! softedge_pidisafe, scribble_pidinet), `teed` (softedge_teed), `anyline` (softedge_anyline:
//! TEED with MistoLine's weights, combined with lineart_standard's faint lines), `mlsd` (the M-LSD network,
//! its segments, drawn by `line`: OpenCV's `cv2.line`), `depth_anything` (depth_anything,
//! depth_anything_v2: DINOv2 and the DPT head), `midas` (depth_midas, normal_midas: DPT-Hybrid,
//! its ResNet in `midas/resnet.rs`), `normalbae` (normal_bae: Bae et al.'s NNET, its
//! EfficientNet-B5 encoder in `normalbae/efficientnet.rs`), `leres` (depth_leres: LeReS, its ResNeXt in
//! `leres/resnext.rs`), `lama` (inpaint_only+lama: LaMa's FFC ResNet generator in `lama/ffc.rs`,
//! its Fourier unit's FFTs in `lama/fourier.rs`; OpenCV's 8-bit linear resize), `openpose` (the OpenPose body network and its maps),
//! `openpose_body` (peaks, limbs and people from those maps), `openpose_hand` (the hand and
//! face network, the hands' boxes and keypoints), `openpose_face` (the face's box and
//! keypoints), `pose_draw` (the pose drawn with OpenCV's ellipse, convex fill, circle and
//! thick line), `resize_lanczos` (OpenCV's Lanczos-4 and float
//! area resizes), `recolor` (recolor_luminance, recolor_intensity and their post-processing),
//! `colour` (OpenCV's 8-bit Lab and HSV conversions); `preprocessor` ([`Preprocessor`]: a module
//! with its settings as a request names it); `run` runs a module on an image, with its network or without.

mod anyline;
mod canny;
mod color;
mod colour;
mod depth_anything;
pub(crate) mod gaussian;
mod hed;
mod lama;
mod leres;
mod line;
mod lineart;
mod lineart_anime;
mod lines;
mod manga_line;
mod midas;
mod mlsd;
mod networks;
mod normalbae;
mod openpose;
mod openpose_body;
mod openpose_face;
mod openpose_hand;
mod pidinet;
mod pointwise;
mod pose_draw;
mod preprocessor;
mod recolor;
mod resize;
mod resize_lanczos;
mod run;
mod shuffle;
mod teed;
mod tile;

pub use anyline::{
    anyline_lineart, anyline_map, combine_layers, remove_small_objects, MTEED, MTEED_FILE,
};
pub use canny::canny;
pub use color::{color, color_size, resize_area_any, resize_shortest_edge};
pub use colour::{hsv_to_rgb_row, lab_to_rgb, rgb_to_hsv, rgb_to_lab, HSV_BLOCK};
pub use depth_anything::{
    depth_anything_depth, depth_anything_input_size, depth_anything_map, DepthAnythingNetwork,
    Version as DepthAnythingVersion, DEPTH_ANYTHING, DEPTH_ANYTHING_FILE, DEPTH_ANYTHING_V2,
    DEPTH_ANYTHING_V2_FILE,
};
pub use gaussian::{gaussian_blur_f32, gaussian_blur_u8};
pub use hed::{hed_edges, hed_logits, resize_linear_f32, scribble_hed, HedNetwork, HED, HED_FILE};
pub use lama::{
    inpaint_only_lama, lama_finish, lama_inpaint, lama_output, lama_padded, resize_linear,
    LamaNetwork, LAMA, LAMA_FILE, LAMA_RESOLUTION,
};
pub use leres::{depth_leres_map, leres_depth, leres_module, LeresNetwork, LERES, LERES_FILE};
pub use line::{draw_line, line_pixels};
pub use lineart::{
    lineart_map, LineartNetwork, LINEART, LINEART_COARSE, LINEART_COARSE_FILE, LINEART_FILE,
};
pub use lineart_anime::{
    lineart_anime_map, lineart_anime_values, resize_cubic_f32, LineartAnimeNetwork, LINEART_ANIME,
    LINEART_ANIME_FILE,
};
pub use lines::{lineart_standard, scribble_xdog};
pub use manga_line::{manga_line_map, rgb_to_grey, MangaLineNetwork, MANGA_LINE, MANGA_LINE_FILE};
pub use midas::{
    depth_midas_map, midas_depth, midas_module, normal_midas_map, MidasNetwork, MIDAS, MIDAS_FILE,
};
pub use mlsd::{decode_lines, draw_segments, mlsd_lines, mlsd_map, MlsdNetwork, MLSD, MLSD_FILE};
pub use networks::{
    lllyasviel, network, AnnotatorFile, AnnotatorNetworks, AnyNetwork, HubFile, LoadedNetworks,
    ANNOTATOR_FILES,
};
pub use normalbae::{
    normal_bae_map, normal_bae_module, normal_bae_normals, NormalBaeNetwork, NORMAL_BAE,
    NORMAL_BAE_FILE,
};
pub use openpose::{
    body_maps, body_outputs, detect_people, draw_poses, openpose_module, outputs_to_image,
    poses_json, BodyNetwork, Include, Maps, Person, PoseJson, PoseNetworks, Poses, BODY_POSE,
    BODY_POSE_FILE,
};
pub use openpose_body::{body_pose, find_peaks, gaussian_filter, BodyPose, Peak};
pub use openpose_face::{detect_face, face_box, face_peaks, FaceNetwork, FACENET, FACENET_FILE};
pub use openpose_hand::{
    crop, detect_hands, hand_boxes, hand_heatmaps, hand_inputs, hand_peaks, CpmNetwork, HandBox,
    HandNetwork, Outputs, HAND_POSE, HAND_POSE_FILE,
};
pub use pidinet::{pidinet_edges, pidinet_logits, PidiNetwork, PIDINET, PIDINET_FILE};
pub use pointwise::{invert, threshold};
pub use pose_draw::{
    draw_bodypose, draw_facepose, draw_handpose, ellipse2poly, fill_circle, fill_convex_poly,
    hue_color, thick_line, Canvas,
};
pub use preprocessor::Preprocessor;
pub use recolor::{recolor, recolor_post_process, RecolorChannel};
pub use resize::{resize_image_with_pad, Padded};
pub use resize_lanczos::{resize_area_f32, resize_lanczos4_f32, resize_lanczos4_u8};
pub use shuffle::{shuffle, shuffle_image};
pub use teed::{teed_edges, teed_logits, TeedNetwork, TEED, TEED_FILE};
pub use tile::{blur_gaussian, tile_resample, tile_resample_size};

use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

#[cfg(test)]
mod tests;
