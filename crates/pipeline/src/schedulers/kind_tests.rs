//! The scheduler names' tests (`SchedulerKind`, `Sampler`), in a file of their own.

use super::*;

#[test]
fn names_round_trip() {
    for k in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(k.name()), Some(k));
        assert_eq!(k.name().parse::<SchedulerKind>(), Ok(k));
    }
    assert_eq!(SchedulerKind::from_name("euler-a"), None);
    assert!("k_lms".parse::<SchedulerKind>().is_err());
}

#[test]
fn kinds_are_a_sampler_and_a_schedule() {
    for k in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::of(k.sampler(), k.karras()), Some(k));
        assert_eq!(k.name().ends_with("_karras"), k.karras(), "{k}");
        // The Karras form of a sampler is its name plus `_karras`.
        if let Some(plain) = SchedulerKind::of(k.sampler(), false).filter(|_| k.karras()) {
            assert_eq!(k.name(), format!("{}_karras", plain.name()));
        }
    }
    assert_eq!(SchedulerKind::of(Sampler::Ddim, true), None);
    assert_eq!(SchedulerKind::of(Sampler::Pndm, true), None);
    assert_eq!(
        SchedulerKind::from_name("euler_a_karras"),
        Some(SchedulerKind::EulerAncestralKarras)
    );
}

#[test]
fn the_name_decides_the_schedule_and_the_solver() {
    let file = SchedulerConfig {
        use_karras_sigmas: Some(true),
        algorithm_type: Some("sde-dpmsolver++".into()),
        ..Default::default()
    };
    let cfg = SchedulerKind::DpmPp2m.config(&file);
    assert_eq!(cfg.use_karras_sigmas, Some(false));
    assert_eq!(cfg.algorithm_type.as_deref(), Some("dpmsolver++"));
    let cfg = SchedulerKind::DpmPp2mSdeKarras.config(&SchedulerConfig::default());
    assert_eq!(cfg.use_karras_sigmas, Some(true));
    assert_eq!(cfg.algorithm_type.as_deref(), Some("sde-dpmsolver++"));
    // Classes without Karras sigmas keep the file's keys as they are.
    assert_eq!(
        SchedulerKind::Ddim.config(&file).use_karras_sigmas,
        Some(true)
    );
}

#[test]
fn default_from_class_name() {
    let cfg = |class: &str, karras: Option<bool>| SchedulerConfig {
        class_name: Some(class.to_string()),
        use_karras_sigmas: karras,
        ..Default::default()
    };
    let default = |c: SchedulerConfig| SchedulerKind::default_for(&c).unwrap();
    assert_eq!(default(cfg("PNDMScheduler", None)), SchedulerKind::Pndm);
    assert_eq!(
        default(cfg("DPMSolverMultistepScheduler", Some(true))),
        SchedulerKind::DpmPp2mKarras
    );
    assert_eq!(
        default(cfg("DPMSolverMultistepScheduler", Some(false))),
        SchedulerKind::DpmPp2m
    );
    for (class, plain, karras) in [
        (
            "EulerDiscreteScheduler",
            SchedulerKind::Euler,
            SchedulerKind::EulerKarras,
        ),
        (
            "LMSDiscreteScheduler",
            SchedulerKind::Lms,
            SchedulerKind::LmsKarras,
        ),
        (
            "DPMSolverSDEScheduler",
            SchedulerKind::DpmPpSde,
            SchedulerKind::DpmPpSdeKarras,
        ),
        (
            "UniPCMultistepScheduler",
            SchedulerKind::UniPc,
            SchedulerKind::UniPcKarras,
        ),
    ] {
        assert_eq!(default(cfg(class, Some(true))), karras, "{class}");
        assert_eq!(default(cfg(class, None)), plain, "{class}");
    }
    // diffusers' Euler ancestral class has no `use_karras_sigmas`; DDIM neither.
    assert_eq!(
        default(cfg("EulerAncestralDiscreteScheduler", Some(true))),
        SchedulerKind::EulerAncestral
    );
    assert_eq!(
        default(cfg("DDIMScheduler", Some(true))),
        SchedulerKind::Ddim
    );
    let sde = |karras| SchedulerConfig {
        algorithm_type: Some("sde-dpmsolver++".into()),
        ..cfg("DPMSolverMultistepScheduler", karras)
    };
    assert_eq!(default(sde(None)), SchedulerKind::DpmPp2mSde);
    assert_eq!(default(sde(Some(true))), SchedulerKind::DpmPp2mSdeKarras);
    for (class, plain, karras) in [
        (
            "HeunDiscreteScheduler",
            SchedulerKind::Heun,
            SchedulerKind::HeunKarras,
        ),
        (
            "KDPM2DiscreteScheduler",
            SchedulerKind::Dpm2,
            SchedulerKind::Dpm2Karras,
        ),
        (
            "KDPM2AncestralDiscreteScheduler",
            SchedulerKind::Dpm2Ancestral,
            SchedulerKind::Dpm2AncestralKarras,
        ),
    ] {
        assert_eq!(default(cfg(class, Some(true))), karras, "{class}");
        assert_eq!(default(cfg(class, None)), plain, "{class}");
        assert_eq!(karras.sampler(), plain.sampler());
    }
    // LCMScheduler has no Karras sigmas.
    assert_eq!(default(cfg("LCMScheduler", Some(true))), SchedulerKind::Lcm);
    assert!(SchedulerKind::default_for(&cfg("DEISMultistepScheduler", None)).is_err());
    assert!(SchedulerKind::default_for(&SchedulerConfig::default()).is_err());
}
