//! A request's image prompts: each adapter's image keys and values at every cross-attention,
//! computed once (they do not change between steps), and laid out per UNet call on the rows
//! that carry the prompt (the image's tokens) and those that carry the negative prompt
//! (diffusers' `uncond_image_embeds`: the tokens of zero embeds for a plain adapter, of the
//! zero image's hidden states for a Plus one).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{IpAdapterModel, IpAdapterUnit};
use crate::controlnet::CondRows;
use crate::unet::UNetConfig;
use crate::{PipelineError, Result};

/// One adapter's image keys and values at one cross-attention for one UNet batch.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub scale: f64,
    /// `[B, num_tokens, hidden]`, as `to_k_ip(image_tokens)`.
    pub key: Tensor,
    pub value: Tensor,
}

/// The IP-Adapters' keys and values for one UNet call, by cross-attention (module path).
#[derive(Debug, Clone, Default)]
pub struct ImageTokens {
    layers: HashMap<String, Vec<LayerKv>>,
}

impl ImageTokens {
    /// The adapters' terms at the cross-attention `name` (none: no term).
    pub(crate) fn layer(&self, name: &str) -> &[LayerKv] {
        self.layers.get(name).map_or(&[], Vec::as_slice)
    }
}

/// One adapter's keys and values at one cross-attention: `[1, tokens, hidden]` each, for the
/// image and for zero embeds.
#[derive(Debug, Clone)]
struct PromptKv {
    scale: f64,
    /// The extension's guidance window (sampling percent); `None`: every step.
    window: Option<(f64, f64)>,
    cond: (Tensor, Tensor),
    uncond: (Tensor, Tensor),
}

/// A request's image prompts (adapters whose scale is 0 left out: diffusers skips them).
#[derive(Debug, Clone)]
pub struct ImagePrompts {
    layers: HashMap<String, Vec<PromptKv>>,
}

impl ImagePrompts {
    /// Loads each unit's adapter (checked against `unet`) and image encoder onto `device` in
    /// `dtype`, encodes its image and projects the embeds and zero embeds to keys and values
    /// at every cross-attention. `None` when no unit has a scale other than 0.
    pub fn prepare(
        units: &[IpAdapterUnit],
        unet: &UNetConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Self>> {
        let mut prompts = Self {
            layers: HashMap::new(),
        };
        for unit in units.iter().filter(|u| u.scale != 0.0) {
            let name = &unit.model.name;
            let refuse =
                |e: String| PipelineError::InvalidRequest(format!("the IP-Adapter {name:?}: {e}"));
            let adapter = unit.model.load_on(unet, device, dtype).map_err(refuse)?;
            let encoder = unit.image_encoder.load_on(device, dtype).map_err(refuse)?;
            match &unit.extension {
                Some(run) => {
                    let tokens = super::extension::unit_tokens(&adapter, &encoder, run)?;
                    let window = Some((run.guidance_start, run.guidance_end));
                    prompts.add_tokens(&adapter, &tokens, unit.scale, window)?;
                }
                None => {
                    let (cond, uncond) = encoder.adapter_inputs(&adapter, &unit.image)?;
                    prompts.add(&adapter, &cond, &uncond, unit.scale)?;
                }
            }
        }
        Ok((!prompts.layers.is_empty()).then_some(prompts))
    }

    /// Image prompts from image embeds already computed (`[1, embed_dim]` each), with their
    /// adapters and scales; `None` when every scale is 0.
    pub fn from_image_embeds(items: &[(&IpAdapterModel, &Tensor, f64)]) -> Result<Option<Self>> {
        let mut prompts = Self {
            layers: HashMap::new(),
        };
        for &(adapter, embeds, scale) in items.iter().filter(|i| i.2 != 0.0) {
            prompts.add(adapter, embeds, &embeds.zeros_like()?, scale)?;
        }
        Ok((!prompts.layers.is_empty()).then_some(prompts))
    }

    /// Image prompts from the encoder's outputs already computed for each adapter, the
    /// image's and the negative side's ([`super::ImageEncoderModel::adapter_inputs`]), with
    /// their scales; `None` when every scale is 0.
    pub fn from_encoder_outputs(
        items: &[(&IpAdapterModel, &Tensor, &Tensor, f64)],
    ) -> Result<Option<Self>> {
        let mut prompts = Self {
            layers: HashMap::new(),
        };
        for &(adapter, cond, uncond, scale) in items.iter().filter(|i| i.3 != 0.0) {
            prompts.add(adapter, cond, uncond, scale)?;
        }
        Ok((!prompts.layers.is_empty()).then_some(prompts))
    }

    fn add(
        &mut self,
        adapter: &IpAdapterModel,
        cond: &Tensor,
        uncond: &Tensor,
        scale: f64,
    ) -> Result<()> {
        let (device, dtype) = (adapter.device(), adapter.dtype());
        let on = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        // Rows: [negative side, the image's], as diffusers' `[negative, positive]`.
        let both = Tensor::cat(&[&on(uncond)?, &on(cond)?], 0)?;
        let tokens = adapter.image_tokens(&both)?;
        self.add_tokens(adapter, &tokens, scale, None)
    }

    /// An adapter's `[uncond, cond]` image tokens, with its scale and window.
    fn add_tokens(
        &mut self,
        adapter: &IpAdapterModel,
        tokens: &Tensor,
        scale: f64,
        window: Option<(f64, f64)>,
    ) -> Result<()> {
        for layer in &adapter.layers {
            let k = layer.to_k.forward(tokens, None)?;
            let v = layer.to_v.forward(tokens, None)?;
            let row = |t: &Tensor, i| t.narrow(0, i, 1);
            self.layers
                .entry(layer.name.clone())
                .or_default()
                .push(PromptKv {
                    scale,
                    window,
                    cond: (row(&k, 1)?, row(&v, 1)?),
                    uncond: (row(&k, 0)?, row(&v, 0)?),
                });
        }
        Ok(())
    }

    /// The keys and values for a UNet batch of `rows` whose rows `cond` carry the prompt (the
    /// image's tokens there, the zero embeds' on the others).
    pub fn for_rows(&self, rows: usize, cond: CondRows) -> Result<ImageTokens> {
        self.for_step(rows, cond, None)
    }

    /// [`Self::for_rows`] at `step` of `steps`: units with a window outside it left out.
    pub fn for_step(
        &self,
        rows: usize,
        cond: CondRows,
        step: Option<(usize, usize)>,
    ) -> Result<ImageTokens> {
        let active = |p: &PromptKv| match (p.window, step) {
            (Some(w), Some((i, n))) => super::extension::steers(w, i, n),
            _ => true,
        };
        let first = cond.first(rows).unwrap_or(rows);
        let lay = |uncond: &Tensor, cond: &Tensor| -> Result<Tensor> {
            let mut parts = vec![uncond; first];
            parts.extend(vec![cond; rows - first]);
            Ok(Tensor::cat(&parts, 0)?)
        };
        let layers = self
            .layers
            .iter()
            .map(|(name, kvs)| {
                let kvs = kvs
                    .iter()
                    .filter(|p| active(p))
                    .map(|p| {
                        Ok(LayerKv {
                            scale: p.scale,
                            key: lay(&p.uncond.0, &p.cond.0)?,
                            value: lay(&p.uncond.1, &p.cond.1)?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok((name.clone(), kvs))
            })
            .collect::<Result<_>>()?;
        Ok(ImageTokens { layers })
    }
}
