//! Device time per kind of op, from CUDA events (`SDSERVE_CUDA_PROFILE=1`; see [`super::profiled`]).
//!
//! Each profiled call records a timing event before and after its work on the device's stream;
//! [`take`] waits for the stream and sums the elapsed time between each pair per kind. Events
//! measure the device's clock, so with the device as the bottleneck (queue full) a pair spans
//! that op's kernels alone; time between pairs (ops not wrapped) is the step's "other".

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Device, Result};

thread_local! {
    static PAIRS: RefCell<Vec<(&'static str, CudaEvent, CudaEvent)>> = const { RefCell::new(Vec::new()) };
    /// Nesting depth: only the outermost profiled call records (no double counting).
    static DEPTH: RefCell<usize> = const { RefCell::new(0) };
}

fn record(device: &Device) -> Result<Option<CudaEvent>> {
    let Ok(cuda) = device.as_cuda_device() else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let e = stream
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .w()?;
    Ok(Some(e))
}

pub fn profiled<T>(
    device: &Device,
    what: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let outer = DEPTH.with(|d| {
        let mut d = d.borrow_mut();
        *d += 1;
        *d == 1
    });
    let run = || -> Result<T> {
        if !outer {
            return f();
        }
        let Some(start) = record(device)? else {
            return f();
        };
        let out = f()?;
        if let Some(end) = record(device)? {
            PAIRS.with(|p| p.borrow_mut().push((what, start, end)));
        }
        Ok(out)
    };
    let out = run();
    DEPTH.with(|d| *d.borrow_mut() -= 1);
    out
}

/// Milliseconds and call counts per kind since the last call (this thread's ops).
pub fn take(device: &Device) -> Result<BTreeMap<&'static str, (f64, usize)>> {
    let pairs = PAIRS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let mut out = BTreeMap::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    device.synchronize()?;
    for (what, start, end) in pairs {
        let ms = start.elapsed_ms(&end).w()? as f64;
        let e = out.entry(what).or_insert((0.0, 0));
        e.0 += ms;
        e.1 += 1;
    }
    Ok(out)
}
