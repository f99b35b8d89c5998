//! Out-of-memory handling: recognising a device allocation failure, and a circuit breaker that
//! turns repeated failures into a leaner memory plan or, when none is left, a pause.
//!
//! A failed request already freed what it held (its tensors are dropped with the error), so
//! one OOM only fails that request. `threshold` OOMs within `window` mean the plan is too
//! optimistic for this device (other processes, fragmentation): the breaker asks for a leaner
//! plan; with the leanest plan already in use it opens and refuses new work for `cooldown`,
//! then lets one probe request through (half-open) once the driver reports enough free memory.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::PipelineError;

/// True when a candle error is a device allocation failure: the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` (cudarc prints `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of
/// memory")`), cuBLAS/cuDNN `*_STATUS_ALLOC_FAILED`, or a plain "out of memory" message.
pub fn is_out_of_memory_text(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("out of memory")
        || t.contains("out_of_memory")
        || t.contains("status_alloc_failed")
        || t.contains("cudaerrormemoryallocation")
}

/// Turns a device allocation failure hidden in a [`PipelineError::Candle`] (or a weights error
/// raised while moving a component to the device) into [`PipelineError::OutOfMemory`]; every
/// other error is returned unchanged.
pub fn classify_oom(e: PipelineError) -> PipelineError {
    match e {
        PipelineError::Candle(c) if is_out_of_memory_text(&c.to_string()) => {
            PipelineError::OutOfMemory(c.to_string())
        }
        PipelineError::Weights { message, .. } if is_out_of_memory_text(&message) => {
            PipelineError::OutOfMemory(message)
        }
        other => other,
    }
}

/// A source of time; tests use a fake one.
pub trait Clock: Send {
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// OOMs within `window` that trip the breaker.
    pub threshold: usize,
    pub window: Duration,
    /// How long the breaker stays open before letting a probe through.
    pub cooldown: Duration,
    /// Free device memory (bytes) the driver must report before a probe is let through;
    /// 0 disables the check.
    pub min_free_bytes: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(15),
            min_free_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Refusing new work until this instant (and until memory is back).
    Open {
        until: Instant,
    },
    /// One probe request is running; its outcome closes or reopens the breaker.
    HalfOpen,
}

/// Whether a new request may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Answer 503 `out_of_memory` with this `Retry-After`.
    Refuse {
        retry_after: Duration,
    },
}

/// What the caller must do after an OOM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomAction {
    /// Under the threshold: only this request failed.
    None,
    /// Switch to the next leaner plan (the caller has one) and carry on.
    UseLeanerPlan,
    /// No leaner plan: the breaker is open until the given instant.
    Opened { until: Instant },
}

pub struct OomBreaker<C: Clock = SystemClock> {
    config: BreakerConfig,
    clock: C,
    failures: VecDeque<Instant>,
    state: BreakerState,
    /// Consecutive openings without a success in between; doubles the cooldown (capped at 8x).
    reopenings: u32,
}

impl OomBreaker<SystemClock> {
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_clock(config, SystemClock)
    }
}

impl<C: Clock> OomBreaker<C> {
    pub fn with_clock(config: BreakerConfig, clock: C) -> Self {
        Self {
            config,
            clock,
            failures: VecDeque::new(),
            state: BreakerState::Closed,
            reopenings: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Asks whether a request may start. `free_bytes` is the driver's free device memory, when
    /// known. After the cooldown, one probe is admitted once memory is back (half-open).
    pub fn admit(&mut self, free_bytes: Option<u64>) -> Admission {
        let now = self.clock.now();
        match self.state {
            BreakerState::Closed => Admission::Allow,
            BreakerState::HalfOpen => Admission::Refuse {
                retry_after: Duration::from_secs(1),
            },
            BreakerState::Open { until } if now < until => Admission::Refuse {
                retry_after: (until - now).max(Duration::from_secs(1)),
            },
            BreakerState::Open { .. } => {
                let memory_back = self.config.min_free_bytes == 0
                    || free_bytes.is_none_or(|f| f >= self.config.min_free_bytes);
                if memory_back {
                    self.state = BreakerState::HalfOpen;
                    Admission::Allow
                } else {
                    Admission::Refuse {
                        retry_after: Duration::from_secs(1),
                    }
                }
            }
        }
    }

    /// A request finished without running out of memory.
    pub fn record_success(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.state = BreakerState::Closed;
        }
        self.reopenings = 0;
    }

    /// A request ran out of memory. `leaner_plan_available`: the caller can still switch to a
    /// leaner plan.
    pub fn record_oom(&mut self, leaner_plan_available: bool) -> OomAction {
        let now = self.clock.now();
        if self.state == BreakerState::HalfOpen {
            // The probe failed: memory is not back.
            return self.open(now);
        }
        self.failures.push_back(now);
        while let Some(&t) = self.failures.front() {
            if now.duration_since(t) > self.config.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() < self.config.threshold {
            return OomAction::None;
        }
        self.failures.clear();
        if leaner_plan_available {
            OomAction::UseLeanerPlan
        } else {
            self.open(now)
        }
    }

    fn open(&mut self, now: Instant) -> OomAction {
        let factor = 1u32 << self.reopenings.min(3);
        self.reopenings += 1;
        let until = now + self.config.cooldown * factor;
        self.state = BreakerState::Open { until };
        OomAction::Opened { until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct FakeClock(Rc<Cell<Instant>>);
    // SAFETY-free: the fake is only used on the test's thread.
    unsafe impl Send for FakeClock {}
    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.0.get()
        }
    }
    impl FakeClock {
        fn advance(&self, secs: u64) {
            self.0.set(self.0.get() + Duration::from_secs(secs));
        }
    }

    fn breaker(min_free: u64) -> (OomBreaker<FakeClock>, FakeClock) {
        let clock = FakeClock(Rc::new(Cell::new(Instant::now())));
        let cfg = BreakerConfig {
            threshold: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(10),
            min_free_bytes: min_free,
        };
        (OomBreaker::with_clock(cfg, clock.clone()), clock)
    }

    #[test]
    fn recognises_driver_and_library_oom_texts() {
        for t in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cublas error: CUBLAS_STATUS_ALLOC_FAILED",
            "CUDNN_STATUS_ALLOC_FAILED",
            "Cuda error out of memory",
        ] {
            assert!(is_out_of_memory_text(t), "{t}");
        }
        assert!(!is_out_of_memory_text(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS)"
        ));
        let e = PipelineError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert!(matches!(classify_oom(e), PipelineError::OutOfMemory(_)));
        let e = PipelineError::InvalidRequest("out of memory".into());
        assert!(matches!(classify_oom(e), PipelineError::InvalidRequest(_)));
    }

    #[test]
    fn failures_outside_the_window_do_not_trip() {
        let (mut b, clock) = breaker(0);
        assert_eq!(b.record_oom(false), OomAction::None);
        clock.advance(40);
        assert_eq!(b.record_oom(false), OomAction::None);
        clock.advance(40); // the first one is now 80 s old
        assert_eq!(b.record_oom(false), OomAction::None);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(None), Admission::Allow);
    }

    #[test]
    fn trips_to_a_leaner_plan_first() {
        let (mut b, clock) = breaker(0);
        b.record_oom(true);
        clock.advance(1);
        b.record_oom(true);
        assert_eq!(b.record_oom(true), OomAction::UseLeanerPlan);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a leaner plan keeps serving"
        );
        // The count starts again after a switch.
        assert_eq!(b.record_oom(true), OomAction::None);
    }

    #[test]
    fn opens_when_no_leaner_plan_and_probes_after_cooldown() {
        let (mut b, clock) = breaker(0);
        b.record_oom(false);
        b.record_oom(false);
        let until = match b.record_oom(false) {
            OomAction::Opened { until } => until,
            other => panic!("{other:?}"),
        };
        assert_eq!(until, clock.now() + Duration::from_secs(10));
        clock.advance(3);
        assert_eq!(
            b.admit(None),
            Admission::Refuse {
                retry_after: Duration::from_secs(7)
            }
        );
        clock.advance(7);
        assert_eq!(b.admit(None), Admission::Allow, "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(
            matches!(b.admit(None), Admission::Refuse { .. }),
            "one probe at a time"
        );
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(None), Admission::Allow);
    }

    #[test]
    fn failed_probe_reopens_with_a_longer_cooldown() {
        let (mut b, clock) = breaker(0);
        for _ in 0..3 {
            b.record_oom(false);
        }
        clock.advance(10);
        assert_eq!(b.admit(None), Admission::Allow);
        match b.record_oom(false) {
            OomAction::Opened { until } => {
                assert_eq!(until, clock.now() + Duration::from_secs(20))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waits_for_free_memory_after_cooldown() {
        let (mut b, clock) = breaker(1 << 30);
        for _ in 0..3 {
            b.record_oom(false);
        }
        clock.advance(11);
        assert!(matches!(b.admit(Some(100 << 20)), Admission::Refuse { .. }));
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: clock.now() - Duration::from_secs(1)
            }
        );
        assert_eq!(b.admit(Some(2 << 30)), Admission::Allow);
        // Unknown free memory (no driver answer) does not keep it closed forever.
        let (mut b, clock) = breaker(1 << 30);
        for _ in 0..3 {
            b.record_oom(false);
        }
        clock.advance(11);
        assert_eq!(b.admit(None), Admission::Allow);
    }
}
