//! The deltas of a LoRA set, computed from the files and the targets' shapes alone (before any
//! offloaded part is built): each layer's type delta times A1111's scale and the LoRA's weight,
//! summed by weight, checked for NaN and for the weights' dtype range; or, where a layer's delta
//! depends on the weight, the steps that make it when the weight is merged (`from_weight`).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use super::from_weight::{dora_scale_dims, Delta, Step, Updown, Weighted};
use super::merge::match_layers;
use super::oft::rotation;
use super::{LayerKeys, LayerKind, LoraLibrary, Part, TargetShapes};
use crate::{PipelineError, Result};

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
            let oft = matches!(layer.kind, LayerKind::Oft { .. });
            let (scale, calc_scale) = match (&layer.scale, &layer.alpha, dim) {
                // network_oft.py sets the module's scale to 1 (its alpha is a constraint).
                _ if oft => (*weight, 1.0),
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
                (
                    LayerKind::Oft {
                        blocks,
                        is_r,
                        rescale,
                    },
                    _,
                ) => {
                    // The constraint: alpha times the rows, for oft_blocks (0: none).
                    let constraint = match (&layer.alpha, is_r) {
                        (Some(a), false) => number(a)? * want[0] as f64,
                        _ => 0.0,
                    };
                    // (An infinite constraint clamps nothing, as in A1111.)
                    if constraint.is_nan() {
                        return Err(invalid(layer, "alpha is NaN"));
                    }
                    let rescale = match rescale {
                        None => None,
                        Some(k) => {
                            let r = tensors[k].to_dtype(DType::F32)?;
                            let n = r.elem_count();
                            if n != want[0] && n != 1 {
                                return Err(invalid(
                                    layer,
                                    &format!(
                                        "rescale has {n} values; it scales the weight {want:?} by output row"
                                    ),
                                ));
                            }
                            Some(r.reshape((n, 1))?)
                        }
                    };
                    weighted(Updown::Oft(rotation(
                        &tensors[blocks],
                        *is_r,
                        constraint as f32,
                        rescale,
                    )?))
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
            if let (Some(index), Some(b)) = (matched.bias, layer.kind.bias_key()) {
                // A1111's finalize_updown: the bias diff (a full diff's diff_b, a norm's
                // b_norm) times the multiplier alone (no scale).
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
                            Updown::Oft(r) => r.tensors().collect(),
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
pub(super) fn dtype_limit(dtype: DType) -> f32 {
    if dtype == DType::F16 {
        65504.0
    } else {
        f32::MAX
    }
}

pub(super) fn overflow(
    loras: &[(String, f64)],
    part: Part,
    path: &str,
    dtype: DType,
) -> PipelineError {
    PipelineError::InvalidRequest(format!(
        "LoRAs {:?}: merged into {} weight {path}, they overflow its {dtype:?} range",
        loras.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        part.name(),
    ))
}
