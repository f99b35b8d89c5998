//! Switching models on the worker (MODELS_DIR): a job that names another model than the one
//! held has it loaded when its turn comes. One pipeline at a time (a 5 GB GPU holds one): the
//! held one is dropped, with its LoRA state, kept deltas and offload host copies, before the
//! next is loaded. A model that fails to load fails that job (503 `model_unavailable` naming
//! it) and the previous one is loaded back for later jobs.
//!
//! A1111's `unload-checkpoint` drops the held pipeline between jobs (`unload_now`); the next
//! job loads its model first, as after a switch, and `reload-checkpoint` loads one now
//! (`reload_now`).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::job::JobEvent;
use super::local::Inner;
use super::LoadedModel;
use crate::error::ApiError;
use crate::generator::{Generator, Loaded, Switcher, Unloaded};

/// What the worker holds.
pub(super) struct Held {
    /// The MODELS_DIR name of the held model (of the last one held, while none is); `None`:
    /// the default model.
    pub name: Option<String>,
    /// False once it was unloaded (`unload-checkpoint`), or a failed switch could not load
    /// the previous model back either.
    pub present: bool,
}

/// What the API asks of the worker's model between jobs (A1111's checkpoint routes).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelAsk {
    /// Drop the held pipeline (weights, device memory, caches); jobs load it again.
    Unload,
    /// Hold this model now (a MODELS_DIR name; `None`: the default), loading it if needed.
    Reload(Option<String>),
}

/// A `ModelAsk` waiting for the worker, with where its answer goes. An ask whose asker went
/// away (`reply` closed) before the worker got to it is dropped undone.
pub(super) struct PendingAsk {
    pub ask: ModelAsk,
    pub reply: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
}

fn label(name: Option<&str>) -> &str {
    name.unwrap_or("the default model")
}

/// Does what `pending` asks, between jobs, and answers it.
pub(super) fn answer(
    inner: &Inner,
    switcher: Option<&mut Switcher>,
    held: &mut Held,
    generator: &mut Box<dyn Generator>,
    pending: PendingAsk,
) {
    if pending.reply.is_closed() {
        return;
    }
    let outcome = match (&pending.ask, switcher) {
        (_, None) => Err(ApiError::ModelUnavailable(
            "this worker cannot load its model again, so it keeps it".into(),
        )),
        (ModelAsk::Unload, Some(_)) => {
            if held.present {
                unload(inner, held, generator);
                inner.unloaded.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
        (ModelAsk::Reload(want), Some(switcher)) => {
            reload_now(inner, switcher, held, generator, want.as_deref())
        }
    };
    let _ = pending.reply.send(outcome);
}

/// Makes `want` the held model now, with no job waiting on it: the previous one (if any) is
/// dropped first and, when `want` fails to load, loaded back.
fn reload_now(
    inner: &Inner,
    switcher: &mut Switcher,
    held: &mut Held,
    generator: &mut Box<dyn Generator>,
    want: Option<&str>,
) -> Result<(), ApiError> {
    if held.present && held.name.as_deref() == want {
        return Ok(());
    }
    if want.is_some() && !switcher.by_name {
        return Err(no_models_dir(want));
    }
    inner.reloading.store(true, Ordering::SeqCst);
    let outcome = switch(
        inner,
        switcher,
        held,
        generator,
        "(reload-checkpoint)",
        want,
    );
    inner.reloading.store(false, Ordering::SeqCst);
    outcome
}

fn no_models_dir(want: Option<&str>) -> ApiError {
    ApiError::ModelUnavailable(format!(
        "model {:?} cannot be loaded here: this server has no MODELS_DIR",
        label(want)
    ))
}

/// Makes `want` the held model before job `job` runs (nothing to do when it is held).
pub(super) fn ensure(
    inner: &Inner,
    switcher: Option<&mut Switcher>,
    held: &mut Held,
    generator: &mut Box<dyn Generator>,
    job: &str,
    want: Option<&str>,
) -> Result<(), ApiError> {
    if held.present && held.name.as_deref() == want {
        return Ok(());
    }
    let Some(switcher) = switcher.filter(|s| want.is_none() || s.by_name) else {
        return Err(no_models_dir(want));
    };
    let model = want.map_or_else(
        || {
            inner
                .state
                .read()
                .ok()
                .and_then(|s| match &*s {
                    super::ModelState::Ready(i) => Some(i.model_version.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        },
        str::to_string,
    );
    {
        let mut jobs = inner.jobs();
        if let Some(r) = jobs.records.get_mut(job) {
            r.loading = Some(model.clone());
            r.emit(JobEvent::Loading {
                model: model.clone(),
            });
        }
    }
    let outcome = switch(inner, switcher, held, generator, job, want);
    if let Some(r) = inner.jobs().records.get_mut(job) {
        r.loading = None;
    }
    outcome
}

/// Drops the held model (if any) and loads `want`; when that fails, loads the previous one
/// back (if there was one) and answers 503 naming `want`. `job` names the cause in the log.
fn switch(
    inner: &Inner,
    switcher: &mut Switcher,
    held: &mut Held,
    generator: &mut Box<dyn Generator>,
    job: &str,
    want: Option<&str>,
) -> Result<(), ApiError> {
    let previous = held.name.clone();
    let had = held.present;
    if had {
        unload(inner, held, generator);
    }
    let t0 = Instant::now();
    match load(switcher, want) {
        Ok(loaded) => {
            install(inner, held, generator, want, loaded, t0);
            Ok(())
        }
        Err(why) => {
            tracing::error!(job, model = label(want), error = %why, "model switch failed: this job fails");
            if had {
                let t0 = Instant::now();
                match load(switcher, previous.as_deref()) {
                    Ok(loaded) => install(inner, held, generator, previous.as_deref(), loaded, t0),
                    Err(why) => tracing::error!(
                        model = label(previous.as_deref()),
                        error = %why,
                        "the previous model could not be loaded back; the next job loads its own"
                    ),
                }
            }
            Err(ApiError::ModelUnavailable(format!(
                "model {:?} could not be loaded (the server log says why); other models still serve",
                label(want)
            )))
        }
    }
}

/// Drops the held pipeline (and what belongs to it) before another is loaded.
fn unload(inner: &Inner, held: &mut Held, generator: &mut Box<dyn Generator>) {
    *generator = Box::new(Unloaded);
    held.present = false;
    *inner.loaded.write().unwrap_or_else(|e| e.into_inner()) = None;
    *inner.memory_plan.write().unwrap_or_else(|e| e.into_inner()) = None;
    tracing::info!(
        model = label(held.name.as_deref()),
        rss_mb = crate::config::rss_mb(),
        "model unloaded"
    );
}

fn load(switcher: &mut Switcher, want: Option<&str>) -> Result<Loaded, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| (switcher.load)(want)))
        .unwrap_or_else(|_| Err("the model loader panicked".into()))
}

fn install(
    inner: &Inner,
    held: &mut Held,
    generator: &mut Box<dyn Generator>,
    name: Option<&str>,
    loaded: Loaded,
    t0: Instant,
) {
    tracing::info!(
        model = label(name),
        model_version = %loaded.info.model_version,
        load_seconds = t0.elapsed().as_secs_f64(),
        rss_mb = crate::config::rss_mb(),
        "model loaded"
    );
    *generator = loaded.generator;
    held.name = name.map(str::to_string);
    held.present = true;
    inner.unloaded.store(false, Ordering::SeqCst);
    *inner.device.write().unwrap_or_else(|e| e.into_inner()) = generator.device();
    *inner.memory_plan.write().unwrap_or_else(|e| e.into_inner()) = generator.memory_plan();
    *inner.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(LoadedModel {
        name: held.name.clone(),
        model_version: loaded.info.model_version,
    });
}
