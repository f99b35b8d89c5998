//! A1111 1.10's own timestep samplers, `DDIM`, `DDIM CFG++` and `PLMS`
//! (`modules/sd_samplers_timesteps.py`, `sd_samplers_timesteps_impl.py`): not diffusers' DDIM
//! and PNDM classes. Both DDIMs take A1111's `eta` (0 by default, its `eta_ddim` option).
//!
//! `DDIM CFG++` (`ddim_cfgpp`, CFG++ by Chung et al. 2024) is DDIM whose update points back
//! along the unconditional prediction (the CFG denoiser's `last_noise_uncond`) instead of the
//! guided one, with the guidance scale divided by 12.5 (`cond_scale_miltiplier`): the denoise
//! loop hands it that prediction ([`Scheduler::set_uncond_prediction`]).
//!
//! What differs from diffusers: the timesteps are `clip(range(0, 1000, 1000 // steps) + 1, 0,
//! 999)` (`CompVisSampler.get_timesteps`), and the loop updates from each one to the one below
//! it, so the last update lands on the first timestep's noise level (not a clean sample) and a
//! schedule of `L` timesteps runs `L - 1` updates (19 for 20 steps). img2img
//! (`sample_img2img`) noises the image at `timesteps[t_enc]` and then runs the `t_enc - 1`
//! updates from `timesteps[t_enc - 1]` down. PLMS's first update is a pseudo improved Euler
//! step (two UNet evaluations, the second at the next timestep down), then Adams-Bashforth of
//! rising order; here, as in diffusers' PNDM, that second evaluation is a repeated entry of
//! [`Scheduler::timesteps`] right after the first update that runs.
//!
//! `alphas_cumprod` comes from the model's scheduler config, as for every scheduler here; a
//! v-prediction model's output is turned into epsilon first, as A1111's
//! `CompVisTimestepsVDenoiser` does. The training schedule's length stands where A1111 writes
//! 1000 (the same for every SD model).

use candle_core::Tensor;

use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig,
};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

// Only the noise schedule's keys are read; the spacing is A1111's own.
const DEFAULTS: ClassDefaults = ClassDefaults::with_spacing("leading");

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Ddim,
    /// DDIM CFG++.
    DdimCfgpp,
    Plms,
}

/// One entry of the loop: the index into A1111's `timesteps` evaluated at (the level of the
/// sample it gets), and whether it is PLMS's second evaluation of its first update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    at: usize,
    warm_up_second: bool,
}

pub struct A1111Timesteps {
    rule: Rule,
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f32>,
    /// `num_inference_steps` of the schedule (A1111's `steps`).
    steps: usize,
    /// A1111's `timesteps`, ascending.
    a1111: Vec<usize>,
    entries: Vec<Entry>,
    timesteps: Vec<f64>,
    /// A1111's `t_enc` where an img2img start was set ([`Scheduler::set_start_step`]).
    t_enc: Option<usize>,
    /// DDIM's eta (PLMS has none).
    eta: f64,
    /// CFG++: the evaluation's unconditional prediction, taken by the next step.
    uncond: Option<Tensor>,
    // PLMS run state: the first update's sample and output, the last three outputs.
    cur_sample: Option<Tensor>,
    first_output: Option<Tensor>,
    old_eps: Vec<Tensor>,
}

impl A1111Timesteps {
    pub fn new(rule: Rule, cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        let train = r.num_train_timesteps;
        let n = num_inference_steps;
        if n > train {
            return Err(config_error(format!(
                "{n} steps exceed num_train_timesteps {train}"
            )));
        }
        // torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
        let a1111: Vec<usize> = (0..train)
            .step_by(train / n)
            .map(|t| (t + 1).min(train - 1))
            .collect();
        let mut out = Self {
            rule,
            prediction_type: r.prediction_type,
            alphas_cumprod: r.alphas_cumprod()?,
            steps: n,
            a1111,
            entries: Vec::new(),
            timesteps: Vec::new(),
            t_enc: None,
            eta: 0.0,
            uncond: None,
            cur_sample: None,
            first_output: None,
            old_eps: Vec::new(),
        };
        out.lay_out(0);
        Ok(out)
    }

    /// The loop's entries for a run that begins at entry `begin`: every update from the top of
    /// the schedule down to `timesteps[1]`, and for PLMS the repeated evaluation after the
    /// first update that runs (at `timesteps[max(index - 1, 0)]`).
    fn lay_out(&mut self, begin: usize) {
        let mut entries: Vec<Entry> = (1..self.a1111.len())
            .rev()
            .map(|at| Entry {
                at,
                warm_up_second: false,
            })
            .collect();
        if self.rule == Rule::Plms && begin < entries.len() {
            let at = entries[begin].at - 1;
            entries.insert(
                begin + 1,
                Entry {
                    at,
                    warm_up_second: true,
                },
            );
        }
        self.timesteps = entries.iter().map(|e| self.a1111[e.at] as f64).collect();
        self.entries = entries;
    }

    fn alpha(&self, at: usize) -> f32 {
        self.alphas_cumprod[self.a1111[at]]
    }

    /// The model output as epsilon (A1111's denoisers hand its samplers epsilon).
    fn epsilon(&self, output: &Tensor, sample: &Tensor, at: usize) -> Result<Tensor> {
        let a = self.alpha(at);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => output.clone(),
            // predict_eps_from_z_and_v: sqrt(ac[t]) * v + sqrt(1 - ac[t]) * x
            PredictionType::VPrediction => {
                (mul_s(output, a.sqrt())? + mul_s(sample, (1.0 - a).sqrt())?)?
            }
            PredictionType::Sample => {
                div_s(&(sample - mul_s(output, a.sqrt())?)?, (1.0 - a).sqrt())?
            }
        })
    }

    /// `get_x_prev_and_pred_x0` (eta 0): from `x` at `timesteps[index]` to `timesteps[index - 1]`.
    fn update(&self, x: &Tensor, eps: &Tensor, index: usize) -> Result<Tensor> {
        self.update_with_sigma(x, (eps, eps), index, 0.0)
    }

    /// DDIM's update with `sigma_t` (the noise's scale, added by the caller): the clean
    /// estimate from `eps`, the direction back along `direction` (`eps` but for CFG++).
    fn update_with_sigma(
        &self,
        x: &Tensor,
        (eps, direction): (&Tensor, &Tensor),
        index: usize,
        sigma_t: f32,
    ) -> Result<Tensor> {
        let a_t = self.alpha(index);
        let a_prev = self.alpha(index - 1);
        let pred_x0 = div_s(&(x - mul_s(eps, (1.0 - a_t).sqrt())?)?, a_t.sqrt())?;
        let dir_xt = mul_s(direction, (1.0 - a_prev - sigma_t * sigma_t).sqrt())?;
        Ok((mul_s(&pred_x0, a_prev.sqrt())? + dir_xt)?)
    }

    /// `ddim`'s `sigmas[index]`: `eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`,
    /// in float64 from the float32 alphas, then float32 (`.item() * s_x`).
    fn ddim_sigma(&self, index: usize) -> f32 {
        let a_t = f64::from(self.alpha(index));
        let a_prev = f64::from(self.alpha(index - 1));
        (self.eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()) as f32
    }

    /// The index into A1111's `timesteps` of the noise level the sample entering entry `index`
    /// is at: the level evaluated there (PLMS's repeated entry gets the first update's result,
    /// at the next level down), and past the last entry the first timestep's, where the last
    /// update lands.
    fn level_at(&self, index: usize) -> Result<usize> {
        if index == self.entries.len() {
            return Ok(0);
        }
        check_index(index, self.entries.len())?;
        Ok(self.entries[index].at)
    }

    fn noise_at(&self, original: &Tensor, noise: &Tensor, at: usize) -> Result<Tensor> {
        let ac = self.alpha(at);
        let dtype = original.dtype();
        let x =
            (mul_s(&to_f32(original)?, ac.sqrt())? + mul_s(&to_f32(noise)?, (1.0 - ac).sqrt())?)?;
        Ok(x.to_dtype(dtype)?)
    }
}

impl Scheduler for A1111Timesteps {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// A1111's timestep samplers hand its CFG denoiser the timestep where k-diffusion's hand
    /// it the sigma: its `s_min_uncond` compares with that.
    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.timesteps.get(index).copied()
    }

    /// `sample_img2img`: `t_enc = steps - step - 1`; the first update runs from
    /// `timesteps[t_enc - 1]`, past every entry above it (none where `t_enc` is 0 or 1).
    fn first_index_of_step(&self, step: usize) -> usize {
        let t_enc = self.steps.saturating_sub(step + 1);
        let len = self.a1111.len() - 1;
        len.saturating_sub(t_enc.saturating_sub(1))
    }

    fn set_start_step(&mut self, step: usize) {
        self.t_enc = Some(self.steps.saturating_sub(step + 1));
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.lay_out(begin);
        self.cur_sample = None;
        self.first_output = None;
        self.old_eps.clear();
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.noise_at(original, noise, self.level_at(index)?)
    }

    /// A1111's img2img start: the image at `timesteps[t_enc]`, one level above the first
    /// evaluation.
    fn add_start_noise(&self, original: &Tensor, noise: &Tensor, begin: usize) -> Result<Tensor> {
        match self.t_enc {
            Some(t_enc) => self.noise_at(original, noise, t_enc.min(self.a1111.len() - 1)),
            None => self.add_noise(original, noise, begin),
        }
    }

    fn eta(&self) -> Option<f64> {
        (self.rule != Rule::Plms).then_some(self.eta)
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }

    /// CFG++'s `cond_scale_miltiplier`: A1111 maps the scale's 0..12.5 onto 0..1.
    fn guidance_scale_multiplier(&self) -> f64 {
        match self.rule {
            Rule::DdimCfgpp => 1.0 / 12.5,
            _ => 1.0,
        }
    }

    fn takes_uncond_prediction(&self) -> bool {
        self.rule == Rule::DdimCfgpp
    }

    fn blends_model_input(&self) -> bool {
        true
    }

    fn set_uncond_prediction(&mut self, uncond: Tensor) {
        self.uncond = Some(uncond);
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.entries.len())?;
        let dtype = sample.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let entry = self.entries[index];
        let eps = self.epsilon(&mo, &x, entry.at)?;
        let prev = match self.rule {
            Rule::Ddim | Rule::DdimCfgpp => {
                let direction = match self.rule {
                    Rule::DdimCfgpp => {
                        let Some(uncond) = self.uncond.take() else {
                            return Err(config_error("CFG++ got no unconditional prediction"));
                        };
                        self.epsilon(&to_f32(&uncond)?, &x, entry.at)?
                    }
                    _ => eps.clone(),
                };
                // A1111 draws the noise at every update (`randn_like` from each image's
                // generator), eta 0 included.
                let sigma_t = self.ddim_sigma(entry.at);
                let noise = common::batch_randn(&x, rngs)?;
                let prev = self.update_with_sigma(&x, (&eps, &direction), entry.at, sigma_t)?;
                (prev + mul_s(&noise, sigma_t)?)?
            }
            Rule::Plms if entry.warm_up_second => {
                // Pseudo improved Euler: the mean of both outputs, from the first sample.
                let (Some(x0), Some(e0)) = (self.cur_sample.take(), self.first_output.take())
                else {
                    return Err(config_error("PLMS's second evaluation came first"));
                };
                let e_prime = div_s(&(&e0 + &eps)?, 2.0)?;
                self.old_eps.push(e0);
                self.update(&x0, &e_prime, entry.at + 1)?
            }
            Rule::Plms if self.old_eps.is_empty() => {
                let prev = self.update(&x, &eps, entry.at)?;
                self.cur_sample = Some(x);
                self.first_output = Some(eps);
                prev
            }
            Rule::Plms => {
                let e = &self.old_eps;
                let n = e.len();
                let e_prime = match n {
                    1 => div_s(&(eps.affine(3.0, 0.0)? - &e[0])?, 2.0)?,
                    2 => div_s(
                        &((eps.affine(23.0, 0.0)? - e[1].affine(16.0, 0.0)?)?
                            + e[0].affine(5.0, 0.0)?)?,
                        12.0,
                    )?,
                    _ => div_s(
                        &(((eps.affine(55.0, 0.0)? - e[n - 1].affine(59.0, 0.0)?)?
                            + e[n - 2].affine(37.0, 0.0)?)?
                            - e[n - 3].affine(9.0, 0.0)?)?,
                        24.0,
                    )?,
                };
                let prev = self.update(&x, &e_prime, entry.at)?;
                self.old_eps.push(eps);
                if self.old_eps.len() > 3 {
                    self.old_eps.remove(0);
                }
                prev
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SD 1.5's scheduler config, as A1111's samplers see it.
    pub(crate) fn sd15() -> SchedulerConfig {
        SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            ..Default::default()
        }
    }

    #[test]
    fn timesteps_are_a1111_s() {
        let ddim = A1111Timesteps::new(Rule::Ddim, &sd15(), 20).unwrap();
        // range(0, 1000, 50) + 1, top down, without the first: 19 updates for 20 steps.
        let want: Vec<f64> = (1..20).rev().map(|i| (i * 50 + 1) as f64).collect();
        assert_eq!(ddim.timesteps(), want.as_slice());
        // 1000 // 30 = 33: 31 timesteps (the last 991), 30 updates.
        let ddim = A1111Timesteps::new(Rule::Ddim, &sd15(), 30).unwrap();
        assert_eq!(ddim.timesteps().len(), 30);
        assert_eq!(ddim.timesteps()[0], 991.0);
        // One step: a single timestep, no update (A1111 returns the noise).
        let one = A1111Timesteps::new(Rule::Ddim, &sd15(), 1).unwrap();
        assert!(one.timesteps().is_empty());
    }

    #[test]
    fn plms_repeats_the_next_timestep_after_its_first_update() {
        let mut plms = A1111Timesteps::new(Rule::Plms, &sd15(), 10).unwrap();
        assert_eq!(&plms.timesteps()[..4], &[901.0, 801.0, 801.0, 701.0]);
        assert_eq!(plms.timesteps().len(), 10);
        // img2img at 0.75: t_enc 7, the first update from timesteps[6] = 601.
        plms.set_start_step(10 - 7 - 1);
        let begin = plms.first_index_of_step(2);
        assert_eq!(begin, 3);
        plms.set_begin_index(begin);
        assert_eq!(
            &plms.timesteps()[begin..],
            &[601.0, 501.0, 501.0, 401.0, 301.0, 201.0, 101.0]
        );
        // The image starts at timesteps[t_enc] = 701, one level above the first evaluation.
        let x = Tensor::ones(
            (1, 1, 1, 1),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let start = plms
            .add_start_noise(&x, &x.zeros_like().unwrap(), begin)
            .unwrap();
        let a = plms.alphas_cumprod[701].sqrt();
        assert_eq!(start.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [a]);
        // t_enc 0 and 1 run no update.
        assert_eq!(plms.first_index_of_step(9), 9);
        assert_eq!(plms.first_index_of_step(8), 9);
    }

    /// A1111's DDIM with eta is the DDIM paper's update, as diffusers' DDIMScheduler (whose eta
    /// the pipeline test `eta` checks against diffusers) computes it: on SD 1.5's config the
    /// two share their timesteps (leading, offset 1) and every update but diffusers' last, and
    /// both draw each update's noise from the images' generators.
    #[test]
    fn ddim_eta_is_diffusers_ddim_on_the_shared_updates() {
        use crate::rng::TorchRng;
        use candle_core::{DType, Device};
        let cfg = SchedulerConfig {
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..sd15()
        };
        let mut a1111 = A1111Timesteps::new(Rule::Ddim, &cfg, 20).unwrap();
        let mut diffusers = super::super::ddim::Ddim::new(&cfg, 20).unwrap();
        for s in [&mut a1111 as &mut dyn Scheduler, &mut diffusers] {
            s.set_eta(0.7);
        }
        assert_eq!(a1111.timesteps(), &diffusers.timesteps()[..19]);
        let randn = |seed: u64| {
            let v = TorchRng::new(seed).randn(2 * 4 * 3 * 3);
            Tensor::from_vec(v, (2, 4, 3, 3), &Device::Cpu).unwrap()
        };
        let (mut x, mut y) = (randn(1), randn(1));
        let mut rngs_a = [TorchRng::new(5), TorchRng::new(6)];
        let mut rngs_d = [TorchRng::new(5), TorchRng::new(6)];
        for i in 0..19 {
            let eps = randn(100 + i as u64);
            x = a1111.step(&eps, i, &x, &mut rngs_a).unwrap();
            y = diffusers.step(&eps, i, &y, &mut rngs_d).unwrap();
            let diff = (&x - &y).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 2e-5, "update {i}: {diff}");
        }
        // PLMS has no eta.
        assert_eq!(a1111.eta(), Some(0.7));
        assert_eq!(
            A1111Timesteps::new(Rule::Plms, &cfg, 20).unwrap().eta(),
            None
        );
    }
}
