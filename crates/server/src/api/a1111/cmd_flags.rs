//! `GET /sdapi/v1/cmd-flags`: A1111 answers `vars(shared.cmd_opts)`, every command-line flag of
//! its `modules/cmd_args.py` (and of the built-in Lora extension's `preload.py`) by its
//! argparse `dest` name. Clients read it to learn how the server runs (`api`, `listen`, `port`,
//! `lora_dir`, `medvram`, ...). Here: every name A1111 has, with this server's equivalent value
//! where one exists and A1111's default for the rest (its paths taken from this process's
//! working directory, which stands for A1111's data and install folder).

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use crate::api::Shared;

/// What this process was started with, as far as A1111 has a flag for it.
#[derive(Debug, Clone, Default)]
pub struct ServerFlags {
    pub host: String,
    pub port: u16,
    /// `--model` / MODEL_ID: a folder, a file or a hub id.
    pub model: String,
    pub models_dir: Option<PathBuf>,
    pub lora_dir: Option<PathBuf>,
    pub embeddings_dir: Option<PathBuf>,
    /// VAE_DIR (A1111's `--vae-dir`).
    pub vae_dir: Option<PathBuf>,
    /// UPSCALERS_DIR (A1111's `--esrgan-models-path`).
    pub upscalers_dir: Option<PathBuf>,
    /// FACE_RESTORE_DIR (A1111's `--codeformer-models-path`).
    pub face_restore_dir: Option<PathBuf>,
    pub cors_allow_origins: Vec<String>,
    /// How long an idle keep-alive connection is kept (HEADER_READ_TIMEOUT_SECONDS).
    pub keep_alive_seconds: u64,
}

impl ServerFlags {
    pub fn from_args(args: &crate::cli::ServeArgs) -> Self {
        Self {
            host: args.host.clone(),
            port: args.port,
            model: args.model.model.clone(),
            models_dir: args.models_dir.clone(),
            lora_dir: args.model.lora_dir.clone(),
            embeddings_dir: args.model.embeddings_dir.clone(),
            vae_dir: args.model.vae_dir.clone(),
            upscalers_dir: args.model.upscalers_dir.clone(),
            face_restore_dir: args.model.face_restore_dir.clone(),
            cors_allow_origins: args.cors_allow_origins.clone(),
            keep_alive_seconds: args.header_read_timeout_seconds,
        }
    }
}

/// A1111's flags (argparse `dest` names, in its order) and their defaults. `Data(p)` and
/// `Models(p)` are paths under its data folder and its `models/` folder.
enum FlagDefault {
    Value(Value),
    Data(&'static str),
    Models(&'static str),
}

fn defaults() -> Vec<(&'static str, FlagDefault)> {
    use FlagDefault::{Data, Models, Value as V};
    let off = || V(json!(false));
    let none = || V(Value::Null);
    vec![
        ("f", off()),
        ("update_all_extensions", off()),
        ("skip_python_version_check", off()),
        ("skip_torch_cuda_test", off()),
        ("reinstall_xformers", off()),
        ("reinstall_torch", off()),
        ("update_check", off()),
        ("test_server", off()),
        ("log_startup", off()),
        ("skip_prepare_environment", off()),
        ("skip_install", off()),
        ("dump_sysinfo", off()),
        ("loglevel", none()),
        ("do_not_download_clip", off()),
        ("data_dir", Data("")),
        ("config", Data("configs/v1-inference.yaml")),
        ("ckpt", Data("model.ckpt")),
        ("ckpt_dir", none()),
        ("vae_dir", none()),
        ("gfpgan_dir", V(json!("./GFPGAN"))),
        ("gfpgan_model", none()),
        ("no_half", off()),
        ("no_half_vae", off()),
        ("no_progressbar_hiding", off()),
        ("max_batch_count", V(json!(16))),
        ("embeddings_dir", Data("embeddings")),
        (
            "textual_inversion_templates_dir",
            Data("textual_inversion_templates"),
        ),
        ("hypernetwork_dir", Models("hypernetworks")),
        ("localizations_dir", Data("localizations")),
        ("allow_code", off()),
        ("medvram", off()),
        ("medvram_sdxl", off()),
        ("lowvram", off()),
        ("lowram", off()),
        ("always_batch_cond_uncond", off()),
        ("unload_gfpgan", off()),
        ("precision", V(json!("autocast"))),
        ("upcast_sampling", off()),
        ("share", off()),
        ("ngrok", none()),
        ("ngrok_region", V(json!(""))),
        ("ngrok_options", V(json!({}))),
        ("enable_insecure_extension_access", off()),
        ("codeformer_models_path", Models("Codeformer")),
        ("gfpgan_models_path", Models("GFPGAN")),
        ("esrgan_models_path", Models("ESRGAN")),
        ("bsrgan_models_path", Models("BSRGAN")),
        ("realesrgan_models_path", Models("RealESRGAN")),
        ("clip_models_path", none()),
        ("xformers", off()),
        ("force_enable_xformers", off()),
        ("xformers_flash_attention", off()),
        ("deepdanbooru", off()),
        ("opt_split_attention", off()),
        ("opt_sub_quad_attention", off()),
        ("sub_quad_q_chunk_size", V(json!(1024))),
        ("sub_quad_kv_chunk_size", none()),
        ("sub_quad_chunk_threshold", none()),
        ("opt_split_attention_invokeai", off()),
        ("opt_split_attention_v1", off()),
        ("opt_sdp_attention", off()),
        ("opt_sdp_no_mem_attention", off()),
        ("disable_opt_split_attention", off()),
        ("disable_nan_check", off()),
        ("use_cpu", V(json!([]))),
        ("use_ipex", off()),
        ("disable_model_loading_ram_optimization", off()),
        ("listen", off()),
        ("port", none()),
        ("show_negative_prompt", off()),
        ("ui_config_file", Data("ui-config.json")),
        ("hide_ui_dir_config", off()),
        ("freeze_settings", off()),
        ("ui_settings_file", Data("config.json")),
        ("gradio_debug", off()),
        ("gradio_auth", none()),
        ("gradio_auth_path", none()),
        ("gradio_img2img_tool", none()),
        ("gradio_inpaint_tool", none()),
        ("gradio_allowed_path", Data("")), // a list: made one below
        ("opt_channelslast", off()),
        ("styles_file", Data("styles.csv")),
        ("autolaunch", off()),
        ("theme", none()),
        ("use_textbox_seed", off()),
        ("disable_console_progressbars", off()),
        ("enable_console_prompts", off()),
        ("vae_path", none()),
        ("disable_safe_unpickle", off()),
        ("api", off()),
        ("api_auth", none()),
        ("api_log", off()),
        ("nowebui", off()),
        ("ui_debug_mode", off()),
        ("device_id", none()),
        ("administrator", off()),
        ("cors_allow_origins", none()),
        ("cors_allow_origins_regex", none()),
        ("tls_keyfile", none()),
        ("tls_certfile", none()),
        ("disable_tls_verify", none()),
        ("server_name", none()),
        ("gradio_queue", V(json!(true))),
        ("no_gradio_queue", off()),
        ("skip_version_check", off()),
        ("no_hashing", off()),
        ("no_download_sd_model", off()),
        ("subpath", none()),
        ("add_stop_route", off()),
        ("api_server_stop", off()),
        ("timeout_keep_alive", V(json!(30))),
        ("disable_all_extensions", off()),
        ("disable_extra_extensions", off()),
        ("skip_load_model_at_start", off()),
        // extensions-builtin/Lora/preload.py
        ("lora_dir", Models("Lora")),
        ("lyco_dir_backcompat", Models("LyCORIS")),
        // Set by modules/shared_cmd_options.py after parsing.
        ("webui_is_non_local", off()),
        ("disable_extension_access", off()),
    ]
}

fn path_value(p: &Path) -> Value {
    json!(p.to_string_lossy())
}

/// The levers of the loaded model's memory plan, as A1111's nearest flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanFlags {
    /// Model offload: text encoder, UNet and VAE moved to the device for their stage only.
    pub medvram: bool,
    /// Sequential offload: the UNet streamed from host memory part by part.
    pub lowvram: bool,
    /// Sliced attention (A1111's Doggettx "split attention").
    pub split_attention: bool,
}

impl PlanFlags {
    /// From the plan's one-line summary (`levers: sliced_attention, model_offload; ...`).
    pub fn from_summary(summary: &str) -> Self {
        let levers = summary
            .strip_prefix("levers: ")
            .and_then(|s| s.split(';').next())
            .unwrap_or("");
        let has = |name: &str| {
            levers
                .split(", ")
                .any(|l| l.split(':').next() == Some(name))
        };
        Self {
            medvram: has("model_offload"),
            lowvram: has("sequential_offload"),
            split_attention: has("sliced_attention"),
        }
    }
}

/// The answer: A1111's flags, ours filled in. `data` stands for A1111's data folder.
pub fn flags(
    server: &ServerFlags,
    data: &Path,
    device: &str,
    dtype: &str,
    plan: PlanFlags,
) -> Map<String, Value> {
    let models = data.join("models");
    let mut out = Map::new();
    for (name, default) in defaults() {
        let v = match default {
            FlagDefault::Value(v) => v,
            FlagDefault::Data(p) => path_value(&data.join(p)),
            FlagDefault::Models(p) => path_value(&models.join(p)),
        };
        out.insert(name.to_string(), v);
    }
    out.insert("gradio_allowed_path".into(), json!([path_value(data)]));
    let mut set = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    // The API is always served, with the web page beside it.
    set("api", json!(true));
    set("nowebui", json!(false));
    let listen = !matches!(server.host.as_str(), "127.0.0.1" | "localhost" | "::1" | "");
    set("listen", json!(listen));
    set("webui_is_non_local", json!(listen));
    set("disable_extension_access", json!(listen));
    if !server.host.is_empty() {
        set("server_name", json!(server.host));
    }
    if server.port != 0 {
        set("port", json!(server.port));
    }
    if !server.model.is_empty() {
        set("ckpt", json!(server.model));
    }
    set(
        "ckpt_dir",
        server.models_dir.as_deref().map_or(Value::Null, path_value),
    );
    // No folder configured: no LoRAs or embeddings are read from anywhere.
    set(
        "lora_dir",
        server.lora_dir.as_deref().map_or(Value::Null, path_value),
    );
    set(
        "embeddings_dir",
        server
            .embeddings_dir
            .as_deref()
            .map_or(Value::Null, path_value),
    );
    set(
        "vae_dir",
        server.vae_dir.as_deref().map_or(Value::Null, path_value),
    );
    set(
        "esrgan_models_path",
        server
            .upscalers_dir
            .as_deref()
            .map_or(Value::Null, path_value),
    );
    set(
        "codeformer_models_path",
        server
            .face_restore_dir
            .as_deref()
            .map_or(Value::Null, path_value),
    );
    if !server.cors_allow_origins.is_empty() {
        set(
            "cors_allow_origins",
            json!(server.cors_allow_origins.join(",")),
        );
    }
    if server.keep_alive_seconds > 0 {
        set("timeout_keep_alive", json!(server.keep_alive_seconds));
    }
    set("medvram", json!(plan.medvram));
    set("lowvram", json!(plan.lowvram));
    set("opt_split_attention", json!(plan.split_attention));
    let full = dtype == "f32";
    set("no_half", json!(full));
    set("precision", json!(if full { "full" } else { "autocast" }));
    if device == "cpu" {
        set("use_cpu", json!(["all"]));
    }
    if let Some(n) = device.strip_prefix("cuda:") {
        set("device_id", json!(n));
    }
    out
}

/// A1111's `cmd-flags`: its flag names, with this server's values where it has one (`api`,
/// `listen`, `port`, `server_name`, `ckpt`, `ckpt_dir` (MODELS_DIR), `lora_dir`,
/// `embeddings_dir`, `cors_allow_origins`, `medvram`/`lowvram`/`opt_split_attention` from the
/// memory plan, `no_half`/`precision` from the dtype, `use_cpu`, `device_id`) and A1111's
/// defaults for the rest. `api_auth` is always null: keys are never shown.
#[utoipa::path(get, path = "/sdapi/v1/cmd-flags", tag = "a1111", responses((status = 200, description = "A1111's command-line flags by name (`vars(cmd_opts)`), with this server's values where it has an equivalent")))]
pub(super) async fn cmd_flags(State(app): State<Shared>) -> Json<Value> {
    let data = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let plan = app
        .engine
        .memory_plan()
        .map(|s| PlanFlags::from_summary(&s))
        .unwrap_or_default();
    Json(Value::Object(flags(
        &app.a1111.flags,
        &data,
        &app.device,
        &app.dtype,
        plan,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_summary_gives_the_vram_flags() {
        let p = PlanFlags::from_summary(
            "levers: sliced_attention:64MiB, tiled_vae:48, model_offload; vae f32; estimated peak 1 MiB",
        );
        assert_eq!(
            p,
            PlanFlags {
                medvram: true,
                lowvram: false,
                split_attention: true
            }
        );
        let p = PlanFlags::from_summary("levers: sequential_offload; vae f16; no device budget");
        assert!(p.lowvram && !p.medvram && !p.split_attention);
        assert_eq!(
            PlanFlags::from_summary("levers: none; vae f32; no device budget"),
            PlanFlags::default()
        );
    }

    #[test]
    fn every_a1111_name_is_there_once_with_ours_filled_in() {
        let names: Vec<&str> = defaults().iter().map(|(n, _)| *n).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a name twice");
        let server = ServerFlags {
            host: "0.0.0.0".into(),
            port: 8123,
            model: "/models/sd15".into(),
            lora_dir: Some("/loras".into()),
            vae_dir: Some("/vaes".into()),
            upscalers_dir: Some("/esrgan".into()),
            ..Default::default()
        };
        let plan = PlanFlags {
            medvram: true,
            ..Default::default()
        };
        let f = flags(&server, Path::new("/srv"), "cuda:1", "f16", plan);
        assert_eq!(f.len(), names.len());
        assert_eq!(f["api"], true);
        assert_eq!(f["listen"], true);
        assert_eq!(f["port"], 8123);
        assert_eq!(f["ckpt"], "/models/sd15");
        assert_eq!(f["lora_dir"], "/loras");
        assert_eq!(f["embeddings_dir"], Value::Null);
        assert_eq!(f["vae_dir"], "/vaes");
        assert_eq!(f["esrgan_models_path"], "/esrgan");
        assert_eq!(f["medvram"], true);
        assert_eq!(f["lowvram"], false);
        assert_eq!(f["device_id"], "1");
        assert_eq!(f["no_half"], false);
        assert_eq!(f["hypernetwork_dir"], "/srv/models/hypernetworks");
        assert_eq!(f["styles_file"], "/srv/styles.csv");
        assert_eq!(f["gradio_allowed_path"], json!(["/srv"]));
        assert_eq!(f["api_auth"], Value::Null);
        let local = ServerFlags {
            host: "127.0.0.1".into(),
            ..server
        };
        let f = flags(
            &local,
            Path::new("/srv"),
            "cpu",
            "f32",
            PlanFlags::default(),
        );
        assert_eq!(f["listen"], false);
        assert_eq!(f["use_cpu"], json!(["all"]));
        assert_eq!(
            (&f["no_half"], &f["precision"]),
            (&json!(true), &json!("full"))
        );
    }
}
