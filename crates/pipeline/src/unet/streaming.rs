//! Sequential offload of the UNet: its weights stay in host memory, already in the compute dtype,
//! and each part (stem, one down block, the mid block, one up block, head) is built on the device
//! just before it runs and dropped right after, so the device holds about one part's weights at a
//! time.
//!
//! Candle modules own their tensors, so a part "moves to the device" by being built there from
//! the host tensors: [`HostWeights::var_builder`] hands out a `VarBuilder` whose `get` copies the
//! host tensor to the device (candle's `HashMap` backend: `to_device`, then a no-op `to_dtype`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// What streaming did so far (counts since the model was built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Parts one forward pass builds on the device, in order: the stem (conv_in, time
    /// embedding), each down block, the mid block (when the model has one), each up block, and
    /// the head (conv_norm_out, conv_out).
    pub parts_per_forward: usize,
    /// Forward passes run.
    pub forwards: usize,
    /// Parts built on the device (each dropped after it ran).
    pub part_builds: usize,
    /// The most parts that were on the device at the same time.
    pub peak_parts_on_device: usize,
}

#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    forwards: AtomicUsize,
    part_builds: AtomicUsize,
    parts_on_device: AtomicUsize,
    peak_parts_on_device: AtomicUsize,
}

impl StreamCounters {
    pub(crate) fn forward_started(&self) {
        self.forwards.fetch_add(1, Ordering::Relaxed);
    }

    fn part_built(&self) {
        self.part_builds.fetch_add(1, Ordering::Relaxed);
        let now = self.parts_on_device.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_parts_on_device.fetch_max(now, Ordering::Relaxed);
    }

    fn part_dropped(&self) {
        self.parts_on_device.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self, parts_per_forward: usize) -> StreamStats {
        StreamStats {
            parts_per_forward,
            forwards: self.forwards.load(Ordering::Relaxed),
            part_builds: self.part_builds.load(Ordering::Relaxed),
            peak_parts_on_device: self.peak_parts_on_device.load(Ordering::Relaxed),
        }
    }
}

/// One part of the UNet ready to run: borrowed from the resident model, or built on the device
/// for this forward pass (freed when this is dropped).
pub(crate) enum PartOnDevice<'a, T> {
    Resident(&'a T),
    Streamed {
        part: T,
        counters: &'a StreamCounters,
    },
}

impl<'a, T> PartOnDevice<'a, T> {
    pub(crate) fn streamed(part: T, counters: &'a StreamCounters) -> Self {
        counters.part_built();
        Self::Streamed { part, counters }
    }
}

impl<T> std::ops::Deref for PartOnDevice<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Self::Resident(t) => t,
            Self::Streamed { part, .. } => part,
        }
    }
}

impl<T> Drop for PartOnDevice<'_, T> {
    fn drop(&mut self) {
        if let Self::Streamed { counters, .. } = self {
            counters.part_dropped();
        }
    }
}

/// The UNet's weights in host memory, keyed by their diffusers names.
#[derive(Clone)]
pub(crate) struct HostWeights {
    tensors: Arc<HashMap<String, Tensor>>,
    pub(crate) counters: Arc<StreamCounters>,
    /// The weights a LoRA may change: module path and the dims its built module reports.
    lora_shapes: Arc<Vec<(String, Vec<usize>)>>,
}

impl std::fmt::Debug for HostWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWeights")
            .field("tensors", &self.tensors.len())
            .field("counters", &self.counters)
            .finish()
    }
}

impl HostWeights {
    /// A `VarBuilder` that copies the host tensors it is asked for to `device`.
    pub(crate) fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        host_var_builder(self.tensors.clone(), dtype, device, false)
    }

    /// The host tensors, shared (what a later build of the whole UNet can take instead of the
    /// files).
    pub(crate) fn tensors(&self) -> crate::memory::offload::HostTensors {
        self.tensors.clone()
    }

    /// The host tensors a LoRA may change (merged in place: every part built afterwards reads
    /// the merged values).
    pub(crate) fn lora_targets(&self) -> Vec<(String, crate::lora::Target<'_>)> {
        self.lora_shapes
            .iter()
            .filter_map(|(path, dims)| {
                // A bias is listed by its own name (`<module>.bias`), a weight by its module's.
                let target = match path.strip_suffix(crate::lora::BIAS) {
                    Some(_) => crate::lora::Target::Bias(self.tensors.get(path)?),
                    None => crate::lora::Target::Host(
                        self.tensors.get(&format!("{path}.weight"))?,
                        dims,
                    ),
                };
                Some((path.clone(), target))
            })
            .collect()
    }

    /// Host bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Wraps `source` so that every tensor read through the returned `VarBuilder` is also kept;
/// [`Recording::finish`] turns what was read into [`HostWeights`]. Building the model once
/// through it checks names and shapes exactly as a resident build does, and reads each weight
/// (converted to the dtype) once.
pub(crate) fn recording<'a>(source: VarBuilder<'a>) -> (VarBuilder<'a>, Recording) {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let dtype = source.dtype();
    let device = source.device().clone();
    let backend = Recorder {
        source,
        seen: seen.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device),
        Recording(seen),
    )
}

pub(crate) struct Recording(Arc<Mutex<HashMap<String, Tensor>>>);

impl Recording {
    /// The tensors read so far. Call after the recording `VarBuilder` and everything built from
    /// it are dropped (they share the tensors, so nothing is copied either way). `lora_shapes`:
    /// the LoRA targets the build listed.
    pub(crate) fn finish(self, lora_shapes: Vec<(String, Vec<usize>)>) -> HostWeights {
        let seen = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        HostWeights {
            tensors: Arc::new(seen),
            counters: Arc::default(),
            lora_shapes: Arc::new(lora_shapes),
        }
    }
}

struct Recorder<'a> {
    source: VarBuilder<'a>,
    seen: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: &Tensor) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), t.clone());
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // `source` is rooted, so `name` (the full key) is its path.
        let t = self.source.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, &t);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.source.get_unchecked_dtype(name, dtype)?;
        self.keep(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Parts are built again from the recorded tensors under their file names, on a device
        // that may keep linears untransposed: no transposed reads here.
        !name.ends_with(crate::weights::TRANSPOSED) && self.source.contains_tensor(name)
    }
}

/// A `VarBuilder` over tensors in host memory: each tensor asked for is put on `device` (on
/// the CPU: the same storage, shared) and converted to `dtype` (a no-op when it already is).
/// `copy`: on the CPU, a copy of each instead of the shared storage.
pub(crate) fn host_var_builder(
    tensors: Arc<HashMap<String, Tensor>>,
    dtype: DType,
    device: &Device,
    copy: bool,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(HostTensors { tensors, copy }),
        dtype,
        device.clone(),
    )
}

/// Host tensors shared by every part build (no per-build copy of the map).
struct HostTensors {
    tensors: Arc<HashMap<String, Tensor>>,
    copy: bool,
}

impl HostTensors {
    fn own(&self, t: Tensor) -> candle_core::Result<Tensor> {
        if self.copy && t.device().is_cpu() {
            t.copy()
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for HostTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // candle's map backend: shape check, `to_device(dev)`, `to_dtype(dtype)` (same dtype).
        let t =
            <HashMap<String, Tensor> as SimpleBackend>::get(&self.tensors, s, name, h, dtype, dev)?;
        self.own(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = <HashMap<String, Tensor> as SimpleBackend>::get_unchecked(
            &self.tensors,
            name,
            dtype,
            dev,
        )?;
        self.own(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_keeps_what_was_read_and_host_builder_copies_it() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut ts = HashMap::new();
        ts.insert("a.w".to_string(), Tensor::ones((2, 3), DType::F32, &dev)?);
        ts.insert("b.w".to_string(), Tensor::zeros(4, DType::F32, &dev)?);
        let (vb, rec) = recording(VarBuilder::from_tensors(ts, DType::F16, &dev));
        // Read once, converted to the builder's dtype; an unread tensor is not kept.
        let a = vb.pp("a").get((2, 3), "w")?;
        assert_eq!(a.dtype(), DType::F16);
        assert!(vb.pp("a").get((3, 2), "w").is_err(), "shape still checked");
        drop(vb);
        let host = rec.finish(Vec::new());
        assert_eq!(host.bytes(), 6 * 2);
        let vb = host.var_builder(DType::F16, &dev);
        assert_eq!(vb.pp("a").get((2, 3), "w")?.dtype(), DType::F16);
        assert!(vb.get(4, "b.w").is_err(), "never read, so not held");
        Ok(())
    }

    #[test]
    fn part_guard_counts_parts_on_device() {
        let c = StreamCounters::default();
        {
            let a = PartOnDevice::streamed(1u8, &c);
            let b = PartOnDevice::streamed(2u8, &c);
            assert_eq!(*a + *b, 3);
        }
        let _c = PartOnDevice::streamed(3u8, &c);
        let resident = 4u8;
        let _r = PartOnDevice::Resident(&resident);
        let s = c.stats(5);
        assert_eq!((s.part_builds, s.peak_parts_on_device), (3, 2));
        assert_eq!(c.parts_on_device.load(Ordering::Relaxed), 1);
    }
}
