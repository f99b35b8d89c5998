//! The pipeline's integration tests, one binary: each module was its own test binary
//! (`tests/<module>.rs`) before. One binary compiles `common` once, links once, and lets the
//! harness keep both cores busy across modules; `cargo test -p sdserve-pipeline --test
//! integration <module>::` runs one module. `tests/mapped_alloc.rs` stays apart: its tests count
//! the process's table of file mappings, which the other modules' model loads would share.

/// The f32 weights live in their mapped files, as in the server (`weights::mapped`); every
/// module runs with the server's allocator.
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

mod common;

mod a1111_cfg_below_one;
mod a1111_cfgpp;
mod a1111_dpm2;
mod a1111_guidance_infotext;
mod a1111_inpaint;
mod a1111_inpaint_timesteps;
mod a1111_sampler_params;
mod a1111_samplers;
mod a1111_skip_early;
mod a1111_steps;
mod adapters;
mod area_resize;
mod codeformer;
mod config_json;
mod controlnet;
mod controlnet_inpaint;
mod controlnet_inpaint_channels;
mod controlnet_modes;
mod controlnet_preprocess;
mod controlnet_preprocess_modules;
mod esrgan;
mod eta;
mod evaluations;
mod external_vae;
mod extras_upscale;
mod face_detect;
mod face_paste;
mod face_restore;
mod fuzz_adapters;
mod fuzz_parsers;
mod half_precision;
mod hires;
mod hires_upscaler;
mod img2img_images;
mod ip_adapter;
mod ip_adapter_a1111;
mod ip_adapter_plus;
mod karras_images;
mod kdiffusion_dpm;
mod kdiffusion_samplers;
mod lcm_model;
mod lycoris;
mod pickle_weights;
mod pipeline_images;
mod prompt_edit_images;
mod prompt_schedules;
mod prompt_syntax;
mod recolor;
mod reference;
mod rng;
mod sampler_images;
mod samplers;
mod schedulers;
mod schedulers_multistep;
mod sde;
mod seed_resize;
mod sequential_offload;
mod sigma_schedules;
mod single_file;
mod single_file_yaml;
mod swinir;
mod taesd;
mod text_encoder;
mod tiling;
mod tokenizer;
mod unet;
mod vae;
mod vae_tiled;
mod variation;
