//! The `prepare_timesteps` and `prepare_latents` stages (text-to-image; an init image's latents
//! are prepared in `images_in`).

use candle_core::Tensor;

use super::{images_in, GenerationParams, StableDiffusion};
use crate::rng::TorchRng;
use crate::schedulers::{self, Scheduler};
use crate::Result;

impl StableDiffusion {
    /// The scheduler for the request's steps and the index of the first timestep to run: 0 for
    /// text-to-image; with an init image, `t_start * order` where `t_start = steps - init` and
    /// `init = min(int(steps * strength), steps)` (diffusers' `get_timesteps`, which also calls
    /// `set_begin_index` there).
    pub(super) fn prepare_timesteps(
        &self,
        params: &GenerationParams,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let strength = params.init_image.as_ref().map(|init| init.strength);
        self.schedule(params.scheduler, params.schedule, params.steps, strength)
    }

    /// The scheduler of `kind` (`None`: the model's) on `schedule` (`None`: the kind's own, or
    /// with no kind the model's) for `steps`, begun where an init image of `strength` begins
    /// (`None`: text-to-image, from the first step).
    pub(super) fn schedule(
        &self,
        kind: Option<schedulers::SchedulerKind>,
        schedule: Option<schedulers::SigmaSchedule>,
        steps: usize,
        strength: Option<f64>,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let (kind, schedule) = match kind {
            Some(kind) => (kind, schedule.unwrap_or(kind.schedule())),
            None => (
                self.default_scheduler,
                schedule.unwrap_or(self.default_schedule),
            ),
        };
        let mut scheduler = schedulers::build_with(kind, schedule, &self.scheduler_config, steps)?;
        let begin = match strength {
            None => 0,
            Some(strength) => {
                let t_start = steps - images_in::init_steps(steps, strength);
                t_start * scheduler.order()
            }
        };
        scheduler.set_begin_index(begin);
        Ok((scheduler, begin))
    }

    /// Initial noise from each image's own generator, as diffusers draws it on the CPU.
    pub(super) fn prepare_latents(
        &self,
        params: &GenerationParams,
        scheduler: &dyn Scheduler,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let shape = (
            self.unet_in_channels,
            params.height / self.vae_scale_factor,
            params.width / self.vae_scale_factor,
        );
        let noise = rngs
            .iter_mut()
            .enumerate()
            .map(|(i, rng)| super::image_noise(rng, params.image_variation(i), shape, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&noise, 0)? * scheduler.init_noise_sigma())?.to_dtype(self.dtype)?)
    }
}
