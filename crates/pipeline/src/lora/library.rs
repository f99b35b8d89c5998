//! Reading LoRA files: each `.safetensors` header sorted into layers (kohya/A1111 and
//! diffusers/PEFT key names, shapes checked), and the library of a folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{LayerKeys, LoraFormat, LoraInfo, Part};
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
            metadata,
            keys,
        })
    }
}

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
