//! The `prepare_timesteps` and `prepare_latents` stages (text-to-image; an init image's latents
//! are prepared in `images_in`).

use candle_core::Tensor;

use super::{GenerationParams, GuidanceSkips, SkipRule, StableDiffusion, StepRule};
use crate::rng::TorchRng;
use crate::schedulers::{self, Scheduler};
use crate::Result;

/// The timestep of `HackedImageRNG.next()`'s `predict_q_sample` (`[999] * batch`).
const LAMA_NOISE_TIMESTEP: f64 = 999.0;

impl StableDiffusion {
    /// The scheduler for the request's steps and the index of the first timestep to run: 0 for
    /// text-to-image; with an init image, where its [`StepRule`] starts (diffusers:
    /// `t_start * order` with `t_start = steps - min(int(steps * strength), steps)`, as its
    /// `get_timesteps`, which also calls `set_begin_index` there).
    pub(super) fn prepare_timesteps(
        &self,
        params: &GenerationParams,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let start = params.init_start();
        self.schedules.schedule(
            params.scheduler,
            params.schedule,
            params.steps,
            start,
            params.eta,
            params.churn,
        )
    }

    /// The model's scheduler config and defaults: enough to know a request's timesteps
    /// ([`ModelSchedules::schedule`] builds a request's scheduler).
    pub fn schedules(&self) -> &ModelSchedules {
        &self.schedules
    }

    /// Initial noise from each image's own generator, as diffusers draws it on the CPU (bent
    /// and resized as A1111's: [`GenerationParams::starting_noise`]).
    pub(super) fn prepare_latents(
        &self,
        params: &GenerationParams,
        scheduler: &dyn Scheduler,
        rngs: &mut [TorchRng],
        lama: Option<&Tensor>,
    ) -> Result<Tensor> {
        let shape = (
            self.vae_latent_channels,
            params.height / self.vae_scale_factor,
            params.width / self.vae_scale_factor,
        );
        let noise = rngs
            .iter_mut()
            .enumerate()
            .map(|(i, rng)| {
                let noise =
                    params.starting_noise(i, rng, shape, self.vae_scale_factor, &self.device)?;
                self.lama_noise(noise, lama)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&noise, 0)? * scheduler.init_noise_sigma())?.to_dtype(self.dtype)?)
    }

    /// `inpaint_only+lama`'s starting noise (the extension's `HackedImageRNG.next()`, its
    /// `noise_modifier` `x0` the control image's latents): `predict_q_sample(x0, 999, noise)`,
    /// `sqrt(ac) * x0 + sqrt(1 - ac) * noise` at the training schedule's timestep 999
    /// (`1 / sqrt(1 + s^2)` and `s / sqrt(1 + s^2)` of its sigma `s`), where the latent sizes
    /// match; else, or without `x0`, the noise as drawn.
    pub(super) fn lama_noise(&self, noise: Tensor, x0: Option<&Tensor>) -> Result<Tensor> {
        let Some(x0) = x0 else {
            return Ok(noise);
        };
        let (_, _, h, w) = noise.dims4()?;
        let (_, _, xh, xw) = x0.dims4()?;
        if (h, w) != (xh, xw) {
            return Ok(noise);
        }
        let sigma = self.schedules.sigma_at(LAMA_NOISE_TIMESTEP)?;
        let norm = (1.0 + sigma * sigma).sqrt();
        let x0 = x0.to_dtype(noise.dtype())?;
        Ok(((x0 / norm)? + (noise * (sigma / norm))?)?)
    }
}

/// A model's `scheduler_config.json` and the scheduler and schedule it names: what a request's
/// timesteps are, without the model's weights (the server counts a job's UNet evaluations with
/// it before the job runs).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSchedules {
    config: schedulers::SchedulerConfig,
    default_scheduler: schedulers::SchedulerKind,
    default_schedule: schedulers::SigmaSchedule,
}

/// A pass's scheduler and the index of `timesteps()` its run begins at.
type PassScheduler = (Box<dyn Scheduler>, usize);

impl ModelSchedules {
    pub fn from_config(config: schedulers::SchedulerConfig) -> Result<Self> {
        Ok(Self {
            default_scheduler: schedulers::SchedulerKind::default_for(&config)?,
            default_schedule: schedulers::SchedulerKind::default_schedule_for(&config)?,
            config,
        })
    }

    /// The training noise level at timestep `t`, `sqrt((1 - ac) / ac)` interpolated linearly
    /// between whole timesteps (np.interp, as diffusers' sigma schedules): what A1111's
    /// `s_min_uncond` compares with where a scheduler has no sigma of its own.
    pub fn sigma_at(&self, t: f64) -> Result<f64> {
        use schedulers::common::{self, ClassDefaults, ResolvedConfig};
        let r = ResolvedConfig::resolve(&self.config, &ClassDefaults::with_spacing("leading"))?;
        let sigmas = common::sigmas_from_alphas_cumprod(&r.alphas_cumprod()?);
        let xs: Vec<f64> = (0..sigmas.len()).map(|i| i as f64).collect();
        let fp: Vec<f64> = sigmas.iter().map(|&s| s as f64).collect();
        Ok(common::interp(&[t], &xs, &fp)[0])
    }

    /// The scheduler the model's config names (requests without `scheduler` run it).
    pub fn default_scheduler(&self) -> schedulers::SchedulerKind {
        self.default_scheduler
    }

    /// The sigma schedule the model's config asks for.
    pub fn default_schedule(&self) -> schedulers::SigmaSchedule {
        self.default_schedule
    }

    /// What the model predicts (`prediction_type`, diffusers' default `epsilon`).
    pub fn prediction_type(&self) -> Result<schedulers::common::PredictionType> {
        schedulers::common::PredictionType::parse(
            self.config.prediction_type.as_deref().unwrap_or("epsilon"),
        )
    }

    /// The scheduler of `kind` (`None`: the model's) on `schedule` (`None`: the kind's own, or
    /// with no kind the model's) for a pass of `steps`, and the index of its first timestep:
    /// `start` is an init image's strength and [`StepRule`] (`None`: text-to-image, from the
    /// first step). A1111's rules may build a longer schedule than `steps` (the hires pass's
    /// stretch), at most the model's `num_train_timesteps`.
    pub fn schedule(
        &self,
        kind: Option<schedulers::SchedulerKind>,
        schedule: Option<schedulers::SigmaSchedule>,
        steps: usize,
        start: Option<(f64, StepRule)>,
        eta: Option<f64>,
        churn: schedulers::Churn,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let (kind, schedule) = match kind {
            Some(kind) => (kind, schedule.unwrap_or(kind.schedule())),
            None => (
                self.default_scheduler,
                schedule.unwrap_or(self.default_schedule),
            ),
        };
        let slice = match start {
            None => None,
            Some((strength, rule)) => Some((rule, rule.slice(steps, strength)?)),
        };
        let schedule_steps = slice.map_or(steps, |(_, s)| s.schedule_steps);
        // diffusers' class default, as every scheduler's `from_config` takes it.
        let train = self.config.num_train_timesteps.unwrap_or(1000);
        if schedule_steps > train {
            return Err(crate::PipelineError::InvalidRequest(format!(
                "the strength stretches the schedule to {schedule_steps} steps \
                 (int(steps / strength)); the model has {train} timesteps"
            )));
        }
        let mut scheduler = schedulers::build_with(kind, schedule, &self.config, schedule_steps)?;
        if let Some(eta) = eta {
            scheduler.set_eta(eta);
        }
        scheduler.set_churn(churn);
        let begin = match slice {
            None => 0,
            Some((StepRule::Diffusers, s)) => s.start * scheduler.order(),
            Some((_, s)) => {
                scheduler.set_start_step(s.start);
                scheduler.first_index_of_step(s.start)
            }
        };
        // A1111's DDIM and PLMS run fewer updates than steps (19 of 20): a late start runs none.
        let begin = begin.min(scheduler.timesteps().len());
        scheduler.set_begin_index(begin);
        Ok((scheduler, begin))
    }

    /// The UNet evaluations `params` runs, as its step hook counts them (`StepProgress::total`):
    /// the first pass's timesteps from where it begins, plus the hires pass's (for DPM adaptive,
    /// whose evaluations are decided as it runs, its first estimate). A request its
    /// schedulers refuse (an LCM model's `original_inference_steps` below the steps, ...) is
    /// the error the run would end with.
    pub fn unet_evaluations(&self, params: &GenerationParams) -> Result<usize> {
        let (first, hires) = self.pass_schedulers(params)?;
        let run = |(s, begin): &PassScheduler| s.planned_evaluations() - begin;
        Ok(run(&first) + hires.as_ref().map_or(0, run))
    }

    /// The step counts A1111's prompt schedule of each pass spans, as `generate` gives them to
    /// `encode_schedule` (A1111's `total_steps`): the pass's steps times its scheduler's UNet
    /// evaluations per step (`order`), for the first pass and the hires pass. Refused as
    /// [`Self::unet_evaluations`] is.
    pub fn prompt_steps(&self, params: &GenerationParams) -> Result<(usize, Option<usize>)> {
        let (first, hires) = self.pass_schedulers(params)?;
        let hires = hires.zip(params.hires.as_ref());
        Ok((
            params.steps * first.0.order(),
            hires.map(|((second, _), h)| h.steps * second.order()),
        ))
    }

    /// Which of `params.negative_guidance`'s rules skip the negative prompt on some UNet
    /// evaluation of its passes, as `denoise` applies them (each pass counted from 0 against
    /// its own A1111 `total_steps`). DPM adaptive decides its evaluations as it runs: the ones
    /// listed before it does.
    pub fn guidance_skips(&self, params: &GenerationParams) -> Result<GuidanceSkips> {
        let (first, hires) = self.pass_schedulers(params)?;
        let mut skips = GuidanceSkips::default();
        let passes = [
            Some((first, params.steps_run())),
            hires.map(|pass| (pass, params.hires_steps())),
        ];
        for ((scheduler, begin), steps_run) in passes.into_iter().flatten() {
            let total_steps = steps_run * scheduler.order();
            for (index, &t) in scheduler.timesteps().iter().enumerate().skip(begin) {
                let sigma = || match scheduler.guidance_sigma(index) {
                    Some(sigma) => Ok(sigma),
                    None => self.sigma_at(t),
                };
                let guidance = &params.negative_guidance;
                match guidance.skip_rule(index - begin, total_steps, sigma)? {
                    Some(SkipRule::Early) => skips.early = true,
                    Some(SkipRule::MinSigma) => skips.min_sigma = true,
                    None => {}
                }
            }
        }
        Ok(skips)
    }

    /// The schedulers of the first pass and of the hires pass (where the request has one), each
    /// with the index its run begins at.
    fn pass_schedulers(
        &self,
        params: &GenerationParams,
    ) -> Result<(PassScheduler, Option<PassScheduler>)> {
        let first = self.schedule(
            params.scheduler,
            params.schedule,
            params.steps,
            params.init_start(),
            params.eta,
            params.churn,
        )?;
        let hires = match &params.hires {
            None => None,
            Some(h) => {
                let (scheduler, schedule) = super::hires::second_pass_scheduler(params, h);
                let start = Some((h.strength, params.step_rule.for_hires()));
                Some(self.schedule(
                    scheduler,
                    schedule,
                    h.steps,
                    start,
                    params.eta,
                    params.churn,
                )?)
            }
        };
        Ok((first, hires))
    }
}
