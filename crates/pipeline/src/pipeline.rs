//! One text-to-image call, staged as diffusers' `StableDiffusionPipeline.__call__`.

use std::ops::ControlFlow;

use crate::schedulers::SchedulerKind;

/// What one request asks of the pipeline (already validated by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub guidance_scale: f64,
    /// `None`: the model's own scheduler config.
    pub scheduler: Option<SchedulerKind>,
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reported to the per-step hook after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
}

/// The per-step hook: `ControlFlow::Break(())` cancels the run before the next step.
pub type StepHook<'a> = &'a mut dyn FnMut(StepProgress) -> ControlFlow<()>;
