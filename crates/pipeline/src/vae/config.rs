//! `vae/config.json` as diffusers' `AutoencoderKL` reads it, with its defaults and checks.

use serde::Deserialize;

use super::Activation;
use crate::{PipelineError, Result};

/// `vae/config.json` (diffusers `AutoencoderKL`); absent keys take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// `None` for SD 1.5; SD3/Flux-style VAEs subtract it before scaling.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The VAE overflows in fp16; the pipeline decodes in f32 when this is set.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// An int or a pair; only informative for decoding.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
}

fn default_1() -> usize {
    1
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

impl VaeConfig {
    /// `key` (`up_block_types` or `down_block_types`) has one block per `block_out_channels`
    /// entry, each of the one type this code builds.
    pub(crate) fn check_block_types(&self, key: &str, types: &[String], want: &str) -> Result<()> {
        let bad = |m: String| Err(PipelineError::config("vae/config.json", m));
        if types.len() != self.block_out_channels.len() {
            return bad(format!(
                "{key} has {} entries but block_out_channels has {}",
                types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = types.iter().find(|t| t.as_str() != want) {
            return bad(format!("unsupported {key} entry {t:?} (only {want})"));
        }
        Ok(())
    }

    /// Rejects configs this decoder cannot build, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::config("vae/config.json", m));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        self.check_block_types("up_block_types", &self.up_block_types, "UpDecoderBlock2D")?;
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % g != 0)
        {
            return bad(format!(
                "norm_num_groups {g} does not divide block_out_channels {:?}",
                self.block_out_channels
            ));
        }
        Activation::from_name(&self.act_fn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_follow_diffusers() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 4}"#,
        )
        .unwrap();
        assert_eq!(cfg.latent_channels, 4);
        assert!(cfg.mid_block_add_attention && cfg.use_post_quant_conv);
        assert_eq!(cfg.shift_factor, None);
        assert!((cfg.scaling_factor - 0.18215).abs() < 1e-12);
        cfg.validate().unwrap();
    }

    #[test]
    fn config_rejects_mismatched_blocks() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "up_block_types": ["UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        assert!(matches!(cfg.validate(), Err(PipelineError::Config { .. })));
        // The encoder's down blocks go through the same check, named by their key.
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "norm_num_groups": 4,
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
                "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let e = cfg
            .check_block_types(
                "down_block_types",
                &cfg.down_block_types,
                "DownEncoderBlock2D",
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("down_block_types") && e.contains("AttnDownEncoderBlock2D"),
            "{e}"
        );
    }
}
