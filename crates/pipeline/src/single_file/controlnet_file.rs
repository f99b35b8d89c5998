//! A ControlNet single file (`control_v11p_sd15_canny.pth` / `.safetensors`: the original
//! ControlNet's `cldm.py` key names, with or without the `control_model.` prefix) read into host
//! tensors under diffusers' `ControlNetModel` names, as diffusers' `convert_controlnet_checkpoint`
//! maps them: the UNet encoder's keys as the UNet's (`time_embed`, `input_blocks`,
//! `middle_block`), `zero_convs.{i}.0` -> `controlnet_down_blocks.{i}`, `middle_block_out.0` ->
//! `controlnet_mid_block`, and the hint encoder `input_hint_block.{2k}` (a convolution at every
//! even index, SiLUs between) -> `controlnet_cond_embedding.conv_in`, `.blocks.{k-1}`, `.conv_out`
//! (the last). Pickles are read by [`crate::ckpt`], which runs no pickle code.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::key_map::map_unet_key;
use super::{weights, SourceFile};
use crate::error::Result;

/// The prefix of the ControlNet's keys in files that hold more (ControlNet 1.0's full models).
const CONTROL_PREFIX: &str = "control_model.";

/// What a ControlNet file's weights say about its config (the rest is the UNet's it was trained
/// on: the caller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetFileShapes {
    /// `conditioning_channels`: the control image's channels.
    pub conditioning_channels: usize,
    /// `conditioning_embedding_out_channels`: the hint encoder's widths.
    pub embedding_channels: Vec<usize>,
}

/// The ControlNet weights of `path` under diffusers' names, converted to `dtype` on the CPU,
/// and the hint encoder's shapes. `layers`: the UNet config's `layers_per_block`, which the
/// numbering of `input_blocks` needs. Other shapes are checked when the model is built.
pub fn read_controlnet_file(
    path: &Path,
    layers: usize,
    dtype: DType,
) -> Result<(HashMap<String, Tensor>, ControlNetFileShapes)> {
    let file = SourceFile::open(path)?;
    let prefixed = file.tensors.keys().any(|k| k.starts_with(CONTROL_PREFIX));
    // Hint encoder convolutions by their index in `input_hint_block`.
    let mut hint: BTreeMap<usize, Vec<(&str, String)>> = BTreeMap::new();
    let mut plain: Vec<(&str, String)> = Vec::new();
    for src in file.tensors.keys() {
        let key = match (prefixed, src.strip_prefix(CONTROL_PREFIX)) {
            (true, Some(k)) => k,
            (true, None) => continue,
            (false, _) => src.as_str(),
        };
        if let Some(rest) = key.strip_prefix("input_hint_block.") {
            let (i, param) = rest
                .split_once('.')
                .and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p)))
                .ok_or_else(|| weights(path, format!("`{src}` is not a ControlNet weight")))?;
            hint.entry(i).or_default().push((src, param.to_string()));
            continue;
        }
        let name = if let Some(rest) = key.strip_prefix("zero_convs.") {
            rest.split_once(".0.")
                .map(|(i, p)| format!("controlnet_down_blocks.{i}.{p}"))
        } else if let Some(p) = key.strip_prefix("middle_block_out.0.") {
            Some(format!("controlnet_mid_block.{p}"))
        } else {
            map_unet_key(key, layers).filter(|m| !m.starts_with("up_blocks."))
        };
        let name = name.ok_or_else(|| {
            weights(
                path,
                format!(
                    "`{src}` is not a weight of an SD 1.x/2.x ControlNet for a UNet of \
                     {layers} layers per block: it does not fit the model's UNet"
                ),
            )
        })?;
        plain.push((src, name));
    }
    if hint.len() < 2
        || !plain
            .iter()
            .any(|(_, n)| n.starts_with("controlnet_mid_block"))
    {
        return Err(weights(
            path,
            "not a ControlNet: no `input_hint_block` convolutions or no `middle_block_out`",
        ));
    }
    let last = hint.len() - 1;
    for (k, (_, params)) in hint.iter_mut().enumerate() {
        let module = match k {
            0 => "conv_in".to_string(),
            k if k == last => "conv_out".to_string(),
            k => format!("blocks.{}", k - 1),
        };
        for (_, p) in params.iter_mut() {
            *p = format!("controlnet_cond_embedding.{module}.{p}");
        }
    }
    let mut out = HashMap::new();
    for (src, name) in plain.into_iter().chain(hint.into_values().flatten()) {
        let shape = file.tensors[src].shape.clone();
        let tensor = file.host_tensor(src, &shape, dtype, "ControlNet")?;
        if out.insert(name.clone(), tensor).is_some() {
            return Err(weights(path, format!("two tensors map to `{name}`")));
        }
    }
    let shapes = hint_shapes(&out).ok_or_else(|| {
        weights(
            path,
            "the `input_hint_block` convolutions are not [out, in, k, k] weights",
        )
    })?;
    Ok((out, shapes))
}

/// `conditioning_channels` and the hint encoder widths from its weights: conv_in `[c0, cond,
/// k, k]`, then per width step a pair of blocks, the second `[c_{i+1}, c_i, k, k]`.
fn hint_shapes(t: &HashMap<String, Tensor>) -> Option<ControlNetFileShapes> {
    let dims = |name: &str| t.get(name).map(|w| w.dims().to_vec());
    let conv_in = dims("controlnet_cond_embedding.conv_in.weight")?;
    if conv_in.len() != 4 {
        return None;
    }
    let mut widths = vec![conv_in[0]];
    let mut k = 1;
    while let Some(d) = dims(&format!("controlnet_cond_embedding.blocks.{k}.weight")) {
        if d.len() != 4 {
            return None;
        }
        widths.push(d[0]);
        k += 2;
    }
    Some(ControlNetFileShapes {
        conditioning_channels: conv_in[1],
        embedding_channels: widths,
    })
}
