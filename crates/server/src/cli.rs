//! Command line: `sdserve serve`, `generate`, `download` and `bench`. Every `serve` flag has an environment twin.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use sdserve_pipeline::attention::AttentionSlicing;
use sdserve_pipeline::memory::plan::LEAN_SLICE_BYTES;
use sdserve_pipeline::memory::{LeverOverrides, Offload};

use crate::generator::FakeSpec;

#[derive(Debug, Parser)]
#[command(
    name = "sdserve",
    version,
    about = "Stable Diffusion 1.5 text-to-image over HTTP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Generate one image to a PNG file, without the server.
    Generate(Box<GenerateArgs>),
    /// Download (or convert) a model into the cache with a progress bar; prints version and folder.
    Download(DownloadArgs),
    /// Time whole generations (per step, device memory) on a local folder; prints JSON.
    Bench(Box<crate::bench_cmd::BenchArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// A hub id, a single-file checkpoint or a diffusers folder.
    #[arg(
        env = "MODEL_ID",
        default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )]
    pub model: String,
    /// Where hub downloads are kept (default: the Hugging Face cache).
    #[arg(long, env = "MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,
    /// Fetch the fp16 weights (what a half-precision GPU run loads) instead of fp32.
    #[arg(long)]
    pub fp16: bool,
    /// The model is a TAESD preview decoder (`PREVIEW_TAESD`, e.g. madebyollin/taesd: one model
    /// at the repo's root), not a pipeline.
    #[arg(long)]
    pub taesd: bool,
}

/// Number format of weights and arithmetic. On the CPU only f32 is fast (f16 is refused there);
/// on a GPU f16 halves the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// f16 on CUDA, f32 on the CPU.
    Auto,
    /// Full precision: what the CPU runs; on a GPU twice the memory of f16.
    F32,
    /// Half precision, for CUDA GPUs (refused on the CPU, which has no fast f16 kernels).
    F16,
    /// Half precision with f32's range, for CUDA GPUs of compute capability 8.0 or newer (f32 on the CPU).
    Bf16,
}

/// Attention slicing; `auto` leaves it to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlicingArg {
    Auto,
    /// The whole score matrix at once (fastest, most memory).
    Off,
    /// Pieces of at most 256 MiB of scores.
    On,
    /// Pieces of at most 64 MiB of scores.
    Lean,
}

/// A lever that is on, off, or left to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ToggleArg {
    Auto,
    On,
    Off,
}

/// Where the components live; `auto` leaves it to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OffloadArg {
    Auto,
    /// Everything stays on the device.
    None,
    /// Text encoder, UNet and VAE on the device only for their stage.
    Model,
    /// As `model`, and the UNet's weights kept in host memory, its blocks put on the device one
    /// at a time during each step (the least device memory, the slowest).
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Where the model comes from and what runs it (shared by `serve` and `generate`).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local diffusers folder, a single-file checkpoint, or a hub id.
    #[arg(
        long = "model",
        env = "MODEL_ID",
        default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )]
    pub model: String,
    /// Where hub downloads are kept (default: the Hugging Face cache).
    #[arg(long, env = "MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "DEVICE", default_value = "auto")]
    pub device: String,
    /// Number format: auto is f16 on CUDA and f32 on the CPU (which refuses f16).
    #[arg(long, env = "DTYPE", value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// GPU memory budget the pipeline plans for (attention slicing, VAE tiling, offload).
    #[arg(long, env = "VRAM_LIMIT_MB", default_value_t = 5120)]
    pub vram_limit_mb: u64,
    /// Overrides the memory plan's attention slicing.
    #[arg(long, env = "ATTENTION_SLICING", value_enum, default_value = "auto")]
    pub attention_slicing: SlicingArg,
    /// Overrides the memory plan's tiled VAE (decode, and encode of init images; `on` still plans the tile size).
    #[arg(long, env = "VAE_TILING", value_enum, default_value = "auto")]
    pub vae_tiling: ToggleArg,
    /// Overrides the memory plan's offload.
    #[arg(long, env = "OFFLOAD", value_enum, default_value = "auto")]
    pub offload: OffloadArg,
    /// A folder of LoRA `.safetensors` files (kohya or PEFT) that requests name in `loras` or
    /// `<lora:name:weight>` tags; listed by GET /loras. Files added, replaced or removed are
    /// picked up without a restart (POST /adapters/refresh reads it at once).
    #[arg(long, env = "LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// A folder of textual-inversion embeddings (A1111 `.pt`, `.safetensors`): a file's name
    /// used as a word in a prompt stands for its vectors; listed by GET /embeddings. Picked up
    /// without a restart, as LORA_DIR.
    #[arg(long, env = "EMBEDDINGS_DIR")]
    pub embeddings_dir: Option<PathBuf>,
    /// A folder of external VAEs requests may decode with (`vae`; A1111's `sd_vae`): every
    /// `.safetensors`, `.ckpt` and `.pt` file (original LDM key names) and diffusers VAE folder
    /// in it, named by its file or folder name; listed by GET /vaes. Files added later are
    /// picked up.
    #[arg(long, env = "VAE_DIR")]
    pub vae_dir: Option<PathBuf>,
    /// A folder of ESRGAN-architecture upscalers (A1111's `models/ESRGAN`: R-ESRGAN 4x+,
    /// 4x-UltraSharp, ...; `.pth`, `.pt`, `.safetensors`), each named by its file stem in
    /// Extras' `upscaler_1` / `upscaler_2`; listed by GET /sdapi/v1/upscalers. Read on every
    /// look, so files added later are picked up.
    #[arg(long, env = "UPSCALERS_DIR")]
    pub upscalers_dir: Option<PathBuf>,
    /// MODELS_DIR for the worker's VAE lookups (its `*.vae.*` files are VAEs, as in A1111):
    /// set by `serve` from `--models-dir`, not a flag of its own.
    #[arg(skip)]
    pub vae_models_dir: Option<PathBuf>,
    /// For a single-file checkpoint not shaped like SD 1.5: a folder with the diffusers
    /// configs (`unet/config.json`, `vae/config.json`, `text_encoder/config.json`,
    /// `scheduler/scheduler_config.json`, optionally `tokenizer/`) to convert it with.
    #[arg(long, env = "MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,
}

impl ModelArgs {
    pub fn adapter_dirs(&self) -> crate::adapters::AdapterDirs {
        crate::adapters::AdapterDirs {
            lora_dir: self.lora_dir.clone(),
            embeddings_dir: self.embeddings_dir.clone(),
        }
    }

    /// The levers fixed by flags; the planner picks the rest from `VRAM_LIMIT_MB`.
    pub fn lever_overrides(&self) -> LeverOverrides {
        LeverOverrides {
            attention: match self.attention_slicing {
                SlicingArg::Auto => None,
                SlicingArg::Off => Some(AttentionSlicing::Off),
                SlicingArg::On => Some(AttentionSlicing::Auto),
                SlicingArg::Lean => Some(AttentionSlicing::MaxBytes(LEAN_SLICE_BYTES)),
            },
            vae_tiling: match self.vae_tiling {
                ToggleArg::Auto => None,
                ToggleArg::On => Some(true),
                ToggleArg::Off => Some(false),
            },
            offload: match self.offload {
                OffloadArg::Auto => None,
                OffloadArg::None => Some(Offload::None),
                OffloadArg::Model => Some(Offload::Model),
                OffloadArg::Sequential => Some(Offload::Sequential),
            },
            vae_dtype: None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder of models requests may name (`model`; A1111's `sd_model_checkpoint`; OpenAI's
    /// `model`): every diffusers folder and single-file checkpoint (`.safetensors`, `.ckpt`) in
    /// it, named by its file or folder name; listed by GET /models. `--model` stays the
    /// default. The worker holds one model at a time: a job naming another waits its turn,
    /// then the worker frees the loaded one and loads it. Files added later are picked up.
    #[arg(long, env = "MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// AUTOMATIC1111's prompt styles file (`styles.csv`: columns `name`, `prompt`,
    /// `negative_prompt`): requests name styles in `styles` and get their texts added to the
    /// prompts, as in A1111; listed by GET /styles. Read on every request, so edits count at
    /// once; not set or not there: no styles.
    #[arg(long, env = "STYLES_FILE")]
    pub styles_file: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface, as in the Docker image).
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (it is logged).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Requests admitted at once (running + waiting); the next one gets 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_concurrent_requests: u32,
    /// Deadline for queue wait plus generation (the run is stopped, not left running). A CPU
    /// takes minutes for 512x512: the start-up log says what fits.
    #[arg(long, env = "GENERATION_TIMEOUT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub generation_timeout_seconds: u64,
    /// Deadline of a `POST /jobs` job, queue wait included.
    #[arg(long, env = "JOB_TIMEOUT_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub job_timeout_seconds: u64,
    /// Jobs (of every route) waiting at once; the next one gets 429.
    #[arg(long, env = "MAX_QUEUED_JOBS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_queued_jobs: u32,
    /// How long a finished job stays readable at /jobs/{id}.
    #[arg(long, env = "JOB_TTL_SECONDS", default_value_t = 600)]
    pub job_ttl_seconds: u64,
    /// Memory finished jobs may hold for /jobs/{id}, counted roughly: their PNGs in base64
    /// (under 1 MB per 512x512 image), request (with decoded init image and mask), metadata,
    /// last preview, and the record (about 1 KB; an event buffer only while followed); past it the
    /// oldest finished jobs are forgotten before JOB_TTL_SECONDS (`sdserve_jobs_evicted_total`).
    /// Queued and running jobs are never dropped.
    #[arg(long, env = "JOB_RESULTS_MB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub job_results_mb: u64,
    /// Share jobs with other replicas through this Redis (`redis://host:port/db`): every
    /// replica's jobs go through one queue, run on whichever worker is free, and can be read,
    /// followed and cancelled through any API process. Unset: one process, no Redis.
    #[arg(long, env = "QUEUE_URL")]
    pub queue_url: Option<String>,
    /// With QUEUE_URL: `all` serves the API and runs jobs, `api` serves the API without loading
    /// a model, `worker` loads the model and runs jobs (its port answers /health and /metrics).
    #[arg(long, env = "ROLE", value_enum, default_value = "all")]
    pub role: crate::engine::Role,
    /// With QUEUE_URL: a worker's hold on a running job, renewed while it runs; a job whose
    /// lease ran out (its worker died) is queued again for another worker.
    #[arg(long, env = "JOB_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub job_lease_seconds: u64,
    /// Live previews in job events.
    #[arg(long, env = "PREVIEW", value_enum, default_value = "off")]
    pub preview: crate::engine::PreviewMode,
    /// The TAESD for `PREVIEW=taesd`: a folder with `config.json` and
    /// `diffusion_pytorch_model.safetensors` (or `.bin`), or a hub id (fetched into the model
    /// cache). If it
    /// cannot be loaded, previews fall back to `latent` and the log says why.
    #[arg(long, env = "PREVIEW_TAESD", default_value = "madebyollin/taesd")]
    pub preview_taesd: String,
    /// A preview every this many steps (and at the last one).
    #[arg(long, env = "PREVIEW_EVERY", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub preview_every: u32,
    /// Response cache size for seeded requests; 0 turns the cache off.
    #[arg(long, env = "RESPONSE_CACHE_MB", default_value_t = 256)]
    pub response_cache_mb: u64,
    /// A tracing filter: a level (info, debug, ...) or directives like `sdserve=debug,info`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log lines on stdout as text or as one JSON object each.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Largest accepted request body (32 MiB: room for a base64 init image and mask).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// While the hub cannot be reached, the model is tried again in the background after this
    /// many seconds, doubling up to 300 (/health says when); 0 gives up after the first failure.
    #[arg(long, env = "MODEL_RETRY_SECONDS", default_value_t = 10)]
    pub model_retry_seconds: u64,
    /// On SIGTERM/Ctrl-C the running generation may finish within this bound; queued ones get 503.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// API keys, comma-separated; when keys are set, every route but /health and the web page
    /// needs `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A file of API keys, one a line: the key, or `sha256:<hex>` of it; `#` starts a comment.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Requests a minute per key (per client address for callers without one); 0: no limit.
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value_t = 0)]
    pub rate_limit_per_minute: u32,
    /// Origins a browser may call the API from, comma-separated (`*`: any); none by default.
    #[arg(long, env = "CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed: IP addresses and CIDR networks,
    /// comma-separated; none by default. From them, the client is the right-most forwarded
    /// address that is not a trusted proxy (nginx's `real_ip_recursive`), for the rate limit
    /// and the request log.
    #[arg(long, env = "TRUSTED_PROXIES")]
    pub trusted_proxies: Option<crate::security::proxies::TrustedProxies>,
    /// A request's whole body must arrive within this, else 408 `body_timeout`.
    #[arg(long, env = "REQUEST_BODY_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_body_timeout_seconds: u64,
    /// A request's headers must arrive within this (also how long an idle keep-alive
    /// connection stays open); a slow sender is disconnected.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_seconds: u64,
    /// How long a generation may go on past its job's deadline before it counts as stuck (a
    /// device call that never returns; a run stops at its deadline otherwise): its job fails
    /// with `timeout` and /health says `degraded` until the run returns. With QUEUE_URL a
    /// worker gives up after two JOB_LEASE_SECONDS instead.
    #[arg(long, env = "STUCK_GRACE_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stuck_grace_seconds: u64,
    /// Exit with status 70 (after draining as on SIGTERM) once a stuck generation has not
    /// returned for this long (counted from when its job failed as stuck), so that a supervisor (Docker `restart:`, Kubernetes) starts a
    /// fresh process: nothing else frees the worker and its device. 0 = never: the process
    /// stays up, `degraded`, taking no job until the run returns.
    #[arg(long, env = "STUCK_EXIT_SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub stuck_exit_seconds: u64,
    /// Open connections at once; more are answered 503 and closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Open connections one client address may hold at once (IPv6: per /64); more are
    /// answered 429 `overloaded` and closed, so one client cannot take every MAX_CONNECTIONS
    /// slot. 0 = no cap. It counts the TCP peer: behind a reverse proxy that peer is the proxy,
    /// so the cap then applies to the proxy unless it is in TRUSTED_PROXIES (trusted proxies
    /// are not capped; cap clients at the proxy then).
    #[arg(long, env = "MAX_CONNECTIONS_PER_CLIENT", default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_client: u64,
    /// Request line plus headers, in bytes; larger ones get 431.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 32768, value_parser = clap::value_parser!(u64).range(8192..=1_048_576))]
    pub max_header_bytes: u64,
    /// Test hook: a fake generator (`step_ms=50,load_ms=0,fail_load=why,scheduler=pndm`).
    #[arg(long, env = "SDSERVE_FAKE_GENERATOR", hide = true)]
    pub fake_generator: Option<FakeSpec>,
}

/// `sdserve generate`. The request flags follow the API's rules (checked by
/// `validate::parse_generate` before the model loads); their help is written by [`command`]
/// from the same constants.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub width: Option<u64>,
    #[arg(long)]
    pub height: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub batch_size: Option<u64>,
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    #[arg(long)]
    pub strength: Option<f64>,
    #[arg(long = "mask")]
    pub mask_image: Option<PathBuf>,
    #[arg(long)]
    pub tiling: bool,
    /// The hires fix: any `--hires-*` flag asks for the second pass (the native `hires` object).
    #[command(flatten)]
    pub hires: HiresArgs,
    /// The PNG to write (a batch adds -1, -2, ... before the extension); checked before the
    /// model loads.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
}

/// `generate`'s hires fix flags: the keys of the native `hires` object, checked by the same
/// validation (errors name `hires.<key>`).
#[derive(Debug, Clone, Default, Args)]
pub struct HiresArgs {
    #[arg(long)]
    pub hires_width: Option<u64>,
    #[arg(long)]
    pub hires_height: Option<u64>,
    #[arg(long)]
    pub hires_scale: Option<f64>,
    #[arg(long)]
    pub hires_upscaler: Option<String>,
    #[arg(long)]
    pub hires_steps: Option<u64>,
    #[arg(long)]
    pub hires_strength: Option<f64>,
    #[arg(long)]
    pub hires_scheduler: Option<String>,
    #[arg(long)]
    pub hires_prompt: Option<String>,
    #[arg(long)]
    pub hires_negative_prompt: Option<String>,
}

/// The request flags of `generate`: (flag id, help), from the API's rules and defaults.
fn request_flag_help() -> Vec<(&'static str, String)> {
    use crate::validate::*;
    let schedulers: Vec<&str> = sdserve_pipeline::schedulers::SchedulerKind::ALL
        .iter()
        .map(|k| k.name())
        .collect();
    vec![
        (
            "prompt",
            format!("What to draw: 1..={PROMPT_MAX_CHARS} characters after trimming"),
        ),
        (
            "negative_prompt",
            format!("What to keep out of the image: 0..={PROMPT_MAX_CHARS} characters [default: none]"),
        ),
        (
            "steps",
            format!("Denoising steps, {STEPS_MIN}..={STEPS_MAX}; time grows with them [default: {STEPS_DEFAULT}]"),
        ),
        (
            "width",
            format!("Image width in pixels, {SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
        ),
        (
            "height",
            format!("Image height in pixels, {SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
        ),
        (
            "seed",
            format!("0..={SEED_MAX}; the same seed and settings give the same image [default: random, printed]"),
        ),
        (
            "guidance_scale",
            format!("How closely to follow the prompt, {GUIDANCE_MIN}..={GUIDANCE_MAX}; at or below 1 guidance is off [default: {GUIDANCE_DEFAULT}]"),
        ),
        (
            "scheduler",
            format!("One of {} [default: the model's own]", schedulers.join(", ")),
        ),
        (
            "schedule",
            format!(
                "Sigma schedule: default, {}; not every scheduler has every one [default: the scheduler's own, or the model's]",
                sdserve_pipeline::schedulers::SigmaSchedule::ALL.map(|s| s.name()).join(", ")
            ),
        ),
        (
            "batch_size",
            format!("Images made at once, {BATCH_MIN}..={BATCH_MAX}; image i uses seed + i and is written to out-i.png [default: 1]"),
        ),
        (
            "init_image",
            "img2img: a PNG, JPEG or WebP file to start from; width and height default to its size [default: none]".to_string(),
        ),
        (
            "strength",
            format!("With --init-image: how much to change it, 0..=1; int(steps * strength) steps run [default: {STRENGTH_DEFAULT}]"),
        ),
        (
            "mask_image",
            "Inpainting, with --init-image: a mask of the same size, white = repaint, black = keep [default: none]".to_string(),
        ),
        (
            "tiling",
            "Seamless texture: the image continues across its edges (A1111's tiling: circular padding in every convolution)".to_string(),
        ),
        (
            "hires_width",
            format!("Hires fix (text-to-image): a second pass at this width, with --hires-height; {SIZE_MIN}..={SIZE_MAX}, a multiple of {SIZE_MULTIPLE} [default: no second pass]"),
        ),
        (
            "hires_height",
            format!("Hires fix: the second pass's height, with --hires-width; {SIZE_MIN}..={SIZE_MAX}, a multiple of {SIZE_MULTIPLE}"),
        ),
        (
            "hires_scale",
            format!("Hires fix: instead of --hires-width/--hires-height, both sides times this; it must land on a multiple of {SIZE_MULTIPLE} in {SIZE_MIN}..={SIZE_MAX} exactly"),
        ),
        (
            "hires_upscaler",
            format!("Hires fix: how the first image is enlarged, one of {} [default: {}]", hires::upscalers().map(|(n, _)| n).collect::<Vec<_>>().join(", "), hires::UPSCALER_DEFAULT),
        ),
        (
            "hires_steps",
            format!("Hires fix: the second pass's schedule, 0..={STEPS_MAX}; 0: --steps [default: 0]"),
        ),
        (
            "hires_strength",
            format!("Hires fix: how much of the second pass's schedule runs, 0..=1 [default: {}]", hires::DENOISING_DEFAULT),
        ),
        (
            "hires_scheduler",
            format!("Hires fix: the second pass's own scheduler, one of {} [default: --scheduler's]", schedulers.join(", ")),
        ),
        (
            "hires_prompt",
            format!("Hires fix: the second pass's own prompt, 0..={PROMPT_MAX_CHARS} characters [default: --prompt]"),
        ),
        (
            "hires_negative_prompt",
            format!("Hires fix: the second pass's own negative prompt, 0..={PROMPT_MAX_CHARS} characters [default: --negative-prompt]"),
        ),
    ]
}

/// The command line, with `generate`'s request flags described from the API's rules.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommand("generate", |mut c| {
        for (id, help) in request_flag_help() {
            c = c.mut_arg(id, |a| a.help(help));
        }
        c
    })
}

/// Parses the process's arguments (exits with clap's message on a bad one).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_defaults_match_the_contract() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["sdserve", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.host.as_str(), a.port, a.generation_timeout_seconds),
            ("127.0.0.1", 8000, 60)
        );
        assert_eq!(a.model.vram_limit_mb, 5120);
        assert_eq!(a.model.device, "auto");
        assert_eq!(a.model.lever_overrides(), LeverOverrides::default());
    }

    #[test]
    fn generate_help_states_every_rule_and_default() {
        use crate::validate::*;
        let mut cmd = command();
        let help = cmd
            .find_subcommand_mut("generate")
            .unwrap()
            .render_long_help()
            .to_string();
        for want in [
            format!("1..={PROMPT_MAX_CHARS} characters"),
            format!("{STEPS_MIN}..={STEPS_MAX}"),
            format!("[default: {STEPS_DEFAULT}]"),
            format!("{SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
            format!("{GUIDANCE_MIN}..={GUIDANCE_MAX}"),
            format!("[default: {GUIDANCE_DEFAULT}]"),
            format!("0..={SEED_MAX}"),
            "dpmpp_2m_karras".to_string(),
            "[default: out.png]".to_string(),
        ] {
            assert!(help.contains(&want), "{want:?} missing from:\n{help}");
        }
        // Every request flag has a description.
        let generate = cmd.find_subcommand("generate").unwrap();
        for (id, _) in request_flag_help() {
            let arg = generate.get_arguments().find(|a| a.get_id() == id);
            assert!(arg.is_some_and(|a| a.get_help().is_some()), "{id}");
        }
    }

    #[test]
    fn lever_flags_fix_the_plan() {
        let cli = Cli::try_parse_from([
            "sdserve",
            "serve",
            "--attention-slicing",
            "lean",
            "--vae-tiling",
            "off",
            "--offload",
            "sequential",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        let o = a.model.lever_overrides();
        assert_eq!(
            o.attention,
            Some(AttentionSlicing::MaxBytes(LEAN_SLICE_BYTES))
        );
        assert_eq!(o.vae_tiling, Some(false));
        assert_eq!(o.offload, Some(Offload::Sequential));
        assert!(Cli::try_parse_from(["sdserve", "serve", "--offload", "disk"]).is_err());
    }
}
