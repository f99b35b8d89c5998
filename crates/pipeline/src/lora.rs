//! LoRA adapters (README "Prompts, LoRA and embeddings"): kohya/A1111 and diffusers/PEFT files, on the
//! UNet (attention, feed-forward, projections, and LoCon's resnet and sampler convolutions) and
//! the text encoder.
//!
//! `W += weight * (alpha / rank) * up @ down`, summed over a request's LoRAs, merged into the
//! resident modules' weight tensors in place. Each changed tensor's original values are copied
//! first and written back when a request asks for other LoRAs (or none), so base weights come
//! back bit for bit and the model is never reloaded. Requests with the same LoRAs as the one
//! before reuse the merged weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::kernels::linear::Dense;
use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// A weight a LoRA may change, borrowed from a built module.
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A linear layer in our fused form (weight stored transposed on the CPU).
    Dense(&'a Dense),
    Linear(&'a candle_nn::Linear),
    Conv(&'a Conv2d),
}

impl Target<'_> {
    /// The tensor whose storage holds the weight (a deferred transpose is made now).
    fn storage(&self) -> Result<&Tensor> {
        Ok(match self {
            Target::Dense(d) => d.weight_storage()?,
            Target::Linear(l) => l.weight(),
            Target::Conv(c) => c.weight(),
        })
    }

    /// `[out, in]` (linear) or `[out, in, k, k]` (conv), as the files write the weight.
    fn canonical_dims(&self) -> Vec<usize> {
        match self {
            Target::Dense(d) => {
                let (out, inp) = d.out_in_dims();
                vec![out, inp]
            }
            Target::Linear(l) => l.weight().dims().to_vec(),
            Target::Conv(c) => c.weight().dims().to_vec(),
        }
    }

    /// `delta` `[out, in]` or `[out, in, k, k]` in the storage's layout.
    fn in_storage_layout(&self, delta: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Target::Dense(d) if d.is_transposed() => delta.t()?.contiguous()?,
            _ => delta.reshape(self.storage()?.dims())?,
        })
    }
}

/// Modules that can list the weights a LoRA may change, by diffusers module path.
pub(crate) trait LoraTargets {
    fn lora_targets<'a>(&'a self, prefix: &str, out: &mut Vec<(String, Target<'a>)>);
}

pub(crate) fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Which of the model's parts a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Unet,
    TextEncoder,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text_encoder",
        }
    }
}

/// The two file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss / A1111: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight`.
    Peft,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
        }
    }
}

/// One adapted layer as the file names it.
#[derive(Debug, Clone)]
struct LayerKeys {
    part: Part,
    /// Module path: dotted for PEFT, underscored for kohya (matched against the model's paths
    /// with `.` written as `_`).
    module: String,
    down: String,
    up: String,
    alpha: Option<String>,
}

/// What a LoRA file holds, read from its header (no tensor data).
#[derive(Debug, Clone)]
pub struct LoraInfo {
    pub name: String,
    pub file: PathBuf,
    pub format: LoraFormat,
    /// The largest rank of its layers.
    pub rank: usize,
    /// Parts it adapts (`unet`, `text_encoder`).
    pub targets: Vec<String>,
    /// Number of adapted layers.
    pub layers: usize,
    /// Adapted convolutions (LoCon) among them.
    pub conv_layers: usize,
    keys: Vec<LayerKeys>,
}

impl LoraInfo {
    /// Reads a `.safetensors` LoRA's header and sorts its keys into layers.
    pub fn read(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| PipelineError::config(path, "LoRA file name is not UTF-8"))?
            .to_owned();
        let bad = |m: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message: m,
        };
        let shapes = header_shapes(path)?;
        let mut keys = Vec::new();
        let mut format = None;
        for key in shapes.keys() {
            let Some((layer, format_here)) = parse_down_key(key) else {
                continue;
            };
            if *format.get_or_insert(format_here) != format_here {
                return Err(bad("mixes kohya and PEFT key names".into()));
            }
            let (part, module, up, alpha) = match format_here {
                LoraFormat::Kohya => {
                    let (part, module) = if let Some(m) = layer.strip_prefix("lora_unet_") {
                        (Part::Unet, m)
                    } else if let Some(m) = layer.strip_prefix("lora_te_") {
                        (Part::TextEncoder, m)
                    } else {
                        return Err(bad(format!(
                            "{key}: unknown part (expected lora_unet_ or lora_te_)"
                        )));
                    };
                    (
                        part,
                        module.to_owned(),
                        format!("{layer}.lora_up.weight"),
                        format!("{layer}.alpha"),
                    )
                }
                LoraFormat::Peft => {
                    let (part, module) = if let Some(m) = layer.strip_prefix("unet.") {
                        (Part::Unet, m)
                    } else if let Some(m) = layer.strip_prefix("text_encoder.") {
                        (Part::TextEncoder, m)
                    } else if let Some(m) = layer.strip_prefix("base_model.model.") {
                        (Part::Unet, m)
                    } else {
                        (Part::Unet, layer)
                    };
                    (
                        part,
                        module.to_owned(),
                        format!("{layer}.lora_B.weight"),
                        format!("{layer}.alpha"),
                    )
                }
            };
            let Some(up_shape) = shapes.get(&up) else {
                return Err(bad(format!("{key} has no matching {up}")));
            };
            let alpha = shapes.contains_key(&alpha).then_some(alpha);
            if let Some(why) = layer_shape_problem(
                &shapes[key],
                up_shape,
                alpha.as_ref().map(|a| shapes[a].as_slice()),
            ) {
                return Err(bad(format!("{layer}: {why}")));
            }
            keys.push(LayerKeys {
                part,
                module,
                down: key.clone(),
                up,
                alpha,
            });
        }
        let Some(format) = format else {
            return Err(bad(
                "no LoRA layers (expected lora_down/lora_up or lora_A/lora_B weights)".into(),
            ));
        };
        keys.sort_by(|a, b| a.down.cmp(&b.down));
        let rank = keys
            .iter()
            .filter_map(|k| shapes[&k.down].first().copied())
            .max()
            .unwrap_or(0);
        let conv_layers = keys
            .iter()
            .filter(|k| shapes[&k.down].len() == 4 && shapes[&k.down][2..] != [1, 1])
            .count();
        let mut targets: Vec<String> = keys.iter().map(|k| k.part.name().to_owned()).collect();
        targets.sort();
        targets.dedup();
        Ok(Self {
            name,
            file: path.to_path_buf(),
            format,
            rank,
            targets,
            layers: keys.len(),
            conv_layers,
            keys,
        })
    }
}

/// What is wrong with a layer's shapes, if anything: `down` is `[rank, in]` or
/// `[rank, in, kh, kw]` with rank at least 1, `up` is `[out, rank]` or `[out, rank, 1, 1]`,
/// and `alpha` one number. (Checked before any index into the shapes, and again when the file
/// is read for merging, in case it changed on disk.)
fn layer_shape_problem(down: &[usize], up: &[usize], alpha: Option<&[usize]>) -> Option<String> {
    if !matches!(down.len(), 2 | 4) || !matches!(up.len(), 2 | 4) {
        return Some(format!(
            "down {down:?} and up {up:?} must be 2-D (linear) or 4-D (convolution)"
        ));
    }
    if down[0] == 0 || up[1] != down[0] {
        return Some(format!(
            "down {down:?} and up {up:?} must share a rank of at least 1 (down[0] = up[1])"
        ));
    }
    if down.contains(&0) || up.contains(&0) {
        return Some(format!("down {down:?} or up {up:?} has an empty dimension"));
    }
    match alpha {
        Some(a) if a.iter().product::<usize>() != 1 => {
            Some(format!("alpha has shape {a:?}; it must be one number"))
        }
        _ => None,
    }
}

/// `(layer prefix, format)` of a down-projection key.
fn parse_down_key(key: &str) -> Option<(&str, LoraFormat)> {
    if let Some(l) = key.strip_suffix(".lora_down.weight") {
        return Some((l, LoraFormat::Kohya));
    }
    if let Some(l) = key.strip_suffix(".lora_A.weight") {
        return Some((l, LoraFormat::Peft));
    }
    None
}

/// Tensor shapes from a safetensors file's JSON header, without reading tensor data.
fn header_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    let bad = |m: String| PipelineError::Weights {
        path: path.to_path_buf(),
        message: format!("not a safetensors file: {m}"),
    };
    let mut f = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(len);
    // The claimed length is checked against the file before any buffer is made for it.
    let file_len = f.metadata().map_err(|e| PipelineError::io(path, e))?.len();
    if n > 100 << 20 || n > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "a header of {n} bytes in a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let mut shapes = HashMap::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("{name} has no shape")))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// The LoRA files of a folder (`LORA_DIR`), by name (file stem).
#[derive(Debug, Clone, Default)]
pub struct LoraLibrary {
    entries: BTreeMap<String, LoraInfo>,
}

impl LoraLibrary {
    /// Reads the header of every `*.safetensors` in `dir`. A file that is not a LoRA fails the
    /// scan, naming it.
    pub fn scan(dir: &Path) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let list = std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir, e))?;
        for entry in list {
            let path = entry.map_err(|e| PipelineError::io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                continue;
            }
            let info = LoraInfo::read(&path)?;
            entries.insert(info.name.clone(), info);
        }
        Ok(Self { entries })
    }

    pub fn list(&self) -> impl Iterator<Item = &LoraInfo> {
        self.entries.values()
    }

    pub fn get(&self, name: &str) -> Option<&LoraInfo> {
        self.entries.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Matches a file's layers to the model's weights: `(target index, layer)` per layer, or an
/// error naming the LoRA and the first layer that has no target or the wrong shape.
fn match_layers<'a>(
    info: &'a LoraInfo,
    shapes: &HashMap<String, Vec<usize>>,
    targets: &HashMap<Part, Vec<(String, Target<'_>)>>,
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
    for layer in &info.keys {
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
        let target = &targets[&layer.part][index].1;
        let want = target.canonical_dims();
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

/// The merged state of the resident model's weights.
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
    /// first. Checks every file before changing any weight.
    pub(crate) fn apply(
        &mut self,
        library: &LoraLibrary,
        loras: &[(String, f64)],
        targets: &HashMap<Part, Vec<(String, Target<'_>)>>,
    ) -> Result<()> {
        debug_assert!(self.originals.is_empty());
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
            for (part, index, layer) in match_layers(info, &shapes, targets)? {
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
                let want = targets[&part][index].1.canonical_dims();
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
            let original = weight.copy()?;
            weight.slice_set(&merged, 0, 0)?;
            self.originals.push((weight.clone(), original));
        }
        self.active = loras.to_vec();
        Ok(())
    }
}

/// Checks that every layer of `info` has a weight of the right shape among `targets`.
pub(crate) fn check_fits(
    info: &LoraInfo,
    targets: &HashMap<Part, Vec<(String, Target<'_>)>>,
) -> Result<()> {
    let shapes = header_shapes(&info.file)?;
    match_layers(info, &shapes, targets).map(|_| ())
}

/// A1111's `<lora:name:weight>` tags: the prompt without them, and the LoRAs they name (weight 1
/// when left out). A tag whose weight is not a number stays in the text.
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            text.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        let mut fields = inner.split(':');
        let name = fields.next().unwrap_or("").trim();
        let weight = match fields.next() {
            None => Some(1.0),
            Some(w) => w.trim().parse::<f64>().ok(),
        };
        match (name.is_empty(), weight) {
            (false, Some(w)) => loras.push((name.to_owned(), w)),
            _ => text.push_str(&rest[start..start + "<lora:".len() + end + 1]),
        }
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    (text, loras)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out() {
        let (text, loras) = extract_lora_tags("a cat <lora:ink_style:0.8>, <lora:x> (dog:1.2)");
        assert_eq!(text, "a cat ,  (dog:1.2)");
        assert_eq!(loras, vec![("ink_style".into(), 0.8), ("x".into(), 1.0)]);
        let (text, loras) = extract_lora_tags("<lora:bad:abc> <lora:open");
        assert_eq!(text, "<lora:bad:abc> <lora:open");
        assert!(loras.is_empty());
    }
}
