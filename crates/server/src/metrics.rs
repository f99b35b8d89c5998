//! Prometheus text exposition, written by hand (counters, gauges, histograms).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Buckets in seconds for latencies (queue, generation, total).
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Buckets in seconds for one denoising step.
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Histogram {
    buckets: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds (atomics hold integers).
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            counts: buckets.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        for (le, c) in self.buckets.iter().zip(&self.counts) {
            if secs <= *le {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add((secs.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, c) in self.buckets.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Gauges read from the engine at scrape time.
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub capacity: usize,
    pub model_ready: bool,
    /// Response cache (entries, bytes); `None` when the cache is off.
    pub cache: Option<(usize, usize)>,
}

/// Device memory of GPU generations (driver readings and the pool's exact high-water mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceMemory {
    pub last: sdserve_pipeline::memory::MemoryUsage,
    /// The highest `peak_used_bytes` of any request since start.
    pub max_peak_used_bytes: u64,
}

pub struct Metrics {
    /// (route, status, error_code) -> count.
    requests: Mutex<BTreeMap<(String, u16, String), u64>>,
    pub queue_seconds: Histogram,
    pub generation_seconds: Histogram,
    pub request_seconds: Histogram,
    pub step_seconds: Histogram,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cancelled: AtomicU64,
    device_memory: Mutex<Option<DeviceMemory>>,
    /// Requests and connections turned away before any work, by reason.
    rejections: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            queue_seconds: Histogram::new(LATENCY_BUCKETS),
            generation_seconds: Histogram::new(LATENCY_BUCKETS),
            request_seconds: Histogram::new(LATENCY_BUCKETS),
            step_seconds: Histogram::new(STEP_BUCKETS),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            device_memory: Mutex::new(None),
            rejections: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Label values may hold anything a client sends; Prometheus wants `\\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn count_request(&self, route: &str, status: u16, error_code: &str) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route.to_string(), status, error_code.to_string()))
            .or_insert(0) += 1;
    }

    /// One request or connection turned away: `unauthorized`, `rate_limited`, `body_timeout`,
    /// `connection_limit`, `header_timeout`, `header_too_large`, `overloaded`, `payload_too_large`.
    pub fn count_rejection(&self, reason: &'static str) {
        let mut map = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(reason).or_insert(0) += 1;
    }

    /// Notes one GPU request's device memory (the CPU has none to note).
    pub fn record_device_memory(&self, u: &sdserve_pipeline::memory::MemoryUsage) {
        let mut m = self.device_memory.lock().unwrap_or_else(|e| e.into_inner());
        let max = m
            .map_or(0, |d| d.max_peak_used_bytes)
            .max(u.peak_used_bytes);
        *m = Some(DeviceMemory {
            last: *u,
            max_peak_used_bytes: max,
        });
    }

    /// `None` until a GPU request finished.
    pub fn device_memory(&self) -> Option<DeviceMemory> {
        *self.device_memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP sdserve_requests_total HTTP requests by route, status and error code.\n",
        );
        out.push_str("# TYPE sdserve_requests_total counter\n");
        for ((route, status, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "sdserve_requests_total{{route=\"{}\",status=\"{status}\",error_code=\"{}\"}} {n}",
                escape(route),
                escape(code)
            );
        }
        out.push_str("# HELP sdserve_rejections_total Requests and connections turned away before any work, by reason.\n# TYPE sdserve_rejections_total counter\n");
        for (reason, n) in self
            .rejections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "sdserve_rejections_total{{reason=\"{reason}\"}} {n}");
        }
        self.queue_seconds.render(
            &mut out,
            "sdserve_queue_seconds",
            "Time admitted requests waited for the worker.",
        );
        self.generation_seconds.render(
            &mut out,
            "sdserve_generation_seconds",
            "Time the worker spent generating.",
        );
        self.request_seconds.render(
            &mut out,
            "sdserve_request_seconds",
            "Total time of POST /generate requests.",
        );
        self.step_seconds.render(
            &mut out,
            "sdserve_step_seconds",
            "Generation seconds per denoising step.",
        );
        let counters = [
            (
                "sdserve_cache_hits_total",
                "Response cache hits.",
                &self.cache_hits,
            ),
            (
                "sdserve_cache_misses_total",
                "Response cache misses (seeded requests only).",
                &self.cache_misses,
            ),
            (
                "sdserve_cancelled_total",
                "Runs stopped early (timeout, client gone, shutdown).",
                &self.cancelled,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "sdserve_queue_depth",
                "Admitted requests waiting for the worker.",
                g.waiting,
            ),
            (
                "sdserve_running",
                "Requests being generated now.",
                g.running,
            ),
            ("sdserve_capacity", "MAX_CONCURRENT_REQUESTS.", g.capacity),
            (
                "sdserve_model_ready",
                "1 when the model is loaded.",
                usize::from(g.model_ready),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        if let Some(d) = self.device_memory() {
            let mut rows = vec![
                (
                    "sdserve_gpu_request_peak_bytes",
                    "Device memory in use (driver) at its highest during the last request.",
                    d.last.peak_used_bytes,
                ),
                (
                    "sdserve_gpu_request_end_bytes",
                    "Device memory in use (driver) after the last request returned its cache.",
                    d.last.end_used_bytes,
                ),
                (
                    "sdserve_gpu_peak_bytes",
                    "Highest device memory in use (driver) during any request since start.",
                    d.max_peak_used_bytes,
                ),
            ];
            if let Some(p) = d.last.pool_peak_bytes {
                rows.push((
                    "sdserve_gpu_request_allocated_peak_bytes",
                    "High-water mark of sdserve's own device allocations in the last request.",
                    p,
                ));
            }
            for (name, help, v) in rows {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
        }
        if let Some((entries, bytes)) = g.cache {
            let _ = writeln!(out, "# HELP sdserve_cache_entries Responses in the cache.\n# TYPE sdserve_cache_entries gauge\nsdserve_cache_entries {entries}");
            let _ = writeln!(out, "# HELP sdserve_cache_bytes Bytes held by the cache.\n# TYPE sdserve_cache_bytes gauge\nsdserve_cache_bytes {bytes}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.count_request("/generate", 200, "");
        m.count_request("/generate", 200, "");
        m.count_request("/x\"", 404, "not_found");
        m.count_rejection("unauthorized");
        m.count_rejection("unauthorized");
        m.count_rejection("rate_limited");
        m.queue_seconds.observe(0.07);
        m.queue_seconds.observe(3.0);
        let text = m.render(&Gauges {
            running: 1,
            waiting: 2,
            capacity: 3,
            model_ready: true,
            cache: Some((1, 10)),
        });
        assert!(text.contains(
            "sdserve_requests_total{route=\"/generate\",status=\"200\",error_code=\"\"} 2\n"
        ));
        assert!(text.contains("route=\"/x\\\"\""));
        assert!(text.contains("sdserve_rejections_total{reason=\"unauthorized\"} 2\n"));
        assert!(text.contains("sdserve_rejections_total{reason=\"rate_limited\"} 1\n"));
        assert!(text.contains("sdserve_queue_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("sdserve_queue_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("sdserve_queue_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("sdserve_queue_seconds_count 2\n"));
        assert!(text.contains("sdserve_queue_depth 2\n"));
        assert!(text.contains("sdserve_cache_bytes 10\n"));
        // No GPU request yet: no device memory gauges.
        assert!(!text.contains("sdserve_gpu_"));
    }

    #[test]
    fn device_memory_gauges_keep_the_last_request_and_the_highest_peak() {
        use sdserve_pipeline::memory::MemoryUsage;
        let m = Metrics::default();
        let gauges = || Gauges {
            running: 0,
            waiting: 0,
            capacity: 1,
            model_ready: true,
            cache: None,
        };
        let usage = |peak, pool| MemoryUsage {
            start_used_bytes: 100,
            peak_used_bytes: peak,
            pool_peak_bytes: pool,
            end_used_bytes: 120,
        };
        m.record_device_memory(&usage(5000, Some(4000)));
        m.record_device_memory(&usage(3000, None));
        let text = m.render(&gauges());
        assert!(
            text.contains("sdserve_gpu_request_peak_bytes 3000\n"),
            "{text}"
        );
        assert!(text.contains("sdserve_gpu_peak_bytes 5000\n"), "{text}");
        assert!(
            text.contains("sdserve_gpu_request_end_bytes 120\n"),
            "{text}"
        );
        // The last request's pool reading was absent: no stale value from the one before.
        assert!(
            !text.contains("sdserve_gpu_request_allocated_peak_bytes"),
            "{text}"
        );
        assert_eq!(m.device_memory().unwrap().max_peak_used_bytes, 5000);
    }
}
