//! Loading a diffusers-layout model folder: the index, each component's weight files, the UNet
//! for an offload mode.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::vae_choice::VaeWeights;
use super::{component_weight_files, StableDiffusion};
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::embeddings::EmbeddingLibrary;
use crate::error::read_json;
use crate::lora::{LoraLibrary, LoraState};
use crate::memory::offload::{Component, HostTensors};
use crate::memory::{MemoryPlan, Offload};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::{PipelineError, Result};

/// `model_index.json`: which pipeline the folder holds. Components are read from their
/// conventional subfolders; the index tells us the folder is a Stable Diffusion pipeline.
#[derive(Debug, serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

impl StableDiffusion {
    /// Loads a diffusers-layout folder. Weights are memory-mapped (safetensors) or read a tensor
    /// at a time (pickle `.bin`, never executed; see `component_weight_files`) and converted to
    /// `dtype` on `device`.
    /// Every component stays on the device; attention is sliced automatically (the CPU plan).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_plan(dir, device, dtype, &MemoryPlan::cpu(dtype))
    }

    /// As [`StableDiffusion::load`], with the memory levers of `plan` (see `memory::plan`):
    /// offloaded components are not put on the device until their stage; under
    /// `Offload::Sequential` the UNet's weights are read into host memory and its parts put on
    /// the device one at a time during each forward pass.
    pub fn load_with_plan(
        dir: &Path,
        device: &Device,
        dtype: DType,
        plan: &MemoryPlan,
    ) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        if let Some(class) = &index.class_name {
            if !class.starts_with("StableDiffusion") {
                return Err(PipelineError::config(
                    dir.join("model_index.json"),
                    format!("`_class_name` is {class}, expected a StableDiffusionPipeline"),
                ));
            }
        }
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let resident = (plan.offload == Offload::None).then_some(device);

        let text_config: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let (text_vocab_size, text_hidden_size) = (text_config.vocab_size, text_config.hidden_size);
        let text_layers = text_config.num_hidden_layers;
        let text_encoder = Component::new(
            "text_encoder",
            component_weight_files(dir, "text_encoder", "model", dtype)?,
            dtype,
            move |vb| ClipTextModel::new(vb, &text_config),
            resident,
        )?;

        let unet_config: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let unet_in_channels = unet_config.in_channels;
        let unet = unet_component(
            component_weight_files(dir, "unet", "diffusion_pytorch_model", dtype)?,
            dtype,
            &unet_config,
            plan.offload,
            device,
            None,
        )?;

        let vae_weights = VaeWeights::of_model(dir, plan, dtype)?;
        let scaling_factor = vae_weights.config.scaling_factor;
        let limits = super::ModelLimits::of(text_layers, &vae_weights.config);
        let (vae, vae_encoder, vae_f32) = vae_weights.components(plan, device)?;

        let schedules = super::ModelSchedules::from_config(read_json::<SchedulerConfig>(
            &dir.join("scheduler/scheduler_config.json"),
        )?)?;

        let mut sd = Self {
            tokenizer: tokenizer.clone(),
            text_encoder,
            unet,
            unet_config,
            unet_in_channels,
            vae_scaling_factor: scaling_factor,
            vae_scale_factor: limits.vae_scale_factor,
            limits,
            vae,
            vae_encoder,
            vae_latent_channels: limits.vae_latent_channels,
            vae_f32,
            own_vae: vae_weights.clone(),
            vae_weights,
            plan: plan.clone(),
            last_memory: std::sync::Mutex::new(None),
            last_decode_retried: std::sync::atomic::AtomicBool::new(false),
            schedules,
            device: device.clone(),
            dtype,
            loras: LoraLibrary::default(),
            embeddings: EmbeddingLibrary::default(),
            embedding_vectors: None,
            base_tokenizer: tokenizer.clone(),
            text_vocab_size,
            text_hidden_size,
            lora_state: std::sync::Mutex::new(LoraState::default()),
            build_deltas: Default::default(),
            lora_delta_limit: super::DEFAULT_LORA_DELTA_LIMIT,
            lora_counters: Default::default(),
            lora_shapes: Default::default(),
        };
        sd.configure_resident();
        Ok(sd)
    }

    /// Seconds each component took to build when the model was loaded (its weights read,
    /// checked and converted), in load order; offloaded components are built per stage and
    /// not listed.
    pub fn load_seconds(&self) -> Vec<(&str, f64)> {
        [
            (self.text_encoder.name(), self.text_encoder.built_in()),
            (self.unet.name(), self.unet.built_in()),
            (self.vae_encoder.name(), self.vae_encoder.built_in()),
            (self.vae.name(), self.vae.built_in()),
        ]
        .into_iter()
        .filter_map(|(name, t)| Some((name, t?.as_secs_f64())))
        .collect()
    }
}

/// The UNet component for an offload mode: built on `device` and kept (`None`), built there for
/// each run (`Model`), or kept in host memory, read once in `dtype`, with its parts built on
/// `device` one at a time during each forward pass (`Sequential`). `host`: the weights already
/// in host memory (read for sequential offload before), which every build then takes instead of
/// the files.
pub(super) fn unet_component(
    files: Vec<PathBuf>,
    dtype: DType,
    config: &UNetConfig,
    offload: Offload,
    device: &Device,
    host: Option<HostTensors>,
) -> Result<Component<UNet2DConditionModel>> {
    let config = config.clone();
    match offload {
        Offload::Sequential => {
            let compute = device.clone();
            Component::with_host(
                "unet",
                files,
                host,
                dtype,
                move |host| UNet2DConditionModel::streamed(host, &config, &compute),
                Some(&Device::Cpu),
            )
        }
        Offload::None | Offload::Model => Component::with_host(
            "unet",
            files,
            host,
            dtype,
            move |vb| UNet2DConditionModel::new(vb, &config),
            (offload == Offload::None).then_some(device),
        ),
    }
}
