//! Merging LoRAs into the resident weights (`W += weight * (alpha / rank) * up @ down`, and a
//! full diff's bias diff into the layer's bias) and writing the originals back.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use super::add_delta::add_in_place;
use super::from_weight::{dora_scale_dims, Delta, Step, Updown, Weighted};
use super::library::layer_shape_problem;
use super::{
    LayerKeys, LayerKind, LoraFormat, LoraInfo, LoraKey, LoraLibrary, Part, Target, TargetShapes,
    BIAS,
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
                "LoRA {:?}: layer {} {why} (applied: LoRA/LoCon, LoHa, LoKr, IA3, GLoRA, full diffs and DoRA)",
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
        } else {
            let shape = layer.kind.delta_shape(shapes).map_err(invalid)?;
            // GLoRA multiplies the weight as a matrix (A1111: linear weights only).
            let matrix_only = matches!(layer.kind, LayerKind::Glora { .. }) && want.len() != 2;
            if matrix_only
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
            dora_scale_dims(&shapes[key], want).map_err(invalid)?;
        }
        let bias = match &layer.kind {
            LayerKind::Full {
                diff_b: Some(diff_b),
                ..
            } => {
                // A1111 gives a layer without a bias one; a built module here has its bias or
                // none for good.
                let Some(&bias) = biases.get(&(layer.part, module)) else {
                    return Err(invalid(
                        "its bias diff (diff_b) is for a layer that has no bias in this model (this server does not add one)".into(),
                    ));
                };
                let (got, want) = (&shapes[diff_b], &targets[&layer.part][bias].1);
                if got != want {
                    return Err(invalid(format!(
                        "its bias diff (diff_b) has shape {got:?}; the layer's bias is {want:?}"
                    )));
                }
                Some(bias)
            }
            _ => None,
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

/// The deltas of a LoRA set by (part, target index), in the canonical layout (`[out, in]` or
/// `[out, in, k, k]`), on the CPU: sums of `weight * (alpha / rank) * up @ down` (or the type's
/// delta and scale) in `dtype` (the dtype of the weights they go into), or, for a weight a DoRA
/// layer changes, the steps that make its delta from the weight when it is merged.
pub(crate) type Deltas = BTreeMap<(Part, usize), Delta>;

/// A layer's contribution to a weight, as it is made.
enum Made {
    Plain(Tensor),
    Weighted(Weighted),
}

/// The deltas of `loras` (resolved in `library`) for every weight of `targets`, checked: a
/// layer whose delta is not finite (NaN or infinity in the file, or f32 overflow) is refused
/// naming the LoRA and the layer, and a summed delta beyond the range of `dtype` naming the
/// weight. All of it needs only the LoRA files and the targets' shapes, not the weights: it can
/// run before any offloaded part is built. (A DoRA layer's delta needs the weight: its steps
/// are checked here as far as the file goes, and made when the weight is merged.)
///
/// Each sum is rounded to `dtype` once (a no-op for f32 weights): every path then merges the
/// same rounded values (offloaded builds keep them between runs at the weights' size, not twice
/// it), and the merge adds them in f32. A set of one LoRA rounds each delta as it is made, so
/// the set is never whole in f32.
pub(crate) fn compute_deltas(
    library: &LoraLibrary,
    loras: &[(String, f64)],
    targets: &TargetShapes,
    dtype: DType,
) -> Result<Deltas> {
    let mut deltas = Deltas::new();
    let round_now = loras.len() == 1 && dtype != DType::F32;
    let mut summed = std::collections::HashSet::new();
    let overflow_at =
        |part: Part, index: usize| overflow(loras, part, &targets[&part][index].0, dtype);
    for (name, weight) in loras {
        let info = library
            .get(name)
            .ok_or_else(|| PipelineError::InvalidRequest(format!("unknown LoRA {name:?}")))?;
        let tensors = load_tensors(&info.file)?;
        let shapes: HashMap<String, Vec<usize>> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        let invalid = |layer: &LayerKeys, why: &str| {
            PipelineError::InvalidRequest(format!("LoRA {name:?}: layer {}: {why}", layer.name))
        };
        for matched in match_layers(info, &shapes, targets)? {
            let (part, layer) = (matched.part, matched.layer);
            // match_layers found every key in this very map, and checked the shapes.
            let shape = match &layer.kind {
                LayerKind::Ia3 { .. } => None, // made from the weight
                kind => Some(
                    kind.delta_shape(&shapes)
                        .map_err(|why| invalid(layer, &why))?,
                ),
            };
            let number = |key: &String| -> Result<f64> {
                tensors[key]
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .first()
                    .map(|&v| f64::from(v))
                    .ok_or_else(|| invalid(layer, &format!("{key} holds no number")))
            };
            // A1111's calc_scale: the file's scale, else alpha / dim, else 1; `scale` is it
            // times the LoRA's weight (DoRA's decomposition comes between the two).
            let dim = shape.as_ref().and_then(|s| s.dim);
            let (scale, calc_scale) = match (&layer.scale, &layer.alpha, dim) {
                (Some(s), _, _) => {
                    let s = number(s)?;
                    if !s.is_finite() {
                        return Err(invalid(layer, &format!("scale is {s}")));
                    }
                    (weight * s, s)
                }
                (None, Some(a), Some(dim)) => {
                    let alpha = number(a)?;
                    if !alpha.is_finite() {
                        return Err(invalid(layer, &format!("alpha is {alpha}")));
                    }
                    (weight * alpha / dim as f64, alpha / dim as f64)
                }
                _ => (*weight, 1.0),
            };
            let want = targets[&part][matched.weight].1.as_slice();
            let dora_scale = match &layer.dora_scale {
                None => None,
                Some(key) => {
                    let [a, b, c] = dora_scale_dims(tensors[key].dims(), want)
                        .map_err(|w| invalid(layer, &w))?;
                    Some(tensors[key].to_dtype(DType::F32)?.reshape((a, b, c))?)
                }
            };
            let weighted = |updown| {
                Made::Weighted(Weighted {
                    updown,
                    dora_scale: dora_scale.clone(),
                    multiplier: *weight,
                    lora: name.clone(),
                    layer: layer.name.clone(),
                })
            };
            let made = match (&layer.kind, shape) {
                (
                    LayerKind::Ia3 {
                        weight: w,
                        on_input,
                    },
                    _,
                ) => {
                    // network_ia3.py: `w` scales the rows, or with on_input the columns.
                    let on_input = number(on_input)? != 0.0;
                    let (rows, cols) = if on_input { (1, want[1]) } else { (want[0], 1) };
                    let w = tensors[w].to_dtype(DType::F32)?;
                    if w.elem_count() != rows * cols {
                        return Err(invalid(
                            layer,
                            &format!(
                                "IA3's weight has {} values; with on_input {on_input} it scales the weight {want:?} by {}",
                                w.elem_count(),
                                if on_input { "input column" } else { "output row" }
                            ),
                        ));
                    }
                    weighted(Updown::Ia3 {
                        w: w.reshape((rows, cols))?,
                        scale: calc_scale,
                    })
                }
                (LayerKind::Glora { a1, a2, b1, b2 }, _) => {
                    let m = |k: &String| tensors[k].to_dtype(DType::F32);
                    weighted(Updown::Glora {
                        fixed: m(b2)?.matmul(&m(b1)?)?,
                        a2: m(a2)?,
                        a1: m(a1)?,
                        scale: calc_scale,
                    })
                }
                (kind, Some(shape)) => {
                    let delta = kind.delta(&tensors, &shape)?.reshape(want)?;
                    match dora_scale {
                        None => Made::Plain((delta * scale)?),
                        Some(_) => weighted(Updown::Fixed((delta * calc_scale)?)),
                    }
                }
                (_, None) => unreachable!("every type but IA3 has its delta's shape"),
            };
            let mut made = vec![(matched.weight, made)];
            if let (
                Some(index),
                LayerKind::Full {
                    diff_b: Some(b), ..
                },
            ) = (matched.bias, &layer.kind)
            {
                // A1111's finalize_updown: the bias diff times the multiplier alone (no scale).
                made.push((
                    index,
                    Made::Plain((tensors[b].to_dtype(DType::F32)? * *weight)?),
                ));
            }
            for (index, made) in made {
                // NaN or infinity (in the file, or from overflow) would spread through every
                // image: refuse the file rather than merge it.
                let read = match &made {
                    Made::Plain(t) => vec![t],
                    Made::Weighted(w) => {
                        let updown = match &w.updown {
                            Updown::Fixed(t) | Updown::Ia3 { w: t, .. } => vec![t],
                            Updown::Glora { fixed, a2, a1, .. } => vec![fixed, a2, a1],
                        };
                        updown.into_iter().chain(&w.dora_scale).collect()
                    }
                };
                for t in read {
                    if !t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
                        return Err(invalid(
                            layer,
                            "its weights are not finite (NaN or infinity, or too large)",
                        ));
                    }
                }
                let f32_of = |d: Tensor| d.to_dtype(DType::F32);
                let next = match (deltas.remove(&(part, index)), made) {
                    // A set of one LoRA rounds each delta now: the set is never all in f32 at
                    // once.
                    (None, Made::Plain(d)) if round_now => {
                        Delta::Sum(checked_in(dtype, d, || overflow_at(part, index))?)
                    }
                    (None, Made::Plain(d)) => Delta::Sum(d),
                    (Some(Delta::Sum(sum)), Made::Plain(d)) => {
                        summed.insert((part, index));
                        Delta::Sum((f32_of(sum)? + d)?)
                    }
                    (Some(Delta::FromWeight(mut steps)), Made::Plain(d)) => {
                        steps.push(Step::Add(d));
                        Delta::FromWeight(steps)
                    }
                    (None, Made::Weighted(w)) => Delta::FromWeight(vec![Step::Weighted(w)]),
                    (Some(Delta::Sum(sum)), Made::Weighted(w)) => {
                        Delta::FromWeight(vec![Step::Add(f32_of(sum)?), Step::Weighted(w)])
                    }
                    (Some(Delta::FromWeight(mut steps)), Made::Weighted(w)) => {
                        steps.push(Step::Weighted(w));
                        Delta::FromWeight(steps)
                    }
                };
                deltas.insert((part, index), next);
            }
        }
    }
    for (&(part, index), delta) in deltas.iter_mut() {
        let Delta::Sum(sum) = delta else {
            continue; // made in f32 when merged, checked then
        };
        // One f32 delta is finite, checked above: all f32 holds.
        if summed.contains(&(part, index)) || (dtype != DType::F32 && !round_now) {
            // Several LoRAs' sum can pass what the weights' dtype holds (65504 in f16).
            *sum = checked_in(dtype, sum.clone(), || overflow_at(part, index))?;
        }
    }
    Ok(deltas)
}

/// A LoRA file's tensors on the CPU; a bool (IA3's `on_input`) as a u8 (candle has no bool).
fn load_tensors(path: &std::path::Path) -> Result<HashMap<String, Tensor>> {
    let data = std::fs::read(path).map_err(|e| PipelineError::io(path, e))?;
    let bad = |e: safetensors::SafeTensorError| PipelineError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = safetensors::SafeTensors::deserialize(&data).map_err(bad)?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let tensor = if view.dtype() == safetensors::Dtype::BOOL {
            Tensor::from_raw_buffer(view.data(), DType::U8, view.shape(), &Device::Cpu)?
        } else {
            candle_core::safetensors::Load::load(&view, &Device::Cpu)?
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

/// `delta` (f32) in `dtype`, or `overflow()` when a value is beyond what `dtype` holds.
fn checked_in(
    dtype: DType,
    delta: Tensor,
    overflow: impl FnOnce() -> PipelineError,
) -> Result<Tensor> {
    let max = delta.abs()?.max_all()?.to_scalar::<f32>()?;
    if max.is_nan() || max > dtype_limit(dtype) {
        return Err(overflow());
    }
    Ok(delta.to_dtype(dtype)?)
}

/// The largest magnitude a weight of `dtype` holds.
fn dtype_limit(dtype: DType) -> f32 {
    if dtype == DType::F16 {
        65504.0
    } else {
        f32::MAX
    }
}

fn overflow(loras: &[(String, f64)], part: Part, path: &str, dtype: DType) -> PipelineError {
    PipelineError::InvalidRequest(format!(
        "LoRAs {:?}: merged into {} weight {path}, they overflow its {dtype:?} range",
        loras.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        part.name(),
    ))
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
