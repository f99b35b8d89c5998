//! Reading LoRA files: each `.safetensors` header sorted into layers (kohya/A1111 and
//! diffusers/PEFT key names, shapes checked), and the library of a folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{LayerKeys, LayerKind, LoraFormat, LoraInfo, Part};
use crate::{PipelineError, Result};

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
        let (shapes, metadata) = header(path)?;
        let mut keys = peft_layers(&shapes);
        let kohya = kohya_layers(&shapes).map_err(bad)?;
        let format = match (keys.is_empty(), kohya.is_empty()) {
            (false, false) => return Err(bad("mixes kohya and PEFT key names".into())),
            (false, true) => LoraFormat::Peft,
            (true, false) => LoraFormat::Kohya,
            (true, true) => {
                return Err(bad(
                    "no LoRA layers (expected lora_down/lora_up or lora_A/lora_B weights, or LyCORIS hada_/lokr_/diff keys)".into(),
                ))
            }
        };
        keys.extend(kohya);
        let mut rank = 0;
        let mut conv_layers = 0;
        for layer in &keys {
            let up = match &layer.kind {
                LayerKind::Lora { up, mid: None, .. } => Some(up),
                _ => None,
            };
            let shape = match (&layer.kind, up) {
                (LayerKind::Refused { .. }, _) => None,
                (_, Some(up)) => {
                    let Some(up_shape) = shapes.get(up) else {
                        return Err(bad(format!("{} has no matching {up}", layer.name)));
                    };
                    if let Some(why) = layer_shape_problem(&shapes[&layer.name], up_shape, None) {
                        return Err(bad(format!("{}: {why}", layer.module_key())));
                    }
                    Some(layer.kind.delta_shape(&shapes).map_err(bad)?)
                }
                _ => Some(
                    layer
                        .kind
                        .delta_shape(&shapes)
                        .map_err(|why| bad(format!("{}: {why}", layer.module_key())))?,
                ),
            };
            for (what, key) in [("alpha", &layer.alpha), ("scale", &layer.scale)] {
                if let Some(key) = key {
                    let s = &shapes[key];
                    if s.iter().product::<usize>() != 1 {
                        return Err(bad(format!(
                            "{}: {what} has shape {s:?}; it must be one number",
                            layer.module_key()
                        )));
                    }
                }
            }
            if let Some(shape) = shape {
                rank = rank.max(shape.dim.unwrap_or(0));
                // LoHa and LoKr files flatten a convolution's kernel: the kohya names of the
                // 3x3 convolutions tell those.
                let conv_name = ["conv1", "conv2", "samplers_0_conv", "samplers.0.conv"]
                    .iter()
                    .any(|n| layer.module.ends_with(n));
                if shape.kernel || conv_name {
                    conv_layers += 1;
                }
            }
        }
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        let mut targets: Vec<String> = keys.iter().map(|k| k.part.name().to_owned()).collect();
        targets.sort();
        targets.dedup();
        let mut types: Vec<String> = keys.iter().map(|k| k.kind.type_name().to_owned()).collect();
        let dora =
            |k: &LayerKeys| k.dora_scale.is_some() && !matches!(k.kind, LayerKind::Refused { .. });
        if keys.iter().any(dora) {
            types.push("dora".into());
        }
        types.sort();
        types.dedup();
        Ok(Self {
            name,
            file: path.to_path_buf(),
            format,
            rank,
            targets,
            layers: keys.len(),
            conv_layers,
            types,
            metadata,
            keys,
        })
    }
}

/// The layers of diffusers/PEFT key names (`<module>.lora_A.weight`, `.lora_B.weight`).
fn peft_layers(shapes: &Shapes) -> Vec<LayerKeys> {
    let mut out = Vec::new();
    for key in shapes.keys() {
        let Some(layer) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let (part, module) = if let Some(m) = layer.strip_prefix("unet.") {
            (Part::Unet, m)
        } else if let Some(m) = layer.strip_prefix("text_encoder.") {
            (Part::TextEncoder, m)
        } else if let Some(m) = layer.strip_prefix("base_model.model.") {
            (Part::Unet, m)
        } else {
            (Part::Unet, layer)
        };
        let alpha = format!("{layer}.alpha");
        // PEFT's DoRA magnitudes (saved without PEFT's `.weight`, or with it): left out, the
        // layer would merge as a plain LoRA, silently another result.
        let kind = if [".lora_magnitude_vector", ".lora_magnitude_vector.weight"]
            .iter()
            .any(|suffix| shapes.contains_key(&format!("{layer}{suffix}")))
        {
            LayerKind::Refused {
                type_name: "dora",
                why: "is a PEFT DoRA layer (lora_magnitude_vector), which this server does not apply to PEFT files".into(),
            }
        } else {
            LayerKind::Lora {
                down: key.clone(),
                up: format!("{layer}.lora_B.weight"),
                mid: None,
            }
        };
        out.push(LayerKeys {
            part,
            module: module.to_owned(),
            name: key.clone(),
            kind,
            alpha: shapes.contains_key(&alpha).then_some(alpha),
            scale: None,
            dora_scale: None,
        });
    }
    out
}

/// The layers of kohya/A1111 key names: `lora_unet_<path>.<part>` and `lora_te_<path>.<part>`
/// (and kohya's OFT, `oft_unet_<path>`), each module's parts sorted into a type as A1111 does
/// (its keys split at the first `.`). Modules of other prefixes are left out (a bundled
/// embedding), unless their keys make a layer: then the file is refused. So are the modules
/// A1111 cannot match in an SD 1.5 model although the model has them ([`A1111_UNMATCHED`]).
fn kohya_layers(shapes: &Shapes) -> std::result::Result<Vec<LayerKeys>, String> {
    let mut modules: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for key in shapes.keys() {
        if let Some((module, part)) = key.split_once('.') {
            modules.entry(module).or_default().insert(part);
        }
    }
    let mut out = Vec::new();
    for (prefix, parts) in modules {
        let at = |p: &str| format!("{prefix}.{p}");
        if parts.contains("lora_down.weight") && !parts.contains("lora_up.weight") {
            return Err(format!(
                "{} has no matching {}",
                at("lora_down.weight"),
                at("lora_up.weight")
            ));
        }
        let kind = LayerKind::classify(prefix, &parts);
        // kohya-ss sd-scripts' OFT (networks/oft.py) names its modules `oft_unet_<path>`, with
        // the same paths as its LoRAs. A1111 maps that prefix to an SDXL model's names only, so
        // in an SD 1.5 model it matches none of them and drops the file's layers silently (its
        // load_network); applied here as kohya's own merge does, which is A1111's OFT formula.
        let (part, module) = if let Some(m) = prefix
            .strip_prefix("lora_unet_")
            .or_else(|| prefix.strip_prefix("oft_unet_"))
        {
            (Part::Unet, m)
        } else if let Some(m) = prefix.strip_prefix("lora_te_") {
            (Part::TextEncoder, m)
        } else if kind.is_some() {
            return Err(format!(
                "{prefix}: unknown part (expected lora_unet_, lora_te_ or oft_unet_)"
            ));
        } else {
            continue;
        };
        if A1111_UNMATCHED
            .iter()
            .any(|&(p, m)| p == part && module.strip_prefix("text_model_").unwrap_or(module) == m)
        {
            continue;
        }
        let kind = kind.unwrap_or_else(|| LayerKind::Refused {
            type_name: "unknown",
            why: format!(
                "has keys no module type takes ({})",
                parts.iter().copied().collect::<Vec<_>>().join(", ")
            ),
        });
        let name = match &kind {
            LayerKind::Lora { down, .. } => down.clone(),
            _ => prefix.to_owned(),
        };
        out.push(LayerKeys {
            part,
            module: module.to_owned(),
            name,
            kind,
            alpha: parts.contains("alpha").then(|| at("alpha")),
            scale: parts.contains("scale").then(|| at("scale")),
            dora_scale: parts.contains("dora_scale").then(|| at("dora_scale")),
        });
    }
    Ok(out)
}

/// Modules of the model a kohya-named file may name that A1111's `load_network` matches to no
/// module of an SD 1.5 model (its name conversion knows neither): A1111 leaves their layers out
/// without a word, and so does this server, so that a file gives the image it gives there.
const A1111_UNMATCHED: [(Part, &str); 2] = [
    (Part::Unet, "conv_norm_out"),
    (Part::TextEncoder, "final_layer_norm"),
];

/// What is wrong with a layer's shapes, if anything: `down` is `[rank, in]` or
/// `[rank, in, kh, kw]` with rank at least 1, `up` is `[out, rank]` or `[out, rank, 1, 1]`,
/// and `alpha` one number. (Checked before any index into the shapes, and again when the file
/// is read for merging, in case it changed on disk.)
pub(super) fn layer_shape_problem(
    down: &[usize],
    up: &[usize],
    alpha: Option<&[usize]>,
) -> Option<String> {
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

/// Tensor shapes from a safetensors file's JSON header, without reading tensor data.
pub(super) fn header_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    header(path).map(|(shapes, _)| shapes)
}

/// Tensor shapes by name.
type Shapes = HashMap<String, Vec<usize>>;

/// A safetensors file's JSON header: tensor shapes, and the string pairs of `__metadata__`
/// (kohya's training notes: `ss_output_name`, `ss_tag_frequency`, ...).
fn header(path: &Path) -> Result<(Shapes, BTreeMap<String, String>)> {
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
    let mut metadata = BTreeMap::new();
    let mut data_end = 0u64;
    for (name, entry) in json {
        if name == "__metadata__" {
            // The format allows only strings here; anything else is left out.
            if let serde_json::Value::Object(pairs) = entry {
                metadata.extend(
                    pairs
                        .into_iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned()))),
                );
            }
            continue;
        }
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("{name} has no shape")))?;
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(format!("{name} has no data_offsets")))?;
        data_end = data_end.max(end);
        shapes.insert(name, shape);
    }
    // A file still being copied in has its whole header but not all of its tensors yet.
    let held = file_len - 8 - n;
    if data_end > held {
        return Err(bad(format!(
            "truncated: its header describes {data_end} bytes of tensors, the file holds {held} (still being written?)"
        )));
    }
    Ok((shapes, metadata))
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
        let (library, failed) = Self::scan_each(dir)?;
        match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(library),
        }
    }

    /// Reads the header of every `*.safetensors` in `dir`: the library of those that are LoRAs,
    /// and each other file with why it is not (a file being written, a broken one). Only a
    /// folder that cannot be listed is an error.
    pub fn scan_each(dir: &Path) -> Result<(Self, Vec<(PathBuf, PipelineError)>)> {
        let mut entries = BTreeMap::new();
        let mut failed = Vec::new();
        for path in crate::weights::files_with_extension(dir, &["safetensors"])? {
            let path = path?;
            match LoraInfo::read(&path) {
                Ok(info) => {
                    entries.insert(info.name.clone(), info);
                }
                Err(e) => failed.push((path, e)),
            }
        }
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((Self { entries }, failed))
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
