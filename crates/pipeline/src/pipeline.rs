//! One text-to-image call, staged as diffusers' `StableDiffusionPipeline.__call__`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::read_json;
use crate::rng::TorchRng;
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKlDecoder, VaeConfig};
use crate::{PipelineError, Result};

/// What one request asks of the pipeline (already validated by the caller).
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
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reported to the per-step hook after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
}

/// The per-step hook: `ControlFlow::Break(())` cancels the run before the next step.
pub type StepHook<'a> = &'a mut dyn FnMut(StepProgress) -> ControlFlow<()>;

/// A loaded Stable Diffusion model: everything `generate` needs, read from a diffusers folder.
pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    unet_in_channels: usize,
    vae: AutoencoderKlDecoder,
    vae_scaling_factor: f64,
    vae_scale_factor: usize,
    scheduler_config: SchedulerConfig,
    default_scheduler: SchedulerKind,
    device: Device,
    dtype: DType,
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
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
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

        let text_config: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let text_encoder = with_weights(dir, "text_encoder", "model", dtype, device, |vb| {
            ClipTextModel::new(vb, &text_config)
        })?;

        let unet_config: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let unet = with_weights(
            dir,
            "unet",
            "diffusion_pytorch_model",
            dtype,
            device,
            |vb| UNet2DConditionModel::new(vb, &unet_config),
        )?;

        let vae_config: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let vae = with_weights(dir, "vae", "diffusion_pytorch_model", dtype, device, |vb| {
            AutoencoderKlDecoder::new(vb, &vae_config)
        })?;

        let scheduler_config: SchedulerConfig =
            read_json(&dir.join("scheduler/scheduler_config.json"))?;
        let default_scheduler = SchedulerKind::default_for(&scheduler_config)?;

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            unet_in_channels: unet_config.in_channels,
            vae_scaling_factor: vae.scaling_factor(),
            vae_scale_factor: vae.downscale_factor(),
            vae,
            scheduler_config,
            default_scheduler,
            device: device.clone(),
            dtype,
        })
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

    /// Pixels per latent cell along each axis (8 for SD 1.5).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// Runs one request. `on_step` is called after every denoising step; breaking cancels the run
    /// (`PipelineError::Cancelled`) before the next step, and every tensor of the run is dropped.
    pub fn generate(&self, params: &GenerationParams, on_step: StepHook) -> Result<RgbImage> {
        self.check_inputs(params)?;
        let do_cfg = params.guidance_scale > 1.0;
        let text_embeddings =
            self.encode_prompt(&params.prompt, &params.negative_prompt, do_cfg)?;
        let mut scheduler = self.prepare_timesteps(params)?;
        let mut rng = TorchRng::new(params.seed);
        let latents = self.prepare_latents(params, scheduler.as_ref(), &mut rng)?;
        let latents = self.denoise(
            latents,
            &text_embeddings,
            scheduler.as_mut(),
            params.guidance_scale,
            &mut rng,
            on_step,
        )?;
        let image = self.decode_latents(&latents)?;
        postprocess(&image)
    }

    fn check_inputs(&self, params: &GenerationParams) -> Result<()> {
        if params.steps == 0 {
            return Err(PipelineError::InvalidRequest(
                "steps must be at least 1".into(),
            ));
        }
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

    /// CLIP embeddings, `[uncond, cond]` along the batch when classifier-free guidance is on.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        do_cfg: bool,
    ) -> Result<Tensor> {
        let cond = self.embed(prompt)?;
        if !do_cfg {
            return Ok(cond);
        }
        let uncond = self.embed(negative_prompt)?;
        Ok(Tensor::cat(&[&uncond, &cond], 0)?)
    }

    fn embed(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        self.text_encoder.forward(&ids)
    }

    fn prepare_timesteps(&self, params: &GenerationParams) -> Result<Box<dyn Scheduler>> {
        let kind = params.scheduler.unwrap_or(self.default_scheduler);
        schedulers::build(kind, &self.scheduler_config, params.steps)
    }

    /// Initial noise from the request's own generator, as diffusers draws it on the CPU.
    fn prepare_latents(
        &self,
        params: &GenerationParams,
        scheduler: &dyn Scheduler,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let shape = (
            1,
            self.unet_in_channels,
            params.height / self.vae_scale_factor,
            params.width / self.vae_scale_factor,
        );
        let noise = rng.randn_tensor(shape, &self.device, DType::F32)?;
        Ok((noise * scheduler.init_noise_sigma())?.to_dtype(self.dtype)?)
    }

    fn denoise(
        &self,
        mut latents: Tensor,
        text_embeddings: &Tensor,
        scheduler: &mut dyn Scheduler,
        guidance_scale: f64,
        rng: &mut TorchRng,
        on_step: StepHook,
    ) -> Result<Tensor> {
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (index, &t) in timesteps.iter().enumerate() {
            let model_input = scheduler.scale_model_input(&latents, index)?;
            let noise_pred =
                self.predict_noise(&model_input, t, text_embeddings, guidance_scale)?;
            latents = scheduler.step(&noise_pred, index, &latents, rng)?;
            if on_step(StepProgress {
                step: index + 1,
                total,
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
        let batch = text_embeddings.dim(0)?;
        let model_input = if batch == 2 {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let t = Tensor::full(t as f32, batch, &self.device)?;
        let noise_pred = self.unet.forward(&model_input, &t, text_embeddings)?;
        if batch != 2 {
            return Ok(noise_pred);
        }
        let uncond = noise_pred.narrow(0, 0, 1)?;
        let cond = noise_pred.narrow(0, 1, 1)?;
        Ok((&uncond + ((cond - &uncond)? * guidance_scale)?)?)
    }

    /// `vae.decode(latents / scaling_factor)`, in `[-1, 1]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.vae_scaling_factor)?;
        self.vae.decode(&z)
    }
}

/// `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` to RGB8, as diffusers' image processor.
fn postprocess(image: &Tensor) -> Result<RgbImage> {
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
    let mut candidates = Vec::new();
    if dtype == DType::F16 {
        candidates.push(format!("{stem}.fp16.safetensors"));
    }
    candidates.push(format!("{stem}.safetensors"));
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

/// Memory-maps a component's weights and builds it, turning tensor errors (a missing tensor, a wrong
/// shape) into `PipelineError::Weights` naming the file.
fn with_weights<T>(
    dir: &Path,
    component: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    let files = component_weight_files(dir, component, stem, dtype)?;
    let weights_error = |message: String| PipelineError::Weights {
        path: files[0].clone(),
        message,
    };
    // SAFETY: the files are memory-mapped read-only; sdserve never writes to a model folder while it is loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| weights_error(e.to_string()))?;
    build(vb).map_err(|e| match e {
        PipelineError::Candle(e) => weights_error(e.to_string()),
        other => other,
    })
}
