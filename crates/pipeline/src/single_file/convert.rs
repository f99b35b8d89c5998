//! The conversion: the file's keys split per model, renamed, written as safetensors files with
//! their configs, the folder validated and renamed into place.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::configs::Configs;
use super::key_map::{map_unet_key, map_vae_key};
use super::{
    validate_folder, weights, ConvertOptions, ConvertSummary, SourceFile, CLIP_PREFIX,
    TEXT_ENCODER_WEIGHTS, UNET_PREFIX, UNET_WEIGHTS, VAE_PREFIXES, VAE_WEIGHTS,
};
use crate::error::{PipelineError, Result};

/// One output tensor: diffusers name, source name, output shape.
struct Planned {
    name: String,
    src: String,
    shape: Vec<usize>,
}

/// Converts a single-file checkpoint into a diffusers folder at `out_dir` (which must not
/// exist). The folder is assembled under a temporary name beside it and renamed into place
/// only when complete, so a crash never leaves a half-written model where a whole one is expected.
pub fn convert_single_file(
    src: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    let file = SourceFile::open(src)?;
    let parts = split_components(&file)?;
    let ([unet, vae, clip], ignored) = parts;

    let mut configs = match opts.config_dir {
        Some(dir) => Configs::from_dir(dir)?,
        None => Configs::infer(&file, &unet, &vae, &clip)?,
    };
    let yaml_config = super::ldm_yaml::beside(src);
    if let Some(yaml) = &yaml_config {
        configs.apply_yaml(yaml)?;
    }
    let layers = configs.unet["layers_per_block"].as_u64().ok_or_else(|| {
        PipelineError::config("unet/config.json", "layers_per_block must be an integer")
    })? as usize;
    let n_vae = configs.vae["block_out_channels"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);

    let mut plans: [Vec<Planned>; 3] = Default::default();
    for (src_name, k) in &unet {
        let name = map_unet_key(k, layers)
            .ok_or_else(|| weights(src, format!("unrecognised UNet key `{src_name}`")))?;
        plans[0].push(Planned {
            name,
            src: src_name.clone(),
            shape: file.tensors[src_name].shape.clone(),
        });
    }
    for (src_name, k) in &vae {
        let Some(name) = map_vae_key(k, n_vae) else {
            return Err(weights(src, format!("unrecognised VAE key `{src_name}`")));
        };
        let mut shape = file.tensors[src_name].shape.clone();
        // LDM keeps the VAE mid-block attention projections as 1x1 convolutions.
        if name.contains(".mid_block.attentions.0.") && name.ends_with(".weight") && shape.len() > 2
        {
            if shape[2..].iter().any(|&d| d != 1) {
                return Err(weights(
                    src,
                    format!("`{src_name}` is not a 1x1 projection: {shape:?}"),
                ));
            }
            shape.truncate(2);
        }
        plans[1].push(Planned {
            name,
            src: src_name.clone(),
            shape,
        });
    }
    for (src_name, k) in &clip {
        let name = if k.starts_with("text_model.") {
            k.clone()
        } else {
            format!("text_model.{k}")
        };
        plans[2].push(Planned {
            name,
            src: src_name.clone(),
            shape: file.tensors[src_name].shape.clone(),
        });
    }
    for (plan, what) in plans.iter().zip(["UNet", "VAE", "text encoder"]) {
        if plan.is_empty() {
            return Err(weights(
                src,
                format!("no {what} weights found: not a Stable Diffusion 1.x single file"),
            ));
        }
        let mut seen = HashMap::new();
        for p in plan {
            if let Some(prev) = seen.insert(p.name.as_str(), p.src.as_str()) {
                return Err(weights(
                    src,
                    format!("`{prev}` and `{}` both map to `{}`", p.src, p.name),
                ));
            }
        }
    }

    // Token ids past the embedding table would fail at the first request; fail now instead.
    let vocab_json = match &configs.tokenizer_dir {
        Some(dir) => std::fs::read(dir.join("vocab.json")).ok(),
        None => opts
            .tokenizer_files
            .iter()
            .find(|(n, _)| *n == "vocab.json")
            .map(|(_, b)| b.to_vec()),
    };
    let vocab_len = vocab_json
        .and_then(|b| crate::config_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_object().map(|o| o.len()));
    if let (Some(n), Some(rows)) = (vocab_len, configs.text_encoder["vocab_size"].as_u64()) {
        if n as u64 > rows {
            return Err(weights(
                src,
                format!(
                    "the text encoder embeds {rows} tokens but the tokenizer has {n}; \
                     give a config folder whose tokenizer matches the checkpoint"
                ),
            ));
        }
    }

    // Assemble beside the target, rename when complete.
    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| PipelineError::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        out_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        for (plan, rel) in plans
            .iter()
            .zip([UNET_WEIGHTS, VAE_WEIGHTS, TEXT_ENCODER_WEIGHTS])
        {
            write_safetensors(&file, plan, &tmp.join(rel))?;
        }
        configs.write(&tmp, opts)?;
        validate_folder(&tmp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, out_dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished the same conversion first: theirs is as good as ours.
        if !out_dir.join("model_index.json").is_file() {
            return Err(PipelineError::io(out_dir, e));
        }
    }
    Ok(ConvertSummary {
        tensors: [plans[0].len(), plans[1].len(), plans[2].len()],
        ignored,
        inferred_configs: opts.config_dir.is_none(),
        yaml_config,
    })
}

/// Splits the file's keys into UNet / VAE / text-encoder maps (source name -> key without the
/// prefix) and counts the keys that belong to none.
#[allow(clippy::type_complexity)]
pub(super) fn split_components(file: &SourceFile) -> Result<([Vec<(String, String)>; 3], usize)> {
    let names: Vec<&String> = file.tensors.keys().collect();
    if names
        .iter()
        .any(|k| k.starts_with("cond_stage_model.model.") || k.starts_with("conditioner."))
    {
        return Err(weights(
            &file.path,
            "this is an SD 2.x (OpenCLIP) or SDXL single file; only Stable Diffusion 1.x is supported",
        ));
    }
    let vae_prefix = VAE_PREFIXES
        .iter()
        .copied()
        .find(|p| names.iter().any(|k| k.starts_with(p)))
        .unwrap_or(VAE_PREFIXES[0]);
    let mut out: [Vec<(String, String)>; 3] = Default::default();
    let mut ignored = 0;
    for k in names {
        if let Some(rest) = k.strip_prefix(UNET_PREFIX) {
            out[0].push((k.clone(), rest.to_string()));
        } else if let Some(rest) = k.strip_prefix(vae_prefix) {
            // Some files keep the VAE's training loss (discriminator, LPIPS) weights.
            if rest.starts_with("loss.") {
                ignored += 1;
            } else {
                out[1].push((k.clone(), rest.to_string()));
            }
        } else if let Some(rest) = k.strip_prefix(CLIP_PREFIX) {
            out[2].push((k.clone(), rest.to_string()));
        } else {
            ignored += 1; // model_ema.*, alphas_cumprod, betas, ...
        }
    }
    Ok((out, ignored))
}

/// Streams tensors into a safetensors file, one source tensor in memory at a time.
fn write_safetensors(file: &SourceFile, plan: &[Planned], out: &Path) -> Result<()> {
    let mut plan: Vec<&Planned> = plan.iter().collect();
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for p in &plan {
        let t = &file.tensors[&p.src];
        let n = p.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        header.insert(
            p.name.clone(),
            json!({"dtype": t.dtype, "shape": p.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut hdr = serde_json::to_vec(&header).map_err(|e| weights(out, e))?;
    while !hdr.len().is_multiple_of(8) {
        hdr.push(b' ');
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
    }
    let f = std::fs::File::create(out).map_err(|e| PipelineError::io(out, e))?;
    let mut w = std::io::BufWriter::new(f);
    let io = |e| PipelineError::io(out, e);
    w.write_all(&(hdr.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hdr).map_err(io)?;
    for p in &plan {
        let data = file.read(&p.src)?;
        w.write_all(&data).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| PipelineError::io(out, e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}
