//! Hand-written CPU kernels for the hot spots of Stable Diffusion on candle tensors, each with its
//! own tests against a plain reference. Tensor front ends return `None` (or fall back to candle)
//! for other dtypes and devices, so f16 and accelerator paths are unchanged. `cuda` holds the GPU
//! counterparts (own kernels compiled at run time; no CUDA in the default build).

pub mod act;
pub mod attention;
pub mod conv;
pub mod cuda;
pub mod dense;
pub mod linear;
#[cfg(test)]
mod linear_timing;
pub mod math;
pub mod norm;
pub mod simd;
pub mod upsample;
pub mod winograd;
pub mod winograd4;

pub use conv::{conv2d, conv_transpose_unpatch, depthwise_conv2d, Conv2d};

/// `group_norm(x)` (then SiLU when `silu`) over `[B, C, ...]` through our own kernels: the CUDA
/// one on a GPU, else the CPU one for f32; `None` when neither applies (the caller composes it
/// from candle's ops).
pub fn group_norm(
    x: &candle_core::Tensor,
    groups: usize,
    weight: &candle_core::Tensor,
    bias: &candle_core::Tensor,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    match cuda::group_norm(x, groups, weight, bias, eps, silu)? {
        Some(y) => Ok(Some(y)),
        None => norm::group_norm(x, groups, weight, bias, eps, silu),
    }
}
