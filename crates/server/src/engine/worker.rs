//! The worker thread: loads the model, then runs queued jobs one at a time. The step hook
//! records progress (with an ETA), sends previews, and stops the run within one step when the
//! job is cancelled, passes its deadline, or the shutdown grace runs out.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use base64::Engine as _;
use sdserve_pipeline::pipeline::StepProgress;
use sdserve_pipeline::taesd::Taesd;
use sdserve_pipeline::PipelineError;

use super::job::{build_result, JobEvent, JobProgress, JobSpec, JobStatus, StopReason};
use super::local::{lock, Inner};
use super::table::outcome_of;
use super::{ModelState, PreviewMode};
use crate::error::ApiError;
use crate::generator::{Generator, Loaded, Loader, Switcher};
use crate::gpu::OomOutcome;
use crate::speed::{SpeedProbe, PROBE_IDLE, PROBE_TRIES};

pub(super) fn worker_main(inner: &Inner, loader: Loader, mut switcher: Option<Switcher>) {
    let t0 = Instant::now();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(loader))
        .unwrap_or_else(|_| Err("the model loader panicked".into()));
    let Loaded {
        mut generator,
        info,
        taesd,
        speed_probe,
    } = match loaded {
        Ok(l) => l,
        Err(why) => {
            tracing::error!(error = %why, load_seconds = t0.elapsed().as_secs_f64(), "model load failed");
            *inner.state.write().unwrap_or_else(|e| e.into_inner()) = ModelState::Failed(why);
            return;
        }
    };
    tracing::info!(
        model_version = %info.model_version,
        default_scheduler = info.default_scheduler.name(),
        load_seconds = t0.elapsed().as_secs_f64(),
        rss_mb = crate::config::rss_mb(),
        "model ready"
    );
    *inner.device.write().unwrap_or_else(|e| e.into_inner()) = generator.device();
    *inner.memory_plan.write().unwrap_or_else(|e| e.into_inner()) = generator.memory_plan();
    *inner.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(super::LoadedModel {
        name: None,
        model_version: info.model_version.clone(),
    });
    *inner.state.write().unwrap_or_else(|e| e.into_inner()) = ModelState::Ready(info);
    let mut held = super::switch::Held {
        name: None,
        present: true,
    };
    // Tries left for the speed probe (0: none wanted, or done).
    let mut probe_tries = if speed_probe { PROBE_TRIES } else { 0 };

    loop {
        let picked = {
            let mut jobs = inner.jobs();
            // The adapter folders are looked at after every wake, so always right before a job.
            let mut looked = false;
            let mut quiet_since = Instant::now();
            loop {
                if !looked {
                    drop(jobs);
                    refresh_adapters(inner, generator.as_mut());
                    looked = true;
                    jobs = inner.jobs();
                    continue;
                }
                if !jobs.shutting_down {
                    if let Some(pending) = jobs.model_asks.pop_front() {
                        break Some(Work::Model(pending));
                    }
                }
                if let Some(id) = jobs.queue.pop_front() {
                    let speed = jobs.speed;
                    let Some(r) = jobs.records.get_mut(&id) else {
                        continue;
                    };
                    let now = (SystemTime::now(), Instant::now());
                    if now.1 >= r.deadline {
                        // Passed its deadline while waiting (before the reaper saw it).
                        let info = r.timeout_info(now.1, speed);
                        let (status, err) = outcome_of(StopReason::Timeout, info);
                        jobs.finish(&id, status, Err(err));
                        jobs.announce_positions(0);
                        inner.oom.release_probe();
                        continue;
                    }
                    r.status = JobStatus::Running;
                    r.started = Some(now);
                    r.emit(JobEvent::Started);
                    let picked = (id.clone(), r.spec.clone(), r.stop.clone(), r.deadline);
                    let queue_secs = now.1.duration_since(r.created_instant).as_secs_f64();
                    jobs.running = Some(id);
                    jobs.announce_positions(0);
                    inner.metrics.queue_seconds.observe(queue_secs);
                    break Some(Work::Job(picked));
                }
                if jobs.shutting_down {
                    break None;
                }
                looked = false;
                if inner.rescans.asked.load(Ordering::SeqCst) > *inner.rescans.done.borrow() {
                    continue;
                }
                // Woken at least every POLL, to look at the adapter folders.
                let (j, woke) = inner
                    .wake
                    .wait_timeout(jobs, crate::adapters::POLL)
                    .unwrap_or_else(|e| e.into_inner());
                jobs = j;
                if !woke.timed_out() {
                    quiet_since = Instant::now();
                }
                // The probe runs only once the worker has been idle (no wake) for a while.
                if probe_tries > 0
                    && held.present
                    && quiet_since.elapsed() >= PROBE_IDLE
                    && jobs.queue.is_empty()
                    && !jobs.shutting_down
                {
                    drop(jobs);
                    probe_tries = run_speed_probe(inner, generator.as_mut(), probe_tries);
                    jobs = inner.jobs();
                    quiet_since = Instant::now();
                }
            }
        };
        let (id, spec, stop, deadline) = match picked {
            None => break,
            Some(Work::Model(pending)) => {
                super::switch::answer(inner, switcher.as_mut(), &mut held, &mut generator, pending);
                continue;
            }
            Some(Work::Job(job)) => job,
        };
        let want = spec.model.as_deref();
        if let Err(e) = super::switch::ensure(
            inner,
            switcher.as_mut(),
            &mut held,
            &mut generator,
            &id,
            want,
        ) {
            let mut jobs = inner.jobs();
            jobs.running = None;
            jobs.finish(&id, JobStatus::Failed, Err(e));
            continue;
        }
        // The job's VAE (the model's own when it names none), swapped between jobs.
        let vae = spec.vae.as_ref().map(|v| v.name.as_str());
        let swapped = std::panic::catch_unwind(AssertUnwindSafe(|| generator.set_vae(vae)))
            .unwrap_or_else(|_| Err("the VAE loader panicked".into()));
        if let Err(why) = swapped {
            let mut jobs = inner.jobs();
            jobs.running = None;
            jobs.finish(
                &id,
                JobStatus::Failed,
                Err(ApiError::validation("vae", why)),
            );
            continue;
        }
        let run = Run {
            inner,
            taesd: taesd.as_ref(),
            id: &id,
            spec: &spec,
            stop: &stop,
            deadline,
        };
        let (status, result, gen_secs) = run.execute(generator.as_mut());
        let mut jobs = inner.jobs();
        if let Some(r) = jobs.records.get_mut(&id) {
            r.gen_secs = gen_secs;
        }
        // Not running any more before anyone hears of the end, so /health and /metrics agree.
        jobs.running = None;
        jobs.running_stuck = None;
        jobs.finish(&id, status, result);
    }
    let refused = std::mem::take(&mut inner.jobs().model_asks);
    for pending in refused {
        let _ = pending.reply.send(Err(ApiError::ModelUnavailable(
            "the server is shutting down".into(),
        )));
    }
    tracing::info!("worker stopped");
}

/// What the worker does next.
enum Work {
    /// A job: its id, spec, stop flag and deadline.
    Job(
        (
            String,
            Arc<JobSpec>,
            Arc<std::sync::atomic::AtomicU8>,
            Instant,
        ),
    ),
    /// An ask about its model (`unload-checkpoint`, `reload-checkpoint`).
    Model(super::switch::PendingAsk),
}

/// Reads of LORA_DIR/EMBEDDINGS_DIR asked of the worker (`JobBackend::rescan_adapters`): it
/// looks at the folders while `asked` is ahead of `done`, reading them even unchanged when
/// `forced`.
#[derive(Default)]
pub(super) struct Rescans {
    pub asked: std::sync::atomic::AtomicU64,
    pub done: tokio::sync::watch::Sender<u64>,
    pub forced: std::sync::atomic::AtomicBool,
}

/// Asks the worker to look at the adapter folders; the ticket is done once it has.
pub(super) fn ask_rescan(inner: &Inner, force: bool) -> super::RescanTicket {
    if force {
        inner.rescans.forced.store(true, Ordering::SeqCst);
    }
    let target = inner.rescans.asked.fetch_add(1, Ordering::SeqCst) + 1;
    let done = inner.rescans.done.subscribe();
    // Under the lock the worker waits with, so the wake cannot fall between its look at the
    // queue and its wait.
    let _jobs = inner.jobs();
    inner.wake.notify_all();
    super::RescanTicket { target, done }
}

/// Reads LORA_DIR/EMBEDDINGS_DIR again when they changed, or when a read was asked for
/// (`Rescans`), and publishes the new listing; validation and both listings use it.
fn refresh_adapters(inner: &Inner, generator: &mut dyn Generator) {
    let asked = inner.rescans.asked.load(Ordering::SeqCst);
    let force = inner.rescans.forced.swap(false, Ordering::SeqCst);
    let refreshed =
        std::panic::catch_unwind(AssertUnwindSafe(|| generator.refresh_adapters(force)));
    match refreshed {
        Ok(Some(adapters)) => {
            if let ModelState::Ready(info) =
                &mut *inner.state.write().unwrap_or_else(|e| e.into_inner())
            {
                info.adapters = adapters;
            }
        }
        Ok(None) => {}
        Err(_) => tracing::error!("reading the LoRA and embedding folders panicked"),
    }
    inner.rescans.done.send_if_modified(|done| {
        let was = *done;
        *done = was.max(asked);
        *done != was
    });
}

/// Times the model while no job waits (`speed`); a job that arrives stops it within a step.
/// Gives the tries left: 0 once it measured, failed, or was interrupted `PROBE_TRIES` times.
fn run_speed_probe(inner: &Inner, generator: &mut dyn Generator, tries: usize) -> usize {
    tracing::debug!(
        tries_left = tries,
        "CPU speed probe: running while the worker is idle"
    );
    let stop = || {
        let jobs = inner.jobs();
        !jobs.queue.is_empty() || jobs.shutting_down
    };
    let measured =
        std::panic::catch_unwind(AssertUnwindSafe(|| SpeedProbe::measure(generator, &stop)));
    match measured {
        Ok(Ok(Some(p))) => {
            let cfg = &inner.cfg;
            tracing::info!(
                step_seconds = p.step_secs,
                decode_seconds = p.decode_secs,
                encode_seconds = p.encode_secs,
                probe_size = p.side,
                "{}",
                p.summary(cfg.timeout, Some(cfg.job_timeout))
            );
            inner.jobs().speed = Some(p);
            0
        }
        Ok(Ok(None)) if tries > 1 => {
            tracing::info!(
                tries_left = tries - 1,
                "CPU speed probe: a request arrived, so the probe stopped and gave way; it runs again when the worker is idle"
            );
            tries - 1
        }
        Ok(Ok(None)) => {
            tracing::info!("CPU speed probe: skipped, requests kept arriving; a 408's details still give the speed a request ran at");
            0
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the CPU speed probe failed");
            0
        }
        Err(_) => {
            tracing::warn!("the CPU speed probe panicked");
            0
        }
    }
}

/// One job on the worker.
struct Run<'a> {
    inner: &'a Inner,
    /// The preview decoder for `PREVIEW=taesd`.
    taesd: Option<&'a Taesd>,
    id: &'a str,
    spec: &'a JobSpec,
    stop: &'a std::sync::atomic::AtomicU8,
    deadline: Instant,
}

type RunResult = (
    JobStatus,
    Result<Arc<crate::api::GenerateResponse>, ApiError>,
    f64,
);

impl Run<'_> {
    fn execute(&self, generator: &mut dyn Generator) -> RunResult {
        let inner = self.inner;
        let job = self.id;
        let start = Instant::now();
        let shutdown_deadline = *lock(&inner.shutdown_deadline);
        let mut last = start;
        let mut stop_reason = None;
        let result = {
            let mut hook = |p: StepProgress<'_>| {
                let now = Instant::now();
                // A check between steps (an upscaler model's tiles) is no step.
                if !p.between_steps {
                    inner
                        .metrics
                        .step_seconds
                        .observe(now.duration_since(last).as_secs_f64());
                    last = now;
                    self.progress(&p, start, now);
                }
                let shutdown = shutdown_deadline.or(*lock(&inner.shutdown_deadline));
                stop_reason = if now >= self.deadline {
                    Some(StopReason::Timeout)
                } else if shutdown.is_some_and(|t| now >= t) {
                    Some(StopReason::ShuttingDown)
                } else {
                    StopReason::from_u8(self.stop.load(Ordering::SeqCst))
                };
                if stop_reason.is_some() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                generator.generate(&self.spec.params, &mut hook)
            }))
        };
        let gen_secs = start.elapsed().as_secs_f64();
        if let Some(u) = generator.last_memory_usage() {
            tracing::info!(
                job,
                vram_start_mb = u.start_used_bytes >> 20,
                vram_peak_mb = u.peak_used_bytes >> 20,
                vram_pool_peak_mb = u.pool_peak_bytes.map(|b| b >> 20),
                vram_end_mb = u.end_used_bytes >> 20,
                "device memory"
            );
            inner.metrics.record_device_memory(&u);
        }
        if result.is_err() {
            inner.oom.release_probe(); // the generator panicked
        }
        if let Ok(r) = &result {
            self.record_oom(generator, r);
        }
        let failed = |e: ApiError| (JobStatus::Failed, Err(e), gen_secs);
        match result {
            Ok(Ok(images)) => {
                inner.metrics.generation_seconds.observe(gen_secs);
                let prev = inner.avg_gen_ms.load(Ordering::Relaxed) as f64;
                let ms = gen_secs * 1000.0;
                let avg = if prev == 0.0 {
                    ms
                } else {
                    0.8 * prev + 0.2 * ms
                };
                inner.avg_gen_ms.store(avg as u64, Ordering::Relaxed);
                // Each image carries its own parameters (its own seed in a batch).
                let pngs: Result<Vec<Vec<u8>>, String> = images
                    .iter()
                    .enumerate()
                    .map(|(i, img)| {
                        let text = self.spec.png_texts.get(i).or(self.spec.png_texts.first());
                        crate::png::encode(img, text.map_or("", |t| t.as_str()))
                    })
                    .collect();
                match pngs {
                    Ok(pngs) => (
                        JobStatus::Succeeded,
                        Ok(Arc::new(build_result(self.spec, &pngs, gen_secs))),
                        gen_secs,
                    ),
                    Err(e) => failed(ApiError::Internal(format!("png encoding failed: {e}"))),
                }
            }
            Ok(Err(PipelineError::Cancelled)) => {
                inner.metrics.cancelled.inc();
                let why = stop_reason.unwrap_or(StopReason::Cancelled);
                tracing::info!(job, reason = ?why, step_secs = gen_secs, "generation stopped early");
                let info = lock_records_info(inner, job);
                let (status, err) = outcome_of(why, info);
                (status, Err(err), gen_secs)
            }
            Ok(Err(e)) if crate::gpu::is_oom(&e) => {
                tracing::error!(job, error = %e, "out of memory");
                failed(ApiError::OutOfMemory {
                    detail: "the device ran out of memory for this request".into(),
                    retry_after_secs: None,
                })
            }
            Ok(Err(PipelineError::InvalidRequest(m))) => failed(ApiError::validation("request", m)),
            Ok(Err(e)) => {
                tracing::error!(job, error = %e, "generation failed");
                failed(ApiError::Internal(format!("generation failed: {e}")))
            }
            Err(_) => {
                tracing::error!(job, "the generator panicked");
                failed(ApiError::Internal("the generator panicked".into()))
            }
        }
    }

    /// Records progress and its ETA, sends the progress event and, when due, a preview: made
    /// only while someone can see it (`Record::previews_wanted`: an event stream that shows
    /// previews, or a poller that asked lately), not for a client that only waits for the
    /// image (`/generate`) nor for the cluster's forwarder (API replicas tell it, via Redis,
    /// whom they serve).
    fn progress(&self, p: &StepProgress<'_>, start: Instant, now: Instant) {
        let per_step = now.duration_since(start).as_secs_f64() / p.step.max(1) as f64;
        let eta = per_step * p.total.saturating_sub(p.step) as f64;
        let progress = JobProgress {
            step: p.step,
            total: p.total,
            eta_seconds: Some((eta * 10.0).round() / 10.0),
        };
        let cfg = &self.inner.cfg;
        let due = cfg.preview != PreviewMode::Off
            && cfg.preview_every > 0
            && (p.step.is_multiple_of(cfg.preview_every) || p.step == p.total);
        let wanted = {
            let mut jobs = self.inner.jobs();
            let Some(r) = jobs.records.get_mut(self.id) else {
                return;
            };
            r.progress = progress;
            r.emit(JobEvent::Progress(progress));
            due && r.previews_wanted(now)
        };
        // Kept in the record too, for clients that poll (A1111 `current_image`).
        if !wanted {
            return;
        }
        let Some(latents) = p.latents else { return };
        self.inner.metrics.previews.inc();
        match preview_png(cfg.preview, latents, self.taesd) {
            Ok(png) => {
                let b64 = Arc::new(base64::engine::general_purpose::STANDARD.encode(png));
                let mut jobs = self.inner.jobs();
                if let Some(r) = jobs.records.get_mut(self.id) {
                    r.preview = Some((p.step, b64.clone()));
                    r.emit(JobEvent::Preview {
                        step: p.step,
                        png_base64: b64,
                    });
                }
            }
            Err(e) => tracing::warn!(job = self.id, error = %e, "preview failed"),
        }
    }

    fn record_oom(
        &self,
        generator: &mut dyn Generator,
        r: &Result<Vec<sdserve_pipeline::pipeline::RgbImage>, PipelineError>,
    ) {
        let inner = self.inner;
        let job = self.id;
        match generator.record_oom(&inner.oom, r) {
            OomOutcome::NotOom => {}
            OomOutcome::Failed => {
                tracing::warn!(job, "out of memory; this request failed")
            }
            OomOutcome::SwitchedPlan(summary) => {
                tracing::warn!(job, memory_plan = %summary, "repeated out-of-memory failures; switched to a leaner memory plan");
                *inner.memory_plan.write().unwrap_or_else(|e| e.into_inner()) =
                    generator.memory_plan();
            }
            OomOutcome::Paused { retry_after } => {
                tracing::error!(
                    job,
                    retry_after_secs = retry_after.as_secs_f64(),
                    "repeated out-of-memory failures and no leaner plan; circuit breaker open"
                )
            }
        }
    }
}

/// A preview PNG of the current latents (the first image of a batch); `PREVIEW=taesd` without
/// a loaded TAESD shows the latent map.
fn preview_png(
    mode: PreviewMode,
    latents: &candle_core::Tensor,
    taesd: Option<&Taesd>,
) -> Result<Vec<u8>, String> {
    let img = match (mode, taesd) {
        (PreviewMode::Off, _) => return Err("previews are off".into()),
        (PreviewMode::Taesd, Some(t)) => latents
            .narrow(0, 0, 1)
            .map_err(PipelineError::from)
            .and_then(|first| t.decode_preview(&first))
            .map_err(|e| e.to_string())?
            .swap_remove(0),
        (PreviewMode::Latent | PreviewMode::Taesd, _) => {
            sdserve_pipeline::preview::latent_rgb(latents).map_err(|e| e.to_string())?
        }
    };
    crate::png::encode(&img, "")
}

/// The job's progress as a 408's details (the record is locked only for this).
fn lock_records_info(inner: &Inner, id: &str) -> crate::error::TimeoutInfo {
    let jobs = inner.jobs();
    jobs.records
        .get(id)
        .map(|r| r.timeout_info(Instant::now(), jobs.speed))
        .unwrap_or_default()
}
