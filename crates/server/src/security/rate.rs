//! `RATE_LIMIT_PER_MINUTE` per caller on governor's GCRA: a caller is its key id when keys are
//! on and it presented a valid one, else its client address.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use super::keys::KeyId;

/// Who is counted: one bucket per key, or per address for callers without a (valid) key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    Key(KeyId),
    Addr(IpAddr),
}

pub struct RateLimits {
    limiter: RateLimiter<Caller, HashMapStateStore<Caller>, DefaultClock>,
    clock: DefaultClock,
}

impl RateLimits {
    /// `per_minute` requests a minute, all of which may come at once (burst = the minute's
    /// allowance), refilled evenly. `None` when `per_minute` is 0 (no limit).
    pub fn new(per_minute: u32) -> Option<Self> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Self {
            limiter: RateLimiter::hashmap(Quota::per_minute(n)),
            clock: DefaultClock::default(),
        })
    }

    /// `Err(retry_after_secs)` (at least 1) when the caller has spent its allowance.
    pub fn check(&self, caller: &Caller) -> Result<(), u64> {
        self.limiter.check_key(caller).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            (wait.as_secs_f64().ceil() as u64).max(1)
        })
    }

    /// Forgets callers whose buckets are full again, so a scan from many addresses does not
    /// grow memory for good; the server calls this every minute.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// How often the server calls [`RateLimits::forget_idle`].
pub const FORGET_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_caller_allowance_then_retry_after() {
        let rl = RateLimits::new(3).unwrap();
        let a = Caller::Addr("10.0.0.1".parse().unwrap());
        let b = Caller::Addr("10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(rl.check(&a).is_ok());
        }
        let retry = rl.check(&a).unwrap_err();
        // One request comes back every 20 s.
        assert!((1..=20).contains(&retry), "{retry}");
        assert!(rl.check(&b).is_ok(), "another caller has its own allowance");
        assert_eq!(rl.tracked(), 2);
        assert!(RateLimits::new(0).is_none());
    }
}
