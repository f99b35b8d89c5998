//! `sdserve serve`'s flags, each with its environment twin.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::generator::FakeSpec;

use super::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
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
