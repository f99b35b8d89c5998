//! The CUDA side of [`super::StepGraph`]: one UNet step captured as a CUDA graph and replayed.
//!
//! First call of a shape: a plain run with candle's host-to-device cache on (so that every
//! small upload the step makes, e.g. dims and strides of strided ops, is recorded), and device
//! copies of the inputs and the output kept as the graph's fixed buffers. Second call: the
//! inputs copied into those buffers, the step captured on candle's stream (nothing runs while
//! capturing; every allocation and free inside becomes a node of the graph, the result is copied
//! into the fixed output buffer), then launched. Later calls: copy in, launch, copy out.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Result, Tensor};

pub(super) struct Graphed {
    key: Key,
    inputs: Vec<Tensor>,
    output: Tensor,
    graph: Option<CudaGraph>,
    device: sys::CUdevice,
}

impl Graphed {
    pub(super) fn captured(&self) -> bool {
        self.graph.is_some()
    }
}

impl Drop for Graphed {
    fn drop(&mut self) {
        // The graph's memory (its pool, apart from ours) goes back to the driver with it.
        self.graph.take();
        // SAFETY: a plain driver call on a valid device handle; no graph of ours is alive here
        // (others' graphs keep their memory: only unused memory is trimmed).
        unsafe { sys::cuDeviceGraphMemTrim(self.device) };
    }
}

/// What a capture holds fixed: the inputs' shapes and dtypes, and the convolutions' padding
/// mode (circular padding adds wrap copies and changes every padded convolution's shape), so a
/// tiling step never replays a plain capture or the reverse.
type Key = (Vec<(Vec<usize>, DType)>, bool);

fn key(inputs: &[&Tensor]) -> Key {
    let shapes = inputs
        .iter()
        .map(|t| (t.dims().to_vec(), t.dtype()))
        .collect();
    (shapes, crate::kernels::conv::circular_padding_on())
}

/// What [`run`] did, for the caller's fallback and log line.
pub(super) enum Outcome {
    Done(Tensor),
    /// Capture or launch failed: the caller runs the step plainly from now on.
    Failed(candle_core::Error),
}

/// One step through the graph for `inputs`' shapes (see the module doc). `f` is the step.
pub(super) fn run<E>(
    state: &mut Option<Graphed>,
    device: &Device,
    inputs: &[&Tensor],
    f: &mut dyn FnMut(&[Tensor]) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Outcome, E>
where
    E: From<candle_core::Error> + std::fmt::Display,
{
    let cuda = device.as_cuda_device()?;
    let k = key(inputs);
    if state.as_ref().is_none_or(|g| g.key != k) {
        // A new shape: a plain run that records the host uploads, and the fixed buffers.
        *state = None;
        let out = {
            let _cache = cuda.enable_cuda_graph_htod_cache();
            f(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>())?
        };
        let fixed = inputs
            .iter()
            .map(|t| t.contiguous()?.copy())
            .collect::<Result<Vec<_>>>()?;
        *state = Some(Graphed {
            key: k,
            inputs: fixed,
            output: out.contiguous()?.copy()?,
            graph: None,
            device: cuda.cuda_stream().context().cu_device(),
        });
        return Ok(Outcome::Done(out));
    }
    let g = state.as_mut().expect("checked above");
    for (fixed, t) in g.inputs.iter().zip(inputs) {
        fixed.slice_set(&t.contiguous()?, 0, 0)?;
    }
    if g.graph.is_none() {
        match capture(device, g, f)? {
            Ok(graph) => g.graph = Some(graph),
            Err(e) => return Ok(Outcome::Failed(e)),
        }
    }
    if let Err(e) = g.graph.as_ref().expect("captured").launch().w() {
        return Ok(Outcome::Failed(e));
    }
    Ok(Outcome::Done(g.output.copy()?))
}

/// Captures `f` on the fixed buffers. The outer error is `f`'s own (a real failure of the
/// step); the inner one a capture that did not work (the step runs plainly instead).
fn capture<E>(
    device: &Device,
    g: &Graphed,
    f: &mut dyn FnMut(&[Tensor]) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Result<CudaGraph>, E>
where
    E: From<candle_core::Error> + std::fmt::Display,
{
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    // Everything issued before must be done: the capture starts from an idle stream. Then
    // our pool hands back what the plain step left cached: the graph's own pool holds the
    // step's intermediates from now on, so the device does not hold them twice.
    stream.synchronize().w()?;
    crate::memory::release_cached_memory(device);
    let _cache = cuda.enable_cuda_graph_htod_cache();
    if let Err(e) = stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .w()
    {
        return Ok(Err(e));
    }
    // The result goes into the fixed output buffer and is freed inside the graph, so that
    // every allocation the graph makes is also freed by it (a graph can then be relaunched).
    let body = (|| -> std::result::Result<Result<()>, E> {
        let out = f(&g.inputs)?;
        Ok(out.contiguous().and_then(|o| g.output.slice_set(&o, 0, 0)))
    })();
    let end = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    match (body, end) {
        (Ok(Ok(())), Ok(Some(graph))) => Ok(graph.upload().w().map(|()| graph)),
        (Ok(Ok(())), Ok(None)) => Ok(Err(candle_core::Error::Msg("empty graph".into()))),
        (Ok(Err(e)), _) | (Ok(Ok(())), Err(e)) => Ok(Err(e)),
        // The step failed while capturing: most likely because capturing forbids what it did
        // (a device-to-host read, an uncached upload); say so and run it plainly.
        (Err(e), _) => Ok(Err(candle_core::Error::Msg(format!(
            "the step failed while being captured: {e}"
        )))),
    }
}
