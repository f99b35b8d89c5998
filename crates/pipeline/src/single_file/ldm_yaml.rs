//! A1111's `<checkpoint>.yaml`: the original LDM config a single-file checkpoint may carry
//! beside it under the same stem (`modules/sd_models_config.py`,
//! `find_checkpoint_config_near_filename`: `model.yaml` for `model.safetensors`). A1111 builds
//! the model from it instead of guessing. Here it decides what the weights cannot say (the
//! prediction type, the noise schedule, the VAE's latent scale, the UNet's head count), and
//! what they do say it must agree with: a config that contradicts the weights, or that is not
//! an SD 1.x model (SD 2's OpenCLIP, SDXL, SD 3, instruct-pix2pix, AltDiffusion), is refused,
//! naming the key.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{PipelineError, Result};

/// The LDM classes of SD 1.x models (`model.target`).
const SD1_MODELS: [&str; 2] = [
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
];
/// SD 1.x's text encoder (`model.params.cond_stage_config.target`).
const SD1_TEXT_ENCODER: &str = "ldm.modules.encoders.modules.FrozenCLIPEmbedder";

/// The config A1111 reads for `checkpoint`, if there is one: the same path with `.yaml`.
pub(super) fn beside(checkpoint: &Path) -> Option<PathBuf> {
    let yaml = checkpoint.with_extension("yaml");
    yaml.is_file().then_some(yaml)
}

/// The configs in use (inferred from the weights, or a config folder's), which the YAML changes.
pub(super) struct Inferred<'a> {
    pub unet: &'a mut Value,
    pub vae: &'a mut Value,
    pub scheduler: &'a mut Value,
}

/// Reads the YAML at `path` and applies it to `configs`.
pub(super) fn apply(path: &Path, configs: Inferred) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    let yaml: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| PipelineError::config(path, format!("is not readable YAML ({e})")))?;
    apply_value(&yaml, configs).map_err(|m| PipelineError::config(path, m))
}

/// `value` at a dotted `key` (`None` when absent or null).
fn at<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.')
        .try_fold(value, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn number(value: &Value, key: &str) -> std::result::Result<Option<f64>, String> {
    at(value, key)
        .map(|v| {
            v.as_f64()
                .ok_or(format!("{key} must be a number (got {v})"))
        })
        .transpose()
}

fn integer(value: &Value, key: &str) -> std::result::Result<Option<u64>, String> {
    at(value, key)
        .map(|v| {
            v.as_u64()
                .ok_or(format!("{key} must be a whole number (got {v})"))
        })
        .transpose()
}

fn integers(value: &Value, key: &str) -> std::result::Result<Option<Vec<u64>>, String> {
    at(value, key)
        .map(|v| {
            v.as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect())
                .ok_or(format!("{key} must be a list of whole numbers (got {v})"))
        })
        .transpose()
}

fn boolean(value: &Value, key: &str) -> std::result::Result<Option<bool>, String> {
    at(value, key)
        .map(|v| {
            v.as_bool()
                .ok_or(format!("{key} must be true or false (got {v})"))
        })
        .transpose()
}

fn text<'a>(value: &'a Value, key: &str) -> std::result::Result<Option<&'a str>, String> {
    at(value, key)
        .map(|v| v.as_str().ok_or(format!("{key} must be text (got {v})")))
        .transpose()
}

/// A stated value that must equal what the weights imply.
fn agree(key: &str, stated: Option<Value>, weights: &Value) -> std::result::Result<(), String> {
    match stated {
        Some(s) if &s != weights => Err(format!(
            "{key} is {s}, but the checkpoint's weights have {weights}"
        )),
        _ => Ok(()),
    }
}

fn apply_value(yaml: &Value, configs: Inferred) -> std::result::Result<(), String> {
    let Inferred {
        unet,
        vae,
        scheduler,
    } = configs;
    let model = text(yaml, "model.target")?.ok_or("has no model.target")?;
    if !SD1_MODELS.contains(&model) {
        return Err(format!(
            "model.target {model} is not a Stable Diffusion 1.x model (SD 1.x's are {}); \
             SDXL, SD 3, instruct-pix2pix and depth models are not supported",
            SD1_MODELS.join(", ")
        ));
    }
    let p = |k: &str| format!("model.params.{k}");
    if let Some(encoder) = text(yaml, &p("cond_stage_config.target"))? {
        if encoder != SD1_TEXT_ENCODER {
            return Err(format!(
                "model.params.cond_stage_config.target {encoder} is not SD 1.x's CLIP text \
                 encoder ({SD1_TEXT_ENCODER}): SD 2.x's OpenCLIP and other text encoders are \
                 not supported"
            ));
        }
    }

    // The scheduler: LDM's DDPM, whose "linear" schedule is diffusers' scaled_linear.
    // Absent: LDM's default, eps, which is also the scheduler's unless a config folder says.
    if let Some(stated) = text(yaml, &p("parameterization"))? {
        let prediction = match stated {
            "eps" => "epsilon",
            "v" => "v_prediction",
            "x0" => "sample",
            other => {
                return Err(format!(
                    "model.params.parameterization {other:?} is not one of eps, v, x0"
                ))
            }
        };
        scheduler["prediction_type"] = json!(prediction);
    }
    match text(yaml, &p("beta_schedule"))? {
        None | Some("linear") => {}
        Some(other) => {
            return Err(format!(
                "model.params.beta_schedule {other:?} is not supported (only LDM's \"linear\", \
                 diffusers' scaled_linear)"
            ))
        }
    }
    if let Some(v) = number(yaml, &p("linear_start"))? {
        scheduler["beta_start"] = json!(v);
    }
    if let Some(v) = number(yaml, &p("linear_end"))? {
        scheduler["beta_end"] = json!(v);
    }
    if let Some(v) = integer(yaml, &p("timesteps"))? {
        scheduler["num_train_timesteps"] = json!(v);
    }
    if let Some(v) = number(yaml, &p("scale_factor"))? {
        vae["scaling_factor"] = json!(v);
    }

    // The UNet (`openaimodel.UNetModel`'s arguments).
    let u = |k: &str| format!("model.params.unet_config.params.{k}");
    for key in ["in_channels", "out_channels"] {
        agree(
            &u(key),
            integer(yaml, &u(key))?.map(Value::from),
            &unet[key],
        )?;
    }
    let mult = integers(yaml, &u("channel_mult"))?;
    if let Some(base) = integer(yaml, &u("model_channels"))? {
        let mult = mult.clone().unwrap_or(vec![1, 2, 4, 8]);
        let channels: Vec<u64> = mult.iter().map(|m| base * m).collect();
        agree(
            &format!("{} x channel_mult", u("model_channels")),
            Some(json!(channels)),
            &unet["block_out_channels"],
        )?;
    }
    agree(
        &u("num_res_blocks"),
        integer(yaml, &u("num_res_blocks"))?.map(Value::from),
        &unet["layers_per_block"],
    )?;
    agree(
        &u("context_dim"),
        integer(yaml, &u("context_dim"))?.map(Value::from),
        &unet["cross_attention_dim"],
    )?;
    agree(
        &u("use_linear_in_transformer"),
        Some(json!(
            boolean(yaml, &u("use_linear_in_transformer"))?.unwrap_or(false)
        )),
        &unet["use_linear_projection"],
    )?;
    agree(
        &u("transformer_depth"),
        integer(yaml, &u("transformer_depth"))?.map(Value::from),
        &unet["transformer_layers_per_block"],
    )?;
    if let Some(resolutions) = integers(yaml, &u("attention_resolutions"))? {
        // Level i works at downsampling 2^i; it has attention when that is listed.
        let levels = unet["down_block_types"].as_array().map_or(0, Vec::len);
        let stated: Vec<&str> = (0..levels)
            .map(|i| match resolutions.contains(&(1 << i)) {
                true => "CrossAttnDownBlock2D",
                false => "DownBlock2D",
            })
            .collect();
        agree(
            &u("attention_resolutions"),
            Some(json!(stated)),
            &unet["down_block_types"],
        )?;
    }
    if integer(yaml, &u("num_head_channels"))?.is_some() {
        return Err(format!(
            "{} sets the heads by their width (SD 2.x's way); SD 1.x's configs give num_heads",
            u("num_head_channels")
        ));
    }
    // What the weights cannot say: diffusers' `attention_head_dim` is SD 1.x's head count.
    if let Some(heads) = integer(yaml, &u("num_heads"))? {
        unet["attention_head_dim"] = json!(heads);
    }

    // The VAE (`first_stage_config`).
    let f = |k: &str| format!("model.params.first_stage_config.params.{k}");
    agree(
        &f("embed_dim"),
        integer(yaml, &f("embed_dim"))?.map(Value::from),
        &vae["latent_channels"],
    )?;
    if let Some(base) = integer(yaml, &f("ddconfig.ch"))? {
        let mult = integers(yaml, &f("ddconfig.ch_mult"))?.unwrap_or(vec![1, 2, 4, 8]);
        let channels: Vec<u64> = mult.iter().map(|m| base * m).collect();
        agree(
            &format!("{} x ch_mult", f("ddconfig.ch")),
            Some(json!(channels)),
            &vae["block_out_channels"],
        )?;
    }
    agree(
        &f("ddconfig.num_res_blocks"),
        integer(yaml, &f("ddconfig.num_res_blocks"))?.map(Value::from),
        &vae["layers_per_block"],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tiny-a's inferred configs, in the shape `Configs::infer` gives them.
    fn tiny() -> (Value, Value, Value) {
        let unet = json!({"in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
                          "layers_per_block": 1, "cross_attention_dim": 32,
                          "use_linear_projection": false, "transformer_layers_per_block": 1,
                          "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                          "attention_head_dim": 8});
        let vae = json!({"latent_channels": 4, "block_out_channels": [32, 64],
                         "layers_per_block": 1, "scaling_factor": 0.18215});
        (unet, vae, super::super::sd15_scheduler_config())
    }

    fn run(yaml: &str) -> std::result::Result<(Value, Value, Value), String> {
        let (mut unet, mut vae, mut scheduler) = tiny();
        let value: Value = serde_yaml_ng::from_str(yaml).unwrap();
        apply_value(
            &value,
            Inferred {
                unet: &mut unet,
                vae: &mut vae,
                scheduler: &mut scheduler,
            },
        )?;
        Ok((unet, vae, scheduler))
    }

    const BASE: &str = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n";

    #[test]
    fn stated_values_decide_what_the_weights_cannot_say() {
        let (unet, vae, scheduler) = run(&format!(
            "{BASE}    parameterization: v\n    linear_start: 0.001\n    linear_end: 0.02\n    \
             timesteps: 500\n    scale_factor: 0.13\n    unet_config:\n      params:\n        \
             num_heads: 2\n        model_channels: 32\n        channel_mult: [1, 2]\n"
        ))
        .unwrap();
        assert_eq!(scheduler["prediction_type"], "v_prediction");
        assert_eq!(
            (
                &scheduler["beta_start"],
                &scheduler["beta_end"],
                &scheduler["num_train_timesteps"]
            ),
            (&json!(0.001), &json!(0.02), &json!(500))
        );
        assert_eq!(vae["scaling_factor"], json!(0.13));
        assert_eq!(unet["attention_head_dim"], 2);
        // Absent: as they were (SD 1.5's scheduler config: epsilon by default).
        let (unet, _, scheduler) = run(BASE).unwrap();
        assert!(scheduler.get("prediction_type").is_none());
        let (_, _, scheduler) = run(&format!("{BASE}    parameterization: eps\n")).unwrap();
        assert_eq!(scheduler["prediction_type"], "epsilon");
        assert_eq!(scheduler["beta_start"], json!(0.00085));
        assert_eq!(unet["attention_head_dim"], 8);
    }

    #[test]
    fn contradictions_and_other_models_are_refused_naming_the_key() {
        let unet = |k: &str| format!("{BASE}    unet_config:\n      params:\n        {k}\n");
        for (yaml, key) in [
            (
                unet("in_channels: 9"),
                "unet_config.params.in_channels is 9",
            ),
            (unet("context_dim: 768"), "context_dim is 768"),
            (unet("model_channels: 320"), "model_channels x channel_mult"),
            (
                unet("use_linear_in_transformer: true"),
                "use_linear_in_transformer",
            ),
            (
                unet("attention_resolutions: [2, 1]"),
                "attention_resolutions",
            ),
            (unet("num_head_channels: 64"), "num_head_channels"),
            (
                format!("{BASE}    parameterization: x1\n"),
                "parameterization",
            ),
            (
                format!("{BASE}    beta_schedule: cosine\n"),
                "beta_schedule",
            ),
            (
                "model:\n  target: sgm.models.diffusion.DiffusionEngine\n".to_string(),
                "not a Stable Diffusion 1.x model",
            ),
            (
                format!(
                    "{BASE}    cond_stage_config:\n      target: \
                     ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
                ),
                "OpenCLIP",
            ),
        ] {
            let e = run(&yaml).unwrap_err();
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }
}
