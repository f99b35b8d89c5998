//! The scheduler names: each [`SchedulerKind`] the API takes, its update rule ([`Sampler`]) and
//! whether its sigmas are Karras'.

use super::*;

/// The update rule of a scheduler (diffusers' class, or A1111's sampler), whatever its sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    /// DPMSolverMultistep with `algorithm_type="sde-dpmsolver++"` (A1111's `DPM++ 2M SDE`).
    DpmPp2mSde,
    /// The same with `solver_type="heun"` (A1111's `DPM++ 2M SDE Heun`).
    DpmPp2mSdeHeun,
    /// [`Sampler::DpmPp2mSde`] with A1111's noise: Brownian trees seeded with the images' seeds
    /// (what A1111 gives k-diffusion's `sample_dpmpp_2m_sde`), not the generators' draws.
    DpmPp2mSdeBrownian,
    /// The same for [`Sampler::DpmPp2mSdeHeun`].
    DpmPp2mSdeHeunBrownian,
    /// DPMSolverSDEScheduler (A1111's `DPM++ SDE`): two UNet evaluations per step, Brownian-tree
    /// noise seeded per image.
    DpmPpSde,
    /// k-diffusion's `sample_dpmpp_2s_ancestral` (A1111's `DPM++ 2S a`): two UNet evaluations
    /// per step but the last, noise from the images' generators.
    DpmPp2sAncestral,
    /// k-diffusion's `sample_dpmpp_3m_sde` (A1111's `DPM++ 3M SDE`): Brownian-tree noise.
    DpmPp3mSde,
    Lms,
    UniPc,
    /// HeunDiscreteScheduler (second order: two UNet evaluations per step but the last).
    Heun,
    /// KDPM2DiscreteScheduler (second order).
    Dpm2,
    /// KDPM2AncestralDiscreteScheduler (second order, noise at every step).
    Dpm2Ancestral,
    /// k-diffusion's `sample_dpm_2` on A1111's sigmas, the next-to-last dropped (A1111's
    /// `DPM2`; [`Sampler::Dpm2`] is diffusers' class, which keeps it).
    Dpm2A1111,
    /// k-diffusion's `sample_dpm_2_ancestral` the same way (A1111's `DPM2 a`).
    Dpm2AncestralA1111,
    /// LCMScheduler (for LCM-distilled UNets and LCM-LoRAs).
    Lcm,
    /// A1111's own `DDIM` (`sd_samplers_timesteps_impl.ddim`, eta 0): its timesteps and img2img.
    DdimA1111,
    /// A1111's `DDIM CFG++` (`sd_samplers_timesteps_impl.ddim_cfgpp`): A1111's DDIM stepping
    /// back along the unconditional prediction, the guidance scale over 12.5.
    DdimCfgpp,
    /// A1111's own `PLMS` (`sd_samplers_timesteps_impl.plms`).
    PlmsA1111,
    /// A1111's own `UniPC` (`sd_samplers_timesteps_impl.unipc`: bh1, order 3).
    UniPcA1111,
    /// A1111's own `Restart` (`sd_samplers_extra.restart_sampler`): Heun steps with a restart
    /// from 20 steps.
    Restart,
    /// k-diffusion's `sample_dpm_fast` (A1111's `DPM fast`): DPM-Solver-Fast between A1111's
    /// ends, one UNet evaluation per step counted, noise from the images' generators.
    DpmFast,
    /// k-diffusion's `sample_dpm_adaptive` (A1111's `DPM adaptive`): DPM-Solver-23 with its
    /// error control; the evaluations are not the step count (three per try, as many tries as
    /// it takes).
    DpmAdaptive,
}

impl Sampler {
    /// UNet evaluations per step (the built scheduler's `order()`): 2 for the second-order
    /// samplers (A1111's `second_order`), which run it twice per step but the last.
    pub fn evaluations_per_step(self) -> usize {
        match self {
            Sampler::DpmPpSde
            | Sampler::DpmPp2sAncestral
            | Sampler::Heun
            | Sampler::Dpm2
            | Sampler::Dpm2Ancestral
            | Sampler::Dpm2A1111
            | Sampler::Dpm2AncestralA1111
            | Sampler::Restart => 2,
            _ => 1,
        }
    }
}

/// The scheduler names of the API: a [`Sampler`] with the training schedule's sigmas (or
/// timesteps) or, for the `_karras` names, Karras et al.'s sigmas (diffusers' `use_karras_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerKarras,
    EulerAncestral,
    EulerAncestralKarras,
    DpmPp2m,
    DpmPp2mKarras,
    DpmPp2mSde,
    DpmPp2mSdeKarras,
    DpmPp2mSdeHeun,
    DpmPp2mSdeHeunKarras,
    DpmPp2mSdeBrownian,
    DpmPp2mSdeBrownianKarras,
    DpmPp2mSdeHeunBrownian,
    DpmPp2mSdeHeunBrownianKarras,
    DpmPpSde,
    DpmPpSdeKarras,
    DpmPp2sAncestral,
    DpmPp2sAncestralKarras,
    DpmPp3mSde,
    DpmPp3mSdeKarras,
    Lms,
    LmsKarras,
    UniPc,
    UniPcKarras,
    Heun,
    HeunKarras,
    Dpm2,
    Dpm2Karras,
    Dpm2Ancestral,
    Dpm2AncestralKarras,
    Dpm2A1111,
    Dpm2AncestralA1111,
    Lcm,
    DdimA1111,
    DdimCfgpp,
    PlmsA1111,
    UniPcA1111,
    Restart,
    RestartKarras,
    DpmFast,
    DpmAdaptive,
}

/// Every kind, in the order of the API documentation: its API name, its sampler, and whether its
/// sigmas are Karras'.
const KINDS: [(SchedulerKind, &str, Sampler, bool); 43] = [
    (SchedulerKind::Pndm, "pndm", Sampler::Pndm, false),
    (SchedulerKind::Ddim, "ddim", Sampler::Ddim, false),
    (SchedulerKind::Euler, "euler", Sampler::Euler, false),
    (
        SchedulerKind::EulerKarras,
        "euler_karras",
        Sampler::Euler,
        true,
    ),
    (
        SchedulerKind::EulerAncestral,
        "euler_a",
        Sampler::EulerAncestral,
        false,
    ),
    (
        SchedulerKind::EulerAncestralKarras,
        "euler_a_karras",
        Sampler::EulerAncestral,
        true,
    ),
    (SchedulerKind::DpmPp2m, "dpmpp_2m", Sampler::DpmPp2m, false),
    (
        SchedulerKind::DpmPp2mKarras,
        "dpmpp_2m_karras",
        Sampler::DpmPp2m,
        true,
    ),
    (
        SchedulerKind::DpmPp2mSde,
        "dpmpp_2m_sde",
        Sampler::DpmPp2mSde,
        false,
    ),
    (
        SchedulerKind::DpmPp2mSdeKarras,
        "dpmpp_2m_sde_karras",
        Sampler::DpmPp2mSde,
        true,
    ),
    (
        SchedulerKind::DpmPp2mSdeHeun,
        "dpmpp_2m_sde_heun",
        Sampler::DpmPp2mSdeHeun,
        false,
    ),
    (
        SchedulerKind::DpmPp2mSdeHeunKarras,
        "dpmpp_2m_sde_heun_karras",
        Sampler::DpmPp2mSdeHeun,
        true,
    ),
    (
        SchedulerKind::DpmPp2mSdeBrownian,
        "dpmpp_2m_sde_brownian",
        Sampler::DpmPp2mSdeBrownian,
        false,
    ),
    (
        SchedulerKind::DpmPp2mSdeBrownianKarras,
        "dpmpp_2m_sde_brownian_karras",
        Sampler::DpmPp2mSdeBrownian,
        true,
    ),
    (
        SchedulerKind::DpmPp2mSdeHeunBrownian,
        "dpmpp_2m_sde_heun_brownian",
        Sampler::DpmPp2mSdeHeunBrownian,
        false,
    ),
    (
        SchedulerKind::DpmPp2mSdeHeunBrownianKarras,
        "dpmpp_2m_sde_heun_brownian_karras",
        Sampler::DpmPp2mSdeHeunBrownian,
        true,
    ),
    (
        SchedulerKind::DpmPpSde,
        "dpmpp_sde",
        Sampler::DpmPpSde,
        false,
    ),
    (
        SchedulerKind::DpmPpSdeKarras,
        "dpmpp_sde_karras",
        Sampler::DpmPpSde,
        true,
    ),
    (
        SchedulerKind::DpmPp2sAncestral,
        "dpmpp_2s_ancestral",
        Sampler::DpmPp2sAncestral,
        false,
    ),
    (
        SchedulerKind::DpmPp2sAncestralKarras,
        "dpmpp_2s_ancestral_karras",
        Sampler::DpmPp2sAncestral,
        true,
    ),
    (
        SchedulerKind::DpmPp3mSde,
        "dpmpp_3m_sde",
        Sampler::DpmPp3mSde,
        false,
    ),
    (
        SchedulerKind::DpmPp3mSdeKarras,
        "dpmpp_3m_sde_karras",
        Sampler::DpmPp3mSde,
        true,
    ),
    (SchedulerKind::Lms, "lms", Sampler::Lms, false),
    (SchedulerKind::LmsKarras, "lms_karras", Sampler::Lms, true),
    (SchedulerKind::UniPc, "unipc", Sampler::UniPc, false),
    (
        SchedulerKind::UniPcKarras,
        "unipc_karras",
        Sampler::UniPc,
        true,
    ),
    (SchedulerKind::Heun, "heun", Sampler::Heun, false),
    (
        SchedulerKind::HeunKarras,
        "heun_karras",
        Sampler::Heun,
        true,
    ),
    (SchedulerKind::Dpm2, "dpm2", Sampler::Dpm2, false),
    (
        SchedulerKind::Dpm2Karras,
        "dpm2_karras",
        Sampler::Dpm2,
        true,
    ),
    (
        SchedulerKind::Dpm2Ancestral,
        "dpm2_a",
        Sampler::Dpm2Ancestral,
        false,
    ),
    (
        SchedulerKind::Dpm2AncestralKarras,
        "dpm2_a_karras",
        Sampler::Dpm2Ancestral,
        true,
    ),
    (
        SchedulerKind::Dpm2A1111,
        "dpm2_a1111",
        Sampler::Dpm2A1111,
        false,
    ),
    (
        SchedulerKind::Dpm2AncestralA1111,
        "dpm2_a_a1111",
        Sampler::Dpm2AncestralA1111,
        false,
    ),
    (SchedulerKind::Lcm, "lcm", Sampler::Lcm, false),
    (
        SchedulerKind::DdimA1111,
        "ddim_a1111",
        Sampler::DdimA1111,
        false,
    ),
    (
        SchedulerKind::DdimCfgpp,
        "ddim_cfgpp",
        Sampler::DdimCfgpp,
        false,
    ),
    (
        SchedulerKind::PlmsA1111,
        "plms_a1111",
        Sampler::PlmsA1111,
        false,
    ),
    (
        SchedulerKind::UniPcA1111,
        "unipc_a1111",
        Sampler::UniPcA1111,
        false,
    ),
    (SchedulerKind::Restart, "restart", Sampler::Restart, false),
    (
        SchedulerKind::RestartKarras,
        "restart_karras",
        Sampler::Restart,
        true,
    ),
    (SchedulerKind::DpmFast, "dpm_fast", Sampler::DpmFast, false),
    (
        SchedulerKind::DpmAdaptive,
        "dpm_adaptive",
        Sampler::DpmAdaptive,
        false,
    ),
];

const fn all_kinds() -> [SchedulerKind; KINDS.len()] {
    let mut out = [SchedulerKind::Pndm; KINDS.len()];
    let mut i = 0;
    while i < KINDS.len() {
        out[i] = KINDS[i].0;
        i += 1;
    }
    out
}

impl SchedulerKind {
    /// Every kind, in the order of the API documentation.
    pub const ALL: [SchedulerKind; KINDS.len()] = all_kinds();

    fn entry(self) -> &'static (SchedulerKind, &'static str, Sampler, bool) {
        KINDS
            .iter()
            .find(|e| e.0 == self)
            .expect("every kind is in KINDS")
    }

    /// The API name (`"euler_a"`, ...); `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        KINDS.iter().find(|e| e.1 == name).map(|e| e.0)
    }

    /// The API name.
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// The update rule.
    pub fn sampler(self) -> Sampler {
        self.entry().2
    }

    /// The default of the sampler's eta ([`Scheduler::eta`]): 0 for DDIM, 1 for the ancestral
    /// and SDE samplers (k-diffusion's, whose eta 1 is diffusers' class); `None` for the
    /// samplers without one.
    pub fn eta_default(self) -> Option<f64> {
        match self.sampler() {
            Sampler::Ddim | Sampler::DdimA1111 | Sampler::DdimCfgpp => Some(0.0),
            Sampler::EulerAncestral
            | Sampler::Dpm2Ancestral
            | Sampler::Dpm2AncestralA1111
            | Sampler::DpmPpSde
            | Sampler::DpmPp2mSde
            | Sampler::DpmPp2mSdeHeun
            | Sampler::DpmPp2mSdeBrownian
            | Sampler::DpmPp2mSdeHeunBrownian
            | Sampler::DpmPp2sAncestral
            | Sampler::DpmPp3mSde
            | Sampler::DpmFast
            | Sampler::DpmAdaptive => Some(1.0),
            _ => None,
        }
    }

    /// Whether the sampler takes k-diffusion's churn ([`Churn`]): Euler, Heun and DPM2, the
    /// three A1111 passes it to (its `sampler_extra_params`).
    pub fn takes_churn(self) -> bool {
        matches!(
            self.sampler(),
            Sampler::Euler | Sampler::Heun | Sampler::Dpm2 | Sampler::Dpm2A1111
        )
    }

    /// Whether the sigmas are Karras' (the `_karras` names).
    pub fn karras(self) -> bool {
        self.entry().3
    }

    /// The kind of `sampler` with Karras sigmas or not; `None` where the sampler has no
    /// Karras form (PNDM, DDIM: diffusers' classes have no `use_karras_sigmas`).
    pub fn of(sampler: Sampler, karras: bool) -> Option<Self> {
        KINDS
            .iter()
            .find(|e| e.2 == sampler && e.3 == karras)
            .map(|e| e.0)
    }

    /// The config this kind is built from, on its own schedule ([`Self::schedule`]).
    pub fn config(self, cfg: &SchedulerConfig) -> SchedulerConfig {
        self.config_with(self.schedule(), cfg)
            .expect("a name runs on its own schedule")
    }

    /// The model's own scheduler, from `_class_name` of its `scheduler_config.json` (and its
    /// `use_karras_sigmas` and `algorithm_type` where the class reads them).
    pub fn default_for(cfg: &SchedulerConfig) -> Result<Self> {
        let class = cfg.class_name.as_deref().ok_or_else(|| {
            common::config_error("no _class_name to choose the default scheduler")
        })?;
        let sampler = match class {
            "PNDMScheduler" => Sampler::Pndm,
            "DDIMScheduler" => Sampler::Ddim,
            "EulerDiscreteScheduler" => Sampler::Euler,
            "EulerAncestralDiscreteScheduler" => Sampler::EulerAncestral,
            "DPMSolverMultistepScheduler" if is_sde(cfg) => Sampler::DpmPp2mSde,
            "DPMSolverMultistepScheduler" => Sampler::DpmPp2m,
            "DPMSolverSDEScheduler" => Sampler::DpmPpSde,
            "LMSDiscreteScheduler" => Sampler::Lms,
            "UniPCMultistepScheduler" => Sampler::UniPc,
            "HeunDiscreteScheduler" => Sampler::Heun,
            "KDPM2DiscreteScheduler" => Sampler::Dpm2,
            "KDPM2AncestralDiscreteScheduler" => Sampler::Dpm2Ancestral,
            "LCMScheduler" => Sampler::Lcm,
            other => {
                return Err(common::config_error(format!(
                    "unsupported scheduler class {other:?}"
                )))
            }
        };
        // diffusers' EulerAncestralDiscreteScheduler has no `use_karras_sigmas`: it ignores the key.
        let karras = cfg.use_karras_sigmas == Some(true) && sampler != Sampler::EulerAncestral;
        Ok(Self::of(sampler, karras).unwrap_or(Self::of(sampler, false).expect("plain kind")))
    }

    /// Same as [`Self::default_for`] (the name docs/ARCHITECTURE.md uses).
    pub fn from_class_name(cfg: &SchedulerConfig) -> Result<Self> {
        Self::default_for(cfg)
    }
}

/// Whether the file's DPM-Solver `algorithm_type` is a stochastic (`sde-`) one.
pub(crate) fn is_sde(cfg: &SchedulerConfig) -> bool {
    cfg.algorithm_type
        .as_deref()
        .is_some_and(|a| a.starts_with("sde-"))
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!(
                "unknown scheduler {s:?}; expected one of {}",
                names.join(", ")
            )
        })
    }
}
