//! CLIP's image encoder as transformers' `CLIPVisionModelWithProjection` computes
//! `image_embeds` (and the hidden states IP-Adapter Plus reads).
//!
//! Patches by a strided convolution (no bias), the class token before them, learned positions,
//! `pre_layrnorm`, encoder layers without a mask (the text encoder's layers,
//! [`crate::clip::EncoderLayer`]), then `post_layernorm` on the class token and
//! `visual_projection` (no bias).

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::clip::{EncoderLayer, F32LayerNorm, HiddenAct, LayerShape};
use crate::error::{PipelineError, Result};
use crate::kernels::linear::Dense;

/// `image_encoder/config.json` (transformers `CLIPVisionConfig`); absent keys take its
/// constructor's defaults, as transformers does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "d_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "d_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_num_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "d_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn d_hidden_size() -> usize {
    768
}
fn d_intermediate_size() -> usize {
    3072
}
fn d_projection_dim() -> usize {
    512
}
fn d_num_hidden_layers() -> usize {
    12
}
fn d_num_attention_heads() -> usize {
    12
}
fn d_num_channels() -> usize {
    3
}
fn d_image_size() -> usize {
    224
}
fn d_patch_size() -> usize {
    32
}
fn d_hidden_act() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn d_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// Reads a `config.json`, errors naming the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let cfg: Self = crate::error::read_json(path)?;
        cfg.validate().map_err(|m| PipelineError::config(path, m))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.layer_shape().validate(&[
            ("projection_dim", self.projection_dim),
            ("num_channels", self.num_channels),
            ("patch_size", self.patch_size),
        ])?;
        if self.image_size < self.patch_size {
            return Err(format!(
                "image_size {} is smaller than patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }

    /// Patches a side (transformers' `image_size // patch_size`).
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// The encoder's outputs an adapter reads.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `image_embeds`: `[B, projection_dim]`.
    pub image_embeds: Tensor,
    /// `hidden_states[-2]` (the penultimate layer's output, `[B, positions, hidden]`); `None`
    /// unless asked for.
    pub penultimate: Option<Tensor>,
}

/// transformers' `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: F32LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: F32LayerNorm,
    visual_projection: Dense,
    device: Device,
}

impl ClipVisionModel {
    /// Builds the model from `vb` rooted at the weight file (`vision_model.*` and
    /// `visual_projection.weight`; `vision_model.embeddings.position_ids`, if present, is
    /// ignored).
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|m| PipelineError::config("image_encoder/config.json", m))?;
        let c = config;
        let h = c.hidden_size;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let positions = c.grid() * c.grid() + 1;
        let shape = c.layer_shape();
        Ok(Self {
            patch_embedding: emb.get(
                (h, c.num_channels, c.patch_size, c.patch_size),
                "patch_embedding.weight",
            )?,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            pre_layrnorm: F32LayerNorm::new(h, c.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| EncoderLayer::new(&shape, vm.pp(format!("encoder.layers.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            post_layernorm: F32LayerNorm::new(h, c.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: Dense::load(h, c.projection_dim, false, vb.pp("visual_projection"))?,
            device: vb.device().clone(),
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values` `[B, channels, image_size, image_size]` (the processor's output) to the
    /// image embeds, and with `penultimate` the penultimate layer's hidden states.
    pub fn forward(&self, pixel_values: &Tensor, penultimate: bool) -> Result<VisionOutput> {
        let c = &self.config;
        let (b, ch, hh, ww) = pixel_values.dims4()?;
        if (ch, hh, ww) != (c.num_channels, c.image_size, c.image_size) {
            return Err(PipelineError::InvalidRequest(format!(
                "the image encoder takes [B, {}, {s}, {s}] pixels, got {:?}",
                c.num_channels,
                pixel_values.dims(),
                s = c.image_size
            )));
        }
        let dtype = self.patch_embedding.dtype();
        let x = pixel_values.to_device(&self.device)?.to_dtype(dtype)?;
        // [B, hidden, grid, grid] -> [B, grid², hidden]
        let patches = x
            .conv2d(&self.patch_embedding, 0, c.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?
            .to_dtype(dtype)?;
        let x = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        let mut before_last = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            // hidden_states[-2]: the input of the last layer (the embeddings for one layer).
            if penultimate && i + 1 == n {
                before_last = Some(x.clone());
            }
            x = layer.forward(&x, None)?;
        }
        if penultimate && n == 0 {
            before_last = Some(x.clone());
        }
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(VisionOutput {
            image_embeds: self.visual_projection.forward(&pooled, None)?,
            penultimate: before_last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ClipVisionConfig;

    /// A config that breaks a rule is refused naming the field, the layers' rules (shared with
    /// the text encoder's) as well as the vision encoder's own.
    #[test]
    fn a_broken_config_is_refused_naming_the_field() {
        let read = |json: &str| serde_json::from_str::<ClipVisionConfig>(json).unwrap();
        let ok = r#"{"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8, "projection_dim": 24}"#;
        assert_eq!(read(ok).validate(), Ok(()));
        for (field, value, needle) in [
            (
                "num_attention_heads",
                "5",
                "not divisible by num_attention_heads 5",
            ),
            (
                "layer_norm_eps",
                "-1.0",
                "layer_norm_eps -1 must be positive",
            ),
            ("projection_dim", "0", "projection_dim must be positive"),
            (
                "intermediate_size",
                "0",
                "intermediate_size must be positive",
            ),
            ("image_size", "4", "smaller than patch_size"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(ok).unwrap();
            v[field] = serde_json::from_str(value).unwrap();
            let e = read(&v.to_string()).validate().unwrap_err();
            assert!(e.contains(needle), "{field}: {e}");
        }
    }
}
