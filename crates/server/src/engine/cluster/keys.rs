//! Redis key names of one deployment, and the millisecond timestamps records carry.

use std::time::{Duration, SystemTime};

/// Every key of one deployment (one prefix per Redis database).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    /// Waiting job ids: new ones pushed on the left, workers take from the right.
    pub fn queue(&self) -> String {
        format!("{}:queue", self.prefix)
    }
    /// Job ids by creation time (ms), for `GET /jobs`.
    pub fn index(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }
    /// Set once, by whoever ends the job: the at-most-once guard.
    pub fn done(&self, id: &str) -> String {
        format!("{}:done:{id}", self.prefix)
    }
    /// The running worker's hold on the job (its worker id), renewed while it runs.
    pub fn lease(&self, id: &str) -> String {
        format!("{}:lease:{id}", self.prefix)
    }
    /// A counter: forced reads of the workers' LORA_DIR/EMBEDDINGS_DIR asked for by API
    /// replicas' refresh routes.
    pub fn adapters_rescan(&self) -> String {
        format!("{}:adapters:rescan", self.prefix)
    }
    pub fn lease_prefix(&self) -> String {
        format!("{}:lease:", self.prefix)
    }
    /// A stop request (a `StopReason` as a number), read by the running worker.
    pub fn cancel(&self, id: &str) -> String {
        format!("{}:cancel:{id}", self.prefix)
    }
    /// A worker's reliable-queue list: the jobs it has taken and not yet ended.
    pub fn processing(&self, worker: &str) -> String {
        format!("{}:processing:{worker}", self.prefix)
    }
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }
    pub fn heartbeat(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.prefix)
    }
    /// Set (with a short TTL, renewed) while an API replica serves an event stream of the job
    /// that shows previews; the running worker makes previews only then.
    pub fn previews(&self, id: &str) -> String {
        format!("{}:previews:{id}", self.prefix)
    }
    /// The latest preview the running worker made of the job (`{step}:{base64 PNG}`), for
    /// pollers (A1111 `current_image`).
    pub fn latest_preview(&self, id: &str) -> String {
        format!("{}:latest_preview:{id}", self.prefix)
    }
    /// Pub/sub channel of every job event.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
    pub fn cache(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.prefix)
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

pub fn time_of_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}
