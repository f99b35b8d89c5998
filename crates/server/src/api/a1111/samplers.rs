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
mod tests {
    use super::*;

    fn field_of(e: ApiError) -> String {
        match e.fields() {
            [first, ..] => first.field.clone(),
            _ => panic!("expected a validation error, got {e:?}"),
        }
    }

    #[test]
    fn sampler_table_follows_a1111() {
        let r = |n: Option<&str>, s: Option<&str>| resolve_sampler("sampler_name", n, s).unwrap();
        assert_eq!(r(None, None).kind, SchedulerKind::Euler);
        assert_eq!(r(Some("Euler a"), None).kind, SchedulerKind::EulerAncestral);
        assert_eq!(
            r(Some("k_euler_a"), None).kind,
            SchedulerKind::EulerAncestral
        );
        assert_eq!(r(Some("PLMS"), None).kind, SchedulerKind::PlmsA1111);
        assert_eq!(
            r(Some("DDIM"), Some("automatic")).kind,
            SchedulerKind::DdimA1111
        );
        // DDIM CFG++: A1111's timesteps sampler, no schedule choice.
        for name in ["DDIM CFG++", "ddim_cfgpp"] {
            let k = r(Some(name), None);
            assert_eq!(
                (k.kind, k.sigmas, k.sampler),
                (
                    SchedulerKind::DdimCfgpp,
                    SigmaSchedule::Uniform,
                    "DDIM CFG++"
                )
            );
        }
        let e = resolve_sampler("sampler_name", Some("DDIM CFG++"), Some("Karras")).unwrap_err();
        assert_eq!(field_of(e), "scheduler");
        assert_eq!(a1111_names(SchedulerKind::DdimCfgpp), ("DDIM CFG++", None));
        assert_eq!(r(Some("LMS"), Some("Uniform")).kind, SchedulerKind::Lms);
        assert_eq!(r(Some("UniPC"), Some("")).kind, SchedulerKind::UniPcA1111);
        // DPM++ 2M: automatic means Karras; Uniform is the plain one.
        assert_eq!(
            r(Some("DPM++ 2M"), Some("automatic")).kind,
            SchedulerKind::DpmPp2mKarras
        );
        assert_eq!(r(Some("DPM++ 2M"), None).kind, SchedulerKind::DpmPp2mKarras);
        assert_eq!(
            r(Some("DPM++ 2M"), Some("Karras")).kind,
            SchedulerKind::DpmPp2mKarras
        );
        assert_eq!(
            r(Some("DPM++ 2M"), Some("uniform")).kind,
            SchedulerKind::DpmPp2m
        );
        // The one-word name wins over the field, as in A1111.
        let k = r(Some("DPM++ 2M Karras"), Some("uniform"));
        assert_eq!(
            (k.kind, k.sampler, k.schedule),
            (SchedulerKind::DpmPp2mKarras, "DPM++ 2M", "Karras")
        );
        assert_eq!(
            r(Some("DPM++ 2M Uniform"), None).kind,
            SchedulerKind::DpmPp2m
        );
        // Every sampler with a Karras form, by the field and by the one-word name.
        for (name, karras) in [
            ("Euler a", SchedulerKind::EulerAncestralKarras),
            ("Euler", SchedulerKind::EulerKarras),
            ("LMS", SchedulerKind::LmsKarras),
            ("DPM++ 2M SDE", SchedulerKind::DpmPp2mSdeBrownianKarras),
            (
                "DPM++ 2M SDE Heun",
                SchedulerKind::DpmPp2mSdeHeunBrownianKarras,
            ),
            ("DPM++ SDE", SchedulerKind::DpmPpSdeKarras),
            ("DPM++ 2S a", SchedulerKind::DpmPp2sAncestralKarras),
            ("DPM++ 3M SDE", SchedulerKind::DpmPp3mSdeKarras),
        ] {
            let k = r(Some(name), Some("Karras"));
            assert_eq!((k.kind, k.sampler, k.schedule), (karras, name, "Karras"));
            let one_word = format!("{name} Karras");
            let k = r(Some(&one_word), Some("uniform"));
            assert_eq!((k.kind, k.sampler, k.schedule), (karras, name, "Karras"));
        }
        assert_eq!(
            r(Some("Euler a"), Some("automatic")).kind,
            SchedulerKind::EulerAncestral
        );
        // DPM++ 2M SDE, its Heun and 3M SDE: A1111 1.9's automatic is its Exponential schedule.
        for (name, kind) in [
            ("DPM++ 2M SDE", SchedulerKind::DpmPp2mSdeBrownian),
            ("DPM++ 2M SDE Heun", SchedulerKind::DpmPp2mSdeHeunBrownian),
            ("k_dpmpp_2m_sde_heun", SchedulerKind::DpmPp2mSdeHeunBrownian),
            ("DPM++ 3M SDE", SchedulerKind::DpmPp3mSde),
            ("k_dpmpp_3m_sde", SchedulerKind::DpmPp3mSde),
        ] {
            let k = r(Some(name), None);
            assert_eq!(
                (k.kind, k.sigmas, k.schedule),
                (kind, SigmaSchedule::Exponential, "Automatic")
            );
        }
        // Exponential and Beta: the uniform scheduler on those sigmas, where it has them.
        for (name, kind) in [
            ("Euler", SchedulerKind::Euler),
            ("DPM++ 2M", SchedulerKind::DpmPp2m),
            ("DPM++ SDE", SchedulerKind::DpmPpSde),
            ("Heun", SchedulerKind::Heun),
            ("DPM2 a", SchedulerKind::Dpm2AncestralA1111),
            ("LMS", SchedulerKind::Lms),
        ] {
            for (label, sigmas) in [
                ("Exponential", SigmaSchedule::Exponential),
                ("beta", SigmaSchedule::Beta),
            ] {
                let k = r(Some(name), Some(label));
                assert_eq!((k.kind, k.sigmas), (kind, sigmas), "{name} {label}");
                assert_eq!(k.schedule, schedule_label(sigmas));
            }
        }
        // The older one-word name of A1111 1.6.
        let k = r(Some("DPM++ 2M SDE Exponential"), None);
        assert_eq!(
            (k.kind, k.sigmas, k.schedule),
            (
                SchedulerKind::DpmPp2mSdeBrownian,
                SigmaSchedule::Exponential,
                "Exponential"
            )
        );
        for (name, label) in [
            ("Euler a", "Exponential"),
            ("DDIM", "Beta"),
            ("UniPC", "Exponential"),
            ("LCM", "Exponential"),
        ] {
            let e = resolve_sampler("sampler_name", Some(name), Some(label)).unwrap_err();
            let details = e.body().details.unwrap();
            assert!(details.contains("Euler, DPM++ 2M"), "{details}");
            assert_eq!(field_of(e), "scheduler");
        }
        assert_eq!(
            r(Some("k_dpmpp_2m_sde"), Some("Uniform")).kind,
            SchedulerKind::DpmPp2mSdeBrownian
        );
        // The native diffusers-noise names still carry A1111's sampler names in infotexts.
        assert_eq!(
            a1111_names(SchedulerKind::DpmPp2mSdeKarras),
            ("DPM++ 2M SDE", Some("Karras"))
        );
        assert_eq!(
            a1111_names(SchedulerKind::DpmPp2mSdeBrownian),
            ("DPM++ 2M SDE", Some("Uniform"))
        );
        // Heun, DPM2, DPM2 a (automatic: uniform, as A1111) and LCM (no Karras form).
        for (name, alias, uniform, karras) in [
            (
                "Heun",
                "k_heun",
                SchedulerKind::Heun,
                Some(SchedulerKind::HeunKarras),
            ),
            (
                "DPM2",
                "k_dpm_2",
                SchedulerKind::Dpm2A1111,
                Some(SchedulerKind::Dpm2A1111),
            ),
            (
                "DPM2 a",
                "k_dpm_2_a",
                SchedulerKind::Dpm2AncestralA1111,
                Some(SchedulerKind::Dpm2AncestralA1111),
            ),
            ("LCM", "k_lcm", SchedulerKind::Lcm, None),
        ] {
            let k = r(Some(name), None);
            assert_eq!(
                (k.kind, k.sampler, k.schedule),
                (uniform, name, "Automatic")
            );
            assert_eq!(r(Some(alias), Some("Uniform")).kind, uniform);
            if let Some(karras) = karras {
                assert_eq!(r(Some(name), Some("Karras")).kind, karras);
                assert_eq!(r(Some(&format!("{name} Karras")), None).kind, karras);
            }
        }
        // DPM2 and DPM2 a: k-diffusion's (the penultimate sigma dropped) on every schedule;
        // diffusers' KDPM2 names still write A1111's names in infotexts.
        for (name, kind) in [
            ("DPM2", SchedulerKind::Dpm2A1111),
            ("k_dpm_2_a", SchedulerKind::Dpm2AncestralA1111),
        ] {
            for (label, sigmas) in [
                ("Automatic", SigmaSchedule::Uniform),
                ("Karras", SigmaSchedule::Karras),
                ("Exponential", SigmaSchedule::Exponential),
                ("Beta", SigmaSchedule::Beta),
            ] {
                let k = r(Some(name), Some(label));
                assert_eq!((k.kind, k.sigmas, k.schedule), (kind, sigmas, label));
            }
        }
        assert_eq!(a1111_names(SchedulerKind::Dpm2), ("DPM2", Some("Uniform")));
        assert_eq!(
            a1111_names(SchedulerKind::Dpm2AncestralKarras),
            ("DPM2 a", Some("Karras"))
        );
        assert_eq!(
            field_of(resolve_sampler("sampler_name", Some("LCM"), Some("Karras")).unwrap_err()),
            "scheduler"
        );
        // DPM++ 2S a: Karras is its automatic schedule too.
        let k = r(Some("DPM++ 2S a"), None);
        assert_eq!(
            (k.kind, k.sigmas, k.schedule),
            (
                SchedulerKind::DpmPp2sAncestralKarras,
                SigmaSchedule::Karras,
                "Automatic"
            )
        );
        assert_eq!(
            r(Some("k_dpmpp_2s_a"), Some("Uniform")).kind,
            SchedulerKind::DpmPp2sAncestral
        );
        assert_eq!(
            r(Some("DPM++ 2S a"), Some("Beta")).kind,
            SchedulerKind::DpmPp2sAncestral
        );
        // Restart: A1111 1.10 lists it with the Karras schedule as its own.
        let k = r(Some("Restart"), None);
        assert_eq!(
            (k.kind, k.sampler, k.schedule),
            (SchedulerKind::RestartKarras, "Restart", "Automatic")
        );
        assert_eq!(
            r(Some("restart"), Some("Uniform")).kind,
            SchedulerKind::Restart
        );
        assert_eq!(
            (
                r(Some("Restart"), Some("Exponential")).kind,
                r(Some("Restart"), Some("Exponential")).sigmas
            ),
            (SchedulerKind::Restart, SigmaSchedule::Exponential)
        );
        // DPM fast: k-diffusion's sample_dpm_fast; every schedule type on the one name.
        let k = r(Some("DPM fast"), None);
        assert_eq!(
            (k.kind, k.sigmas, k.schedule),
            (SchedulerKind::DpmFast, SigmaSchedule::Uniform, "Automatic")
        );
        assert_eq!(
            r(Some("k_dpm_fast"), Some("Uniform")).kind,
            SchedulerKind::DpmFast
        );
        for (name, kind) in [
            ("DPM fast", SchedulerKind::DpmFast),
            ("k_dpm_ad", SchedulerKind::DpmAdaptive),
        ] {
            for (label, sigmas) in [
                ("Karras", SigmaSchedule::Karras),
                ("Exponential", SigmaSchedule::Exponential),
                ("Beta", SigmaSchedule::Beta),
            ] {
                let k = r(Some(name), Some(label));
                assert_eq!((k.kind, k.sigmas, k.schedule), (kind, sigmas, label));
            }
        }
        // DPM adaptive, as A1111 names it (alias k_dpm_ad).
        let k = r(Some("k_dpm_ad"), None);
        assert_eq!(
            (k.kind, k.sampler, k.schedule),
            (SchedulerKind::DpmAdaptive, "DPM adaptive", "Automatic")
        );
        // DPM++ SDE: A1111 lists it with the Karras schedule as its own.
        let k = r(Some("DPM++ SDE"), None);
        assert_eq!(
            (k.kind, k.sampler, k.schedule),
            (SchedulerKind::DpmPpSdeKarras, "DPM++ SDE", "Automatic")
        );
        assert_eq!(
            r(Some("k_dpmpp_sde"), Some("Uniform")).kind,
            SchedulerKind::DpmPpSde
        );
        assert_eq!(
            r(Some("DPM++ SDE Karras"), None).kind,
            SchedulerKind::DpmPpSdeKarras
        );
    }

    #[test]
    fn unknown_samplers_and_schedules_are_named() {
        let e = resolve_sampler("sampler_index", Some("DPM++ 4M"), None).unwrap_err();
        let details = e.body().details.unwrap();
        assert!(details.starts_with("sampler_index:"), "{details}");
        for name in [
            "Euler a",
            "Euler",
            "DPM++ 2M",
            "DDIM",
            "PLMS",
            "LMS",
            "UniPC",
            "DPM++ 2M Karras",
            "DPM++ 2M SDE Karras",
            "DPM++ SDE",
            "DPM++ SDE Karras",
            "Euler a Karras",
        ] {
            assert!(details.contains(name), "{details}");
        }
        assert!(!details.contains("DDIM Karras"), "{details}");
        assert!(!details.contains("UniPC Karras"), "{details}");
        let e = resolve_sampler("sampler_name", Some("DDIM"), Some("Karras")).unwrap_err();
        let details = e.body().details.unwrap();
        assert!(details.contains("Euler a, Euler, DPM++ 2M"), "{details}");
        assert_eq!(field_of(e), "scheduler");
        let e =
            resolve_sampler("sampler_name", Some("Euler"), Some("Polyexponential")).unwrap_err();
        let details = e.body().details.unwrap();
        assert!(
            details.contains("Automatic, Uniform, Karras, Exponential, Beta"),
            "{details}"
        );
        assert_eq!(field_of(e), "scheduler");
    }
}
