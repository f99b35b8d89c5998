//! Which VAE decodes (and encodes init images): the model's own, or an external one swapped in
//! (A1111's `sd_vae`, diffusers' `vae=AutoencoderKL.from_single_file(path, config=...)`).
//!
//! A single file (`.safetensors`, `.ckpt`, `.pt`) carries only weights: it is read with the
//! model's own VAE config (scaling factor, channels), as `from_single_file(path,
//! config=<model>/vae)` does. A diffusers VAE folder (`config.json` +
//! `diffusion_pytorch_model*.safetensors`) brings its own config, as `from_pretrained` does; it
//! must make latents the UNet takes (same latent channels and downscale factor).
//!
//! One VAE at a time: the held one is dropped before the next is read, and a VAE that cannot
//! be built (its shapes do not fit) fails the swap with the model's own VAE back in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use candle_nn::VarBuilder;

use super::{component_weight_files, StableDiffusion};
use crate::error::read_json;
use crate::memory::offload::{Component, HostTensors};
use crate::memory::{MemoryPlan, Offload};
use crate::vae::{AutoencoderKlDecoder, VaeConfig};
use crate::vae_encoder::AutoencoderKlEncoder;
use crate::{PipelineError, Result};

/// Where a VAE's weights are and the config they are built with.
#[derive(Clone)]
pub(super) struct VaeWeights {
    /// `None`: the model's own.
    pub(super) path: Option<PathBuf>,
    pub(super) config: VaeConfig,
    /// Files in the plan's VAE dtype and in f32 (the NaN retry); empty when `host` holds them.
    pub(super) files: Vec<PathBuf>,
    pub(super) files_f32: Vec<PathBuf>,
    /// A single file's tensors, read once, in the plan's VAE dtype (f32 with the NaN retry).
    pub(super) host: Option<HostTensors>,
}

/// The three VAE components a pipeline holds: decoder, encoder, f32 decoder for the NaN retry.
pub(super) type VaeComponents = (
    Component<AutoencoderKlDecoder>,
    Component<AutoencoderKlEncoder>,
    Option<Component<AutoencoderKlDecoder>>,
);

impl VaeWeights {
    /// The VAE of a diffusers model folder (`dir/vae`).
    pub(super) fn of_model(dir: &Path, plan: &MemoryPlan, dtype: DType) -> Result<Self> {
        Self::of_folder(&dir.join("vae"), None, plan, dtype)
    }

    /// A diffusers VAE folder; `path`: the name it was asked by (`None`: the model's own).
    fn of_folder(
        folder: &Path,
        path: Option<PathBuf>,
        plan: &MemoryPlan,
        dtype: DType,
    ) -> Result<Self> {
        let config: VaeConfig = read_json(&folder.join("config.json"))?;
        let files = |d: DType| {
            // An f32 VAE from the full-precision file; a folder with only fp16 files upcasts.
            component_weight_files(folder, "", "diffusion_pytorch_model", d)
                .or_else(|_| component_weight_files(folder, "", "diffusion_pytorch_model", dtype))
        };
        let files_f32 = if plan.vae_nan_retry && plan.vae_dtype != DType::F32 {
            files(DType::F32)?
        } else {
            Vec::new()
        };
        Ok(Self {
            path,
            config,
            files: files(plan.vae_dtype)?,
            files_f32,
            host: None,
        })
    }

    /// An external VAE at `path` (a file or a diffusers folder) for a model whose own VAE is
    /// `own`; refused, naming the difference, when its latents would not fit the UNet.
    fn external(path: &Path, own: &VaeConfig, plan: &MemoryPlan, dtype: DType) -> Result<Self> {
        if path.is_dir() {
            let w = Self::of_folder(path, Some(path.to_path_buf()), plan, dtype)?;
            let mismatch = super::limits::vae_mismatch(
                &w.config,
                own.latent_channels,
                super::limits::vae_scale_factor(own),
            );
            if let Some(why) = mismatch {
                return Err(PipelineError::Weights {
                    path: path.to_path_buf(),
                    message: format!("this VAE does not fit the model: {why}"),
                });
            }
            return Ok(w);
        }
        // Kept in the VAE's dtype (on the CPU the VAE's weights are these); in f32 when a
        // half-precision decode may be redone in f32 from them.
        let host_dtype = if plan.vae_nan_retry && plan.vae_dtype != DType::F32 {
            DType::F32
        } else {
            plan.vae_dtype
        };
        let tensors =
            crate::single_file::read_vae_file(path, own.block_out_channels.len(), host_dtype)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            config: own.clone(),
            files: vec![path.to_path_buf()],
            files_f32: vec![path.to_path_buf()],
            host: Some(Arc::new(tensors)),
        })
    }

    /// Builds the components (resident on `plan`'s device when not offloaded).
    pub(super) fn components(
        &self,
        plan: &MemoryPlan,
        device: &candle_core::Device,
    ) -> Result<VaeComponents> {
        let resident = (plan.offload == Offload::None).then_some(device);
        let encoder_config = self.config.clone();
        let decoder_config = self.config.clone();
        let vae_build = move |vb: VarBuilder| AutoencoderKlDecoder::new(vb, &decoder_config);
        let encoder = Component::with_host(
            "vae_encoder",
            self.files.clone(),
            self.host.clone(),
            plan.vae_dtype,
            move |vb| AutoencoderKlEncoder::new(vb, &encoder_config),
            resident,
        )?;
        let f32_retry = if plan.vae_nan_retry && plan.vae_dtype != DType::F32 {
            Some(Component::with_host(
                "vae",
                self.files_f32.clone(),
                self.host.clone(),
                DType::F32,
                vae_build.clone(),
                None,
            )?)
        } else {
            None
        };
        let decoder = Component::with_host(
            "vae",
            self.files.clone(),
            self.host.clone(),
            plan.vae_dtype,
            vae_build,
            resident,
        )?;
        Ok((decoder, encoder, f32_retry))
    }
}

impl StableDiffusion {
    /// Decodes (and encodes init images) with the VAE at `path` from now on: a single file
    /// (`.safetensors`, `.ckpt`, `.pt`; LDM key names) read with the model's own VAE config, or
    /// a diffusers VAE folder with its own. `None`: the model's own VAE. Nothing happens when
    /// that VAE is already in use. The held VAE is dropped first; when the new one cannot be
    /// read or built (its shapes do not fit the model), the model's own is put back and the
    /// error returned ([`PipelineError::Weights`] or `Io`/`Config`, naming the file).
    pub fn set_vae(&mut self, path: Option<&Path>) -> Result<()> {
        if self.vae_in_use() == path {
            return Ok(());
        }
        // Drop the held VAE (weights, host tensors) before anything of the next is read.
        self.install_vae(self.own_vae.clone(), false)?;
        return_freed_memory();
        let Some(path) = path else {
            return self.install_vae(self.own_vae.clone(), true);
        };
        let built = VaeWeights::external(path, &self.own_vae.config, &self.plan, self.dtype)
            .and_then(|w| self.install_vae(w, true));
        if let Err(e) = built {
            // What was read of the VAE that does not fit goes first.
            self.install_vae(self.own_vae.clone(), false)?;
            return_freed_memory();
            self.install_vae(self.own_vae.clone(), true)?;
            return Err(e);
        }
        Ok(())
    }

    /// The external VAE in use (as given to [`Self::set_vae`]); `None`: the model's own.
    pub fn vae_in_use(&self) -> Option<&Path> {
        self.vae_weights.path.as_deref()
    }

    /// Makes `weights` the VAE; `build`: build it now as the plan says (else every component
    /// is left offloaded, holding no weights: the step that drops the previous VAE).
    fn install_vae(&mut self, weights: VaeWeights, build: bool) -> Result<()> {
        let plan = if build {
            self.plan.clone()
        } else {
            MemoryPlan {
                offload: Offload::Model,
                ..self.plan.clone()
            }
        };
        let weights = if build {
            weights
        } else {
            VaeWeights {
                host: None,
                ..weights
            }
        };
        // Free the current modules first: at most one VAE is built at a time.
        self.vae.set_residence(None)?;
        self.vae_encoder.set_residence(None)?;
        self.vae_f32 = None;
        let (decoder, encoder, f32_retry) = weights.components(&plan, &self.device)?;
        self.vae = decoder;
        self.vae_encoder = encoder;
        self.vae_f32 = f32_retry;
        self.vae_scaling_factor = weights.config.scaling_factor;
        self.vae_weights = weights;
        self.configure_resident();
        Ok(())
    }
}

/// Gives the dropped VAE's heap memory back to the system: glibc keeps freed blocks under its
/// dynamic mmap threshold (up to 32 MB each, which every VAE tensor is) for reuse, so without
/// this a process back on the model's own (memory-mapped) VAE would still hold the external
/// one's 320 MB (SD 1.5, f32) as free heap.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
