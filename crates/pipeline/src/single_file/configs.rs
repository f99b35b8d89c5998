//! The output folder's JSON configs: copied from a config folder, or inferred from the tensor
//! shapes with SD 1.5's values for what shapes cannot say.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{
    read_json_value, weights, ConvertOptions, SourceFile, CLIP_PREFIX, UNET_PREFIX, VAE_PREFIXES,
};
use crate::error::{PipelineError, Result};

/// The JSON configs of the output folder.
pub(super) struct Configs {
    pub(super) unet: serde_json::Value,
    pub(super) vae: serde_json::Value,
    pub(super) text_encoder: serde_json::Value,
    scheduler: serde_json::Value,
    /// Tokenizer folder of `config_dir`, if it has one.
    pub(super) tokenizer_dir: Option<PathBuf>,
    /// `config_dir`, whose config files are copied byte for byte.
    copy_from: Option<PathBuf>,
}

impl Configs {
    pub(super) fn from_dir(dir: &Path) -> Result<Self> {
        let tok = dir.join("tokenizer");
        Ok(Self {
            unet: read_json_value(&dir.join("unet/config.json"))?,
            vae: read_json_value(&dir.join("vae/config.json"))?,
            text_encoder: read_json_value(&dir.join("text_encoder/config.json"))?,
            scheduler: read_json_value(&dir.join("scheduler/scheduler_config.json"))?,
            tokenizer_dir: tok.join("vocab.json").is_file().then_some(tok),
            copy_from: Some(dir.to_path_buf()),
        })
    }

    pub(super) fn infer(
        file: &SourceFile,
        unet: &[(String, String)],
        vae: &[(String, String)],
        clip: &[(String, String)],
    ) -> Result<Self> {
        let shape = |prefix: &str, parts: &[(String, String)], key: &str| -> Result<Vec<usize>> {
            parts
                .iter()
                .find(|(_, k)| k == key)
                .map(|(s, _)| file.tensors[s].shape.clone())
                .ok_or_else(|| weights(&file.path, format!("tensor `{prefix}{key}` is missing")))
        };
        Ok(Self {
            unet: infer_unet(unet, &|k| shape(UNET_PREFIX, unet, k))?,
            vae: infer_vae(vae, &|k| shape(VAE_PREFIXES[0], vae, k))?,
            text_encoder: infer_clip(clip, &|k| shape(CLIP_PREFIX, clip, k))?,
            scheduler: sd15_scheduler_config(),
            tokenizer_dir: None,
            copy_from: None,
        })
    }

    /// The LDM config at `path` (`<checkpoint>.yaml`) applied: the files are written from the
    /// values then, not copied.
    pub(super) fn apply_yaml(&mut self, path: &Path) -> Result<()> {
        super::ldm_yaml::apply(
            path,
            super::ldm_yaml::Inferred {
                unet: &mut self.unet,
                vae: &mut self.vae,
                scheduler: &mut self.scheduler,
            },
        )?;
        self.copy_from = None;
        Ok(())
    }

    pub(super) fn write(&self, dir: &Path, opts: &ConvertOptions) -> Result<()> {
        let put = |rel: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| PipelineError::io(d, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| PipelineError::io(&p, e))
        };
        let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON");
        for (rel, value) in [
            ("unet/config.json", &self.unet),
            ("vae/config.json", &self.vae),
            ("text_encoder/config.json", &self.text_encoder),
            ("scheduler/scheduler_config.json", &self.scheduler),
        ] {
            match &self.copy_from {
                Some(src) => {
                    let p = src.join(rel);
                    put(
                        rel,
                        &std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?,
                    )?
                }
                None => put(rel, &pretty(value))?,
            }
        }
        let scheduler_class = self.scheduler["_class_name"]
            .as_str()
            .unwrap_or("PNDMScheduler");
        put(
            "model_index.json",
            &pretty(&json!({
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [null, null],
                "requires_safety_checker": false,
                "safety_checker": [null, null],
                "scheduler": ["diffusers", scheduler_class],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            })),
        )?;
        if let Some(tok) = &self.tokenizer_dir {
            for entry in std::fs::read_dir(tok).map_err(|e| PipelineError::io(tok, e))? {
                let entry = entry.map_err(|e| PipelineError::io(tok, e))?;
                if entry.path().is_file() {
                    let bytes = std::fs::read(entry.path())
                        .map_err(|e| PipelineError::io(entry.path(), e))?;
                    put(
                        &format!("tokenizer/{}", entry.file_name().to_string_lossy()),
                        &bytes,
                    )?;
                }
            }
        } else if opts.tokenizer_files.is_empty() {
            return Err(PipelineError::Tokenizer(
                "a single-file checkpoint carries no tokenizer and none was supplied".into(),
            ));
        } else {
            for (name, bytes) in opts.tokenizer_files {
                put(&format!("tokenizer/{name}"), bytes)?;
            }
        }
        Ok(())
    }
}

pub(super) type ShapeOf<'a> = dyn Fn(&str) -> Result<Vec<usize>> + 'a;

fn indices(parts: &[(String, String)], prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = parts
        .iter()
        .filter_map(|(_, k)| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn has(parts: &[(String, String)], prefix: &str) -> bool {
    parts.iter().any(|(_, k)| k.starts_with(prefix))
}

fn infer_unet(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    let bad = |m: String| PipelineError::config("unet (inferred from the single file)", m);
    let inputs = indices(parts, "input_blocks.");
    let max_in = *inputs.last().ok_or_else(|| bad("no input_blocks".into()))?;
    let ops: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|i| has(parts, &format!("input_blocks.{i}.0.op.")))
        .collect();
    // Each level holds `layers` resnets plus a downsampler, except the last.
    let (layers, levels) = match ops.first() {
        Some(&first) => (first - 1, ops.len() + 1),
        None => (max_in, 1),
    };
    if layers == 0 || max_in != levels * (layers + 1) - 1 {
        return Err(bad(format!(
            "input_blocks do not form a regular UNet ({} blocks)",
            max_in + 1
        )));
    }
    let mut channels = Vec::new();
    let mut down = Vec::new();
    for b in 0..levels {
        let first = 1 + b * (layers + 1);
        channels.push(shape(&format!("input_blocks.{first}.0.out_layers.3.weight"))?[0]);
        down.push(if has(parts, &format!("input_blocks.{first}.1.")) {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
    }
    let mut up = Vec::new();
    for b in 0..levels {
        let attn = has(parts, &format!("output_blocks.{}.1.", b * (layers + 1)))
            && !has(
                parts,
                &format!("output_blocks.{}.1.conv.", b * (layers + 1)),
            );
        up.push(if attn {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
    }
    let conv_in = shape("input_blocks.0.0.weight")?;
    let conv_out = shape("out.2.weight")?;
    let time = shape("time_embed.0.weight")?;
    if time != [4 * channels[0], channels[0]] {
        return Err(bad(format!(
            "time embedding {time:?} is not 4x{}",
            channels[0]
        )));
    }
    let attn_keys: Vec<&String> = parts
        .iter()
        .map(|(_, k)| k)
        .filter(|k| k.ends_with("attn2.to_k.weight"))
        .collect();
    let cross = match attn_keys.first() {
        Some(k) => shape(k)?[1],
        None => 768,
    };
    let linear = match parts
        .iter()
        .map(|(_, k)| k)
        .find(|k| k.ends_with("proj_in.weight"))
    {
        Some(k) => shape(k)?.len() == 2,
        None => false,
    };
    // Transformer depth: count of transformer_blocks in the first attention of the file.
    let depth = parts
        .iter()
        .filter_map(|(_, k)| {
            let rest = k.strip_prefix("middle_block.1.transformer_blocks.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(1, |m| m + 1);
    let mid = if has(parts, "middle_block.1.") {
        "UNetMidBlock2DCrossAttn"
    } else {
        "UNetMidBlock2D"
    };
    Ok(json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": channels,
        "center_input_sample": false,
        "cross_attention_dim": cross,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": conv_in[1],
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "mid_block_type": mid,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": conv_out[0],
        "sample_size": 64,
        "transformer_layers_per_block": depth,
        "up_block_types": up,
        "use_linear_projection": linear,
    }))
}

pub(super) fn infer_vae(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    let levels = indices(parts, "encoder.down.").len();
    if levels == 0 {
        return Err(PipelineError::config(
            "vae (inferred from the single file)",
            "no encoder.down blocks",
        ));
    }
    let layers = indices(parts, "encoder.down.0.block.").len();
    let channels: Vec<usize> = (0..levels)
        .map(|i| shape(&format!("encoder.down.{i}.block.0.conv2.weight")).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let latent = shape("decoder.conv_in.weight")?[1];
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "in_channels": shape("encoder.conv_in.weight")?[1],
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "out_channels": shape("decoder.conv_out.weight")?[0],
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "use_quant_conv": has(parts, "quant_conv."),
        "use_post_quant_conv": has(parts, "post_quant_conv."),
    }))
}

fn infer_clip(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    // Keys may or may not carry `text_model.`; normalise for lookups.
    let norm: Vec<(String, String)> = parts
        .iter()
        .map(|(s, k)| {
            (
                s.clone(),
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
            )
        })
        .collect();
    let shape_n = |k: &str| -> Result<Vec<usize>> {
        let full = parts
            .iter()
            .zip(&norm)
            .find(|(_, (_, n))| n == k)
            .map(|((_, orig), _)| orig.clone())
            .ok_or_else(|| {
                weights(
                    Path::new("text encoder"),
                    format!("tensor `{k}` is missing"),
                )
            })?;
        shape(&full)
    };
    let tok = shape_n("embeddings.token_embedding.weight")?;
    let pos = shape_n("embeddings.position_embedding.weight")?;
    let layers = indices(&norm, "encoder.layers.").len();
    let inter = shape_n("encoder.layers.0.mlp.fc1.weight")?[0];
    let hidden = tok[1];
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": pos[0],
        "model_type": "clip_text_model",
        "num_attention_heads": (hidden / 64).max(1),
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "vocab_size": tok[0],
    }))
}

/// `scheduler/scheduler_config.json` of stable-diffusion-v1-5 (keys absent there take the
/// scheduler class defaults, so none are added).
pub fn sd15_scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null
    })
}
