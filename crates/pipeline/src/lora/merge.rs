//! Merging LoRAs into the resident weights (`W += weight * (alpha / rank) * up @ down`, and a
//! full diff's bias diff into the layer's bias) and writing the originals back.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};

use super::add_delta::add_in_place;
use super::deltas::{dtype_limit, overflow};
use super::from_weight::{dora_scale_dims, Delta};
use super::library::layer_shape_problem;
use super::{
    LayerKeys, LayerKind, LoraFormat, LoraInfo, LoraKey, Part, Target, TargetShapes, BIAS,
};
use crate::{PipelineError, Result};

/// A file's layer matched to the model's weight (`part`, target index), and with a bias diff,
/// to the layer's bias (its target index).
pub(super) struct Matched<'a> {
    pub part: Part,
    pub weight: usize,
    pub bias: Option<usize>,
    pub layer: &'a LayerKeys,
}

/// Matches a file's layers to the model's weights, or an error naming the LoRA and the first
/// layer that has no target or the wrong shape. Layers of a part `targets` does not hold are
/// left out (merging into one offloaded part as it is built; checks always pass every part).
pub(super) fn match_layers<'a>(
    info: &'a LoraInfo,
    shapes: &HashMap<String, Vec<usize>>,
    targets: &TargetShapes,
) -> Result<Vec<Matched<'a>>> {
    // Weights by module name as the file writes it; biases by their module's name.
    let mut by_name: HashMap<(Part, String), usize> = HashMap::new();
    let mut biases: HashMap<(Part, String), usize> = HashMap::new();
    for (part, list) in targets {
        for (i, (path, _)) in list.iter().enumerate() {
            let (module, map) = match path.strip_suffix(BIAS) {
                Some(module) => (module, &mut biases),
                None => (path.as_str(), &mut by_name),
            };
            let key = match info.format {
                LoraFormat::Kohya => module.replace('.', "_"),
                LoraFormat::Peft => module.to_owned(),
            };
            map.insert((*part, key), i);
        }
    }
    let mut out = Vec::new();
    for layer in info.keys.iter().filter(|l| targets.contains_key(&l.part)) {
        if let LayerKind::Refused { why, .. } = &layer.kind {
            return Err(PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {} {why} (applied: LoRA/LoCon, LoHa, LoKr, IA3, GLoRA, full diffs, OFT/BOFT, norm diffs and DoRA)",
                info.name,
                layer.module_key()
            )));
        }
        let module = match (info.format, layer.part) {
            // The text encoder's paths start at `text_model`; some files leave it out.
            (LoraFormat::Peft, Part::TextEncoder) if !layer.module.starts_with("text_model.") => {
                format!("text_model.{}", layer.module)
            }
            (LoraFormat::Kohya, Part::TextEncoder) if !layer.module.starts_with("text_model_") => {
                format!("text_model_{}", layer.module)
            }
            _ => layer.module.clone(),
        };
        let Some(&index) = by_name.get(&(layer.part, module.clone())) else {
            return Err(PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {} has no matching {} weight in this model",
                info.name,
                layer.name,
                layer.part.name()
            )));
        };
        let want = &targets[&layer.part][index].1;
        let changed = || {
            PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {} changed on disk since the folder was scanned",
                info.name, layer.name
            ))
        };
        let used = layer
            .kind
            .keys()
            .into_iter()
            .chain(&layer.alpha)
            .chain(&layer.scale)
            .chain(&layer.dora_scale);
        for key in used {
            if !shapes.contains_key(key) {
                return Err(changed());
            }
        }
        let invalid = |why: String| {
            PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {}: {why}",
                info.name, layer.name
            ))
        };
        for key in layer.alpha.iter().chain(&layer.scale) {
            if shapes[key].iter().product::<usize>() != 1 {
                return Err(invalid(format!(
                    "{key} has shape {:?}; it must be one number",
                    shapes[key]
                )));
            }
        }
        if let LayerKind::Lora {
            down,
            up,
            mid: None,
        } = &layer.kind
        {
            let (down, up) = (&shapes[down], &shapes[up]);
            if let Some(why) = layer_shape_problem(down, up, None) {
                return Err(invalid(why));
            }
            let rest: usize = down[1..].iter().product();
            let fits = down[0] == up[0..].get(1).copied().unwrap_or(0)
                && up[0] == want[0]
                && rest == want[1..].iter().product::<usize>()
                && up[2..].iter().all(|&d| d == 1)
                && (down.len() == want.len() || (down.len() == 4 && down[2..] == [1, 1]));
            if !fits {
                return Err(PipelineError::InvalidRequest(format!(
                    "LoRA {:?}: layer {} (down {down:?}, up {up:?}) does not fit the model's weight {want:?}",
                    info.name, layer.name
                )));
            }
        } else if let LayerKind::Ia3 { weight, .. } = &layer.kind {
            // Its on_input (a value, not a shape) says which; the merge checks it.
            let n = shapes[weight].iter().product::<usize>();
            if want.len() != 2 || (n != want[0] && n != want[1]) {
                return Err(PipelineError::InvalidRequest(format!(
                    "LoRA {:?}: layer {} (ia3, {n} values) does not fit the model's weight {want:?} (IA3 scales a linear weight's output rows or input columns)",
                    info.name, layer.name
                )));
            }
        } else if let LayerKind::Oft { .. } = &layer.kind {
            // The blocks rotate the output rows of a linear or convolution weight.
            let rows = layer.kind.delta_shape(shapes).map_err(invalid)?.rows;
            if want.len() < 2 || rows != want[0] {
                return Err(PipelineError::InvalidRequest(format!(
                    "LoRA {:?}: layer {} (oft, blocks of {rows} rows) does not fit the model's weight {want:?} (OFT rotates a linear or convolution weight's output rows)",
                    info.name, layer.name
                )));
            }
        } else {
            let shape = layer.kind.delta_shape(shapes).map_err(invalid)?;
            // GLoRA multiplies the weight as a matrix (A1111: linear weights only); a norm's
            // diff is a norm's weight.
            let matrix_only = matches!(layer.kind, LayerKind::Glora { .. }) && want.len() != 2;
            let norm_only = matches!(layer.kind, LayerKind::Norm { .. }) && want.len() != 1;
            if matrix_only
                || norm_only
                || shape.rows != want[0]
                || shape.cols != want[1..].iter().product::<usize>()
            {
                return Err(PipelineError::InvalidRequest(format!(
                    "LoRA {:?}: layer {} ({}, a delta of {} x {}) does not fit the model's weight {want:?}",
                    info.name,
                    layer.name,
                    layer.kind.type_name(),
                    shape.rows,
                    shape.cols
                )));
            }
        }
        if let Some(key) = &layer.dora_scale {
            // A1111's decomposition takes norms per input channel: a norm's weight has none
            // (it fails there).
            if want.len() < 2 {
                return Err(invalid(format!(
                    "dora_scale is for a weight of input channels; the model's weight is {want:?}"
                )));
            }
            dora_scale_dims(&shapes[key], want).map_err(invalid)?;
        }
        let bias = match layer.kind.bias_key() {
            Some(key) => {
                let what = key.rsplit('.').next().unwrap_or(key);
                // A1111 (network_apply_weights) makes a bias of the diff where the layer has
                // none (in fp16, with an fp32 diff, it raises instead); a built module here has
                // its bias or none for good, so the file is refused.
                let Some(&bias) = biases.get(&(layer.part, module)) else {
                    return Err(invalid(format!(
                        "its bias diff ({what}) is for a layer that has no bias in this model (this server does not add one)"
                    )));
                };
                let (got, want) = (&shapes[key], &targets[&layer.part][bias].1);
                if got != want {
                    return Err(invalid(format!(
                        "its bias diff ({what}) has shape {got:?}; the layer's bias is {want:?}"
                    )));
                }
                Some(bias)
            }
            None => None,
        };
        out.push(Matched {
            part: layer.part,
            weight: index,
            bias,
            layer,
        });
    }
    Ok(out)
}

/// Adds `deltas` (of `part`, by target index, from [`compute_deltas`]) to `targets`' weights in
/// place. `originals`: where to keep a copy of each weight before it changes (`None` for a
/// module built for one stage and dropped after it). A merged weight beyond its dtype's range
/// is refused, and the weights changed so far are left to the caller (restored from
/// `originals`, or dropped with the module).
pub(crate) fn merge_deltas(
    loras: &[(String, f64)],
    part: Part,
    deltas: impl IntoIterator<Item = (usize, impl std::borrow::Borrow<Delta>)>,
    targets: &[(String, Target<'_>)],
    mut originals: Option<&mut Vec<(Tensor, Tensor)>>,
) -> Result<()> {
    for (index, delta) in deltas {
        let target = &targets[index].1;
        // A DoRA layer's delta is made now, from the weight as it is before the set.
        let delta = delta.borrow().for_weight(|| target.canonical_weight())?;
        let delta = delta.as_ref();
        let weight = target.storage()?;
        let limit = dtype_limit(weight.dtype());
        if let Some(originals) = originals.as_deref_mut() {
            originals.push((weight.clone(), weight.copy()?));
        }
        let fits = match add_in_place(weight, delta, target.stored_transposed(), limit)? {
            Some(fits) => fits,
            None => {
                let delta = target
                    .in_storage_layout(delta)?
                    .to_device(weight.device())?
                    .to_dtype(DType::F32)?;
                let merged = (weight.to_dtype(DType::F32)? + delta)?;
                // A half-precision weight plus its delta can still overflow.
                let abs = merged.abs()?;
                let fits = abs.sum_all()?.to_scalar::<f32>()?.is_finite()
                    && abs.max_all()?.to_scalar::<f32>()? <= limit;
                if fits {
                    weight.slice_set(&merged.to_dtype(weight.dtype())?, 0, 0)?;
                }
                fits
            }
        };
        if !fits {
            return Err(overflow(loras, part, &targets[index].0, weight.dtype()));
        }
    }
    Ok(())
}

/// The merged state of the resident model's weights.
#[derive(Default)]
pub(crate) struct LoraState {
    /// The LoRAs merged now, as asked, with their files' identities.
    active: Vec<LoraKey>,
    /// (the changed weight, a copy of its original values).
    originals: Vec<(Tensor, Tensor)>,
}

impl LoraState {
    pub(crate) fn active(&self) -> &[LoraKey] {
        &self.active
    }

    /// Writes every original value back: the weights are bit for bit as loaded.
    pub(crate) fn restore(&mut self) -> Result<()> {
        for (weight, original) in self.originals.drain(..).rev() {
            weight.slice_set(&original, 0, 0)?;
        }
        self.active.clear();
        Ok(())
    }

    /// Merges `deltas` of `part` into the resident `targets`, keeping the originals (each delta
    /// is dropped once merged: the copies of the originals take its place in memory). Call
    /// [`LoraState::restore`] when it fails.
    pub(crate) fn merge(
        &mut self,
        loras: &[(String, f64)],
        part: Part,
        deltas: BTreeMap<usize, Delta>,
        targets: &[(String, Target<'_>)],
    ) -> Result<()> {
        merge_deltas(loras, part, deltas, targets, Some(&mut self.originals))
    }

    /// Notes `key` as the set now merged.
    pub(crate) fn set_active(&mut self, key: Vec<LoraKey>) {
        self.active = key;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::super::{check_fits, target_shapes_of_folder, LoraInfo};

    /// A bias diff for a layer the model built without a bias (the UNet's `to_k`) is refused
    /// naming the LoRA, the layer and why; the same diff on `to_out.0`, which has one, fits.
    #[test]
    fn a_bias_diff_needs_a_bias_to_change() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let targets = target_shapes_of_folder(&fixtures.join("tiny-a")).unwrap();
        let dir = std::env::temp_dir().join(format!("sdserve-bias-diff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1";
        for (leaf, fits) in [("to_k", false), ("to_out_0", true)] {
            let file = dir.join(format!("{leaf}.safetensors"));
            let zeros = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu);
            candle_core::safetensors::save(
                &[
                    (format!("{attn}_{leaf}.diff"), zeros(&[32, 32]).unwrap()),
                    (format!("{attn}_{leaf}.diff_b"), zeros(&[32]).unwrap()),
                ]
                .into_iter()
                .collect(),
                &file,
            )
            .unwrap();
            let info = LoraInfo::read(&file).unwrap();
            let got = check_fits(&info, &targets);
            if fits {
                assert!(got.is_ok(), "{got:?}");
            } else {
                let why = got.unwrap_err().to_string();
                assert!(
                    why.contains(leaf) && why.contains("diff_b") && why.contains("no bias"),
                    "{why}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
