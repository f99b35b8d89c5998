//! AUTOMATIC1111's samplers and schedules: which of our schedulers each name means, and how a
//! request's `sampler_name`/`scheduler` pair resolves (re-exported from `translate`).

use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};

use super::translate::SAMPLER_DEFAULT;
use crate::error::ApiError;

/// One A1111 sampler: its name, the aliases A1111 also accepts, and our scheduler for its
/// `Uniform` (and `Exponential`, `Beta`: the same scheduler on those sigmas) and `Karras`
/// schedules.
pub struct Sampler {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub uniform: SchedulerKind,
    pub karras: Option<SchedulerKind>,
    /// The schedule `automatic` means for this sampler (A1111 1.9's `options.scheduler`;
    /// uniform where it has none).
    pub automatic: SigmaSchedule,
}

pub const SAMPLERS: [Sampler; 20] = [
    Sampler {
        name: "Euler a",
        aliases: &["k_euler_a", "k_euler_ancestral"],
        uniform: SchedulerKind::EulerAncestral,
        karras: Some(SchedulerKind::EulerAncestralKarras),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "Euler",
        aliases: &["k_euler"],
        uniform: SchedulerKind::Euler,
        karras: Some(SchedulerKind::EulerKarras),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "DPM++ 2M",
        aliases: &["k_dpmpp_2m"],
        uniform: SchedulerKind::DpmPp2m,
        karras: Some(SchedulerKind::DpmPp2mKarras),
        automatic: SigmaSchedule::Karras,
    },
    Sampler {
        name: "DPM++ 2M SDE",
        aliases: &["k_dpmpp_2m_sde"],
        // A1111's noise for it: Brownian trees seeded with the images' seeds (its
        // `brownian_noise` option), not diffusers' generator draws (`dpmpp_2m_sde`).
        uniform: SchedulerKind::DpmPp2mSdeBrownian,
        karras: Some(SchedulerKind::DpmPp2mSdeBrownianKarras),
        // A1111 1.9+ lists it with `scheduler: exponential`.
        automatic: SigmaSchedule::Exponential,
    },
    Sampler {
        name: "DPM++ 2M SDE Heun",
        aliases: &["k_dpmpp_2m_sde_heun"],
        uniform: SchedulerKind::DpmPp2mSdeHeunBrownian,
        karras: Some(SchedulerKind::DpmPp2mSdeHeunBrownianKarras),
        // k-diffusion's sample_dpmpp_2m_sde with `solver_type: heun`; exponential as above.
        automatic: SigmaSchedule::Exponential,
    },
    Sampler {
        name: "DPM++ SDE",
        aliases: &["k_dpmpp_sde"],
        uniform: SchedulerKind::DpmPpSde,
        karras: Some(SchedulerKind::DpmPpSdeKarras),
        // A1111 lists it with `scheduler: karras`: its automatic schedule is Karras'.
        automatic: SigmaSchedule::Karras,
    },
    Sampler {
        name: "DDIM",
        aliases: &["ddim"],
        uniform: SchedulerKind::DdimA1111,
        karras: None,
        automatic: SigmaSchedule::Uniform,
    },
    // A1111's DDIM stepping back along the negative prompt's prediction (CFG++), the scale
    // over 12.5; a timesteps sampler, no schedule choice.
    Sampler {
        name: "DDIM CFG++",
        aliases: &["ddim_cfgpp"],
        uniform: SchedulerKind::DdimCfgpp,
        karras: None,
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "PLMS",
        aliases: &["plms"],
        uniform: SchedulerKind::PlmsA1111,
        karras: None,
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "LMS",
        aliases: &["k_lms"],
        uniform: SchedulerKind::Lms,
        karras: Some(SchedulerKind::LmsKarras),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "UniPC",
        aliases: &["unipc"],
        // A1111's own (bh1, order 3; a timesteps sampler without a schedule choice), not
        // diffusers' UniPCMultistep (`unipc`).
        uniform: SchedulerKind::UniPcA1111,
        karras: None,
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "Heun",
        aliases: &["k_heun"],
        uniform: SchedulerKind::Heun,
        karras: Some(SchedulerKind::HeunKarras),
        automatic: SigmaSchedule::Uniform,
    },
    // k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral on A1111's schedule of steps + 1
    // with the next-to-last sigma dropped (`discard_next_to_last_sigma`); one name runs on every
    // schedule. diffusers' KDPM2 classes (`dpm2`, `dpm2_a`) keep that sigma.
    Sampler {
        name: "DPM2",
        aliases: &["k_dpm_2"],
        uniform: SchedulerKind::Dpm2A1111,
        karras: Some(SchedulerKind::Dpm2A1111),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "DPM2 a",
        aliases: &["k_dpm_2_a"],
        uniform: SchedulerKind::Dpm2AncestralA1111,
        karras: Some(SchedulerKind::Dpm2AncestralA1111),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "Restart",
        aliases: &["restart"],
        uniform: SchedulerKind::Restart,
        karras: Some(SchedulerKind::RestartKarras),
        // A1111 1.10 lists it with `scheduler: karras`.
        automatic: SigmaSchedule::Karras,
    },
    Sampler {
        name: "LCM",
        aliases: &["k_lcm"],
        uniform: SchedulerKind::Lcm,
        karras: None,
        automatic: SigmaSchedule::Uniform,
    },
    // k-diffusion's own samplers (no diffusers class), on A1111's sigmas; A1111 1.9+ lists
    // 2S a with `scheduler: karras` and 3M SDE with `scheduler: exponential`.
    Sampler {
        name: "DPM++ 2S a",
        aliases: &["k_dpmpp_2s_a"],
        uniform: SchedulerKind::DpmPp2sAncestral,
        karras: Some(SchedulerKind::DpmPp2sAncestralKarras),
        automatic: SigmaSchedule::Karras,
    },
    Sampler {
        name: "DPM++ 3M SDE",
        aliases: &["k_dpmpp_3m_sde"],
        uniform: SchedulerKind::DpmPp3mSde,
        karras: Some(SchedulerKind::DpmPp3mSdeKarras),
        automatic: SigmaSchedule::Exponential,
    },
    // k-diffusion's sample_dpm_fast and sample_dpm_adaptive: A1111 hands them the training
    // sigmas' ends for txt2img; the schedule type (any, one name each) scales the start noise
    // and gives img2img's ends.
    Sampler {
        name: "DPM fast",
        aliases: &["k_dpm_fast"],
        uniform: SchedulerKind::DpmFast,
        karras: Some(SchedulerKind::DpmFast),
        automatic: SigmaSchedule::Uniform,
    },
    Sampler {
        name: "DPM adaptive",
        aliases: &["k_dpm_ad"],
        uniform: SchedulerKind::DpmAdaptive,
        karras: Some(SchedulerKind::DpmAdaptive),
        automatic: SigmaSchedule::Uniform,
    },
];

/// A1111's schedules we can honour: (name, label). Its Polyexponential, SGM Uniform, KL Optimal,
/// Align Your Steps, Simple, Normal and DDIM are not among them (a 422 listing these).
pub const SCHEDULES: [(&str, &str); 5] = [
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("beta", "Beta"),
];

/// A1111's label of a sigma schedule (`Schedule type: Exponential`).
pub fn schedule_label(schedule: SigmaSchedule) -> &'static str {
    match schedule {
        SigmaSchedule::Uniform => "Uniform",
        SigmaSchedule::Karras => "Karras",
        SigmaSchedule::Exponential => "Exponential",
        SigmaSchedule::Beta => "Beta",
    }
}

/// A1111's sampler name for `kind`, and its schedule label where the sampler has a choice
/// (`Karras` or `Uniform`; none for DDIM, PLMS and UniPC).
pub fn a1111_names(kind: SchedulerKind) -> (&'static str, Option<&'static str>) {
    SAMPLERS
        .iter()
        .find_map(|s| {
            let schedule = |label| s.karras.is_some().then_some(label);
            if s.uniform == kind {
                Some((s.name, schedule("Uniform")))
            } else if s.karras == Some(kind) {
                Some((s.name, schedule("Karras")))
            } else {
                None
            }
        })
        .or(match kind {
            // diffusers' classes of A1111's names (our infotext's `Scheduler:` tells them apart).
            SchedulerKind::Ddim => Some(("DDIM", None)),
            SchedulerKind::Pndm => Some(("PLMS", None)),
            SchedulerKind::UniPc => Some(("UniPC", Some("Uniform"))),
            SchedulerKind::UniPcKarras => Some(("UniPC", Some("Karras"))),
            SchedulerKind::DpmPp2mSde => Some(("DPM++ 2M SDE", Some("Uniform"))),
            SchedulerKind::DpmPp2mSdeKarras => Some(("DPM++ 2M SDE", Some("Karras"))),
            SchedulerKind::DpmPp2mSdeHeun => Some(("DPM++ 2M SDE Heun", Some("Uniform"))),
            SchedulerKind::DpmPp2mSdeHeunKarras => Some(("DPM++ 2M SDE Heun", Some("Karras"))),
            SchedulerKind::Dpm2 => Some(("DPM2", Some("Uniform"))),
            SchedulerKind::Dpm2Karras => Some(("DPM2", Some("Karras"))),
            SchedulerKind::Dpm2Ancestral => Some(("DPM2 a", Some("Uniform"))),
            SchedulerKind::Dpm2AncestralKarras => Some(("DPM2 a", Some("Karras"))),
            _ => None,
        })
        .unwrap_or((kind.name(), None))
}

/// The sampler a request resolved to: our scheduler and sigma schedule, and A1111's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub kind: SchedulerKind,
    pub sigmas: SigmaSchedule,
    pub sampler: &'static str,
    /// A1111's schedule label (`Automatic`, `Uniform`, `Karras`, `Exponential`, `Beta`), as its
    /// infotext writes it.
    pub schedule: &'static str,
}

/// The names A1111 lists: each sampler, and the one-word `<sampler> Karras` forms of its
/// older versions (still read by the newer ones).
fn sampler_names() -> String {
    let mut names: Vec<String> = SAMPLERS.iter().map(|s| s.name.to_string()).collect();
    names.extend(
        SAMPLERS
            .iter()
            .filter(|s| s.karras.is_some())
            .map(|s| format!("{} Karras", s.name)),
    );
    names.join(", ")
}

/// The samplers that take the Karras schedule.
fn karras_samplers() -> String {
    let names: Vec<&str> = SAMPLERS
        .iter()
        .filter(|s| s.karras.is_some())
        .map(|s| s.name)
        .collect();
    names.join(", ")
}

/// A1111's `get_sampler_and_scheduler`: a schedule written after the sampler name
/// (`DPM++ 2M Karras`) wins over the `scheduler` field; `automatic` is the sampler's own.
pub fn resolve_sampler(
    field: &str,
    name: Option<&str>,
    scheduler: Option<&str>,
) -> Result<Resolved, ApiError> {
    let mut name = name.unwrap_or(SAMPLER_DEFAULT);
    let mut schedule = scheduler.unwrap_or("automatic");
    for (sname, label) in SCHEDULES {
        for suffix in [sname, label] {
            if let Some(base) = name.strip_suffix(suffix).and_then(|b| b.strip_suffix(' ')) {
                name = base;
                schedule = sname;
            }
        }
    }
    let sampler = SAMPLERS
        .iter()
        .find(|s| s.name == name || s.aliases.contains(&name))
        .ok_or_else(|| {
            ApiError::validation(
                field,
                format!("unknown sampler {name:?}; one of {}", sampler_names()),
            )
        })?;
    let schedule = SCHEDULES
        .iter()
        .find(|(n, l)| schedule.is_empty() || *n == schedule || *l == schedule)
        .map(|(n, _)| *n)
        .ok_or_else(|| {
            ApiError::validation(
                "scheduler",
                format!(
                    "unknown schedule {schedule:?}; one of {}",
                    SCHEDULES.map(|(_, l)| l).join(", ")
                ),
            )
        })?;
    let sigmas = match schedule {
        "karras" => SigmaSchedule::Karras,
        "exponential" => SigmaSchedule::Exponential,
        "beta" => SigmaSchedule::Beta,
        "uniform" => SigmaSchedule::Uniform,
        _ => sampler.automatic,
    };
    let kind = match (sigmas, sampler.karras) {
        (SigmaSchedule::Karras, Some(karras)) => karras,
        (SigmaSchedule::Karras, None) => {
            return Err(ApiError::validation(
                "scheduler",
                format!(
                    "the Karras schedule is available with {} only, not {:?}",
                    karras_samplers(),
                    sampler.name
                ),
            ))
        }
        _ => sampler.uniform,
    };
    kind.check_schedule(sigmas).map_err(|_| {
        let with: Vec<&str> = SAMPLERS
            .iter()
            .filter(|s| s.uniform.sampler().schedules().contains(&sigmas))
            .map(|s| s.name)
            .collect();
        ApiError::validation(
            "scheduler",
            format!(
                "the {} schedule is available with {} only, not {:?}",
                schedule_label(sigmas),
                with.join(", "),
                sampler.name
            ),
        )
    })?;
    Ok(Resolved {
        kind,
        sigmas,
        sampler: sampler.name,
        schedule: if schedule == "automatic" {
            "Automatic"
        } else {
            schedule_label(sigmas)
        },
    })
}

#[cfg(test)]
#[path = "samplers_tests.rs"]
mod tests;
