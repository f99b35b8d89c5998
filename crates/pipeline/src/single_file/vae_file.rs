//! A standalone VAE file (`vae-ft-mse-840000-ema-pruned.safetensors`, a `.ckpt`/`.pt`) read
//! into host tensors under diffusers' names, as diffusers' `AutoencoderKL.from_single_file`
//! and A1111's `sd_vae` read them: original LDM key names, with or without a
//! `first_stage_model.` (or `vae.`) prefix, the dict under `state_dict` of a pickle, A1111's
//! ignored keys (`loss.*`, `model_ema.*`) skipped. Pickles are read by [`crate::ckpt`], which
//! runs no pickle code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::key_map::map_vae_key;
use super::{weights, SourceFile, VAE_PREFIXES};
use crate::error::Result;

/// The VAE weights of `path` under diffusers' `AutoencoderKL` names, converted to `dtype` on
/// the CPU; `levels`: the resolution levels of the VAE config they are read for (its
/// `block_out_channels` length, which LDM's decoder numbering needs). Shapes are not checked
/// here: building the VAE from them against the model's config does that, naming the tensor.
pub fn read_vae_file(path: &Path, levels: usize, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let file = SourceFile::open(path)?;
    // A whole checkpoint offered as a VAE: its VAE part (the rest is not a VAE's).
    let prefix = VAE_PREFIXES
        .iter()
        .copied()
        .find(|p| file.tensors.keys().any(|k| k.starts_with(p)));
    let mut out = HashMap::new();
    let mut sources: HashMap<String, &str> = HashMap::new();
    for (src, t) in &file.tensors {
        let key = match prefix {
            Some(p) => match src.strip_prefix(p) {
                Some(k) => k,
                None => continue,
            },
            None => src.as_str(),
        };
        // A1111's `load_vae_dict` drops the training loss and the EMA bookkeeping.
        if key.starts_with("loss.") || key.starts_with("model_ema.") {
            continue;
        }
        let name = map_vae_key(key, levels)
            .ok_or_else(|| weights(path, format!("`{src}` is not a VAE weight")))?;
        if let Some(prev) = sources.insert(name.clone(), src) {
            return Err(weights(
                path,
                format!("`{prev}` and `{src}` both map to `{name}`"),
            ));
        }
        let mut shape = t.shape.clone();
        // LDM keeps the mid-block attention projections as 1x1 convolutions.
        if name.contains(".mid_block.attentions.0.") && name.ends_with(".weight") && shape.len() > 2
        {
            if shape[2..].iter().any(|&d| d != 1) {
                return Err(weights(
                    path,
                    format!("`{src}` is not a 1x1 projection: {shape:?}"),
                ));
            }
            shape.truncate(2);
        }
        let tensor = file.host_tensor(src, &shape, dtype, "VAE")?;
        out.insert(name, tensor);
    }
    if !out.keys().any(|k| k.starts_with("decoder.")) {
        return Err(weights(path, "no VAE decoder weights in this file"));
    }
    Ok(out)
}

/// The VAE config the weights of VAE file `path` imply (`block_out_channels`, layers per
/// block, latent channels, ...), from their names and shapes alone (a safetensors header, a
/// pickle's object tree; no tensor data), keys read as [`read_vae_file`] reads them: so a
/// file that cannot take a model's VAE's place is known before the swap.
pub fn vae_file_config(path: &Path) -> Result<crate::vae::VaeConfig> {
    let file = SourceFile::open(path)?;
    let prefix = VAE_PREFIXES
        .iter()
        .copied()
        .find(|p| file.tensors.keys().any(|k| k.starts_with(p)));
    let parts: Vec<(String, String)> = file
        .tensors
        .keys()
        .filter_map(|src| {
            let key = match prefix {
                Some(p) => src.strip_prefix(p)?,
                None => src.as_str(),
            };
            (!key.starts_with("loss.") && !key.starts_with("model_ema."))
                .then(|| (src.clone(), key.to_string()))
        })
        .collect();
    let shape = |key: &str| -> Result<Vec<usize>> {
        parts
            .iter()
            .find(|(_, k)| k == key)
            .map(|(src, _)| file.tensors[src].shape.clone())
            .ok_or_else(|| weights(path, format!("no `{key}`: not a VAE's weights")))
    };
    let config = super::configs::infer_vae(&parts, &shape)?;
    serde_json::from_value(config)
        .map_err(|e| weights(path, format!("its shapes make no VAE config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vae")
            .join(name)
    }

    #[test]
    fn ldm_names_become_diffusers_names_in_both_file_forms() {
        let st = read_vae_file(&fixture("alt.safetensors"), 4, DType::F32).unwrap();
        let ck = read_vae_file(&fixture("alt.ckpt"), 4, DType::F32).unwrap();
        // The .ckpt's EMA bookkeeping is skipped; both hold the same tensors.
        assert_eq!(st.len(), ck.len());
        let q = &st["decoder.mid_block.attentions.0.to_q.weight"];
        assert_eq!(q.dims(), [16, 16]);
        assert!(st.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
        assert!(!st.contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));
        for (k, a) in &st {
            let b = &ck[k];
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k}");
        }
    }

    #[test]
    fn a_file_s_config_is_read_from_its_shapes() {
        let own: crate::vae::VaeConfig = crate::error::read_json(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tiny-a-vae8/vae/config.json"),
        )
        .unwrap();
        for f in ["alt.safetensors", "alt.ckpt"] {
            let c = vae_file_config(&fixture(f)).unwrap();
            assert_eq!(
                (&c.block_out_channels, c.layers_per_block, c.latent_channels),
                (
                    &own.block_out_channels,
                    own.layers_per_block,
                    own.latent_channels
                ),
                "{f}"
            );
        }
        let wrong = vae_file_config(&fixture("wrong-shape.safetensors")).unwrap();
        assert_ne!(wrong.block_out_channels, own.block_out_channels);
    }

    #[test]
    fn a_file_without_a_vae_is_refused() {
        let err = read_vae_file(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tiny-a/text_encoder/model.safetensors"),
            4,
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not a VAE weight"), "{err}");
    }
}
