//! A1111's sampler parameters as the native request has them: k-diffusion's churn
//! (`sigma_churn`, `sigma_tmin`, `sigma_tmax`, `sigma_noise`: A1111's `s_churn`, `s_tmin`,
//! `s_tmax`, `s_noise`), the negative guidance minimum sigma (`negative_guidance_min_sigma`,
//! `negative_guidance_all_steps`: `s_min_uncond`, `s_min_uncond_all`) and the early skip
//! (`negative_guidance_skip_early`: `skip_early_cond`, "Skip Early CFG"). Their rules, and what
//! the metadata and the infotext say of them.

use sdserve_pipeline::pipeline::{
    GenerationParams, GuidanceRule, GuidanceSkips, ModelSchedules, NegativeGuidance,
};
use sdserve_pipeline::schedulers::Churn;

use super::fields::FieldReader;

/// The largest values: A1111's option sliders (`s_churn` 100, `s_tmin` 10, `s_tmax` 999,
/// `s_noise` 1.1, `s_min_uncond` 15; `skip_early_cond` 0..=1, a share of the steps).
pub const CHURN_MAX: f64 = 100.0;
pub const TMIN_MAX: f64 = 10.0;
pub const TMAX_MAX: f64 = 999.0;
pub const NOISE_MAX: f64 = 1.1;
pub const MIN_SIGMA_MAX: f64 = 15.0;
pub const SKIP_EARLY_MAX: f64 = 1.0;

/// The fields' values (absent: the defaults, which change nothing); `sigma_tmax` 0 is no bound,
/// as A1111's 0.
pub fn read(r: &mut FieldReader) -> (Churn, NegativeGuidance) {
    let none = Churn::default();
    let tmax = r.number("sigma_tmax", 0.0, TMAX_MAX).unwrap_or(0.0);
    let churn = Churn {
        churn: r
            .number("sigma_churn", 0.0, CHURN_MAX)
            .unwrap_or(none.churn),
        tmin: r.number("sigma_tmin", 0.0, TMIN_MAX).unwrap_or(none.tmin),
        tmax: if tmax == 0.0 { f64::INFINITY } else { tmax },
        noise: r
            .number("sigma_noise", 0.0, NOISE_MAX)
            .unwrap_or(none.noise),
    };
    let all_steps = r.with("negative_guidance_all_steps", |v| {
        v.as_bool().ok_or_else(|| "must be true or false".into())
    });
    let guidance = NegativeGuidance {
        min_sigma: r
            .number("negative_guidance_min_sigma", 0.0, MIN_SIGMA_MAX)
            .unwrap_or(0.0),
        all_steps: all_steps.unwrap_or(false),
        skip_early: r
            .number("negative_guidance_skip_early", 0.0, SKIP_EARLY_MAX)
            .unwrap_or(0.0),
    };
    (churn, guidance)
}

/// The churn where it applied (the scheduler takes it and it is on): `(churn, tmin, tmax,
/// noise)`, each where it is not its default.
pub fn applied_churn(p: &GenerationParams) -> Option<[Option<f64>; 4]> {
    let takes = p.scheduler.is_some_and(|k| k.takes_churn());
    let c = p.churn;
    let d = Churn::default();
    let set = |v: f64, default: f64| (v != default).then_some(v);
    (takes && c != d).then(|| {
        [
            set(c.churn, d.churn),
            set(c.tmin, d.tmin),
            set(c.tmax, d.tmax),
            set(c.noise, d.noise),
        ]
    })
}

/// The negative guidance minimum sigma where it applied: on, with guidance, or under A1111's
/// rule, whose CFG denoiser applies it at every scale (at exactly 1 a skip changes nothing).
pub fn applied_guidance(p: &GenerationParams) -> Option<NegativeGuidance> {
    let g = p.negative_guidance;
    let guided = p.runs_negative_prompt() || p.guidance_rule == GuidanceRule::A1111;
    (g.min_sigma > 0.0 && guided).then_some(g)
}

/// Which rules skip some evaluation of the run (what the infotext writes), counted on the
/// model's schedules; without them, or where they refuse the request, each rule where it is on.
pub fn skips(p: &GenerationParams, schedules: Option<&ModelSchedules>) -> GuidanceSkips {
    match schedules.map(|s| s.guidance_skips(p)) {
        Some(Ok(skips)) => skips,
        _ => skips_where_on(p),
    }
}

/// Each rule wherever it is on: the skips where they cannot be counted.
pub fn skips_where_on(p: &GenerationParams) -> GuidanceSkips {
    let g = p.negative_guidance;
    GuidanceSkips {
        early: g.skip_early != 0.0,
        min_sigma: g.min_sigma > 0.0,
    }
}

/// The early skip where it is on (A1111's first call, `0 / total_steps`, always skips, whatever
/// the guidance scale).
pub fn applied_skip_early(p: &GenerationParams) -> Option<f64> {
    let s = p.negative_guidance.skip_early;
    (s != 0.0).then_some(s)
}

/// The infotext entries, under A1111's names (`Sigma churn`, `Sigma tmin`, `Sigma tmax`,
/// `Sigma noise`, `Skip Early CFG`, `NGMS`, `NGMS all steps`), in the order it adds them: the
/// sampler's at its start, the early skip at the first call, NGMS at a later one. A1111 writes the churn values only when they came from its
/// options (a request's own `s_churn` runs unwritten); they are written here wherever they
/// apply, so that the text reproduces the image. `Skip Early CFG` and `NGMS` are written, as
/// A1111 writes them, only where an evaluation of the run skipped the negative prompt by that
/// rule (`skips`): NGMS's sigma may never be reached, or every evaluation below it skip early.
pub fn infotext(p: &GenerationParams, skips: GuidanceSkips) -> String {
    let mut s = String::new();
    if let Some(values) = applied_churn(p) {
        let names = ["Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise"];
        for (name, v) in names.iter().zip(values) {
            if let Some(v) = v {
                s.push_str(&format!(", {name}: {v:?}"));
            }
        }
    }
    if let Some(v) = applied_skip_early(p).filter(|_| skips.early) {
        s.push_str(&format!(", Skip Early CFG: {v:?}"));
    }
    if let Some(g) = applied_guidance(p).filter(|_| skips.min_sigma) {
        s.push_str(&format!(", NGMS: {:?}", g.min_sigma));
        if g.all_steps {
            s.push_str(", NGMS all steps: True");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use sdserve_pipeline::schedulers::SchedulerKind;

    use super::*;

    #[test]
    fn the_fields_are_the_native_request_s() {
        for f in [
            "sigma_churn",
            "sigma_tmin",
            "sigma_tmax",
            "sigma_noise",
            "negative_guidance_min_sigma",
            "negative_guidance_all_steps",
            "negative_guidance_skip_early",
        ] {
            assert!(super::super::FIELDS.contains(&f), "{f}");
        }
    }

    #[test]
    fn infotext_names_what_applied() {
        let p = GenerationParams {
            scheduler: Some(SchedulerKind::Heun),
            churn: Churn {
                churn: 2.0,
                tmin: 0.5,
                tmax: f64::INFINITY,
                noise: 0.9,
            },
            negative_guidance: NegativeGuidance {
                min_sigma: 1.5,
                all_steps: true,
                skip_early: 0.25,
            },
            ..Default::default()
        };
        assert_eq!(
            infotext(&p, skips_where_on(&p)),
            ", Sigma churn: 2.0, Sigma tmin: 0.5, Sigma noise: 0.9, Skip Early CFG: 0.25, \
             NGMS: 1.5, NGMS all steps: True"
        );
        // Euler a takes no churn (A1111 passes it none); without guidance NGMS skips nothing,
        // while A1111 still writes the early skip.
        let p = GenerationParams {
            scheduler: Some(SchedulerKind::EulerAncestral),
            guidance_scale: 1.0,
            ..p
        };
        assert_eq!(infotext(&p, skips_where_on(&p)), ", Skip Early CFG: 0.25");
        let p = GenerationParams {
            negative_guidance: NegativeGuidance::default(),
            ..p
        };
        assert_eq!(infotext(&p, skips_where_on(&p)), "");
        // ddim_cfgpp runs the negative prompt at every scale: NGMS applies at 1 too.
        let p = GenerationParams {
            scheduler: Some(SchedulerKind::DdimCfgpp),
            negative_guidance: NegativeGuidance {
                min_sigma: 4.5,
                ..Default::default()
            },
            ..p
        };
        assert_eq!(infotext(&p, skips_where_on(&p)), ", NGMS: 4.5");
        // Where no evaluation skipped by a rule, its entry is not written.
        let none = GuidanceSkips::default();
        assert_eq!(infotext(&p, none), "");
        let p = GenerationParams {
            negative_guidance: NegativeGuidance {
                skip_early: 0.5,
                ..p.negative_guidance
            },
            ..p
        };
        let early_only = GuidanceSkips {
            early: true,
            min_sigma: false,
        };
        assert_eq!(infotext(&p, early_only), ", Skip Early CFG: 0.5");
        // A1111's rule applies NGMS at a scale of 1 too (its denoiser guides at every scale).
        let p = GenerationParams {
            scheduler: Some(SchedulerKind::EulerAncestral),
            guidance_rule: GuidanceRule::A1111,
            ..p
        };
        assert!(!p.runs_negative_prompt());
        assert_eq!(
            infotext(&p, skips_where_on(&p)),
            ", Skip Early CFG: 0.5, NGMS: 4.5"
        );
    }
}
