//! `UniPCMultistepScheduler` of diffusers 0.42.1: the UniP predictor with the UniC corrector
//! applied at every step after the first (B(h) variants bh1/bh2).
//!
//! Scalars follow torch's 0-d float32 arithmetic; tensors are computed in f32 and handed back in
//! the model output's dtype.

use candle_core::Tensor;

use super::common::{self, config_error, div_s as div, mul_s as mul, PredictionType};
use super::multistep::{
    add_noise_alpha_sigma, alpha_sigma, convert_model_output, current_step_index, final_sigma_zero,
    lambda, newest_output, Family, MultistepSchedule,
};
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    /// `B(h) = h`.
    Bh1,
    /// `B(h) = e^h - 1`.
    Bh2,
}

/// `UniPCMultistepScheduler.from_config(cfg)` after `set_timesteps(n)`.
pub struct UniPcMultistep {
    timesteps: Vec<f64>,
    /// `n + 1` float32 sigmas, the final one appended.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    predict_x0: bool,
    solver_type: SolverType,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The last `solver_order` converted model outputs, oldest first (f32).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The sample the last predictor started from (the corrector restarts from it).
    last_sample: Option<Tensor>,
    /// The order the last predictor used; the corrector uses the same.
    this_order: usize,
    step_index: Option<usize>,
}

impl UniPcMultistep {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => SolverType::Bh1,
            // diffusers maps DPM-Solver's solver types onto bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
            other => return Err(config_error(format!("unsupported solver_type {other:?}"))),
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if solver_order == 0 {
            return Err(config_error("solver_order must be at least 1"));
        }
        if cfg.thresholding == Some(true) {
            return Err(config_error("thresholding is not supported"));
        }
        let final_sigma_zero = final_sigma_zero(cfg)?;
        let predict_x0 = cfg.predict_x0.unwrap_or(true);
        if !predict_x0 && final_sigma_zero {
            // The noise-prediction form's last step is 0 * inf there: diffusers returns NaN.
            return Err(config_error(
                "predict_x0 false needs final_sigmas_type \"sigma_min\"",
            ));
        }
        let schedule = MultistepSchedule::new(
            cfg,
            num_inference_steps,
            SigmaSchedule::of_config(cfg)?,
            final_sigma_zero,
            Family::UniPc,
        )?;
        Ok(Self {
            timesteps: schedule.timesteps,
            sigmas: schedule.sigmas,
            prediction: schedule.prediction,
            predict_x0,
            solver_type,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
            step_index: None,
        })
    }

    /// The float32 sigmas, `timesteps().len() + 1` of them.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `convert_model_output`: x0 (predict_x0) or epsilon.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        convert_model_output(
            model_output,
            sample,
            self.sigmas[i],
            self.predict_x0,
            self.prediction,
        )
    }

    /// The `k`-th newest stored model output (1 = newest).
    fn output(&self, k: usize) -> Result<&Tensor> {
        newest_output(&self.model_outputs, k)
    }

    /// The shared part of UniP and UniC from sigma index `s0` to `t`: `h`, `rks`, the coefficient
    /// vector `b`, and the scalars `hh`, `h_phi_1`, `B(h)`. `hist` gives the sigma index of the
    /// `k`-th older model output (k = 1..order).
    fn coefficients(
        &self,
        t: usize,
        s0: usize,
        order: usize,
        hist: impl Fn(usize) -> usize,
    ) -> Coeffs {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = (1..order)
            .map(|k| {
                let (a, s) = alpha_sigma(self.sigmas[hist(k)]);
                (lambda(a, s) - lambda_s0) / h
            })
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut b = Vec::with_capacity(order);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: u64 = 1;
        for i in 1..=order {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            // torch: 0-d f32 tensor minus a Python float, computed in f32.
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Coeffs {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            rks,
            b,
            h_phi_1,
            b_h,
        }
    }

    /// `x_t_`: the first-order part shared by predictor and corrector.
    fn base_update(&self, c: &Coeffs, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        Ok(if self.predict_x0 {
            (mul(x, c.sigma_t / c.sigma_s0)? - mul(m0, c.alpha_t * c.h_phi_1)?)?
        } else {
            (mul(x, c.alpha_t / c.alpha_s0)? - mul(m0, c.sigma_t * c.h_phi_1)?)?
        })
    }

    /// `alpha_t * B(h)` (x0 form) or `sigma_t * B(h)`: the factor of the higher-order terms.
    fn res_factor(&self, c: &Coeffs) -> f32 {
        if self.predict_x0 {
            c.alpha_t * c.b_h
        } else {
            c.sigma_t * c.b_h
        }
    }

    /// `multistep_uni_p_bh_update` from sigma index `i` to `i + 1`.
    fn predictor(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let c = self.coefficients(i + 1, i, order, |k| i - k);
        let m0 = self.output(1)?;
        let x_t = self.base_update(&c, x, m0)?;
        if order == 1 {
            // pred_res is the Python int 0: `x_t_ - alpha_t * B_h * 0` leaves x_t_ as is. (With
            // bh1 and a zero final sigma, B_h = -inf there and diffusers ends in NaN; we do not.)
            return Ok(x_t);
        }
        let d1s = self.differences(&c.rks, m0)?;
        let rhos_p = if order == 2 {
            vec![0.5f32]
        } else {
            let k = order - 1;
            let r: Vec<Vec<f32>> = (0..k)
                .map(|row| c.rks[..k].iter().map(|&v| powi(v, row)).collect())
                .collect();
            solve(r, c.b[..k].to_vec())?
        };
        let pred_res = weighted_sum(&rhos_p, &d1s)?;
        Ok((x_t - mul(&pred_res, self.res_factor(&c))?)?)
    }

    /// `multistep_uni_c_bh_update`: corrects `this_sample` (at sigma index `i`) using the model
    /// output there, restarting from `last_sample` at `i - 1`.
    fn corrector(
        &self,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let c = self.coefficients(i, i - 1, order, |k| i - (k + 1));
        let m0 = self.output(1)?;
        let x_t = self.base_update(&c, last_sample, m0)?;
        let d1s = self.differences(&c.rks, m0)?;
        let rhos_c = if order == 1 {
            vec![0.5f32]
        } else {
            let r: Vec<Vec<f32>> = (0..order)
                .map(|row| c.rks.iter().map(|&v| powi(v, row)).collect())
                .collect();
            solve(r, c.b.clone())?
        };
        let d1_t = (this_model_output - m0)?;
        let last = mul(&d1_t, rhos_c[order - 1])?;
        // corr_res is the Python int 0 when there are no differences: `0 + t` is t.
        let total = if d1s.is_empty() {
            last
        } else {
            (weighted_sum(&rhos_c[..order - 1], &d1s)? + last)?
        };
        Ok((x_t - mul(&total, self.res_factor(&c))?)?)
    }

    /// `D1s`: `(m_k - m0) / r_k` for the older outputs k = 1..order-1.
    fn differences(&self, rks: &[f32], m0: &Tensor) -> Result<Vec<Tensor>> {
        (1..rks.len())
            .map(|k| div(&(self.output(k + 1)? - m0)?, rks[k - 1]))
            .collect()
    }
}

struct Coeffs {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    /// `r_k` for the older outputs, then 1.
    rks: Vec<f32>,
    b: Vec<f32>,
    h_phi_1: f32,
    b_h: f32,
}

/// `torch.pow(x, n)` for the small integer powers of `R`.
fn powi(x: f32, n: usize) -> f32 {
    match n {
        0 => 1.0,
        1 => x,
        2 => x * x,
        _ => x.powi(n as i32),
    }
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: `sum_k rhos[k] * D1s[k]`, in order.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut acc = mul(&d1s[0], rhos[0])?;
    for (r, d) in rhos.iter().zip(d1s).skip(1) {
        acc = (acc + mul(d, *r)?)?;
    }
    Ok(acc)
}

/// `torch.linalg.solve(R, b)` in float32: LU with partial pivoting (LAPACK's gesv). The
/// multipliers use the pivot's reciprocal and the substitutions fused multiply-adds, which
/// reproduces torch 2.11's CPU results bit for bit on 2x2 systems (UniPC order 2), and to an ulp
/// on larger ones.
pub(super) fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        // The first row with the largest magnitude, as isamax.
        let piv = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()).then(y.cmp(&x)))
            .expect("non-empty");
        if a[piv][col] == 0.0 {
            return Err(PipelineError::InvalidRequest(
                "UniPC coefficient system is singular".into(),
            ));
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let inv = 1.0 / a[col][col];
        let (top, below) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (r, row) in below.iter_mut().enumerate() {
            let l = row[col] * inv;
            for (v, p) in row[col + 1..].iter_mut().zip(&pivot_row[col + 1..]) {
                *v = (-l).mul_add(*p, *v);
            }
            b[col + 1 + r] = (-l).mul_add(b[col], b[col + 1 + r]);
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let mut s = b[row];
        for k in row + 1..n {
            s = (-a[row][k]).mul_add(x[k], s);
        }
        x[row] = s * (1.0 / a[row][row]);
    }
    Ok(x)
}

impl Scheduler for UniPcMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.step_index = Some(begin);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_alpha_sigma(&self.sigmas, &self.timesteps, original, noise, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let i = current_step_index(self.step_index, &self.timesteps, index)?;
        let out_dtype = model_output.dtype();
        let model_output = common::to_f32(model_output)?;
        let mut sample = common::to_f32(sample)?;

        // The conversion sees the sample before correction, as in diffusers.
        let converted = self.convert_model_output(&model_output, &sample, i)?;
        if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = &self.last_sample {
                sample = self.corrector(&converted, last, i, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("solver_order >= 1") = Some(converted);

        let order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        // Warm-up: no more history than steps taken.
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_pivots_and_solves() {
        // |r| > 1 forces a row swap; the solution is checked by substitution.
        let r = vec![vec![1.0f32, 1.0], vec![-1.5, 1.0]];
        let b = vec![0.25f32, 0.75];
        let x = solve(r.clone(), b.clone()).unwrap();
        for (row, rhs) in r.iter().zip(&b) {
            let lhs: f32 = row.iter().zip(&x).map(|(a, v)| a * v).sum();
            assert!((lhs - rhs).abs() < 1e-6, "{lhs} vs {rhs}");
        }
        assert!(solve(vec![vec![0.0, 0.0], vec![0.0, 0.0]], vec![1.0, 1.0]).is_err());
    }
}
