//! `PNDMScheduler`: pseudo numerical methods; with `skip_prk_steps` (SD 1.5) it is PLMS, a
//! 4th-order linear multistep method whose first step is taken twice (hence the repeated
//! timestep). Without `skip_prk_steps` it starts with Runge-Kutta (PRK) steps, as diffusers does.

use candle_core::Tensor;

use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig, TimestepSpacing,
};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

const DEFAULTS: ClassDefaults = ClassDefaults::with_spacing("leading");

pub struct Pndm {
    prediction_type: PredictionType,
    skip_prk_steps: bool,
    num_train_timesteps: i64,
    num_inference_steps: i64,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// Number of PRK entries at the head of `timesteps`.
    prk_len: usize,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    timesteps_i: Vec<i64>,
    // Run state, as the Python object keeps it.
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if r.prediction_type == PredictionType::Sample {
            return Err(config_error(
                "PNDMScheduler supports prediction_type epsilon or v_prediction",
            ));
        }
        let ac = r.alphas_cumprod()?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            ac[0]
        };
        let skip_prk_steps = cfg.skip_prk_steps.unwrap_or(false);
        let n = num_inference_steps;
        let train = r.num_train_timesteps;

        // `self._timesteps`, ascending.
        let base: Vec<i64> = match r.timestep_spacing {
            TimestepSpacing::Linspace => common::linspace_rounded_timesteps(n, train),
            TimestepSpacing::Leading => common::leading_timesteps(n, train, r.steps_offset),
            TimestepSpacing::Trailing => common::trailing_timesteps(n, train),
        }
        .into_iter()
        .rev()
        .map(|t| t as i64)
        .collect();
        let len = base.len();

        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk_steps {
            // concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]: the second-to-last entry repeats.
            let mut v: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                v.push(base[len - 2]);
            }
            v.push(base[len - 1]);
            v.reverse();
            (vec![], v)
        } else {
            if len < 4 {
                return Err(config_error(format!(
                    "PNDM with skip_prk_steps=false needs at least 4 steps, got {n}"
                )));
            }
            // repeat(ts[-4:], 2) + tile([0, T // n // 2], 4), then [:-1].repeat(2)[1:-1][::-1].
            let half = (train / n / 2) as i64;
            let tail = &base[len - 4..];
            let prk0: Vec<i64> = tail
                .iter()
                .flat_map(|&t| [t, t])
                .enumerate()
                .map(|(i, t)| t + if i % 2 == 1 { half } else { 0 })
                .collect();
            let rep: Vec<i64> = prk0[..prk0.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk: Vec<i64> = rep[1..rep.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let prk_len = prk.len();
        let timesteps_i: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        Ok(Self {
            prediction_type: r.prediction_type,
            skip_prk_steps,
            num_train_timesteps: train as i64,
            num_inference_steps: n as i64,
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prk_len,
            prk_timesteps: prk,
            timesteps: timesteps_i.iter().map(|&t| t as f64).collect(),
            timesteps_i,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| config_error(format!("timestep {t} is outside the training schedule")))
    }

    /// Formula (9) of the PNDM paper, in float32 like diffusers' `_get_prev_sample`.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha(t)?;
        let a_prev = self.alpha(prev_t)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                (mul_s(model_output, a_t.sqrt())? + mul_s(sample, b_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let rhs = div_s(&mul_s(&model_output, a_prev - a_t)?, denom)?;
        Ok((mul_s(sample, sample_coeff)? - rhs)?)
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let half = self.num_train_timesteps / self.num_inference_steps / 2;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = t - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let add = |acc: &Option<Tensor>, x: Tensor| -> Result<Tensor> {
            Ok(match acc {
                Some(a) => (a + x)?,
                None => x,
            })
        };
        let mut mo = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(add(&self.cur_model_output, mul_s(model_output, sixth)?)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(add(&self.cur_model_output, mul_s(model_output, third)?)?);
            }
            _ => {
                mo = add(&self.cur_model_output, mul_s(model_output, sixth)?)?;
                self.cur_model_output = None;
            }
        }
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let ratio = self.num_train_timesteps / self.num_inference_steps;
        let (mut t, mut prev_t) = (t, t - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let mo = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            let m = mul_s(&(model_output + &e[0])?, 0.5)?;
            sample = self.cur_sample.take().unwrap_or(sample);
            m
        } else if k == 2 {
            mul_s(&(mul_s(&e[1], 3.0)? - &e[0])?, 0.5)?
        } else if k == 3 {
            let s = ((mul_s(&e[2], 23.0)? - mul_s(&e[1], 16.0)?)? + mul_s(&e[0], 5.0)?)?;
            div_s(&s, 12.0)?
        } else {
            let s = (((mul_s(&e[3], 55.0)? - mul_s(&e[2], 59.0)?)? + mul_s(&e[1], 37.0)?)?
                - mul_s(&e[0], 9.0)?)?;
            mul_s(&s, (1.0f64 / 24.0) as f32)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// PLMS repeats its second timestep (`[t0, t1, t1, t2, ...]`: the first step's two
    /// evaluations), so step `k > 0` begins at `k + 1`. Started there, the run is the one
    /// diffusers' img2img makes from `t_start = k + 1` (its warm-up step included). PRK steps
    /// keep `step` (diffusers' index).
    fn first_index_of_step(&self, step: usize) -> usize {
        match (self.skip_prk_steps, step) {
            (true, k) if k > 0 => k + 1,
            _ => step,
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        common::add_noise_alphas(
            &self.alphas_cumprod,
            &self.timesteps,
            original,
            noise,
            index,
        )
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps_i.len())?;
        let dtype = sample.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let t = self.timesteps_i[index];
        let out = if self.counter < self.prk_len && !self.skip_prk_steps {
            self.step_prk(&mo, t, &s)?
        } else {
            self.step_plms(&mo, t, &s)?
        };
        Ok(out.to_dtype(dtype)?)
    }
}
