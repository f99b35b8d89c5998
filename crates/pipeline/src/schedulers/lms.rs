//! `LMSDiscreteScheduler`: linear multistep of order 4 in sigma, with coefficients from
//! integrating the Lagrange basis polynomials over each step (diffusers uses `scipy.integrate.quad`;
//! the integrand is a polynomial of degree < 4, which 4-point Gauss-Legendre integrates exactly).

use candle_core::Tensor;

use super::common::{div_s, mul_s};
use super::euler::{sigma_scheduler_methods, SigmaBase, SigmaOptions};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

/// The `order` argument of diffusers' `step` (the pipeline never changes it).
const ORDER: usize = 4;

pub struct LmsDiscrete {
    base: SigmaBase,
    /// The last `ORDER` derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl LmsDiscrete {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            euler_options: false,
            karras: true,
            exponential_beta: true,
        };
        Ok(Self {
            base: SigmaBase::new(cfg, num_inference_steps, opts)?,
            derivatives: Vec::new(),
        })
    }

    /// The float32 sigmas (one per timestep plus the final zero).
    pub fn sigmas(&self) -> &[f32] {
        &self.base.sched.sigmas
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral over [sigma_t, sigma_{t+1}] of
    /// the Lagrange basis polynomial of node `t - current_order` on nodes `t, t-1, .., t-order+1`.
    pub fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = |i: usize| self.base.sched.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current_order)
                .map(|k| (tau - s(t - k)) / (s(t - current_order) - s(t - k)))
                .product::<f64>()
        };
        gauss_legendre4(basis, s(t), s(t + 1))
    }
}

/// Integral of `f` over [a, b] by 4-point Gauss-Legendre (exact for polynomials of degree <= 7).
fn gauss_legendre4(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const NODES: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const WEIGHTS: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    half * NODES
        .iter()
        .zip(WEIGHTS)
        .map(|(x, w)| w * f(mid + half * x))
        .sum::<f64>()
}

impl Scheduler for LmsDiscrete {
    sigma_scheduler_methods!();

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let dtype = sample.dtype();
        let (s, sigma, x0) = self.base.step_start(model_output, sample, index)?;
        self.derivatives.push(div_s(&(&s - x0)?, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        // Python's sum(coeff * derivative for ... zip(coeffs, reversed(derivatives))), left to right.
        let mut acc: Option<Tensor> = None;
        for (c, d) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = mul_s(d, self.lms_coefficient(order, index, c) as f32)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        let prev = match acc {
            Some(a) => (&s + a)?,
            None => s,
        };
        Ok(prev.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_is_exact_for_cubics() {
        let f = |x: f64| 2.0 * x * x * x - x + 3.0;
        // Antiderivative x^4/2 - x^2/2 + 3x from -1 to 2.
        let exact = (8.0 - 2.0 + 6.0) - (0.5 - 0.5 - 3.0);
        assert!((gauss_legendre4(f, -1.0, 2.0) - exact).abs() < 1e-12);
    }
}
