//! Device memory: the planner that picks memory levers for a budget (`VRAM_LIMIT_MB`), the
//! levers themselves (tiled VAE decode, model offload, the f32 retry of a NaN decode), the
//! out-of-memory circuit breaker, and per-request device memory accounting.
//!
//! Everything here is a no-op or `None` on the CPU; the logic (plan selection, which component
//! lives where, blending, the breaker) is plain Rust and unit-tested without a GPU.

pub mod breaker;
pub mod estimate;
pub mod footprint;
pub mod offload;
pub mod plan;
pub mod precision;
pub mod request;
pub mod tiling;

pub use breaker::{classify_oom, is_out_of_memory_text, OomBreaker};
pub use footprint::Footprint;
pub use plan::{plan, LeverOverrides, MemoryPlan, Offload, PlanRequest, VaeTiling};

use candle_core::Device;

/// Device memory seen by one request, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MemoryUsage {
    /// Device memory in use (driver: total - free) when the request started.
    pub start_used_bytes: u64,
    /// Highest device memory in use seen at the stage boundaries and after every step
    /// (driver: total - free; includes other processes and the CUDA context).
    pub peak_used_bytes: u64,
    /// Highest memory allocated from the device's stream-ordered pool during the request (our
    /// tensors, exact high-water mark), when the allocator uses the pool.
    pub pool_peak_bytes: Option<u64>,
    /// Device memory in use after the request, once cached blocks were returned.
    pub end_used_bytes: u64,
}

/// Samples device memory during a request. All methods are cheap no-ops on the CPU.
#[derive(Debug)]
pub struct MemoryTracker {
    device: Device,
    usage: Option<MemoryUsage>,
}

impl MemoryTracker {
    /// Starts accounting on `device`: resets the pool's high-water mark, notes memory in use.
    pub fn start(device: &Device) -> Self {
        let usage = used_bytes(device).map(|used| {
            cuda::reset_pool_peak(device);
            MemoryUsage {
                start_used_bytes: used,
                peak_used_bytes: used,
                pool_peak_bytes: None,
                end_used_bytes: used,
            }
        });
        Self {
            device: device.clone(),
            usage,
        }
    }

    /// Notes the memory in use now (call at stage boundaries and after each step).
    pub fn sample(&mut self) {
        if let Some(u) = &mut self.usage {
            if let Some(used) = used_bytes(&self.device) {
                u.peak_used_bytes = u.peak_used_bytes.max(used);
            }
        }
    }

    /// Ends accounting: reads the pool's high-water mark, returns cached memory to the driver
    /// (memory is returned between requests), notes what is still in use. `None` on the CPU.
    pub fn finish(mut self) -> Option<MemoryUsage> {
        self.sample();
        let device = self.device.clone();
        self.usage.map(|mut u| {
            u.pool_peak_bytes = cuda::pool_peak(&device);
            release_cached_memory(&device);
            u.end_used_bytes = used_bytes(&device).unwrap_or(u.end_used_bytes);
            u
        })
    }
}

/// Device memory in use (total - free) from the driver; `None` on the CPU.
pub fn used_bytes(device: &Device) -> Option<u64> {
    crate::device::gpu_info(device).map(|g| g.memory_used_bytes())
}

/// Free device memory from the driver; `None` on the CPU.
pub fn free_bytes(device: &Device) -> Option<u64> {
    crate::device::gpu_info(device).map(|g| g.memory_free_bytes)
}

/// Waits for the device's work to finish and gives the allocator's cached blocks back to the
/// driver, so that memory is free between requests (and after an out-of-memory failure).
pub fn release_cached_memory(device: &Device) {
    cuda::release(device);
}

/// Lets the device's stream-ordered memory pool keep up to `bytes` of freed memory across
/// synchronisations (the driver's default, 0, hands freed blocks back at every sync, so each
/// step re-maps its activations). No-op on the CPU.
pub fn set_pool_release_threshold(device: &Device, bytes: u64) {
    cuda::set_release_threshold(device, bytes);
}

#[cfg(feature = "cuda-core")]
mod cuda {
    use candle_core::Device;
    use cudarc::driver::{result, sys};

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let stream = device.as_cuda_device().ok()?.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }.ok()
    }

    pub fn reset_pool_peak(device: &Device) {
        if let Some(p) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; resetting takes the value 0.
            let _ = unsafe {
                result::mem_pool::set_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    pub fn pool_peak(device: &Device) -> Option<u64> {
        let p = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        unsafe {
            result::mem_pool::get_attribute(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .ok()?;
        // Zero means the allocator does not use the pool (synchronous cuMemAlloc).
        (v > 0).then_some(v)
    }

    pub fn set_release_threshold(device: &Device, bytes: u64) {
        if let Some(p) = pool(device) {
            let mut v = bytes;
            // SAFETY: RELEASE_THRESHOLD is a cuuint64_t attribute of the default pool.
            let _ = unsafe {
                result::mem_pool::set_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    pub fn release(device: &Device) {
        let Ok(cuda) = device.as_cuda_device() else {
            return;
        };
        let stream = cuda.cuda_stream();
        let _ = stream.synchronize();
        if let Some(p) = pool(device) {
            // SAFETY: the pool is the device's default pool; trimming only releases unused blocks.
            let _ = unsafe { result::mem_pool::trim_to(p, 0) };
        }
    }
}

#[cfg(not(feature = "cuda-core"))]
mod cuda {
    use candle_core::Device;
    pub fn reset_pool_peak(_: &Device) {}
    pub fn pool_peak(_: &Device) -> Option<u64> {
        None
    }
    pub fn release(_: &Device) {}
    pub fn set_release_threshold(_: &Device, _: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_accounting_on_cpu() {
        let mut t = MemoryTracker::start(&Device::Cpu);
        t.sample();
        assert_eq!(t.finish(), None);
        assert_eq!(used_bytes(&Device::Cpu), None);
        assert_eq!(free_bytes(&Device::Cpu), None);
        release_cached_memory(&Device::Cpu);
    }
}
