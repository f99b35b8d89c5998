//! `/metrics`: counters, gauges and histograms on the `prometheus-client` crate, exposed in the
//! Prometheus text format 0.0.4.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The exposition's `Content-Type`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Buckets in seconds for latencies (queue, generation, total).
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Buckets in seconds for one denoising step.
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
    error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    reason: &'static str,
}

pub struct Metrics {
    /// The metrics that live as long as the server; scrape-time gauges are added per scrape.
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    pub queue_seconds: Histogram,
    pub generation_seconds: Histogram,
    pub request_seconds: Histogram,
    pub step_seconds: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cancelled: Counter,
    pub previews: Counter,
    pub jobs_evicted: Counter,
    device_memory: Mutex<Option<DeviceMemory>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "sdserve_requests",
            "HTTP requests by route, status and error code",
            requests.clone(),
        );
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "sdserve_rejections",
            "Requests and connections turned away before any work, by reason",
            rejections.clone(),
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            registry.register(name, help, h.clone());
            h
        };
        let queue_seconds = histogram(
            &mut registry,
            "sdserve_queue_seconds",
            "Time admitted requests waited for the worker",
            LATENCY_BUCKETS,
        );
        let generation_seconds = histogram(
            &mut registry,
            "sdserve_generation_seconds",
            "Time the worker spent generating",
            LATENCY_BUCKETS,
        );
        let request_seconds = histogram(
            &mut registry,
            "sdserve_request_seconds",
            "Total time of POST /generate requests",
            LATENCY_BUCKETS,
        );
        let step_seconds = histogram(
            &mut registry,
            "sdserve_step_seconds",
            "Generation seconds per denoising step",
            STEP_BUCKETS,
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let cache_hits = counter(&mut registry, "sdserve_cache_hits", "Response cache hits");
        let cache_misses = counter(
            &mut registry,
            "sdserve_cache_misses",
            "Response cache misses (seeded requests only)",
        );
        let cancelled = counter(
            &mut registry,
            "sdserve_cancelled",
            "Runs stopped early (timeout, client gone, shutdown, cancel)",
        );
        let previews = counter(
            &mut registry,
            "sdserve_previews",
            "Previews made (PREVIEW): only for jobs someone can see them of (an event stream, a poller)",
        );
        let jobs_evicted = counter(
            &mut registry,
            "sdserve_jobs_evicted",
            "Finished job records dropped before JOB_TTL_SECONDS because finished jobs held more than JOB_RESULTS_MB",
        );
        Self {
            registry,
            requests,
            rejections,
            queue_seconds,
            generation_seconds,
            request_seconds,
            step_seconds,
            cache_hits,
            cache_misses,
            cancelled,
            previews,
            jobs_evicted,
            device_memory: Mutex::new(None),
        }
    }
}

/// A gauge holding one reading taken at scrape time.
fn reading(registry: &mut Registry, name: &str, help: &str, v: u64) {
    let g = Gauge::<u64, AtomicU64>::default();
    g.set(v);
    registry.register(name, help, g);
}

impl Metrics {
    pub fn count_request(&self, route: &str, status: u16, error_code: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
                error_code: error_code.to_string(),
            })
            .inc();
    }

    /// One request or connection turned away: `unauthorized`, `rate_limited`, `body_timeout`,
    /// `connection_limit`, `connection_limit_per_client`, `header_timeout`, `header_too_large`, `overloaded`, `payload_too_large`.
    pub fn count_rejection(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels { reason })
            .inc();
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

    /// The whole exposition: the server's metrics, then the gauges read now.
    pub fn render(&self, g: &Gauges) -> String {
        let mut now = Registry::default();
        let count = |n: usize| n as u64;
        reading(
            &mut now,
            "sdserve_queue_depth",
            "Admitted requests waiting for the worker",
            count(g.waiting),
        );
        reading(
            &mut now,
            "sdserve_running",
            "Requests being generated now",
            count(g.running),
        );
        reading(
            &mut now,
            "sdserve_capacity",
            "MAX_CONCURRENT_REQUESTS",
            count(g.capacity),
        );
        reading(
            &mut now,
            "sdserve_model_ready",
            "1 when the model is loaded",
            u64::from(g.model_ready),
        );
        if let Some(d) = self.device_memory() {
            reading(
                &mut now,
                "sdserve_gpu_request_peak_bytes",
                "Device memory in use (driver) at its highest during the last request",
                d.last.peak_used_bytes,
            );
            reading(
                &mut now,
                "sdserve_gpu_request_end_bytes",
                "Device memory in use (driver) after the last request returned its cache",
                d.last.end_used_bytes,
            );
            reading(
                &mut now,
                "sdserve_gpu_peak_bytes",
                "Highest device memory in use (driver) during any request since start",
                d.max_peak_used_bytes,
            );
            if let Some(p) = d.last.pool_peak_bytes {
                reading(
                    &mut now,
                    "sdserve_gpu_request_allocated_peak_bytes",
                    "High-water mark of sdserve's own device allocations in the last request",
                    p,
                );
            }
        }
        if let Some((entries, bytes)) = g.cache {
            reading(
                &mut now,
                "sdserve_cache_entries",
                "Responses in the cache",
                count(entries),
            );
            reading(
                &mut now,
                "sdserve_cache_bytes",
                "Bytes held by the cache",
                count(bytes),
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &now);
        out
    }
}

#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/integration/common/exposition.rs"]
mod exposition;

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            running: 1,
            waiting: 2,
            capacity: 3,
            model_ready: true,
            cache: Some((1, 10)),
        }
    }

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
        m.cache_hits.inc();
        let text = m.render(&gauges());
        let e = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let requests = |route, status, code| {
            e.value(
                "sdserve_requests_total",
                &[("route", route), ("status", status), ("error_code", code)],
            )
        };
        assert_eq!(requests("/generate", "200", ""), Some(2.0));
        assert_eq!(requests("/x\"", "404", "not_found"), Some(1.0));
        assert_eq!(e.families["sdserve_requests_total"].kind, "counter");
        let rejections = |reason| e.value("sdserve_rejections_total", &[("reason", reason)]);
        assert_eq!(rejections("unauthorized"), Some(2.0));
        assert_eq!(rejections("rate_limited"), Some(1.0));
        assert_eq!(e.families["sdserve_queue_seconds"].kind, "histogram");
        let bucket = |le| e.value("sdserve_queue_seconds_bucket", &[("le", le)]);
        assert_eq!(bucket("0.05"), Some(0.0));
        assert_eq!(bucket("0.1"), Some(1.0));
        assert_eq!(bucket("5"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(2.0));
        assert_eq!(e.value("sdserve_queue_seconds_count", &[]), Some(2.0));
        let sum = e.value("sdserve_queue_seconds_sum", &[]).unwrap();
        assert!((sum - 3.07).abs() < 1e-9, "{sum}");
        assert_eq!(e.value("sdserve_step_seconds_count", &[]), Some(0.0));
        assert_eq!(e.value("sdserve_cache_hits_total", &[]), Some(1.0));
        assert_eq!(e.value("sdserve_cache_misses_total", &[]), Some(0.0));
        assert_eq!(e.value("sdserve_queue_depth", &[]), Some(2.0));
        assert_eq!(e.value("sdserve_running", &[]), Some(1.0));
        assert_eq!(e.value("sdserve_capacity", &[]), Some(3.0));
        assert_eq!(e.value("sdserve_model_ready", &[]), Some(1.0));
        assert_eq!(e.value("sdserve_cache_bytes", &[]), Some(10.0));
        assert_eq!(e.families["sdserve_cache_bytes"].kind, "gauge");
        // No GPU request yet: no device memory gauges.
        assert!(!text.contains("sdserve_gpu_"));
        // Every family says what it is.
        for (name, f) in &e.families {
            assert!(f.help.is_some() && f.kind != "untyped", "{name}: {f:?}");
        }
    }

    #[test]
    fn scrape_time_gauges_follow_the_engine() {
        let m = Metrics::default();
        let mut g = gauges();
        g.cache = None;
        g.model_ready = false;
        let e = exposition::parse(&m.render(&g)).unwrap();
        assert_eq!(e.value("sdserve_model_ready", &[]), Some(0.0));
        assert!(!e.families.contains_key("sdserve_cache_entries"));
        g.waiting = 7;
        let e = exposition::parse(&m.render(&g)).unwrap();
        assert_eq!(e.value("sdserve_queue_depth", &[]), Some(7.0));
    }

    #[test]
    fn device_memory_gauges_keep_the_last_request_and_the_highest_peak() {
        use sdserve_pipeline::memory::MemoryUsage;
        let m = Metrics::default();
        let usage = |peak, pool| MemoryUsage {
            start_used_bytes: 100,
            peak_used_bytes: peak,
            pool_peak_bytes: pool,
            end_used_bytes: 120,
        };
        m.record_device_memory(&usage(5000, Some(4000)));
        m.record_device_memory(&usage(3000, None));
        let text = m.render(&gauges());
        let e = exposition::parse(&text).unwrap();
        assert_eq!(e.value("sdserve_gpu_request_peak_bytes", &[]), Some(3000.0));
        assert_eq!(e.value("sdserve_gpu_peak_bytes", &[]), Some(5000.0));
        assert_eq!(e.value("sdserve_gpu_request_end_bytes", &[]), Some(120.0));
        // The last request's pool reading was absent: no stale value from the one before.
        assert!(
            !text.contains("sdserve_gpu_request_allocated_peak_bytes"),
            "{text}"
        );
        assert_eq!(m.device_memory().unwrap().max_peak_used_bytes, 5000);
    }
}
