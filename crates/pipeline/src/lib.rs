//! Stable Diffusion 1.5 text-to-image, image for image with HuggingFace diffusers.
//!
//! Synchronous, no async runtime and no HTTP: the server crate owns those. The stages of
//! [`pipeline::StableDiffusion::generate`] follow `StableDiffusionPipeline.__call__`.

pub mod attention;
pub mod ckpt;
pub mod clip;
pub mod config_json;
pub mod controlnet;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod face_restore;
pub mod image_in;
pub mod inpaint_a1111;
pub mod interpolate;
pub mod ip_adapter;
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod named_file;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod prompt_schedule;
pub mod rng;
pub mod schedulers;
pub mod single_file;
pub mod taesd;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod unet;
pub mod upscale;
pub mod upscaler;
pub mod vae;
pub mod vae_encoder;
pub mod weights;

pub use error::{PipelineError, Result};
