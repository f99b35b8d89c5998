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
pub mod winograd;
pub mod winograd4;

pub use conv::{conv2d, Conv2d};
