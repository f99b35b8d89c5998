//! The worker thread: loads the model, then runs queued jobs one at a time.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sdserve_pipeline::pipeline::StepProgress;
use sdserve_pipeline::PipelineError;
use tokio::sync::oneshot;

use super::{lock, Inner, Job, JobError, ModelState, Outcome};
use crate::generator::{Loaded, Loader};
use crate::gpu::OomOutcome;

pub(super) fn worker_main(inner: &Inner, loader: Loader) {
    let t0 = Instant::now();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(loader))
        .unwrap_or_else(|_| Err("the model loader panicked".into()));
    let Loaded {
        mut generator,
        info,
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
    *inner.state.write().unwrap_or_else(|e| e.into_inner()) = ModelState::Ready(info);

    loop {
        let job = {
            let mut q = lock(&inner.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    inner.running.fetch_add(1, Ordering::SeqCst);
                    break Some(job);
                }
                if q.shutting_down {
                    break None;
                }
                q = inner.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(job) = job else { break };
        let (reply, result) = run_job(inner, generator.as_mut(), job);
        // Counted as not running before the client hears back, so /health and /metrics agree.
        inner.running.fetch_sub(1, Ordering::SeqCst);
        if let (Some(reply), Some(result)) = (reply, result) {
            let _ = reply.send(result);
        }
    }
    tracing::info!("worker stopped");
}

type Reply = oneshot::Sender<Result<Outcome, JobError>>;

/// Runs one job; returns its reply channel and answer (none when nobody is listening).
fn run_job(
    inner: &Inner,
    generator: &mut dyn crate::generator::Generator,
    job: Job,
) -> (Option<Reply>, Option<Result<Outcome, JobError>>) {
    let start = Instant::now();
    if job.cancel.load(Ordering::SeqCst) || job.reply.is_closed() {
        inner.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        inner.oom.release_probe();
        return (None, None); // the client is gone: never start it
    }
    if start >= job.deadline {
        inner.oom.release_probe();
        return (Some(job.reply), Some(Err(JobError::Timeout)));
    }
    let _ = job.progress.started.set(start);
    let queue_secs = start.duration_since(job.enqueued).as_secs_f64();
    inner.metrics.queue_seconds.observe(queue_secs);
    let shutdown_deadline = *lock(&inner.shutdown_deadline);
    let mut last = start;
    let mut stop_reason = None;
    let result = {
        let mut hook = |p: StepProgress| {
            job.progress.step.store(p.step, Ordering::SeqCst);
            job.progress.total.store(p.total, Ordering::SeqCst);
            let now = Instant::now();
            inner
                .metrics
                .step_seconds
                .observe(now.duration_since(last).as_secs_f64());
            last = now;
            let shutdown = shutdown_deadline.or(*lock(&inner.shutdown_deadline));
            stop_reason = if now >= job.deadline {
                Some(JobError::Timeout)
            } else if shutdown.is_some_and(|t| now >= t) {
                Some(JobError::ShuttingDown)
            } else if job.cancel.load(Ordering::SeqCst) || job.reply.is_closed() {
                Some(JobError::Cancelled)
            } else {
                None
            };
            if stop_reason.is_some() {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            generator.generate(&job.params, &mut hook)
        }))
    };
    let gen_secs = start.elapsed().as_secs_f64();
    if let Some(u) = generator.last_memory_usage() {
        tracing::info!(
            job = job.id,
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
        match generator.record_oom(&inner.oom, r) {
            OomOutcome::NotOom => {}
            OomOutcome::Failed => {
                tracing::warn!(job = job.id, "out of memory; this request failed")
            }
            OomOutcome::SwitchedPlan(summary) => {
                tracing::warn!(job = job.id, memory_plan = %summary, "repeated out-of-memory failures; switched to a leaner memory plan");
                *inner.memory_plan.write().unwrap_or_else(|e| e.into_inner()) =
                    generator.memory_plan();
            }
            OomOutcome::Paused { retry_after } => {
                tracing::error!(
                    job = job.id,
                    retry_after_secs = retry_after.as_secs_f64(),
                    "repeated out-of-memory failures and no leaner plan; circuit breaker open"
                )
            }
        }
    }
    let reply = match result {
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
                    let text = job.png_texts.get(i).or(job.png_texts.first());
                    crate::png::encode(img, text.map_or("", |t| t.as_str()))
                })
                .collect();
            match pngs {
                Ok(pngs) => Ok(Outcome {
                    pngs,
                    queue_secs,
                    gen_secs,
                }),
                Err(e) => Err(JobError::Internal(format!("png encoding failed: {e}"))),
            }
        }
        Ok(Err(PipelineError::Cancelled)) => {
            inner.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            let why = stop_reason.unwrap_or(JobError::Cancelled);
            tracing::info!(job = job.id, reason = ?why, step_secs = gen_secs, "generation stopped early");
            Err(why)
        }
        Ok(Err(e)) if crate::gpu::is_oom(&e) => {
            tracing::error!(job = job.id, error = %e, "out of memory");
            Err(JobError::OutOfMemory)
        }
        Ok(Err(PipelineError::InvalidRequest(m))) => Err(JobError::Invalid(m)),
        Ok(Err(e)) => Err(JobError::Internal(format!("generation failed: {e}"))),
        Err(_) => Err(JobError::Internal("the generator panicked".into())),
    };
    (Some(job.reply), Some(reply))
}
