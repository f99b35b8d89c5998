//! The `denoise` stage: the scheduler's loop over the UNet's guided noise predictions.

use candle_core::Tensor;

use super::control::{unet_forward, ControlState, StepControl};
use super::encode_prompt::{ScheduledConditioning, StepConditioning};
use super::{images_in, Conditioning, NegativeGuidance, StableDiffusion, StepHook, StepProgress};
use crate::controlnet::CondRows;
use crate::kernels::cuda::StepGraph;
use crate::rng::TorchRng;
use crate::schedulers::Scheduler;
use crate::unet::UNet2DConditionModel;
use crate::{PipelineError, Result};

impl StableDiffusion {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn denoise(
        &self,
        start: images_in::Start,
        text_embeddings: &ScheduledConditioning,
        scheduler: &mut dyn Scheduler,
        begin: usize,
        (guidance_scale, negative_guidance, steps_run): (f64, NegativeGuidance, usize),
        rngs: &mut [TorchRng],
        control: Option<&ControlState>,
        on_step: StepHook,
    ) -> Result<Tensor> {
        let images_in::Start {
            mut latents,
            inpaint,
        } = start;
        // Model offload: the UNet comes to the device once for the whole loop and leaves after
        // it. Sequential: it stays in host memory and streams its parts in every forward pass.
        let unet = self.unet_for_run()?;
        // SDSERVE_STEP_TIMES=1: per-step UNet and scheduler times on stderr (profiling).
        let timing = std::env::var_os("SDSERVE_STEP_TIMES").is_some();
        // SDSERVE_CUDA_GRAPH=1: the step as a CUDA graph for this loop (a no-op otherwise).
        let mut graph = StepGraph::new(&self.device);
        // A1111's `total_steps` (what "Skip Early CFG" counts against): the steps the pass runs,
        // times two for second-order samplers; not the evaluations (Heun and DDIM run one fewer).
        let total_steps = steps_run * scheduler.order();
        // The list is read again at every evaluation: DPM adaptive lists its next ones as it
        // decides them, and estimates the rest for the progress.
        let mut index = begin;
        while index < scheduler.timesteps().len() {
            let t = scheduler.timesteps()[index];
            let total = scheduler.planned_evaluations().max(index + 1) - begin;
            let start = std::time::Instant::now();
            // k-diffusion's churn raises the sample before the evaluation.
            if let Some(raised) = scheduler.prepare_sample(&latents, index, rngs)? {
                latents = raised;
            }
            // A1111's timestep samplers blend the input (inpainting): the UNet and ControlNets
            // see it, the step takes the unblended latents.
            let blended = match &inpaint {
                Some(state) => state.blended_input(&latents, scheduler)?,
                None => None,
            };
            let mut model_input =
                scheduler.scale_model_input(blended.as_ref().unwrap_or(&latents), index)?;
            if let Some(state) = &inpaint {
                model_input = state.unet_input(model_input)?;
            }
            if let Some(state) = control {
                model_input = state.unet_input(model_input, self.vae_latent_channels)?;
            }
            // A1111's denoiser counts its calls from 0: one per UNet evaluation.
            let mut conditioning = text_embeddings.at(index - begin)?;
            let mut guidance = guidance_scale * scheduler.guidance_scale_multiplier();
            let sigma = || match scheduler.guidance_sigma(index) {
                Some(sigma) => Ok(sigma),
                None => self.schedules.sigma_at(t),
            };
            let skipped = negative_guidance.skips(index - begin, total_steps, sigma)?;
            if skipped {
                conditioning = conditioning.prompt_only()?;
                guidance = 1.0;
            }
            let wants_uncond = scheduler.takes_uncond_prediction();
            let step_control = match control {
                Some(state) => Some(StepControl {
                    state,
                    step: index - begin,
                    steps: total,
                    sigma: match state.needs_sigma() {
                        true => self.schedules.sigma_at(t.round_ties_even())?,
                        false => 0.0,
                    },
                }),
                None => None,
            };
            let (noise_pred, uncond) = self.predict_noise_with(
                &unet,
                &model_input,
                t,
                &conditioning,
                (guidance, wants_uncond),
                // A skipping evaluation's batch is half the captured one.
                (!skipped).then_some(&mut graph),
                step_control,
            )?;
            let carry = |output: Tensor| match &inpaint {
                Some(state) => {
                    state.blend_prediction(output, &latents, blended.as_ref(), scheduler, index)
                }
                None => Ok(output),
            };
            // Without guidance rows the prompt's prediction stands in (A1111's fake_uncond).
            // Taken on the blended input where there is one; never blended itself.
            let uncond = match (wants_uncond, &blended) {
                (false, _) => None,
                (true, Some(_)) => Some(carry(uncond.unwrap_or_else(|| noise_pred.clone()))?),
                (true, None) => Some(uncond.unwrap_or_else(|| noise_pred.clone())),
            };
            let noise_pred = carry(noise_pred)?;
            if let Some(uncond) = uncond {
                scheduler.set_uncond_prediction(uncond);
            }
            let unet_done = start.elapsed();
            latents = scheduler.step(&noise_pred, index, &latents, rngs)?;
            if let Some(state) = &inpaint {
                latents = state.keep_known_region(latents, scheduler, index)?;
            }
            if timing {
                eprintln!(
                    "step {index} t={t}: unet {:.3} s, scheduler {:.4} s",
                    unet_done.as_secs_f64(),
                    (start.elapsed() - unet_done).as_secs_f64()
                );
            }
            if on_step(StepProgress {
                step: index + 1 - begin,
                total: scheduler.planned_evaluations().max(index + 1) - begin,
                latents: Some(&latents),
                between_steps: false,
            })
            .is_break()
            {
                return Err(PipelineError::Cancelled);
            }
            index += 1;
        }
        match &inpaint {
            Some(state) => state.finish(latents),
            None => Ok(latents),
        }
    }

    /// The UNet's noise prediction at timestep `t` for (already scaled) `latents`, with
    /// classifier-free guidance when `text_embeddings` holds `[uncond, cond]`:
    /// `uncond + g * (cond - uncond)`.
    pub fn predict_noise(
        &self,
        latents: &Tensor,
        t: f64,
        text_embeddings: &Tensor,
        guidance_scale: f64,
    ) -> Result<Tensor> {
        let unet = self.unet_for_run()?;
        let conditioning = match text_embeddings.dim(0)? {
            2 => Conditioning::Joint(text_embeddings.clone()),
            _ => Conditioning::Cond(text_embeddings.clone()),
        };
        let conditioning = StepConditioning::Single(conditioning);
        let (pred, _) = self.predict_noise_with(
            &unet,
            latents,
            t,
            &conditioning,
            (guidance_scale, false),
            None,
            None,
        )?;
        Ok(pred)
    }

    /// `latents` holds the batch's `n` images; `text_embeddings` one image's `[uncond, cond]`
    /// (or `[cond]` without guidance), repeated for the batch as diffusers'
    /// `num_images_per_prompt` does: `[uncond x n, cond x n]`. `graph`: the loop's CUDA graph
    /// of the one-pass step (the two-pass one, and any with ControlNets, runs plainly).
    /// `control`: the step's ControlNets, run on every UNet evaluation's input. With
    /// `want_uncond` the unconditional prediction comes back too (a view of the batch's rows;
    /// `None` where the conditioning has no negative prompt).
    #[allow(clippy::too_many_arguments)]
    fn predict_noise_with(
        &self,
        unet: &UNet2DConditionModel,
        latents: &Tensor,
        t: f64,
        conditioning: &StepConditioning,
        (guidance_scale, want_uncond): (f64, bool),
        graph: Option<&mut StepGraph>,
        control: Option<StepControl<'_>>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = latents.dim(0)?;
        // diffusers' num_images_per_prompt: each row of the conditioning repeated n times.
        let repeat = |e: &Tensor| -> Result<Tensor> {
            if n == 1 {
                return Ok(e.clone());
            }
            let rows = (0..e.dim(0)?)
                .map(|r| {
                    let row = e.narrow(0, r, 1)?;
                    Tensor::cat(&vec![&row; n], 0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let conditioning = match conditioning {
            StepConditioning::Single(c) => c,
            StepConditioning::Composed {
                uncond,
                conds,
                weights,
            } => {
                let (pred, uncond) = self.predict_composed(
                    unet,
                    latents,
                    t,
                    (uncond, conds, weights),
                    guidance_scale,
                    repeat,
                    control,
                )?;
                return Ok((pred, want_uncond.then_some(uncond)));
            }
        };
        let text_embeddings = match conditioning {
            Conditioning::Cond(e) | Conditioning::Joint(e) => e,
            Conditioning::Separate { uncond, cond } => {
                // Two passes, each with its own sequence length.
                let t = Tensor::full(t as f32, n, &self.device)?;
                // Only with guidance on, which a guidance-distilled UNet never has.
                let uncond = unet_forward(
                    unet,
                    latents,
                    &t,
                    &repeat(uncond)?,
                    None,
                    control,
                    CondRows::None,
                )?;
                let cond = unet_forward(
                    unet,
                    latents,
                    &t,
                    &repeat(cond)?,
                    None,
                    control,
                    CondRows::All,
                )?;
                let pred = (&uncond + ((cond - &uncond)? * guidance_scale)?)?;
                return Ok((pred, want_uncond.then_some(uncond)));
            }
        };
        let cfg = text_embeddings.dim(0)? == 2;
        let embeddings = repeat(text_embeddings)?;
        let model_input = if cfg {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let rows = embeddings.dim(0)?;
        let t = Tensor::full(t as f32, rows, &self.device)?;
        let timestep_cond = match self.unet_config.time_cond_proj_dim {
            Some(dim) => Some(guidance_scale_embedding(
                guidance_scale,
                dim,
                rows,
                &self.device,
            )?),
            None => None,
        };
        let graph = graph.filter(|_| control.is_none());
        let noise_pred = match (graph, &timestep_cond) {
            (Some(g), None) => g.run(&[&model_input, &t, &embeddings], |x| {
                unet.forward(&x[0], &x[1], &x[2])
            })?,
            (Some(g), Some(c)) => g.run(&[&model_input, &t, &embeddings, c], |x| {
                unet.forward_with_cond(&x[0], &x[1], &x[2], Some(&x[3]))
            })?,
            (None, c) => {
                let cond = if cfg {
                    CondRows::From(n)
                } else {
                    CondRows::All
                };
                unet_forward(
                    unet,
                    &model_input,
                    &t,
                    &embeddings,
                    c.as_ref(),
                    control,
                    cond,
                )?
            }
        };
        if !cfg {
            return Ok((noise_pred, None));
        }
        let uncond = noise_pred.narrow(0, 0, n)?;
        let cond = noise_pred.narrow(0, n, n)?;
        let pred = (&uncond + ((cond - &uncond)? * guidance_scale)?)?;
        Ok((pred, want_uncond.then_some(uncond)))
    }
}

impl StableDiffusion {
    /// Composable diffusion as A1111's `combine_denoised`: `uncond + sum_i w_i * g * (cond_i -
    /// uncond)` over the AND parts, every part a row of one UNet batch with the negative
    /// prompt's (two passes where the negative prompt's length differs, as A1111 batches).
    /// Also the negative prompt's prediction.
    #[allow(clippy::too_many_arguments)]
    fn predict_composed(
        &self,
        unet: &UNet2DConditionModel,
        latents: &Tensor,
        t: f64,
        (uncond, conds, weights): (&Tensor, &Tensor, &[f64]),
        guidance_scale: f64,
        repeat: impl Fn(&Tensor) -> Result<Tensor>,
        control: Option<StepControl<'_>>,
    ) -> Result<(Tensor, Tensor)> {
        let n = latents.dim(0)?;
        let parts = conds.dim(0)?;
        let (uncond_pred, cond_pred) = if uncond.dim(1)? == conds.dim(1)? {
            let embeddings = Tensor::cat(&[repeat(uncond)?, repeat(conds)?], 0)?;
            let input = Tensor::cat(&vec![latents; parts + 1], 0)?;
            let t = Tensor::full(t as f32, embeddings.dim(0)?, &self.device)?;
            // Every AND part is the prompt's (A1111 marks `conditioning` as one).
            let out = unet_forward(
                unet,
                &input,
                &t,
                &embeddings,
                None,
                control,
                CondRows::From(n),
            )?;
            (out.narrow(0, 0, n)?, out.narrow(0, n, n * parts)?)
        } else {
            let tu = Tensor::full(t as f32, n, &self.device)?;
            let uncond_pred = unet_forward(
                unet,
                latents,
                &tu,
                &repeat(uncond)?,
                None,
                control,
                CondRows::None,
            )?;
            let tc = Tensor::full(t as f32, n * parts, &self.device)?;
            let input = Tensor::cat(&vec![latents; parts], 0)?;
            let conds = repeat(conds)?;
            (
                uncond_pred,
                unet_forward(unet, &input, &tc, &conds, None, control, CondRows::All)?,
            )
        };
        let mut pred = uncond_pred.clone();
        for (i, w) in weights.iter().enumerate() {
            let delta = (cond_pred.narrow(0, i * n, n)? - &uncond_pred)?;
            pred = (pred + (delta * (w * guidance_scale))?)?;
        }
        Ok((pred, uncond_pred))
    }
}

/// diffusers' `get_guidance_scale_embedding(w, embedding_dim)` for a guidance-distilled (LCM)
/// UNet's `timestep_cond`, `w = guidance_scale - 1` for each of `rows` images: `[rows, dim]` f32
/// of `[sin, cos](1000 w * exp(-i * ln(10000) / (half - 1)))`, zero-padded to an odd `dim`;
/// computed in f32 step by step as torch does.
pub(crate) fn guidance_scale_embedding(
    guidance_scale: f64,
    dim: usize,
    rows: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let w = (guidance_scale - 1.0) as f32 * 1000.0;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).collect();
    row.extend(args.iter().map(|a| a.cos()));
    row.resize(dim, 0.0);
    let all: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
    Ok(Tensor::from_vec(all, (rows, dim), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_scale_embedding_follows_the_formula() -> Result<()> {
        let e = guidance_scale_embedding(8.5, 9, 2, &candle_core::Device::Cpu)?;
        assert_eq!(e.dims(), &[2, 9]);
        let e = e.to_vec2::<f32>()?;
        assert_eq!(e[0], e[1]);
        for i in 0..4 {
            let a = 7500.0 * (-(i as f64) * 10000f64.ln() / 3.0).exp();
            assert!((e[0][i] as f64 - a.sin()).abs() < 2e-3, "{:?}", e[0]);
            assert!((e[0][i + 4] as f64 - a.cos()).abs() < 2e-3, "{:?}", e[0]);
        }
        assert_eq!(e[0][8], 0.0);
        // Guidance 1 (w = 0): sin 0, cos 1.
        let e = guidance_scale_embedding(1.0, 4, 1, &candle_core::Device::Cpu)?;
        assert_eq!(e.to_vec2::<f32>()?[0], vec![0.0, 0.0, 1.0, 1.0]);
        Ok(())
    }
}
