//! Merging LoRAs into the resident weights (`W += weight * (alpha / rank) * up @ down`) and
//! writing the originals back.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use super::library::layer_shape_problem;
use super::{shapes_of, LayerKeys, LoraFormat, LoraInfo, LoraLibrary, Part, Target, TargetShapes};
use crate::{PipelineError, Result};

/// Matches a file's layers to the model's weights: `(target index, layer)` per layer, or an
/// error naming the LoRA and the first layer that has no target or the wrong shape. Layers of a
/// part `targets` does not hold are left out (merging into one offloaded part as it is built;
/// checks always pass every part).
pub(super) fn match_layers<'a>(
    info: &'a LoraInfo,
    shapes: &HashMap<String, Vec<usize>>,
    targets: &TargetShapes,
) -> Result<Vec<(Part, usize, &'a LayerKeys)>> {
    let mut by_name: HashMap<(Part, String), usize> = HashMap::new();
    for (part, list) in targets {
        for (i, (path, _)) in list.iter().enumerate() {
            let key = match info.format {
                LoraFormat::Kohya => path.replace('.', "_"),
                LoraFormat::Peft => path.clone(),
            };
            by_name.insert((*part, key), i);
        }
    }
    let mut out = Vec::new();
    for layer in info.keys.iter().filter(|l| targets.contains_key(&l.part)) {
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
                layer.down,
                layer.part.name()
            )));
        };
        let want = &targets[&layer.part][index].1;
        let changed = || {
            PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {} changed on disk since the folder was scanned",
                info.name, layer.down
            ))
        };
        let (Some(down), Some(up)) = (shapes.get(&layer.down), shapes.get(&layer.up)) else {
            return Err(changed());
        };
        let alpha = match &layer.alpha {
            Some(a) => Some(shapes.get(a).ok_or_else(changed)?.as_slice()),
            None => None,
        };
        if let Some(why) = layer_shape_problem(down, up, alpha) {
            return Err(PipelineError::InvalidRequest(format!(
                "LoRA {:?}: layer {}: {why}",
                info.name, layer.down
            )));
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
                info.name, layer.down
            )));
        }
        out.push((layer.part, index, layer));
    }
    Ok(out)
}

/// The merged state of the resident model's weights (and, for offloaded parts, the LoRAs their
/// next build takes).
#[derive(Default)]
pub(crate) struct LoraState {
    /// The LoRAs merged now, as asked (name, weight).
    active: Vec<(String, f64)>,
    /// (the changed weight, a copy of its original values).
    originals: Vec<(Tensor, Tensor)>,
}

impl LoraState {
    pub(crate) fn active(&self) -> &[(String, f64)] {
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

    /// Forgets the merged LoRAs without writing anything back: for when the modules were rebuilt
    /// from their files (already the base weights), so the next request merges again.
    pub(crate) fn forget(&mut self) {
        self.originals.clear();
        self.active.clear();
    }

    /// Merges `loras` (resolved in `library`) into `targets`. Call [`LoraState::restore`]
    /// first. Checks every file before changing any weight. `keep_originals: false` for a
    /// module built for one stage and dropped after it: no copy to write back.
    pub(crate) fn apply(
        &mut self,
        library: &LoraLibrary,
        loras: &[(String, f64)],
        targets: &HashMap<Part, Vec<(String, Target<'_>)>>,
        keep_originals: bool,
    ) -> Result<()> {
        debug_assert!(self.originals.is_empty());
        let target_shapes: TargetShapes = targets
            .iter()
            .map(|(part, list)| (*part, shapes_of(list)))
            .collect();
        // (part, target index) -> summed delta in the canonical layout, f32 on the CPU.
        let mut deltas: BTreeMap<(Part, usize), Tensor> = BTreeMap::new();
        for (name, weight) in loras {
            let info = library
                .get(name)
                .ok_or_else(|| PipelineError::InvalidRequest(format!("unknown LoRA {name:?}")))?;
            let tensors = candle_core::safetensors::load(&info.file, &Device::Cpu)?;
            let shapes: HashMap<String, Vec<usize>> = tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                .collect();
            let invalid = |layer: &LayerKeys, why: &str| {
                PipelineError::InvalidRequest(format!("LoRA {name:?}: layer {}: {why}", layer.down))
            };
            for (part, index, layer) in match_layers(info, &shapes, &target_shapes)? {
                // match_layers found both keys (and alpha's) in this very map.
                let down = tensors[&layer.down].to_dtype(DType::F32)?;
                let up = tensors[&layer.up].to_dtype(DType::F32)?;
                let rank = down.dim(0)?;
                let alpha = match &layer.alpha {
                    Some(a) => tensors[a]
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .first()
                        .map(|&v| f64::from(v))
                        .ok_or_else(|| invalid(layer, "alpha holds no number"))?,
                    None => rank as f64,
                };
                if !alpha.is_finite() {
                    return Err(invalid(layer, &format!("alpha is {alpha}")));
                }
                let scale = weight * alpha / rank as f64;
                let out_dim = up.dim(0)?;
                let delta = up
                    .reshape((out_dim, rank))?
                    .matmul(&down.reshape((rank, ()))?)?;
                let want = target_shapes[&part][index].1.as_slice();
                let delta = (delta.reshape(want)? * scale)?;
                // NaN or infinity (in the file, or from overflow) would spread through every
                // image: refuse the file rather than merge it.
                let total = delta.abs()?.sum_all()?.to_scalar::<f32>()?;
                if !total.is_finite() {
                    return Err(invalid(
                        layer,
                        "its weights are not finite (NaN or infinity, or too large)",
                    ));
                }
                let sum = match deltas.remove(&(part, index)) {
                    Some(d) => (d + delta)?,
                    None => delta,
                };
                deltas.insert((part, index), sum);
            }
        }
        for ((part, index), delta) in deltas {
            let target = &targets[&part][index].1;
            let weight = target.storage()?;
            let delta = target
                .in_storage_layout(&delta)?
                .to_device(weight.device())?;
            let merged = (weight.to_dtype(DType::F32)? + delta)?;
            // Several LoRAs' sum, or a half-precision weight, can still overflow.
            let abs = merged.abs()?;
            let limit = if weight.dtype() == DType::F16 {
                65504.0
            } else {
                f32::MAX
            };
            if !(abs.sum_all()?.to_scalar::<f32>()?.is_finite()
                && abs.max_all()?.to_scalar::<f32>()? <= limit)
            {
                return Err(PipelineError::InvalidRequest(format!(
                    "LoRAs {:?}: merged into {} weight {}, they overflow its {:?} range",
                    loras.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                    part.name(),
                    targets[&part][index].0,
                    weight.dtype()
                )));
            }
            let merged = merged.to_dtype(weight.dtype())?;
            if keep_originals {
                self.originals.push((weight.clone(), weight.copy()?));
            }
            weight.slice_set(&merged, 0, 0)?;
        }
        self.active = loras.to_vec();
        Ok(())
    }
}
