//! How this process hears of jobs that run anywhere in the cluster: the events channel's
//! listener, which hands each event to this process's followers, and the poller, which
//! refreshes workers and queue length, runs the reaper, and reads followed jobs' records in
//! case an event was missed.

use std::sync::Arc;
use std::time::Duration;

use super::store::Store;
use super::{lock, previews, record_gone, wire, Seen, Shared, CALL_TIMEOUT, POLL_EVERY};
use crate::engine::job::JobEvent;

/// Hands every event on the channel to this process's followers; reconnects when the
/// connection drops.
pub(super) async fn listen(sh: Arc<Shared>) {
    use futures_util::StreamExt;
    loop {
        if let Ok(mut pubsub) = sh.client.get_async_pubsub().await {
            if pubsub.subscribe(sh.keys.events()).await.is_ok() {
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if let Some((id, event)) = wire::parse_event(&text) {
                        deliver(&sh, &id, event);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn deliver(sh: &Shared, id: &str, event: JobEvent) {
    let mut follows = lock(&sh.follows);
    let Some(f) = follows.get_mut(id) else { return };
    if f.ended {
        return;
    }
    match &event {
        JobEvent::Queued { position } => f.position = Some(*position),
        JobEvent::Started => f.position = None,
        e if e.is_final() => f.ended = true,
        _ => {}
    }
    let _ = f.tx.send(event);
}

/// Refreshes workers and queue length, queues again jobs whose lease ran out, and reads the
/// records of followed jobs (their end and queue position) in case an event was missed.
pub(super) async fn poll(sh: Arc<Shared>) {
    let store = Store::new(sh.clone());
    let mut last_reap = std::time::Instant::now();
    let reap_every = (sh.cluster.lease / 2).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let refreshed = tokio::time::timeout(CALL_TIMEOUT, store.overview()).await;
        {
            let mut seen = sh.seen.write().unwrap_or_else(|e| e.into_inner());
            match refreshed {
                Ok(Ok((workers, waiting))) => {
                    if seen.unreachable.take().is_some() {
                        tracing::info!("QUEUE_URL's Redis answers again");
                    }
                    if let Some(info) = workers
                        .iter()
                        .filter_map(|w| w.info.as_ref().and_then(|i| i.info()))
                        .next()
                    {
                        seen.info = Some(info);
                    }
                    let rescanned = workers
                        .iter()
                        .filter(|w| w.info.is_some())
                        .map(|w| w.adapters_rescan)
                        .min()
                        .unwrap_or(u64::MAX);
                    sh.rescans_done.send_replace(rescanned);
                    seen.workers = workers;
                    seen.waiting = waiting;
                }
                Ok(Err(e)) => note_unreachable(&mut seen, e.to_string()),
                Err(_) => note_unreachable(&mut seen, "no answer within 3 s".into()),
            }
            if seen.unreachable.is_some() {
                continue;
            }
        }
        previews::renew_keys(&sh).await;
        if last_reap.elapsed() >= reap_every {
            last_reap = std::time::Instant::now();
            if let Err(e) = store.reap().await {
                tracing::warn!(error = %e, "reaper");
            }
        }
        let followed: Vec<(String, Option<usize>)> = {
            let mut follows = lock(&sh.follows);
            follows.retain(|_, f| f.tx.receiver_count() > 0 && !f.ended);
            follows
                .iter()
                .map(|(id, f)| (id.clone(), f.position))
                .collect()
        };
        let ids: Vec<String> = followed.iter().map(|(id, _)| id.clone()).collect();
        let Ok(Ok(seen)) = tokio::time::timeout(CALL_TIMEOUT, store.read_many(&ids)).await else {
            continue;
        };
        for ((id, position), seen) in followed.into_iter().zip(seen) {
            let view = match seen {
                Some(Ok((_, view))) => view,
                // Unreadable: the job's end as its reads answer it (failed, or as it ended).
                Some(Err(unparsable)) => {
                    let end = unparsable.view.as_deref().and_then(JobEvent::terminal);
                    deliver(
                        &sh,
                        &id,
                        end.unwrap_or_else(|| JobEvent::Failed(record_gone().body())),
                    );
                    continue;
                }
                None => {
                    deliver(&sh, &id, JobEvent::Failed(record_gone().body()));
                    continue;
                }
            };
            if let Some(end) = JobEvent::terminal(&view) {
                deliver(&sh, &id, end);
            } else if view.position.is_some() && view.position != position {
                deliver(
                    &sh,
                    &id,
                    JobEvent::Queued {
                        position: view.position.unwrap_or(1),
                    },
                );
            }
        }
    }
}

fn note_unreachable(seen: &mut Seen, why: String) {
    if seen.unreachable.is_none() {
        tracing::error!(error = %why, "QUEUE_URL's Redis cannot be reached; answering 503 queue_unavailable until it is back");
    }
    seen.unreachable = Some(why);
}
