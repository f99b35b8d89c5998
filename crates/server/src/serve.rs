//! `sdserve serve`: bind, start the engine (the model loads in the background), serve, and shut
//! down gracefully on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{self, AppState};
use crate::cache::ResponseCache;
use crate::cli::ServeArgs;
use crate::config::{self, Runtime};
use crate::engine::{ClusterConfig, Engine, EngineConfig, Role};
use crate::metrics::Metrics;

/// Exit status after a stuck generation made the process stop (STUCK_EXIT_SECONDS):
/// EX_SOFTWARE, so that a supervisor restarts it.
const STUCK_EXIT_STATUS: u8 = 70;

/// Set when the process stops because of a stuck generation.
static STOPPED_STUCK: AtomicBool = AtomicBool::new(false);

fn exit_status() -> u8 {
    if STOPPED_STUCK.load(Ordering::SeqCst) {
        STUCK_EXIT_STATUS
    } else {
        0
    }
}

pub fn run(args: ServeArgs) -> ExitCode {
    config::init_logging(&args.log_level, args.log_format);
    let rt = match config::select_runtime(&args.model.device, args.model.dtype) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            return ExitCode::from(2);
        }
    };
    let tokio_rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match tokio_rt.block_on(serve(args, rt)) {
        Ok(()) => ExitCode::from(exit_status()),
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs, rt: Runtime) -> Result<(), String> {
    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot bind {}:{}: {e}", args.host, args.port))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let dtype = config::dtype_label(rt.dtype);
    for w in &rt.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %addr,
        device = %rt.label,
        dtype,
        model = %args.model.model,
        vram_limit_mb = args.model.vram_limit_mb,
        max_concurrent_requests = args.max_concurrent_requests,
        generation_timeout_seconds = args.generation_timeout_seconds,
        job_timeout_seconds = args.job_timeout_seconds,
        max_queued_jobs = args.max_queued_jobs,
        preview = ?args.preview,
        response_cache_mb = args.response_cache_mb,
        rss_mb = config::rss_mb(),
        "listening; loading the model in the background"
    );

    let metrics = Arc::new(Metrics::default());
    let security = Arc::new(crate::security::Security::from_config(
        &crate::security::SecurityConfig {
            api_keys: args.api_keys.clone(),
            api_keys_file: args.api_keys_file.clone(),
            rate_limit_per_minute: args.rate_limit_per_minute,
            cors_allow_origins: args.cors_allow_origins.clone(),
            body_timeout: Duration::from_secs(args.request_body_timeout_seconds),
        },
    )?);
    tracing::info!(
        api_keys = security.keys.len(),
        key_ids = ?security.keys.key_ids().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        rate_limit_per_minute = args.rate_limit_per_minute,
        cors_allow_origins = ?args.cors_allow_origins,
        trusted_proxies = ?args.trusted_proxies,
        max_connections = args.max_connections,
        max_connections_per_client = args.max_connections_per_client,
        "access control"
    );
    crate::security::spawn_forgetting(&security);
    let load_status = crate::hub::LoadStatus::default();
    // The worker finds the VAEs requests name among MODELS_DIR's VAE files too.
    let mut model_args = args.model.clone();
    model_args.vae_models_dir = args.models_dir.clone();
    // The default model's files, once loaded: a MODELS_DIR model's load judges LoRAs against them.
    let default_files = crate::model::DefaultModelFiles::default();
    let loader = match args.fake_generator.clone() {
        Some(spec) => {
            tracing::warn!(?spec, "using the FAKE generator (test mode)");
            spec.loader()
        }
        None => crate::model::real_loader(
            model_args.clone(),
            rt.clone(),
            load_status.clone(),
            crate::model::LoadOptions {
                patience: (args.model_retry_seconds > 0).then(|| crate::hub::RetryPolicy {
                    first: Duration::from_secs(args.model_retry_seconds),
                    max: Duration::from_secs(args.model_retry_seconds.max(300)),
                }),
                speed_probe: true,
                default_files: default_files.clone(),
                other_model: false,
            },
        ),
    };
    let loader = if args.preview == crate::engine::PreviewMode::Taesd {
        crate::model::with_taesd(
            loader,
            args.preview_taesd.clone(),
            crate::hub::HubOptions::from_env(
                args.model.model_cache_dir.clone(),
                rt.dtype == candle_core::DType::F16,
            ),
            rt.dtype,
            load_status.clone(),
        )
    } else {
        loader
    };
    let switcher = Some(match &args.fake_generator {
        Some(spec) => spec.clone().switcher(),
        None => crate::model::switcher(
            model_args.clone(),
            rt.clone(),
            args.models_dir.clone(),
            load_status.clone(),
            default_files,
        ),
    });
    let engine_cfg = EngineConfig {
        max_concurrent: args.max_concurrent_requests as usize,
        timeout: Duration::from_secs(args.generation_timeout_seconds),
        job_timeout: Duration::from_secs(args.job_timeout_seconds),
        max_queued: args.max_queued_jobs as usize,
        job_ttl: Duration::from_secs(args.job_ttl_seconds),
        job_results_bytes: (args.job_results_mb as usize).saturating_mul(1 << 20),
        preview: args.preview,
        preview_every: args.preview_every as usize,
        stuck_grace: Duration::from_secs(args.stuck_grace_seconds),
    };
    let cluster = args.queue_url.clone().map(|url| ClusterConfig {
        url,
        role: args.role,
        lease: Duration::from_secs(args.job_lease_seconds),
    });
    let engine = match &cluster {
        None => Engine::start_switching(engine_cfg, loader, switcher, metrics.clone()),
        Some(c) => {
            tracing::info!(role = ?c.role, lease_seconds = args.job_lease_seconds, "sharing jobs through QUEUE_URL");
            let loader = c.role.runs_jobs().then_some(loader);
            let switcher = if c.role.runs_jobs() { switcher } else { None };
            Engine::start_cluster(engine_cfg, c.clone(), loader, switcher, metrics.clone())?
        }
    };
    crate::annotators::AnnotatorStore::shared().set_dirs(
        args.model.annotator_dir.clone(),
        Some(crate::hub::HubOptions::from_env(args.model.model_cache_dir.clone(), false).cache_dir),
    );
    let state = Arc::new(AppState {
        engine: engine.clone(),
        cache: ResponseCache::new((args.response_cache_mb as usize).saturating_mul(1 << 20)),
        metrics,
        device: rt.label.clone(),
        candle_device: rt.device.clone(),
        dtype: dtype.to_string(),
        started,
        max_body_bytes: args.max_body_bytes,
        load_status,
        a1111: crate::api::a1111::Dialect::new(crate::api::a1111::cmd_flags::ServerFlags {
            // The port bound (PORT=0 picks one).
            port: addr.port(),
            ..crate::api::a1111::cmd_flags::ServerFlags::from_args(&args)
        }),
        openai_files: Default::default(),
        security,
        adapter_dirs: args.model.adapter_dirs(),
        models: crate::models::Catalog::new(
            args.models_dir.clone(),
            &args.model.model,
            args.model.model_cache_dir.clone(),
        ),
        vaes: crate::vaes::VaeCatalog::new(
            args.model.vae_dir.clone(),
            args.model.model_cache_dir.clone(),
        )
        .with_models_dir(args.models_dir.clone()),
        upscalers: crate::upscalers::UpscalerCatalog::new(args.model.upscalers_dir.clone()),
        controlnets: crate::controlnets::ControlNetCatalog::new(args.model.controlnet_dir.clone()),
        ip_adapters: crate::ip_adapters::IpAdapterCatalog::new(args.model.ip_adapter_dir.clone()),
        styles: crate::styles::StyleBook::new(args.styles_file.clone()),
        face_restore: crate::face_restorers::FaceRestoreCatalog::new(
            args.model.face_restore_dir.clone(),
        ),
    });
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let shutdown_engine = engine.clone();
    let stuck_exit = Duration::from_secs(args.stuck_exit_seconds);
    let stuck_engine = engine.clone();
    let shutdown = async move {
        let which = tokio::select! {
            which = shutdown_signal() => which,
            () = stuck_too_long(stuck_engine, stuck_exit) => {
                STOPPED_STUCK.store(true, Ordering::SeqCst);
                "STUCK_EXIT_SECONDS"
            }
        };
        tracing::info!(
            signal = which,
            "shutting down: no new connections, draining"
        );
        shutdown_engine.begin_shutdown(grace);
        // A hard bound in case a connection never finishes.
        std::thread::spawn(move || {
            std::thread::sleep(grace + Duration::from_secs(10));
            tracing::warn!("shutdown bound passed; exiting");
            std::process::exit(exit_status().into());
        });
    };
    let limits = crate::listen::ConnLimits {
        max_connections: args.max_connections as usize,
        max_per_client: args.max_connections_per_client as usize,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds),
        max_header_bytes: args.max_header_bytes as usize,
        max_headers: 100,
    };
    let metrics = state.metrics.clone();
    let router = match &cluster {
        Some(c) if c.role == Role::Worker => api::worker_router(state),
        _ => api::router(state),
    };
    let proxies = Arc::new(args.trusted_proxies.clone().unwrap_or_default());
    crate::listen::serve(listener, router, limits, proxies, metrics, shutdown).await;
    let stopped = engine.wait_worker(Duration::from_secs(5));
    tracing::info!(
        worker_stopped = stopped,
        uptime_seconds = started.elapsed().as_secs_f64(),
        "bye"
    );
    Ok(())
}

/// Resolves once this process's run has been stuck (past its deadline by STUCK_GRACE_SECONDS,
/// not returned) for `after`; never when `after` is 0.
async fn stuck_too_long(engine: Engine, after: Duration) {
    if after.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(since) = engine.stuck_since() {
            if since.elapsed() >= after {
                tracing::error!(
                    stuck_exit_seconds = after.as_secs(),
                    exit_status = STUCK_EXIT_STATUS,
                    "the stuck generation has not returned within STUCK_EXIT_SECONDS: stopping the process so that its supervisor starts a fresh one"
                );
                return;
            }
        }
    }
}

async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => "SIGINT",
        _ = term => "SIGTERM",
    }
}
