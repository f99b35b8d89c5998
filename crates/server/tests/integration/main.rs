//! The server's integration tests, one binary: each module was its own test binary
//! (`tests/<module>.rs`) before. One binary compiles `common` once, links once, and lets the
//! harness keep both cores busy across modules (many of them mostly wait on a server they
//! started); `cargo test -p sdserve --test integration <module>::` runs one module.

mod common;

mod adapters_http;
mod cluster_records;
mod cluster_redis;
mod cluster_traffic;
mod controlnet_http;
mod controlnet_img2img_http;
mod controlnet_inpaint_http;
mod controlnet_modes_http;
mod controlnet_preprocess_http;
mod dialects;
mod e2e_tiny;
mod face_restore_http;
mod generate_cli;
mod guidance_rule_http;
mod hires_http;
mod hires_upscaler_http;
mod http_fake;
mod hub;
mod images_in;
mod inpaint_http;
mod ip_adapter_a1111_http;
mod ip_adapter_http;
mod jobs_http;
mod karras_http;
mod load_memory;
mod lora_http;
mod lycoris_http;
mod model_rules_http;
mod models_http;
mod prompt_schedule_http;
mod proxies_http;
mod reference_http;
mod sampler_params_http;
mod security_http;
mod seed_resize_http;
mod styles_http;
mod unload_http;
mod vae_http;
mod vae_near_http;
mod variation_http;
