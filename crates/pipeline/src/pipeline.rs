//! One text-to-image call, staged as diffusers' `StableDiffusionPipeline.__call__`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::embeddings::EmbeddingLibrary;
use crate::error::read_json;
use crate::lora::{LoraLibrary, LoraState, Part, Target};
use crate::memory::offload::{Component, Held};
use crate::memory::precision::{decode_checked, DecodeOutcome, Fallback};
use crate::memory::{classify_oom, MemoryPlan, MemoryTracker, MemoryUsage, Offload};
use crate::prompt::Chunk;
use crate::rng::TorchRng;
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{StreamStats, UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKlDecoder, VaeConfig};
use crate::vae_encoder::AutoencoderKlEncoder;
use crate::{PipelineError, Result};
use std::collections::HashMap;

mod images_in;

pub use images_in::{seed_of_image, InitImage, Mode};

/// What one request asks of the pipeline (already validated by the caller). New fields keep a
/// default, so callers write `..Default::default()` for what they do not set.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub guidance_scale: f64,
    /// `None`: the model's own scheduler config.
    pub scheduler: Option<SchedulerKind>,
    /// How the prompts are read: `Plain` (diffusers: 77 tokens, brackets are text) or `A1111`.
    pub prompt_syntax: PromptSyntax,
    /// A1111's "clip skip": 1 conditions on the last CLIP layer, 2 on the penultimate, ...
    pub clip_skip: usize,
    /// LoRA adapters for this request only, by name, with their weights.
    pub loras: Vec<LoraWeight>,
    /// Images made at once, as one UNet batch; image `i` uses seed `seed + i` (see
    /// [`seed_of_image`]), so each can be made again alone.
    pub batch_size: usize,
    /// img2img (no mask) or inpainting (with a mask); `None`: text-to-image.
    pub init_image: Option<InitImage>,
}

/// The library's defaults: diffusers' behaviour (plain prompts, last CLIP layer, no LoRA) and
/// its call defaults (20 steps, 512x512, guidance 7.5). Callers set what they mean and take
/// the rest from here (`..Default::default()`), so new fields do not break them.
impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            width: 512,
            height: 512,
            seed: 0,
            guidance_scale: 7.5,
            scheduler: None,
            batch_size: 1,
            init_image: None,
            prompt_syntax: PromptSyntax::Plain,
            clip_skip: 1,
            loras: Vec::new(),
        }
    }
}

/// How prompt text becomes CLIP conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// diffusers: the text as is, truncated to the tokenizer's 77 tokens.
    #[default]
    Plain,
    /// AUTOMATIC1111: `(word:1.3)`, `((word))`, `[word]`, escapes, `BREAK`, prompts of any length.
    A1111,
}

/// One LoRA adapter asked for by a request.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub name: String,
    pub weight: f64,
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reported to the per-step hook after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress<'a> {
    /// 1-based index of the step just finished (UNet evaluations: PNDM runs steps + 1).
    pub step: usize,
    pub total: usize,
    /// The latents after this step (`[B, 4, h, w]`), for previews; `None` where there are none
    /// (a fake generator).
    pub latents: Option<&'a Tensor>,
}

/// The per-step hook: `ControlFlow::Break(())` cancels the run before the next step.
pub type StepHook<'a> = &'a mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>;

/// A loaded Stable Diffusion model: everything `generate` needs, read from a diffusers folder.
pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    // Components are resident on `device`, or offloaded (built there for their stage) when the
    // memory plan says so; see `memory::offload`. Under sequential offload the UNet is resident
    // in host memory and streams its parts to `device` (see `unet_component`).
    text_encoder: Component<ClipTextModel>,
    unet: Component<UNet2DConditionModel>,
    unet_config: UNetConfig,
    unet_in_channels: usize,
    vae: Component<AutoencoderKlDecoder>,
    /// The VAE's encoder half, for init images (img2img, inpainting).
    vae_encoder: Component<AutoencoderKlEncoder>,
    vae_latent_channels: usize,
    /// The VAE in f32, built only to redo a half-precision decode that produced NaN/Inf.
    vae_f32: Option<Component<AutoencoderKlDecoder>>,
    plan: MemoryPlan,
    last_memory: std::sync::Mutex<Option<MemoryUsage>>,
    last_decode_retried: std::sync::atomic::AtomicBool,
    vae_scaling_factor: f64,
    vae_scale_factor: usize,
    scheduler_config: SchedulerConfig,
    default_scheduler: SchedulerKind,
    device: Device,
    dtype: DType,
    /// LoRA files requests may name (`LORA_DIR`).
    loras: LoraLibrary,
    /// Textual-inversion embeddings prompts may name (`EMBEDDINGS_DIR`), their vectors stacked
    /// (`[rows, hidden]` on the device) for the ids past the text encoder's vocabulary.
    embeddings: EmbeddingLibrary,
    embedding_vectors: Option<Tensor>,
    /// The tokenizer as loaded, before embedding names were added.
    base_tokenizer: ClipTokenizer,
    text_vocab_size: usize,
    text_hidden_size: usize,
    /// Which LoRAs are merged into the resident weights now (held for a whole run).
    lora_state: std::sync::Mutex<LoraState>,
}

/// `model_index.json`: which pipeline the folder holds. Components are read from their
/// conventional subfolders; the index tells us the folder is a Stable Diffusion pipeline.
#[derive(Debug, serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

impl StableDiffusion {
    /// Loads a diffusers-layout folder. Weights are memory-mapped and converted to `dtype` on `device`.
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
        )?;

        let vae_config: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let vae_files = |d: DType| {
            // An f32 VAE from the full-precision file; a folder with only fp16 files upcasts.
            component_weight_files(dir, "vae", "diffusion_pytorch_model", d)
                .or_else(|_| component_weight_files(dir, "vae", "diffusion_pytorch_model", dtype))
        };
        let scaling_factor = vae_config.scaling_factor;
        let vae_scale_factor = 1usize << (vae_config.block_out_channels.len().saturating_sub(1));
        let vae_latent_channels = vae_config.latent_channels;
        let encoder_config = vae_config.clone();
        let vae_encoder = Component::new(
            "vae_encoder",
            vae_files(plan.vae_dtype)?,
            plan.vae_dtype,
            move |vb| AutoencoderKlEncoder::new(vb, &encoder_config),
            resident,
        )?;
        let vae_build = move |vb: VarBuilder| AutoencoderKlDecoder::new(vb, &vae_config);
        let vae_f32 = if plan.vae_nan_retry && plan.vae_dtype != DType::F32 {
            Some(Component::new(
                "vae",
                vae_files(DType::F32)?,
                DType::F32,
                vae_build.clone(),
                None,
            )?)
        } else {
            None
        };
        let vae = Component::new(
            "vae",
            vae_files(plan.vae_dtype)?,
            plan.vae_dtype,
            vae_build,
            resident,
        )?;

        let scheduler_config: SchedulerConfig =
            read_json(&dir.join("scheduler/scheduler_config.json"))?;
        let default_scheduler = SchedulerKind::default_for(&scheduler_config)?;

        let mut sd = Self {
            tokenizer: tokenizer.clone(),
            text_encoder,
            unet,
            unet_config,
            unet_in_channels,
            vae_scaling_factor: scaling_factor,
            vae_scale_factor,
            vae,
            vae_encoder,
            vae_latent_channels,
            vae_f32,
            plan: plan.clone(),
            last_memory: std::sync::Mutex::new(None),
            last_decode_retried: std::sync::atomic::AtomicBool::new(false),
            scheduler_config,
            default_scheduler,
            device: device.clone(),
            dtype,
            loras: LoraLibrary::default(),
            embeddings: EmbeddingLibrary::default(),
            embedding_vectors: None,
            base_tokenizer: tokenizer.clone(),
            text_vocab_size,
            text_hidden_size,
            lora_state: std::sync::Mutex::new(LoraState::default()),
        };
        sd.configure_resident();
        Ok(sd)
    }

    /// Applies the plan's attention slicing to the resident modules.
    fn configure_resident(&mut self) {
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
    fn vae_attention_rows(&self) -> Option<usize> {
        let budget = match self.plan.attention {
            crate::attention::AttentionSlicing::Off => return None,
            crate::attention::AttentionSlicing::MaxBytes(b) => b,
            _ => crate::attention::AUTO_SLICE_BYTES,
        };
        let side = self.plan.max_side / self.vae_scale_factor.max(1);
        Some((budget / (4 * side * side).max(1)).max(1))
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
    pub fn set_offload(&mut self, offload: Offload) -> Result<()> {
        // The modules are rebuilt from their files below (base weights): merged LoRAs are gone,
        // and a request for the same LoRAs must merge them again (or be refused when offloaded).
        self.lora_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget();
        let resident = (offload == Offload::None).then_some(&self.device);
        self.text_encoder.set_residence(resident)?;
        // Free the current UNet before building it for the new mode.
        self.unet.set_residence(None)?;
        self.unet = unet_component(
            self.unet.files().to_vec(),
            self.dtype,
            &self.unet_config,
            offload,
            &self.device,
        )?;
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

    /// The LoRA files requests may name; replaces the previous library (and unmerges its LoRAs).
    pub fn set_lora_library(&mut self, library: LoraLibrary) -> Result<()> {
        self.lora_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore()?;
        self.loras = library;
        Ok(())
    }

    /// The textual-inversion embeddings prompts may name by file name; replaces the previous
    /// ones. An embedding whose vectors do not have the text encoder's width, or whose name is
    /// already a token, is refused naming it.
    pub fn set_embedding_library(&mut self, library: EmbeddingLibrary) -> Result<()> {
        let mut tokenizer = self.base_tokenizer.clone();
        let mut rows = Vec::new();
        let mut next = self.text_vocab_size as u32;
        for e in library.list() {
            if e.hidden_size() != self.text_hidden_size {
                return Err(PipelineError::Weights {
                    path: e.file.clone(),
                    message: format!(
                        "embedding {:?} has vectors of {} values; this text encoder takes {}",
                        e.name,
                        e.hidden_size(),
                        self.text_hidden_size
                    ),
                });
            }
            let n = e.num_vectors() as u32;
            tokenizer
                .add_word(&e.name, (next..next + n).collect())
                .map_err(|err| PipelineError::Weights {
                    path: e.file.clone(),
                    message: format!("embedding {:?}: {err}", e.name),
                })?;
            next += n;
            rows.push(&e.vectors);
        }
        self.embedding_vectors = if rows.is_empty() {
            None
        } else {
            Some(
                Tensor::cat(&rows, 0)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?,
            )
        };
        self.tokenizer = tokenizer;
        self.embeddings = library;
        Ok(())
    }

    pub fn embedding_library(&self) -> &EmbeddingLibrary {
        &self.embeddings
    }

    pub fn lora_library(&self) -> &LoraLibrary {
        &self.loras
    }

    /// Checks that the library's LoRA `name` fits this model (every layer has a weight of its
    /// shape): an error names the LoRA and the layer.
    pub fn check_lora(&self, name: &str) -> Result<()> {
        let info = self
            .loras
            .get(name)
            .ok_or_else(|| PipelineError::InvalidRequest(format!("unknown LoRA {name:?}")))?;
        crate::lora::check_fits(info, &self.lora_targets()?)
    }

    /// The resident modules' weights a LoRA may change.
    fn lora_targets(&self) -> Result<HashMap<Part, Vec<(String, Target<'_>)>>> {
        let not_resident = || {
            PipelineError::InvalidRequest(
                "LoRA needs the text encoder and UNet resident on the device (offload none); \
                 this model runs with its weights offloaded"
                    .into(),
            )
        };
        let unet = self.unet.resident().ok_or_else(not_resident)?;
        let text = self.text_encoder.resident().ok_or_else(not_resident)?;
        let mut targets = HashMap::new();
        targets.insert(Part::Unet, unet.lora_targets().ok_or_else(not_resident)?);
        targets.insert(Part::TextEncoder, text.lora_targets());
        Ok(targets)
    }

    /// Makes the resident weights those of `loras` now, as the next run asking for them would
    /// (an empty list writes the originals back); that run then starts without the merge. The
    /// bench times merging and restoring with it.
    pub fn prepare_loras(&self, loras: &[LoraWeight]) -> Result<()> {
        self.sync_loras(loras).map(drop)
    }

    /// Makes the resident weights those of `loras`: unchanged when the last run had the same,
    /// else the originals are written back and the new LoRAs merged.
    fn sync_loras(&self, loras: &[LoraWeight]) -> Result<std::sync::MutexGuard<'_, LoraState>> {
        let mut state = self.lora_state.lock().unwrap_or_else(|e| e.into_inner());
        let want: Vec<(String, f64)> = loras.iter().map(|l| (l.name.clone(), l.weight)).collect();
        if state.active() == want.as_slice() {
            return Ok(state);
        }
        state.restore()?;
        if want.is_empty() {
            return Ok(state);
        }
        let targets = self.lora_targets()?;
        if let Err(e) = state.apply(&self.loras, &want, &targets) {
            state.restore()?;
            return Err(e);
        }
        Ok(state)
    }

    /// The UNet for one run, with the plan's attention slicing (built now when offloaded).
    fn unet_for_run(&self) -> Result<Held<'_, UNet2DConditionModel>> {
        let mut held = self.unet.get(&self.device)?;
        if let Held::Loaded(u) = &mut held {
            u.set_attention_slicing(self.plan.attention);
        }
        Ok(held)
    }

    fn vae_for_run<'a>(
        &self,
        component: &'a Component<AutoencoderKlDecoder>,
    ) -> Result<Held<'a, AutoencoderKlDecoder>> {
        let mut held = component.get(&self.device)?;
        if let Held::Loaded(v) = &mut held {
            v.set_attention_slice(self.vae_attention_rows());
        }
        Ok(held)
    }

    /// The scheduler named by the model's own `scheduler_config.json`.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.default_scheduler
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Latent channels the UNet takes.
    pub fn unet_in_channels(&self) -> usize {
        self.unet_in_channels
    }

    /// True for an inpainting model: its UNet takes the latents, the mask and the masked
    /// image's latents (9 channels for SD 1.5), so every request needs an init image and a mask.
    pub fn is_inpainting(&self) -> bool {
        self.unet_in_channels == 2 * self.vae_latent_channels + 1
    }

    /// Pixels per latent cell along each axis (8 for SD 1.5).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// Runs one request: `batch_size` images, in order. `on_step` is called after every
    /// denoising step (once for the whole batch); breaking cancels the run
    /// (`PipelineError::Cancelled`) before the next step, and every tensor of the run is dropped.
    ///
    /// A device allocation failure comes back as [`PipelineError::OutOfMemory`]; the tensors of
    /// the run are dropped and the allocator's cached memory returned before this returns.
    pub fn generate(&self, params: &GenerationParams, on_step: StepHook) -> Result<Vec<RgbImage>> {
        let mut tracker = MemoryTracker::start(&self.device);
        let result = self.generate_tracked(params, on_step, &mut tracker);
        let usage = tracker.finish();
        *self.last_memory.lock().unwrap_or_else(|e| e.into_inner()) = usage;
        result.map_err(classify_oom)
    }

    fn generate_tracked(
        &self,
        params: &GenerationParams,
        on_step: StepHook,
        tracker: &mut MemoryTracker,
    ) -> Result<Vec<RgbImage>> {
        self.check_inputs(params)?;
        // Held for the whole run: no other run changes the merged weights under this one.
        let _loras = self.sync_loras(&params.loras)?;
        let text_embeddings = self.encode_conditioning(params)?;
        let (mut scheduler, begin) = self.prepare_timesteps(params)?;
        // diffusers' list of generators: one per image, seeded seed + i.
        let mut rngs: Vec<TorchRng> = (0..params.batch_size)
            .map(|i| TorchRng::new(seed_of_image(params.seed, i)))
            .collect();
        let start = match &params.init_image {
            None => images_in::Start {
                latents: self.prepare_latents(params, scheduler.as_ref(), &mut rngs)?,
                inpaint: None,
            },
            Some(init) => {
                self.prepare_image_latents(params, init, scheduler.as_ref(), begin, &mut rngs)?
            }
        };
        tracker.sample();
        let mut on_step = |p: StepProgress<'_>| {
            tracker.sample();
            on_step(p)
        };
        let latents = self.denoise(
            start,
            &text_embeddings,
            scheduler.as_mut(),
            begin,
            params.guidance_scale,
            &mut rngs,
            &mut on_step,
        )?;
        drop(text_embeddings);
        // One image at a time through the VAE: its memory does not grow with the batch.
        let mut images = Vec::with_capacity(params.batch_size);
        for i in 0..latents.dim(0)? {
            let image = self.decode_latents(&latents.narrow(0, i, 1)?)?;
            tracker.sample();
            images.push(postprocess(&image)?);
        }
        Ok(images)
    }

    fn check_inputs(&self, params: &GenerationParams) -> Result<()> {
        if params.steps == 0 {
            return Err(PipelineError::InvalidRequest(
                "steps must be at least 1".into(),
            ));
        }
        if params.batch_size == 0 {
            return Err(PipelineError::InvalidRequest(
                "batch_size must be at least 1".into(),
            ));
        }
        self.check_image_inputs(params)?;
        // diffusers requires multiples of 8; the latent grid also needs whole VAE cells.
        let multiple = self.vae_scale_factor.max(8);
        for (name, value) in [("width", params.width), ("height", params.height)] {
            if value == 0 || value % multiple != 0 {
                return Err(PipelineError::InvalidRequest(format!(
                    "{name} must be a positive multiple of {multiple}, got {value}"
                )));
            }
        }
        Ok(())
    }

    /// The text conditioning of a request: its prompt (and negative prompt when classifier-free
    /// guidance is on) read with its `prompt_syntax` and encoded with its `clip_skip`. Prompt and
    /// negative prompt of the same length go through the UNet as one batch; otherwise as two
    /// passes (A1111's default).
    pub fn encode_conditioning(&self, params: &GenerationParams) -> Result<Conditioning> {
        let do_cfg = params.guidance_scale > 1.0;
        let cond = self.prompt_chunks(&params.prompt, params.prompt_syntax)?;
        let uncond = match do_cfg {
            true => self.prompt_chunks(&params.negative_prompt, params.prompt_syntax)?,
            false => Vec::new(),
        };
        // Offloaded: the encoder comes to the device once for both prompts. Every chunk of
        // both prompts goes through it as one batch (each row only attends to itself).
        let encoder = self.text_encoder.get(&self.device)?;
        let rows: Vec<&Chunk> = uncond.iter().chain(&cond).collect();
        let len = rows[0].ids.len();
        let ids: Vec<u32> = rows.iter().flat_map(|c| c.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), len), &self.device)?;
        let z = encoder.forward_skip(&ids, params.clip_skip, self.embedding_vectors.as_ref())?;
        drop(encoder);
        let z = if rows.iter().all(|c| c.unweighted()) {
            z
        } else {
            let weighted = rows
                .iter()
                .enumerate()
                .map(|(i, c)| emphasis(&z.narrow(0, i, 1)?, c))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&weighted, 0)?
        };
        if !do_cfg {
            return Ok(Conditioning::Cond(join_chunks(&z, 0, cond.len())?));
        }
        if uncond.len() == cond.len() {
            if cond.len() == 1 {
                return Ok(Conditioning::Joint(z));
            }
            let u = join_chunks(&z, 0, uncond.len())?;
            let c = join_chunks(&z, uncond.len(), cond.len())?;
            return Ok(Conditioning::Joint(Tensor::cat(&[&u, &c], 0)?));
        }
        Ok(Conditioning::Separate {
            uncond: join_chunks(&z, 0, uncond.len())?,
            cond: join_chunks(&z, uncond.len(), cond.len())?,
        })
    }

    /// Token rows of one prompt: one row of exactly `max_length` ids for `Plain` (diffusers'
    /// truncation), chunks of `BOS + 75 + EOS` with weights for `A1111`.
    fn prompt_chunks(&self, text: &str, syntax: PromptSyntax) -> Result<Vec<Chunk>> {
        match syntax {
            PromptSyntax::Plain => {
                let ids = self.tokenizer.encode(text)?;
                let weights = vec![1.0; ids.len()];
                Ok(vec![Chunk { ids, weights }])
            }
            PromptSyntax::A1111 => {
                crate::prompt::chunks(&self.tokenizer, &crate::prompt::parse_attention(text))
            }
        }
    }

    /// CLIP embeddings, `[uncond, cond]` along the batch when classifier-free guidance is on
    /// (plain prompts, last layer).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        do_cfg: bool,
    ) -> Result<Tensor> {
        let params = GenerationParams {
            prompt: prompt.into(),
            negative_prompt: negative_prompt.into(),
            guidance_scale: if do_cfg { 7.5 } else { 1.0 },
            ..Default::default()
        };
        match self.encode_conditioning(&params)? {
            Conditioning::Cond(z) | Conditioning::Joint(z) => Ok(z),
            Conditioning::Separate { uncond, cond } => Ok(Tensor::cat(&[&uncond, &cond], 0)?),
        }
    }

    /// The scheduler for the request's steps and the index of the first timestep to run: 0 for
    /// text-to-image; with an init image, `t_start * order` where `t_start = steps - init` and
    /// `init = min(int(steps * strength), steps)` (diffusers' `get_timesteps`, which also calls
    /// `set_begin_index` there).
    fn prepare_timesteps(&self, params: &GenerationParams) -> Result<(Box<dyn Scheduler>, usize)> {
        let kind = params.scheduler.unwrap_or(self.default_scheduler);
        let mut scheduler = schedulers::build(kind, &self.scheduler_config, params.steps)?;
        let begin = match &params.init_image {
            None => 0,
            Some(init) => {
                let t_start = params.steps - images_in::init_steps(params.steps, init.strength);
                t_start * scheduler.order()
            }
        };
        scheduler.set_begin_index(begin);
        Ok((scheduler, begin))
    }

    /// Initial noise from each image's own generator, as diffusers draws it on the CPU.
    fn prepare_latents(
        &self,
        params: &GenerationParams,
        scheduler: &dyn Scheduler,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let shape = (
            1,
            self.unet_in_channels,
            params.height / self.vae_scale_factor,
            params.width / self.vae_scale_factor,
        );
        let noise = rngs
            .iter_mut()
            .map(|rng| rng.randn_tensor(shape, &self.device, DType::F32))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&noise, 0)? * scheduler.init_noise_sigma())?.to_dtype(self.dtype)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        start: images_in::Start,
        text_embeddings: &Conditioning,
        scheduler: &mut dyn Scheduler,
        begin: usize,
        guidance_scale: f64,
        rngs: &mut [TorchRng],
        on_step: StepHook,
    ) -> Result<Tensor> {
        let images_in::Start {
            mut latents,
            inpaint,
        } = start;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - begin;
        // Model offload: the UNet comes to the device once for the whole loop and leaves after
        // it. Sequential: it stays in host memory and streams its parts in every forward pass.
        let unet = self.unet_for_run()?;
        // SDSERVE_STEP_TIMES=1: per-step UNet and scheduler times on stderr (profiling).
        let timing = std::env::var_os("SDSERVE_STEP_TIMES").is_some();
        for (index, &t) in timesteps.iter().enumerate().skip(begin) {
            let start = std::time::Instant::now();
            let mut model_input = scheduler.scale_model_input(&latents, index)?;
            if let Some(state) = &inpaint {
                model_input = state.unet_input(model_input)?;
            }
            let noise_pred =
                self.predict_noise_with(&unet, &model_input, t, text_embeddings, guidance_scale)?;
            let unet_done = start.elapsed();
            latents = scheduler.step(&noise_pred, index, &latents, rngs)?;
            if let Some(state) = &inpaint {
                latents = state.keep_known_region(latents, scheduler, index)?;
            }
            if timing {
                eprintln!(
                    "step {index} t={t}: unet {:.3} s, scheduler {:.4} s",
                    unet_done.as_secs_f64(),
                    (start.elapsed() - unet_done).as_secs_f64()
                );
            }
            if on_step(StepProgress {
                step: index + 1 - begin,
                total,
                latents: Some(&latents),
            })
            .is_break()
            {
                return Err(PipelineError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// The UNet's noise prediction at timestep `t` for (already scaled) `latents`, with
    /// classifier-free guidance when `text_embeddings` holds `[uncond, cond]`:
    /// `uncond + g * (cond - uncond)`.
    pub fn predict_noise(
        &self,
        latents: &Tensor,
        t: f64,
        text_embeddings: &Tensor,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let unet = self.unet_for_run()?;
        let conditioning = match text_embeddings.dim(0)? {
            2 => Conditioning::Joint(text_embeddings.clone()),
            _ => Conditioning::Cond(text_embeddings.clone()),
        };
        self.predict_noise_with(&unet, latents, t, &conditioning, guidance_scale)
    }

    /// `latents` holds the batch's `n` images; `text_embeddings` one image's `[uncond, cond]`
    /// (or `[cond]` without guidance), repeated for the batch as diffusers'
    /// `num_images_per_prompt` does: `[uncond x n, cond x n]`.
    fn predict_noise_with(
        &self,
        unet: &UNet2DConditionModel,
        latents: &Tensor,
        t: f64,
        conditioning: &Conditioning,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let n = latents.dim(0)?;
        // diffusers' num_images_per_prompt: each row of the conditioning repeated n times.
        let repeat = |e: &Tensor| -> Result<Tensor> {
            if n == 1 {
                return Ok(e.clone());
            }
            let rows = (0..e.dim(0)?)
                .map(|r| {
                    let row = e.narrow(0, r, 1)?;
                    Tensor::cat(&vec![&row; n], 0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let text_embeddings = match conditioning {
            Conditioning::Cond(e) | Conditioning::Joint(e) => e,
            Conditioning::Separate { uncond, cond } => {
                // Two passes, each with its own sequence length.
                let t = Tensor::full(t as f32, n, &self.device)?;
                let uncond = unet.forward(latents, &t, &repeat(uncond)?)?;
                let cond = unet.forward(latents, &t, &repeat(cond)?)?;
                return Ok((&uncond + ((cond - &uncond)? * guidance_scale)?)?);
            }
        };
        let cfg = text_embeddings.dim(0)? == 2;
        let embeddings = repeat(text_embeddings)?;
        let model_input = if cfg {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let t = Tensor::full(t as f32, embeddings.dim(0)?, &self.device)?;
        let noise_pred = unet.forward(&model_input, &t, &embeddings)?;
        if !cfg {
            return Ok(noise_pred);
        }
        let uncond = noise_pred.narrow(0, 0, n)?;
        let cond = noise_pred.narrow(0, n, n)?;
        Ok((&uncond + ((cond - &uncond)? * guidance_scale)?)?)
    }

    /// `vae.decode(latents / scaling_factor)`, in `[-1, 1]`: tiled when the plan says so; a
    /// half-precision decode with NaN/Inf (the "black image") is redone in f32.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.vae_scaling_factor)?;
        let vae = self.vae_for_run(&self.vae)?;
        let mut retry = |z: &Tensor| -> Result<Tensor> {
            let vae32 = self.vae_for_run(self.vae_f32.as_ref().expect("checked below"))?;
            self.decode_with(&vae32, z)
        };
        let fallback: Option<Fallback> = if self.plan.vae_nan_retry && self.vae_f32.is_some() {
            Some(&mut retry)
        } else {
            None
        };
        let (image, outcome) = decode_checked(&z, |z| self.decode_with(&vae, z), fallback)?;
        self.last_decode_retried.store(
            outcome == DecodeOutcome::RetriedInF32,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(image)
    }

    /// One VAE decode of `z` (already divided by the scaling factor), tiled when the plan says so
    /// and the latent is larger than a tile.
    fn decode_with(&self, vae: &AutoencoderKlDecoder, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match self.plan.vae_tiling {
            Some(t) if h > t.tile_latent || w > t.tile_latent => {
                crate::memory::tiling::decode_tiled(z, t, self.vae_scale_factor, |tile| {
                    vae.decode(tile)
                })
            }
            _ => vae.decode(z),
        }
    }
}

/// The UNet component for an offload mode: built on `device` and kept (`None`), built there for
/// each run (`Model`), or kept in host memory, read once in `dtype`, with its parts built on
/// `device` one at a time during each forward pass (`Sequential`).
fn unet_component(
    files: Vec<PathBuf>,
    dtype: DType,
    config: &UNetConfig,
    offload: Offload,
    device: &Device,
) -> Result<Component<UNet2DConditionModel>> {
    let config = config.clone();
    match offload {
        Offload::Sequential => {
            let compute = device.clone();
            Component::new(
                "unet",
                files,
                dtype,
                move |host| UNet2DConditionModel::streamed(host, &config, &compute),
                Some(&Device::Cpu),
            )
        }
        Offload::None | Offload::Model => Component::new(
            "unet",
            files,
            dtype,
            move |vb| UNet2DConditionModel::new(vb, &config),
            (offload == Offload::None).then_some(device),
        ),
    }
}

/// Text conditioning for the denoising loop.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// Guidance off: the prompt's embeddings, `[1, L, D]`.
    Cond(Tensor),
    /// `[uncond, cond]` as one batch, `[2, L, D]`.
    Joint(Tensor),
    /// Prompt and negative prompt of different lengths: two UNet passes per step.
    Separate { uncond: Tensor, cond: Tensor },
}

/// A1111's emphasis on one encoded chunk `z` `[1, L, D]`: `m0 = mean(z)`, `z *= weight` per token,
/// `z *= m0 / mean(z)`; computed in f32.
fn emphasis(z: &Tensor, chunk: &Chunk) -> Result<Tensor> {
    if chunk.unweighted() {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let before = z.mean_all()?;
    let weights = Tensor::from_slice(&chunk.weights, (1, chunk.weights.len(), 1), z.device())?;
    let z = z.broadcast_mul(&weights)?;
    let after = z.mean_all()?;
    let ratio = (before / after)?;
    Ok(z.broadcast_mul(&ratio)?.to_dtype(dtype)?)
}

/// Rows `start..start + count` of `z` `[R, L, D]` joined along the sequence: `[1, count * L, D]`.
fn join_chunks(z: &Tensor, start: usize, count: usize) -> Result<Tensor> {
    if count == 1 {
        return Ok(z.narrow(0, start, 1)?);
    }
    let rows = (start..start + count)
        .map(|i| z.narrow(0, i, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 1)?)
}

/// `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` to RGB8, as diffusers' image processor.
pub(crate) fn postprocess(image: &Tensor) -> Result<RgbImage> {
    let (_, channels, height, width) = image.dims4()?;
    if channels != 3 {
        return Err(PipelineError::InvalidRequest(format!(
            "the VAE produced {channels} channels; only RGB is supported"
        )));
    }
    let hwc = image.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)?;
    let values = hwc.flatten_all()?.to_vec1::<f32>()?;
    let pixels = values
        .into_iter()
        .map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(RgbImage {
        width: width as u32,
        height: height as u32,
        pixels,
    })
}

/// Weight files of one component: `<stem>.safetensors`, its half-precision variant
/// `<stem>.fp16.safetensors` when loading in f16 and present, or the shards of
/// `<stem>.safetensors.index.json`.
pub fn component_weight_files(
    dir: &Path,
    component: &str,
    stem: &str,
    dtype: DType,
) -> Result<Vec<PathBuf>> {
    let folder = dir.join(component);
    let full = format!("{stem}.safetensors");
    let half = format!("{stem}.fp16.safetensors");
    // Half precision prefers the fp16 variant; the other precisions take it only when it is all
    // the folder has (some repos publish fp16 weights alone).
    let candidates = if dtype == DType::F16 {
        [half, full]
    } else {
        [full, half]
    };
    for name in &candidates {
        let path = folder.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
        let index_path = folder.join(format!("{name}.index.json"));
        if index_path.is_file() {
            #[derive(serde::Deserialize)]
            struct ShardIndex {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let index: ShardIndex = read_json(&index_path)?;
            let mut shards: Vec<PathBuf> =
                index.weight_map.values().map(|f| folder.join(f)).collect();
            shards.sort();
            shards.dedup();
            return Ok(shards);
        }
    }
    Err(PipelineError::Weights {
        path: folder,
        message: format!("no weights: expected {}", candidates.join(" or ")),
    })
}

#[cfg(test)]
mod weight_file_tests {
    use super::*;

    fn folder_with(files: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sdserve-weights-{}-{}",
            std::process::id(),
            files.join("+")
        ));
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        for f in files {
            std::fs::write(dir.join("unet").join(f), b"").unwrap();
        }
        dir
    }

    fn chosen(dir: &Path, dtype: DType) -> String {
        let files = component_weight_files(dir, "unet", "diffusion_pytorch_model", dtype).unwrap();
        files[0].file_name().unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn precision_picks_its_variant_and_falls_back_to_the_other() {
        let both = folder_with(&[
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ]);
        assert_eq!(
            chosen(&both, DType::F32),
            "diffusion_pytorch_model.safetensors"
        );
        assert_eq!(
            chosen(&both, DType::F16),
            "diffusion_pytorch_model.fp16.safetensors"
        );

        let half_only = folder_with(&["diffusion_pytorch_model.fp16.safetensors"]);
        assert_eq!(
            chosen(&half_only, DType::F32),
            "diffusion_pytorch_model.fp16.safetensors"
        );

        let none = folder_with(&[]);
        let err = component_weight_files(&none, "unet", "diffusion_pytorch_model", DType::F32);
        assert!(matches!(err, Err(PipelineError::Weights { .. })));
        for dir in [both, half_only, none] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
