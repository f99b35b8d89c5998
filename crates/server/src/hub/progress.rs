//! Where model resolution stands: stages, byte counts, and the latest progress shared with /health.

use std::sync::{Arc, Mutex};

use super::RetryWait;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Resolving,
    Downloading,
    Hashing,
    Converting,
    Done,
}

/// Where model resolution stands; passed to the progress callback.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub stage: Stage,
    /// The file being worked on.
    pub file: Option<String>,
    pub bytes_done: u64,
    /// Total bytes to download, when known.
    pub bytes_total: Option<u64>,
    pub files_done: usize,
    pub files_total: usize,
}

impl Progress {
    pub fn stage(stage: Stage, file: Option<String>) -> Self {
        Self {
            stage,
            file,
            bytes_done: 0,
            bytes_total: None,
            files_done: 0,
            files_total: 0,
        }
    }

    /// One line for logs and /health.
    pub fn describe(&self) -> String {
        let file = self.file.as_deref().unwrap_or("");
        match self.stage {
            Stage::Resolving => format!("resolving {file}"),
            Stage::Hashing => format!("hashing {file}"),
            Stage::Converting => format!("converting {file} to diffusers layout"),
            Stage::Done => "model files ready".into(),
            Stage::Downloading => {
                let total = self.bytes_total.map_or(String::new(), |t| {
                    let pct = if t > 0 {
                        self.bytes_done as f64 * 100.0 / t as f64
                    } else {
                        100.0
                    };
                    format!(" / {} ({pct:.0}%)", human(t))
                });
                format!(
                    "downloading {file} {}{total}, file {} of {}",
                    human(self.bytes_done),
                    (self.files_done + 1).min(self.files_total),
                    self.files_total
                )
            }
        }
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub type ProgressFn<'a> = &'a (dyn Fn(&Progress) + Send + Sync);

/// The latest progress, shared between the loading thread and /health.
#[derive(Debug, Clone, Default)]
pub struct LoadStatus(Arc<Mutex<StatusInner>>);

#[derive(Debug, Default)]
struct StatusInner {
    progress: Option<Progress>,
    waiting: Option<RetryWait>,
}

impl LoadStatus {
    /// New progress; a planned retry is over.
    pub fn update(&self, p: &Progress) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.progress = Some(p.clone());
        s.waiting = None;
    }
    pub fn set_waiting(&self, w: Option<RetryWait>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).waiting = w;
    }
    pub fn snapshot(&self) -> Option<Progress> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .progress
            .clone()
    }
    /// The planned retry, while resolution waits for one.
    pub fn waiting(&self) -> Option<RetryWait> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .clone()
    }
    pub fn describe(&self) -> Option<String> {
        match self.waiting() {
            Some(w) => Some(w.describe()),
            None => self.snapshot().map(|p| p.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let p = Progress {
            stage: Stage::Downloading,
            file: Some("unet/x.safetensors".into()),
            bytes_done: 1_500_000_000,
            bytes_total: Some(3_000_000_000),
            files_done: 5,
            files_total: 11,
        };
        assert_eq!(
            p.describe(),
            "downloading unet/x.safetensors 1.5 GB / 3.0 GB (50%), file 6 of 11"
        );
        let s = LoadStatus::default();
        assert_eq!(s.describe(), None);
        s.update(&p);
        assert_eq!(s.snapshot(), Some(p));
    }
}
