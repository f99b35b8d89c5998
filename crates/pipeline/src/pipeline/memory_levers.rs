//! The memory levers of a loaded model: offload, attention slicing, VAE tiling, and what the
//! last run used; components fetched for a run as the plan says.

use super::load::unet_component;
use super::StableDiffusion;
use crate::clip::ClipTextModel;
use crate::lora::Part;
use crate::memory::offload::{Component, Held};
use crate::memory::{MemoryPlan, MemoryUsage, Offload};
use crate::unet::{StreamStats, UNet2DConditionModel};
use crate::vae::AutoencoderKlDecoder;
use crate::Result;

impl StableDiffusion {
    /// Applies the plan's attention slicing to the resident modules.
    pub(super) fn configure_resident(&mut self) {
        let attention = self.plan.attention;
        let rows = self.vae_attention_rows();
        if let Some(u) = self.unet.resident_mut() {
            u.set_attention_slicing(attention);
        }
        if let Some(v) = self.vae.resident_mut() {
            v.set_attention_slice(rows);
        }
        if let Some(e) = self.vae_encoder.resident_mut() {
            e.set_attention_slice(rows);
        }
    }

    /// Query rows per piece of the VAE's mid-block attention: `None` (all at once) when attention
    /// is not sliced, else as many rows as keep one piece of f32 scores within the slicing budget
    /// at the largest image the plan is for.
    pub(super) fn vae_attention_rows(&self) -> Option<usize> {
        let budget = match self.plan.attention {
            crate::attention::AttentionSlicing::Off => return None,
            crate::attention::AttentionSlicing::MaxBytes(b) => b,
            _ => crate::attention::AUTO_SLICE_BYTES,
        };
        let side = self.plan.max_side / self.vae_scale_factor.max(1);
        Some((budget / (4 * side * side).max(1)).max(1))
    }

    /// The memory plan in use.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Device memory of the last `generate` call (`None` on the CPU).
    pub fn last_memory_usage(&self) -> Option<MemoryUsage> {
        *self.last_memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the last decode produced NaN/Inf in half precision and was redone in f32.
    pub fn last_decode_retried(&self) -> bool {
        self.last_decode_retried
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switches attention slicing (the one memory switch that needs no reload): `Off` is fastest,
    /// `Auto`/`MaxBytes` bound the score matrices. Results change only by float rounding.
    pub fn set_attention_slicing(&mut self, slicing: crate::attention::AttentionSlicing) {
        self.plan.attention = slicing;
        self.configure_resident();
    }

    /// Switches tiled VAE decoding and encoding on (`Some`) or off (diffusers' `enable_tiling`
    /// covers both halves too); takes effect at the next encode or decode.
    pub fn set_vae_tiling(&mut self, tiling: Option<crate::memory::VaeTiling>) {
        self.plan.vae_tiling = tiling;
    }

    /// Keeps every component on the device (`Offload::None`), or only during its stage
    /// (`Offload::Model`), or, for the UNet, one part at a time during each forward pass with its
    /// weights in host memory (`Offload::Sequential`; text encoder and VAE as under `Model`).
    ///
    /// The UNet's weights in host memory, once sequential offload read them, stay there and
    /// build the UNet in every later mode (uploaded on a GPU): switching back and forth reads
    /// the UNet's files once. They cost host memory (the UNet in the compute dtype, 1.7 GB for
    /// SD 1.5 in f16) from the first switch to sequential offload on; on the CPU the resident
    /// UNet shares them.
    pub fn set_offload(&mut self, offload: Offload) -> Result<()> {
        // The UNet's host copy may build the next UNet, so the LoRAs merged into it (or into
        // the resident modules) are written back; the next request merges its LoRAs again.
        self.lora_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore()?;
        self.set_build_deltas(None);
        let resident = (offload == Offload::None).then_some(&self.device);
        self.text_encoder.set_residence(resident)?;
        let host = self
            .unet
            .host()
            .cloned()
            .or_else(|| self.unet.resident().and_then(|u| u.host_tensors()));
        let builds = self.unet.builds();
        // Free the current UNet before building it for the new mode.
        self.unet.set_residence(None)?;
        self.unet = unet_component(
            self.unet.files().to_vec(),
            self.dtype,
            &self.unet_config,
            offload,
            &self.device,
            host,
        )?;
        self.unet.count_earlier_builds(builds);
        self.vae.set_residence(resident)?;
        self.vae_encoder.set_residence(resident)?;
        self.plan.offload = offload;
        self.configure_resident();
        Ok(())
    }

    /// What UNet streaming did since the model was loaded or its offload last changed; `None`
    /// unless the offload is `Sequential`.
    pub fn unet_stream_stats(&self) -> Option<StreamStats> {
        self.unet.resident().and_then(|u| u.stream_stats())
    }

    /// Bytes of UNet weights held in host memory under `Offload::Sequential`; `None` otherwise.
    pub fn unet_host_weight_bytes(&self) -> Option<usize> {
        self.unet.resident().and_then(|u| u.host_weight_bytes())
    }

    /// How many times each component was built from its weight files (reading them), by
    /// name, since the model was loaded: resident ones once (and again when the offload mode
    /// changes), offloaded ones at each stage that uses them. A UNet built from its weights in
    /// host memory (see [`Self::set_offload`]) reads no file and is not counted.
    pub fn component_builds(&self) -> Vec<(&str, usize)> {
        [
            (self.text_encoder.name(), self.text_encoder.builds()),
            (self.unet.name(), self.unet.builds()),
            (self.vae_encoder.name(), self.vae_encoder.builds()),
            (self.vae.name(), self.vae.builds()),
        ]
        .into()
    }

    /// The UNet for one run, with the plan's attention slicing (built now when offloaded, with
    /// the run's LoRAs).
    pub(super) fn unet_for_run(&self) -> Result<Held<'_, UNet2DConditionModel>> {
        let mut held = self.unet.get(&self.device)?;
        if let Held::Loaded(u) = &mut held {
            u.set_attention_slicing(self.plan.attention);
            self.merge_into_built(Part::Unet, u.lora_targets())?;
        }
        Ok(held)
    }

    /// The text encoder for one stage (built now when offloaded, with the run's LoRAs).
    pub(super) fn text_encoder_for_run(&self) -> Result<Held<'_, ClipTextModel>> {
        let held = self.text_encoder.get(&self.device)?;
        if let Held::Loaded(t) = &held {
            self.merge_into_built(Part::TextEncoder, t.lora_targets())?;
        }
        Ok(held)
    }

    pub(super) fn vae_for_run<'a>(
        &self,
        component: &'a Component<AutoencoderKlDecoder>,
    ) -> Result<Held<'a, AutoencoderKlDecoder>> {
        let mut held = component.get(&self.device)?;
        if let Held::Loaded(v) = &mut held {
            v.set_attention_slice(self.vae_attention_rows());
        }
        Ok(held)
    }
}
