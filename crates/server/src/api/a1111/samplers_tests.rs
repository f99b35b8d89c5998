//! `samplers`' unit tests: A1111's sampler and schedule names to our kinds, and back.

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
    let e = resolve_sampler("sampler_name", Some("Euler"), Some("Polyexponential")).unwrap_err();
    let details = e.body().details.unwrap();
    assert!(
        details.contains("Automatic, Uniform, Karras, Exponential, Beta"),
        "{details}"
    );
    assert_eq!(field_of(e), "scheduler");
}
