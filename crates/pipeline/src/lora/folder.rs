//! Whether a LoRA fits a model that is not loaded (a diffusers folder or a single-file
//! checkpoint): the weights a LoRA may change, with the dims their built modules report, read
//! from the UNet's and text encoder's tensor names and shapes (safetensors headers, pickles'
//! object trees: no tensor data), then the same matching as for a loaded model
//! ([`super::check_fits`]). A server checks a request naming another model with it before the
//! job is queued.

use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;

use super::library::header_shapes;
use super::{match_layers, LoraInfo, Part, TargetShapes, BIAS};
use crate::pipeline::component_weight_files;
use crate::Result;

/// The UNet's LoRA targets by module path suffix: linear layers (`Dense`, `Linear`: their
/// modules report `[out, in]`, also for a projection stored as a 1x1 convolution) and
/// convolutions (`[out, in, k, k]` as stored). Only inside the down, mid and up blocks, as the
/// built model lists them (`UNet2DConditionModel::lora_targets`).
const UNET_LINEAR: [&str; 9] = [
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".proj_in",
    ".proj_out",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".time_emb_proj",
];
const UNET_CONV: [&str; 5] = [
    ".conv1",
    ".conv2",
    ".conv_shortcut",
    ".downsamplers.0.conv",
    ".upsamplers.0.conv",
];
const UNET_BLOCKS: [&str; 3] = ["down_blocks.", "mid_block.", "up_blocks."];
/// Norm layers (weight `[channels]`): the resnets' and attentions' GroupNorms, the transformer
/// blocks' LayerNorms.
const UNET_NORM: [&str; 4] = [".norm1", ".norm2", ".norm3", ".attentions.N.norm"];
/// The text encoder's: every encoder layer's attention projections and MLP, and its layer norms.
const TEXT_NORM: [&str; 2] = [".layer_norm1", ".layer_norm2"];
const TEXT_LINEAR: [&str; 6] = [
    ".self_attn.q_proj",
    ".self_attn.k_proj",
    ".self_attn.v_proj",
    ".self_attn.out_proj",
    ".mlp.fc1",
    ".mlp.fc2",
];

/// Why the LoRA `info` does not fit the model at `path` (a diffusers folder, or a single-file
/// checkpoint read as conversion reads it), naming the LoRA and its first layer without a
/// weight of its shape; `None` when it fits.
pub fn fit_problem_in_model(info: &LoraInfo, path: &Path) -> Result<Option<String>> {
    if path.is_dir() {
        fit_problem_in(info, &target_shapes_of_folder(path)?)
    } else {
        let file = crate::single_file::SingleFileShapes::read(path)?;
        fit_problem_in_single_file(info, &file)
    }
}

/// [`fit_problem_in_model`] for a single file whose names and shapes were read already.
pub fn fit_problem_in_single_file(
    info: &LoraInfo,
    file: &crate::single_file::SingleFileShapes,
) -> Result<Option<String>> {
    fit_problem_in(info, &target_shapes_of_single_file(file))
}

fn fit_problem_in(info: &LoraInfo, targets: &TargetShapes) -> Result<Option<String>> {
    let shapes = header_shapes(&info.file)?;
    match match_layers(info, &shapes, targets) {
        Ok(_) => Ok(None),
        Err(crate::PipelineError::InvalidRequest(why)) => Ok(Some(why)),
        Err(e) => Err(e),
    }
}

/// Paths and dims of every LoRA target of the folder's UNet and text encoder, from the
/// headers of their full-precision safetensors files or the object trees of their pickles
/// (`.bin`; parsed, never run), shards merged.
pub(crate) fn target_shapes_of_folder(dir: &Path) -> Result<TargetShapes> {
    let mut targets = TargetShapes::new();
    for (part, stem) in [
        (Part::Unet, "diffusion_pytorch_model"),
        (Part::TextEncoder, "model"),
    ] {
        let mut shapes = HashMap::new();
        for file in component_weight_files(dir, part.name(), stem, DType::F32)? {
            if file.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                shapes.extend(header_shapes(&file)?);
            } else {
                let ckpt = crate::ckpt::Checkpoint::open(&file)?;
                shapes.extend(ckpt.state_dict()?.into_iter().map(|(k, t)| (k, t.shape)));
            }
        }
        targets.insert(part, targets_of(part, &shapes));
    }
    Ok(targets)
}

/// [`target_shapes_of_folder`] for a single-file checkpoint, its names as conversion makes
/// them ([`crate::single_file::SingleFileShapes`]).
pub(crate) fn target_shapes_of_single_file(
    file: &crate::single_file::SingleFileShapes,
) -> TargetShapes {
    let mut targets = TargetShapes::new();
    targets.insert(Part::Unet, targets_of(Part::Unet, &file.unet));
    targets.insert(
        Part::TextEncoder,
        targets_of(Part::TextEncoder, &file.text_encoder),
    );
    targets
}

/// The LoRA targets among a part's weights (shapes by name, `.weight` included), sorted.
fn targets_of(part: Part, shapes: &HashMap<String, Vec<usize>>) -> Vec<(String, Vec<usize>)> {
    let mut list: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .filter_map(|(key, dims)| {
            // A target's bias is one too (`<module>.bias`, its dims as stored).
            if let Some(module) = key.strip_suffix(BIAS) {
                let weight = shapes.get(&format!("{module}.weight"))?;
                let (path, _) = target_path_dims(part, module, weight)?;
                return Some((format!("{path}{BIAS}"), dims.clone()));
            }
            target_path_dims(part, key.strip_suffix(".weight")?, dims)
        })
        .collect();
    list.sort();
    list
}

/// The built module's path and dims of the weight of module `path` (as the file names it,
/// stored as `dims`), if it is a target.
fn target_path_dims(part: Part, path: &str, dims: &[usize]) -> Option<(String, Vec<usize>)> {
    // Some text encoder files leave out `text_model.`; the built module's paths have it (as
    // the loader reads both).
    let path = match part {
        Part::TextEncoder if !path.starts_with("text_model.") => format!("text_model.{path}"),
        _ => path.to_string(),
    };
    target_dims(part, &path, dims).map(|d| (path, d))
}

/// The dims the built module of weight `path` (stored as `dims`) reports, if it is a target.
fn target_dims(part: Part, path: &str, dims: &[usize]) -> Option<Vec<usize>> {
    let ends = |suffixes: &[&str]| suffixes.iter().any(|s| path.ends_with(s));
    let linear = || (dims.len() >= 2).then(|| vec![dims[0], dims[1..].iter().product()]);
    match part {
        Part::Unet if !UNET_BLOCKS.iter().any(|b| path.starts_with(b)) => None,
        Part::Unet if ends(&UNET_LINEAR) => linear(),
        Part::Unet if ends(&UNET_CONV) && dims.len() == 4 => Some(dims.to_vec()),
        Part::Unet if dims.len() == 1 && (ends(&UNET_NORM[..3]) || attention_norm(path)) => {
            Some(dims.to_vec())
        }
        Part::Unet => None,
        Part::TextEncoder
            if path.starts_with("text_model.encoder.layers.") && ends(&TEXT_LINEAR) =>
        {
            linear()
        }
        Part::TextEncoder
            if path.starts_with("text_model.encoder.layers.")
                && ends(&TEXT_NORM)
                && dims.len() == 1 =>
        {
            Some(dims.to_vec())
        }
        Part::TextEncoder => None,
    }
}

/// `<block>.attentions.<n>.norm`: an attention's GroupNorm (`UNET_NORM`'s last form).
fn attention_norm(path: &str) -> bool {
    let Some(rest) = path.strip_suffix(".norm") else {
        return false;
    };
    let Some((head, n)) = rest.rsplit_once('.') else {
        return false;
    };
    head.ends_with(".attentions") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}
