//! What a request must fit in a model, read from its folder's configs alone (no weights): the
//! clip skip its text encoder can take, the image sides its VAE can take, and the external
//! diffusers VAEs whose latents its UNet takes. The pipeline refuses a request past these when
//! it runs; a server checks them before queueing one (a model it has not loaded included).

use std::path::Path;

use crate::clip::ClipTextConfig;
use crate::error::read_json;
use crate::vae::VaeConfig;
use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelLimits {
    /// `text_encoder/config.json`'s `num_hidden_layers`.
    pub text_encoder_layers: usize,
    /// `vae/config.json`: `2^(len(block_out_channels) - 1)` pixels per latent cell a side.
    pub vae_scale_factor: usize,
    /// `vae/config.json`'s `latent_channels`.
    pub vae_latent_channels: usize,
    /// `vae/config.json`'s `block_out_channels` (zeros after them; all zeros: not known, as
    /// from a worker of an older version) and `layers_per_block` (0: not known): with the
    /// latent channels, the shapes a VAE file must have to take the model's VAE's place.
    #[serde(default)]
    pub vae_widths: [usize; 8],
    #[serde(default)]
    pub vae_layers_per_block: usize,
}

impl ModelLimits {
    /// The limits of a diffusers folder, from `text_encoder/config.json` and `vae/config.json`.
    pub fn of_folder(dir: &Path) -> Result<Self> {
        let text: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        Ok(Self::of_configs(&text, &vae))
    }

    pub(crate) fn of_configs(text: &ClipTextConfig, vae: &VaeConfig) -> Self {
        Self::of(text.num_hidden_layers, vae)
    }

    /// The limits of a model whose text encoder has `text_encoder_layers` and whose VAE is
    /// `vae`.
    pub(crate) fn of(text_encoder_layers: usize, vae: &VaeConfig) -> Self {
        let mut vae_widths = [0; 8];
        for (w, c) in vae_widths.iter_mut().zip(&vae.block_out_channels) {
            *w = *c;
        }
        Self {
            text_encoder_layers,
            vae_scale_factor: vae_scale_factor(vae),
            vae_latent_channels: vae.latent_channels,
            vae_widths,
            vae_layers_per_block: vae.layers_per_block,
        }
    }

    /// The largest clip skip (A1111's count: 1 is the last layer's output). transformers'
    /// `hidden_states` holds the input embeddings and every layer's output, `layers + 1`
    /// entries; A1111 takes `hidden_states[-clip_skip]` and diffusers
    /// `hidden_states[-(clip_skip + 1)]` with its count one less, so both reach the
    /// embeddings at `layers + 1` and no further.
    pub fn clip_skip_max(&self) -> usize {
        self.text_encoder_layers + 1
    }

    /// Image sides must be multiples of this: 8, as diffusers' `check_inputs` asks, and whole
    /// latent cells of the VAE.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor.max(8)
    }

    /// Why the external diffusers VAE of `config` cannot decode this model's latents, if it
    /// cannot: other latent channels, or another downscale factor.
    pub fn external_vae_problem(&self, config: &VaeConfig) -> Option<String> {
        vae_mismatch(config, self.vae_latent_channels, self.vae_scale_factor)
    }

    /// Why a VAE *file* whose weights' shapes imply `config` cannot take this model's VAE's
    /// place, if it cannot: a file is built on the model's own VAE config, so beyond the
    /// latents ([`Self::external_vae_problem`]) its blocks' widths and depth must be the
    /// model's (where those are known).
    pub fn vae_file_problem(&self, config: &VaeConfig) -> Option<String> {
        if let Some(why) = self.external_vae_problem(config) {
            return Some(why);
        }
        let widths: Vec<usize> = self.vae_widths.iter().copied().filter(|&w| w > 0).collect();
        if !widths.is_empty() && config.block_out_channels != widths {
            return Some(format!(
                "its weights' shapes make blocks of {:?} channels, the model's VAE {widths:?}",
                config.block_out_channels
            ));
        }
        if self.vae_layers_per_block > 0 && config.layers_per_block != self.vae_layers_per_block {
            return Some(format!(
                "its weights' shapes make {} layers per block, the model's VAE {}",
                config.layers_per_block, self.vae_layers_per_block
            ));
        }
        None
    }
}

/// Why a VAE of `config` cannot take the place of one making `latent_channels` latents at
/// `scale_factor`, if it cannot.
pub(crate) fn vae_mismatch(
    config: &VaeConfig,
    latent_channels: usize,
    scale_factor: usize,
) -> Option<String> {
    let factor = vae_scale_factor(config);
    if config.latent_channels != latent_channels {
        Some(format!(
            "it makes {} latent channels, the model's {latent_channels}",
            config.latent_channels
        ))
    } else if factor != scale_factor {
        Some(format!(
            "its downscale factor is {factor}, the model's {scale_factor}"
        ))
    } else {
        None
    }
}

/// `2^(len(block_out_channels) - 1)`, as diffusers' pipelines compute `vae_scale_factor`.
pub(crate) fn vae_scale_factor(vae: &VaeConfig) -> usize {
    1usize << vae.block_out_channels.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn limits_come_from_the_folder_s_configs() {
        let a = ModelLimits::of_folder(&fixture("tiny-a")).unwrap();
        let b = ModelLimits::of_folder(&fixture("tiny-b")).unwrap();
        let vae8 = ModelLimits::of_folder(&fixture("tiny-a-vae8")).unwrap();
        // tiny-a: 2 text layers, VAE [16, 32]; tiny-b: 3 layers, VAE [16, 16, 32].
        assert_eq!((a.text_encoder_layers, a.vae_scale_factor), (2, 2));
        assert_eq!((b.text_encoder_layers, b.vae_scale_factor), (3, 4));
        assert_eq!((vae8.clip_skip_max(), vae8.vae_scale_factor), (3, 8));
        // Below 8 the multiple stays diffusers' 8.
        assert_eq!((a.size_multiple(), vae8.size_multiple()), (8, 8));
        let sixteen = ModelLimits {
            vae_scale_factor: 16,
            ..vae8
        };
        assert_eq!(sixteen.size_multiple(), 16);
        let own: VaeConfig = read_json(&fixture("tiny-a-vae8/vae/config.json")).unwrap();
        assert_eq!(vae8.external_vae_problem(&own), None);
        let other: VaeConfig = read_json(&fixture("tiny-b/vae/config.json")).unwrap();
        assert_eq!(
            vae8.external_vae_problem(&other).unwrap(),
            "its downscale factor is 4, the model's 8"
        );
        assert!(ModelLimits::of_folder(&fixture("no-such-model")).is_err());
    }
}
