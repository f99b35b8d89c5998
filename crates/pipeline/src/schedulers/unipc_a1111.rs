//! A1111 1.10's own UniPC (`sd_samplers_timesteps_impl.unipc` on
//! `modules/models/diffusion/uni_pc/uni_pc.py`) with A1111's default options: variant `bh1`,
//! skip type `time_uniform`, order 3, lower order final; not diffusers' UniPCMultistep (`bh2`,
//! order 2, its own timesteps).
//!
//! The noise schedule is continuous (`NoiseScheduleVP('discrete')`): `log(alpha_t)` is the
//! piecewise linear interpolation of `0.5 * log(alphas_cumprod)` with entry `i` at
//! `t = (i + 1) / N`. A run of `M` steps goes over `torch.linspace(t_T, 1 / N, M + 1)` in
//! float32 and evaluates the UNet `M` times, at model time `(t - 1 / N) * N` (fractional). In
//! txt2img `t_T` is 1 and `M` is the length of A1111's timesteps (`range(0, 1000, 1000 //
//! steps)`, one more than `steps` where it does not divide 1000); img2img (`sample_img2img`)
//! noises the image at `timesteps[t_enc]` (the discrete schedule) and runs `M = t_enc` steps
//! from `t_T = (timesteps[t_enc - 1] + 1) / 1000`.
//!
//! Each step predicts (UniP, from the data predictions of up to `order` earlier steps), the
//! UNet evaluates the prediction, and the corrector (UniC) redoes the step with that
//! evaluation; the evaluation is kept as the step's model value. The last step predicts only.
//! Here the loop entry `k` evaluates the UNet on step `k`'s prediction, and `step` applies
//! step `k`'s corrector and step `k + 1`'s predictor. The orders are A1111's: `1, 2, ...` up
//! to 3, then lower again towards the end (`min(order, M + 1 - step)`). A1111 asserts `M >=
//! order` and fails below it; here the order is lowered to `M` (what its X/Y/Z plot does with
//! its UniPC order axis), so 1 and 2 steps run. A v-prediction model's output becomes
//! epsilon at `alphas_cumprod[int(model time)]`, as `CompVisTimestepsVDenoiser` does.

use candle_core::Tensor;

use super::common::{
    self, check_index, config_error, mul_s, to_f32, torch_linspace_f32, ClassDefaults,
    PredictionType, ResolvedConfig,
};
use super::{unipc, Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

// Only the noise schedule's keys are read; the times are A1111's own.
const DEFAULTS: ClassDefaults = ClassDefaults::with_spacing("leading");

/// A1111's `uni_pc_order` default.
const ORDER: usize = 3;

/// `torch.linalg.solve(R[:n, :n], b[:n])`, in float32 as A1111's tensors are.
fn solve(r: &[Vec<f64>], b: &[f64], n: usize) -> Result<Vec<f64>> {
    let r32 = r[..n]
        .iter()
        .map(|row| row[..n].iter().map(|&v| v as f32).collect())
        .collect();
    let b32 = b[..n].iter().map(|&v| v as f32).collect();
    Ok(unipc::solve(r32, b32)?
        .into_iter()
        .map(|v| v as f64)
        .collect())
}

pub struct UniPcA1111 {
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f32>,
    /// `0.5 * log(alphas_cumprod)`, the interpolation's knots.
    log_alphas: Vec<f64>,
    /// `num_inference_steps` of the schedule (A1111's `steps`).
    steps: usize,
    /// A1111's `timesteps`, ascending.
    a1111: Vec<usize>,
    /// The run's continuous times `t_0 > ... > t_M` (float32, as torch makes them).
    times: Vec<f32>,
    /// The model times of the `M` evaluations.
    timesteps: Vec<f64>,
    /// A1111's `t_enc` where an img2img start was set ([`Scheduler::set_start_step`]).
    t_enc: Option<usize>,
    /// The entry the run begins at (a fresh run: no earlier model values).
    begin: usize,
    /// The last `ORDER` data predictions and their times, oldest first.
    models: Vec<Tensor>,
    model_times: Vec<f64>,
    /// The corrected sample the pending prediction started from.
    last_sample: Option<Tensor>,
}

impl UniPcA1111 {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        let train = r.num_train_timesteps;
        let n = num_inference_steps;
        if n > train || train < 2 {
            return Err(config_error(format!(
                "{n} steps do not fit num_train_timesteps {train}"
            )));
        }
        // torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
        let a1111: Vec<usize> = (0..train)
            .step_by(train / n)
            .map(|t| (t + 1).min(train - 1))
            .collect();
        let alphas_cumprod = r.alphas_cumprod()?;
        let log_alphas = alphas_cumprod
            .iter()
            .map(|&a| 0.5 * (a as f64).ln())
            .collect();
        let mut out = Self {
            prediction_type: r.prediction_type,
            alphas_cumprod,
            log_alphas,
            steps: n,
            a1111,
            times: Vec::new(),
            timesteps: Vec::new(),
            t_enc: None,
            begin: 0,
            models: Vec::new(),
            model_times: Vec::new(),
            last_sample: None,
        };
        out.lay_out();
        Ok(out)
    }

    fn train(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The run's times: txt2img's from `t = 1` over A1111's timestep count, or img2img's
    /// `t_enc` steps from `(timesteps[t_enc - 1] + 1) / N`.
    fn lay_out(&mut self) {
        let n = self.train() as f32;
        let (t_start, steps) = match self.t_enc {
            None => (1.0f32, self.a1111.len()),
            Some(0) => (1.0, 0),
            Some(t_enc) => {
                let t = self.a1111[t_enc.min(self.a1111.len()) - 1];
                (t as f32 / n + 1.0 / n, t_enc)
            }
        };
        let t_end = 1.0 / n;
        self.times = torch_linspace_f32(t_start as f64, t_end as f64, steps + 1);
        // UniPCCFG.get_model_input_time: (t - 1 / N) * 1000, in float32.
        self.timesteps = self.times[..steps]
            .iter()
            .map(|&t| ((t - t_end) * n) as f64)
            .collect();
    }

    /// `marginal_log_mean_coeff`: `log(alpha_t)`, linear between the knots at `(i + 1) / N`.
    fn log_alpha(&self, t: f64) -> f64 {
        let n = self.log_alphas.len();
        let x = t * n as f64 - 1.0;
        let i = (x.floor().max(0.0) as usize).min(n - 2);
        let (lo, hi) = (self.log_alphas[i], self.log_alphas[i + 1]);
        lo + (x - i as f64) * (hi - lo)
    }

    /// `(alpha_t, sigma_t, lambda_t)` of the continuous schedule.
    fn at(&self, t: f64) -> (f64, f64, f64) {
        let la = self.log_alpha(t);
        let sigma = (1.0 - (2.0 * la).exp()).sqrt();
        (la.exp(), sigma, la - sigma.ln())
    }

    /// The model output as epsilon at model time `model_t`.
    fn epsilon(&self, output: &Tensor, sample: &Tensor, model_t: f64) -> Result<Tensor> {
        let a = || -> Result<f32> {
            self.alphas_cumprod
                .get(model_t as usize)
                .copied()
                .ok_or_else(|| config_error(format!("model time {model_t} is past the schedule")))
        };
        Ok(match self.prediction_type {
            PredictionType::Epsilon => output.clone(),
            // predict_eps_from_z_and_v at alphas_cumprod[t.to(int)]
            PredictionType::VPrediction => {
                let a = a()?;
                (mul_s(output, a.sqrt())? + mul_s(sample, (1.0 - a).sqrt())?)?
            }
            PredictionType::Sample => {
                let a = a()?;
                ((sample - mul_s(output, a.sqrt())?)? / ((1.0 - a) as f64).sqrt())?
            }
        })
    }

    /// The order of run step `j` (1-based) of `m`: A1111's warm-up `j`, then
    /// `min(order, m + 1 - j)` (lower order final), with the order at most `m`.
    fn order_of(j: usize, m: usize) -> usize {
        let order = ORDER.min(m);
        if j < order {
            j
        } else {
            order.min(m + 1 - j)
        }
    }

    /// `multistep_uni_pc_bh_update` (bh1, data prediction) from `x` at the newest kept model
    /// value's time to `t` with `order`: the predictor, or with `model_t` (the model value at
    /// the prediction) the corrector.
    fn update(&self, x: &Tensor, t: f64, order: usize, model_t: Option<&Tensor>) -> Result<Tensor> {
        let last = self.models.len() - 1;
        let (m0, t0) = (&self.models[last], self.model_times[last]);
        let (_, sigma_0, lambda_0) = self.at(t0);
        let (alpha_t, sigma_t, lambda_t) = self.at(t);
        let h = lambda_t - lambda_0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for i in 1..order {
            let (_, _, lambda_i) = self.at(self.model_times[last - i]);
            let rk = (lambda_i - lambda_0) / h;
            rks.push(rk);
            d1s.push(((&self.models[last - i] - m0)? / rk)?);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        // bh1: B(h) = h (bh2 would be e^h - 1).
        let b_h = hh;
        let mut factorial = 1.0;
        let mut r = vec![vec![0.0; order]; order];
        let mut b = vec![0.0; order];
        for i in 0..order {
            for (col, rk) in rks.iter().enumerate() {
                r[i][col] = rk.powi(i as i32);
            }
            b[i] = h_phi_k * factorial / b_h;
            factorial *= (i + 2) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let base = ((x * (sigma_t / sigma_0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let weighted = |rhos: &[f64]| -> Result<Option<Tensor>> {
            let mut sum: Option<Tensor> = None;
            for (d, &rho) in d1s.iter().zip(rhos) {
                let term = (d * rho)?;
                sum = Some(match sum {
                    None => term,
                    Some(s) => (s + term)?,
                });
            }
            Ok(sum)
        };
        let res = match model_t {
            None => {
                let rhos = match order {
                    1 => Vec::new(),
                    // "for order 2, we use a simplified version"
                    2 => vec![0.5],
                    _ => solve(&r, &b, order - 1)?,
                };
                weighted(&rhos)?
            }
            Some(model_t) => {
                let rhos = match order {
                    1 => vec![0.5],
                    _ => solve(&r, &b, order)?,
                };
                let d1_t = ((model_t - m0)? * rhos[order - 1])?;
                Some(match weighted(&rhos[..order - 1])? {
                    None => d1_t,
                    Some(s) => (s + d1_t)?,
                })
            }
        };
        Ok(match res {
            None => base,
            Some(res) => (base - (res * (alpha_t * b_h))?)?,
        })
    }

    fn noise_with(&self, original: &Tensor, noise: &Tensor, a: f64, s: f64) -> Result<Tensor> {
        let dtype = original.dtype();
        let x = ((to_f32(original)? * a)? + (to_f32(noise)? * s)?)?;
        Ok(x.to_dtype(dtype)?)
    }
}

impl Scheduler for UniPcA1111 {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// A1111's timestep samplers hand its CFG denoiser the timestep where k-diffusion's hand
    /// it the sigma: its `s_min_uncond` compares with that.
    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.timesteps.get(index).copied()
    }

    fn blends_model_input(&self) -> bool {
        true
    }

    /// With A1111's img2img start set, its run is the whole of [`Self::timesteps`].
    fn first_index_of_step(&self, step: usize) -> usize {
        match self.t_enc {
            Some(_) => 0,
            None => step,
        }
    }

    /// `sample_img2img`: `t_enc = steps - step - 1` steps from `timesteps[t_enc - 1]`.
    fn set_start_step(&mut self, step: usize) {
        self.t_enc = Some(self.steps.saturating_sub(step + 1));
        self.lay_out();
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
        self.models.clear();
        self.model_times.clear();
        self.last_sample = None;
    }

    /// The sample at the continuous schedule's level of entry `index` (`M`: the end).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.times.len())?;
        let (a, s, _) = self.at(self.times[index] as f64);
        self.noise_with(original, noise, a, s)
    }

    /// A1111's img2img start: the image at the discrete `alphas_cumprod[timesteps[t_enc]]`.
    fn add_start_noise(&self, original: &Tensor, noise: &Tensor, begin: usize) -> Result<Tensor> {
        match self.t_enc {
            Some(t_enc) => {
                let ac = self.alphas_cumprod[self.a1111[t_enc.min(self.a1111.len() - 1)]];
                let (a, s) = (ac.sqrt() as f64, (1.0 - ac).sqrt() as f64);
                self.noise_with(original, noise, a, s)
            }
            None => self.add_noise(original, noise, begin),
        }
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        if index < self.begin {
            return Err(config_error("UniPC stepped before its run began"));
        }
        let dtype = sample.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let run = self.timesteps.len() - self.begin;
        let j = index - self.begin;
        let t = self.times[index] as f64;
        let eps = self.epsilon(&mo, &x, self.timesteps[index])?;
        // data_prediction_fn: x0 = (x - sigma_t * eps) / alpha_t
        let (alpha, sigma, _) = self.at(t);
        let model = ((&x - (eps * sigma)?)? / alpha)?;
        let x = match self.last_sample.take() {
            None if j == 0 => x,
            None => return Err(config_error("UniPC's steps came out of order")),
            Some(prev) => self.update(&prev, t, Self::order_of(j, run), Some(&model))?,
        };
        self.models.push(model);
        self.model_times.push(t);
        if self.models.len() > ORDER {
            self.models.remove(0);
            self.model_times.remove(0);
        }
        let next = self.times[index + 1] as f64;
        let prediction = self.update(&x, next, Self::order_of(j + 1, run), None)?;
        self.last_sample = Some(x);
        Ok(prediction.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::a1111_timesteps::tests::sd15;

    #[test]
    fn model_times_are_a1111_s() {
        let s = UniPcA1111::new(&sd15(), 10).unwrap();
        assert_eq!(s.timesteps().len(), 10);
        assert_eq!(s.timesteps()[0], 999.0);
        assert!((s.timesteps()[1] - 899.1).abs() < 1e-3);
        // 1000 // 7 = 142: eight timesteps, eight steps.
        assert_eq!(UniPcA1111::new(&sd15(), 7).unwrap().timesteps().len(), 8);
        // img2img at 0.7 of 10: t_enc 7 steps from timesteps[6] + 1 = 602.
        let mut s = UniPcA1111::new(&sd15(), 10).unwrap();
        s.set_start_step(10 - 7 - 1);
        assert_eq!(s.first_index_of_step(2), 0);
        assert_eq!(s.timesteps().len(), 7);
        assert_eq!(s.timesteps()[0], 601.0);
    }

    #[test]
    fn orders_rise_then_fall() {
        let orders = |m: usize| {
            (1..=m)
                .map(|j| UniPcA1111::order_of(j, m))
                .collect::<Vec<_>>()
        };
        assert_eq!(orders(10), [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]);
        assert_eq!(orders(5), [1, 2, 3, 2, 1]);
        assert_eq!(orders(4), [1, 2, 2, 1]);
        assert_eq!(orders(3), [1, 2, 1]);
        // Below the order (A1111 asserts): the order is the step count.
        assert_eq!(orders(2), [1, 1]);
        assert_eq!(orders(1), [1]);
    }

    #[test]
    fn the_schedule_interpolates_log_alpha() {
        let s = UniPcA1111::new(&sd15(), 10).unwrap();
        // At the knots, the discrete schedule itself.
        for i in [0usize, 1, 500, 998, 999] {
            let (a, sigma, _) = s.at((i + 1) as f64 / 1000.0);
            let ac = s.alphas_cumprod[i] as f64;
            assert!((a - ac.sqrt()).abs() < 1e-9, "{i}");
            assert!((sigma - (1.0 - ac).sqrt()).abs() < 1e-7, "{i}");
        }
    }
}
