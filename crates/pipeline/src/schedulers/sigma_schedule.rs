//! The sigma schedules a sampler can run on: the training schedule's own (uniform) sigmas, or
//! diffusers' `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas` (A1111's schedule
//! types Karras, Exponential and Beta), with the `_convert_to_*` functions of diffusers 0.42.1.

use super::common::{self, config_error};
use super::kind::is_sde;
use super::{Sampler, SchedulerConfig, SchedulerKind};
use crate::Result;

/// Which sigmas a sampler steps through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigmaSchedule {
    /// The training schedule's sigmas at the spaced timesteps (no conversion).
    Uniform,
    /// Karras et al. (2022), rho = 7.
    Karras,
    /// Evenly spaced in log sigma (k-diffusion's `get_sigmas_exponential`).
    Exponential,
    /// Quantiles of Beta(0.6, 0.6) ("Beta Sampling is All You Need", Lee et al. 2024).
    Beta,
}

/// diffusers' `_convert_to_beta` defaults; its classes never pass others (nor read config keys
/// for them).
const BETA_ALPHA: f64 = 0.6;
const BETA_BETA: f64 = 0.6;

impl SigmaSchedule {
    /// Every schedule, in the order of the API documentation.
    pub const ALL: [SigmaSchedule; 4] =
        [Self::Uniform, Self::Karras, Self::Exponential, Self::Beta];

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::Beta => "beta",
        }
    }

    /// The schedule of an API name; `None` for an unknown one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The schedule a config's `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`
    /// ask for; more than one is an error, as in diffusers' `__init__`.
    pub fn of_config(cfg: &SchedulerConfig) -> Result<Self> {
        let on: Vec<(&str, Self)> = [
            ("use_karras_sigmas", cfg.use_karras_sigmas, Self::Karras),
            (
                "use_exponential_sigmas",
                cfg.use_exponential_sigmas,
                Self::Exponential,
            ),
            ("use_beta_sigmas", cfg.use_beta_sigmas, Self::Beta),
        ]
        .into_iter()
        .filter(|(_, flag, _)| *flag == Some(true))
        .map(|(key, _, s)| (key, s))
        .collect();
        match on.as_slice() {
            [] => Ok(Self::Uniform),
            [(_, s)] => Ok(*s),
            _ => Err(config_error(format!(
                "only one of {} can be true",
                on.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Sets the three keys of `cfg` to ask for this schedule (`from_config(cfg, **overrides)`).
    pub fn set_in(self, cfg: &mut SchedulerConfig) {
        cfg.use_karras_sigmas = Some(self == Self::Karras);
        cfg.use_exponential_sigmas = Some(self == Self::Exponential);
        cfg.use_beta_sigmas = Some(self == Self::Beta);
    }

    /// `_convert_to_exponential` / `_convert_to_beta` of every class that has them: `n` float64
    /// sigmas from `sigma_max` down to `sigma_min`, where the config's `sigma_min` / `sigma_max`
    /// win over the given ends (the functions read `self.config`'s keys whenever it has them, and a
    /// key the file carries is there even in classes that do not declare it). Karras sigmas differ
    /// class by class in that respect, so the classes call [`common::karras_sigmas`] themselves;
    /// `Uniform` and `Karras` are not conversions here (`None`).
    pub(crate) fn convert(
        self,
        cfg: &SchedulerConfig,
        in_min: f64,
        in_max: f64,
        n: usize,
    ) -> Option<Vec<f64>> {
        let sigma_min = cfg.sigma_min.unwrap_or(in_min);
        let sigma_max = cfg.sigma_max.unwrap_or(in_max);
        match self {
            Self::Uniform | Self::Karras => None,
            Self::Exponential => Some(exponential_sigmas(sigma_min, sigma_max, n)),
            Self::Beta => Some(beta_sigmas(sigma_min, sigma_max, n)),
        }
    }
}

impl Sampler {
    /// The sigma schedules this sampler runs on: all four where diffusers' class has
    /// `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas`; Euler ancestral also
    /// on Karras sigmas (A1111's `Euler a` + `Karras`; diffusers' class has none of the keys);
    /// PNDM, DDIM and LCM only on their own timesteps.
    pub fn schedules(self) -> &'static [SigmaSchedule] {
        match self {
            Sampler::Pndm
            | Sampler::Ddim
            | Sampler::Lcm
            | Sampler::DdimA1111
            | Sampler::DdimCfgpp
            | Sampler::PlmsA1111
            | Sampler::UniPcA1111 => &[SigmaSchedule::Uniform],
            Sampler::EulerAncestral => &[SigmaSchedule::Uniform, SigmaSchedule::Karras],
            _ => &SigmaSchedule::ALL,
        }
    }

    /// Whether diffusers' class reads the three schedule keys of its config.
    pub(crate) fn reads_schedule_keys(self) -> bool {
        self.schedules().len() == SigmaSchedule::ALL.len()
    }
}

/// A scheduler name on a sigma schedule.
impl SchedulerKind {
    /// The sigma schedule of the name alone: Karras for the `_karras` names, else uniform.
    pub fn schedule(self) -> SigmaSchedule {
        if self.karras() {
            SigmaSchedule::Karras
        } else {
            SigmaSchedule::Uniform
        }
    }

    /// Whether this name runs on `schedule`: one its sampler has, and for a `_karras` name only
    /// Karras (`euler` + `karras` is `euler_karras`). The error says why not, for a person.
    pub fn check_schedule(self, schedule: SigmaSchedule) -> std::result::Result<(), String> {
        if self.karras() && schedule != SigmaSchedule::Karras {
            return Err(format!(
                "scheduler {self} already has Karras sigmas; use {} with schedule {schedule}",
                Self::of(self.sampler(), false).map_or("another scheduler", |k| k.name())
            ));
        }
        let allowed = self.sampler().schedules();
        if !allowed.contains(&schedule) {
            let names: Vec<&str> = allowed.iter().map(|s| s.name()).collect();
            return Err(format!(
                "scheduler {self} does not run on {schedule} sigmas; it has {}",
                names.join(", ")
            ));
        }
        Ok(())
    }

    /// The config this kind is built from on `schedule`: the model's `scheduler_config.json` with
    /// the keys the name and schedule decide set, as `Class.from_config(cfg, **overrides)`
    /// (tools/api_schedulers.py): `use_karras_sigmas`, `use_exponential_sigmas` and
    /// `use_beta_sigmas` for every sampler whose class has them, so `euler` is uniform even when the
    /// model's file asks for other sigmas, and DPM-Solver's `algorithm_type` (and `solver_type`
    /// heun for the `_heun` names). Errors where the name does not run on `schedule`
    /// ([`Self::check_schedule`]).
    pub fn config_with(
        self,
        schedule: SigmaSchedule,
        cfg: &SchedulerConfig,
    ) -> Result<SchedulerConfig> {
        self.check_schedule(schedule)
            .map_err(common::config_error)?;
        let mut cfg = cfg.clone();
        if self.sampler().reads_schedule_keys() {
            schedule.set_in(&mut cfg);
        } else if Self::of(self.sampler(), true).is_some() {
            // Euler ancestral: our Karras form reads the key; its class has none of the three.
            cfg.use_karras_sigmas = Some(schedule == SigmaSchedule::Karras);
            cfg.use_exponential_sigmas = None;
            cfg.use_beta_sigmas = None;
        }
        let stochastic = is_sde(&cfg);
        match self.sampler() {
            // The deterministic solver: the file's own choice unless it is a stochastic one.
            Sampler::DpmPp2m if stochastic => cfg.algorithm_type = Some("dpmsolver++".into()),
            Sampler::DpmPp2mSde | Sampler::DpmPp2mSdeBrownian => {
                cfg.algorithm_type = Some("sde-dpmsolver++".into())
            }
            Sampler::DpmPp2mSdeHeun | Sampler::DpmPp2mSdeHeunBrownian => {
                cfg.algorithm_type = Some("sde-dpmsolver++".into());
                cfg.solver_type = Some("heun".into());
            }
            _ => {}
        }
        Ok(cfg)
    }

    /// The sigma schedule of the model's own scheduler (see [`Self::default_for`]): what the
    /// file's `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` ask for where the
    /// class reads them (more than one is an error naming them, as diffusers refuses the file),
    /// else uniform.
    pub fn default_schedule_for(cfg: &SchedulerConfig) -> Result<SigmaSchedule> {
        let kind = Self::default_for(cfg)?;
        if kind.sampler().reads_schedule_keys() {
            SigmaSchedule::of_config(cfg)
        } else {
            Ok(kind.schedule())
        }
    }
}

impl std::fmt::Display for SigmaSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    common::np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `sigma_min + ppf * (sigma_max - sigma_min)` for `ppf = scipy.stats.beta.ppf(t, 0.6, 0.6)` at
/// `t` in `1 - np.linspace(0, 1, n)`.
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    common::np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|x| sigma_min + beta_ppf(1.0 - x, BETA_ALPHA, BETA_BETA) * (sigma_max - sigma_min))
        .collect()
}

/// The quantile function of Beta(a, b): the `x` with `I_x(a, b) = p`, by bisection on the
/// regularised incomplete beta function (monotone in `x`) down to adjacent doubles.
pub fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if regularized_incomplete_beta(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// `I_x(a, b)`, by the continued fraction (modified Lentz) on whichever side converges fast.
pub fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_continued_fraction(1.0 - x, b, a) / b
    }
}

fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, &c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in SigmaSchedule::ALL {
            assert_eq!(SigmaSchedule::from_name(s.name()), Some(s));
        }
        assert_eq!(SigmaSchedule::from_name("Karras"), None);
    }

    #[test]
    fn one_schedule_per_config() {
        let mut cfg = SchedulerConfig::default();
        assert_eq!(
            SigmaSchedule::of_config(&cfg).unwrap(),
            SigmaSchedule::Uniform
        );
        for s in SigmaSchedule::ALL {
            s.set_in(&mut cfg);
            assert_eq!(SigmaSchedule::of_config(&cfg).unwrap(), s);
        }
        cfg.use_karras_sigmas = Some(true);
        let err = SigmaSchedule::of_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("use_karras_sigmas") && err.contains("use_beta_sigmas"),
            "{err}"
        );
    }

    #[test]
    fn ln_gamma_at_known_points() {
        // Γ(1) = Γ(2) = 1, Γ(1/2) = √π, Γ(5) = 24.
        assert!(ln_gamma(1.0).abs() < 1e-14);
        assert!(ln_gamma(2.0).abs() < 1e-14);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
    }

    #[test]
    fn incomplete_beta_closed_forms() {
        // I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1/2, 1/2) = (2/π) asin(√x); symmetry at 1/2.
        for x in [0.01, 0.3, 0.5, 0.77, 0.999] {
            assert!((regularized_incomplete_beta(x, 1.0, 1.0) - x).abs() < 1e-14);
            assert!((regularized_incomplete_beta(x, 0.6, 1.0) - x.powf(0.6)).abs() < 1e-14);
            let arcsine = 2.0 / std::f64::consts::PI * x.sqrt().asin();
            assert!((regularized_incomplete_beta(x, 0.5, 0.5) - arcsine).abs() < 1e-14);
        }
        assert!((regularized_incomplete_beta(0.5, 0.6, 0.6) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn ppf_inverts_the_cdf() {
        // The ppf is the double whose neighbours' CDFs bracket p (near 1 the CDF moves by
        // ~1e-12 between adjacent doubles, so no closer match exists there).
        let next =
            |x: f64, up: bool| f64::from_bits(if up { x.to_bits() + 1 } else { x.to_bits() - 1 });
        for p in [1e-9, 0.001, 0.25, 0.5, 0.9, 0.999_999] {
            let x = beta_ppf(p, 0.6, 0.6);
            let cdf = |x| regularized_incomplete_beta(x, 0.6, 0.6);
            assert!(cdf(next(x, false)) <= p && p <= cdf(next(x, true)), "{p}");
            assert!((cdf(x) - p).abs() < 1e-11, "{p}");
        }
        assert_eq!(beta_ppf(0.0, 0.6, 0.6), 0.0);
        assert_eq!(beta_ppf(1.0, 0.6, 0.6), 1.0);
    }

    #[test]
    fn ends_are_sigma_max_and_sigma_min() {
        for s in [
            exponential_sigmas(0.03, 14.6, 5),
            beta_sigmas(0.03, 14.6, 5),
        ] {
            assert!(
                (s[0] - 14.6).abs() < 1e-12 && (s[4] - 0.03).abs() < 1e-12,
                "{s:?}"
            );
            assert!(s.windows(2).all(|w| w[0] > w[1]), "{s:?}");
        }
        assert_eq!(exponential_sigmas(0.03, 14.6, 1).len(), 1);
    }
}
