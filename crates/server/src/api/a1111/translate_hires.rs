//! `enable_hr`'s second pass in an A1111 body: its fields handed to the one validation place
//! (`validate::hires`), its sampler and schedule as A1111 picks them.

use sdserve_pipeline::schedulers::SigmaSchedule;
use serde_json::{Map, Value};

use super::translate::{get, opt_str, resolve_sampler, Resolved, SAMPLERS, SCHEDULES};
use crate::error::ApiError;
use crate::validate::ValidRequest;

/// The second pass of `enable_hr`: its fields checked by the one validation place, and its
/// sampler as A1111 runs it (`StableDiffusionProcessingTxt2Img`): `hr_sampler_name or
/// sampler_name` on `hr_scheduler`, which defaults to the first pass's `p.scheduler`, then to
/// the sampler's own (`Automatic`, in `get_sigmas`); "Use same ..." (the web UI's) is absent.
/// A sampler or schedule other than the first pass's is the pass's own.
pub(super) fn hires(
    body: &Map<String, Value>,
    first: &ValidRequest,
    first_sampler: &Resolved,
) -> Result<crate::validate::hires::ValidHires, ApiError> {
    let same = |field: &str| -> Result<Option<&str>, ApiError> {
        Ok(opt_str(body, field)?.filter(|v| !v.is_empty() && !v.starts_with("Use same")))
    };
    let (name, schedule) = (same("hr_sampler_name")?, same("hr_scheduler")?);
    let sampler = match (name, schedule) {
        (None, None) => None,
        _ => {
            let first_name = opt_str(body, "sampler_name")?.or(opt_str(body, "sampler_index")?);
            let r = resolve_sampler(
                if name.is_some() {
                    "hr_sampler_name"
                } else {
                    "hr_scheduler"
                },
                name.or(first_name),
                schedule.or(first_pass_scheduler(body, first_sampler)?),
            )?;
            ((r.kind, r.sigmas) != (first_sampler.kind, first_sampler.sigmas)).then(|| {
                let (first_name, first_label) = crate::validate::hires::a1111_sampler_of(
                    first_sampler.kind,
                    Some(first_sampler.sigmas),
                );
                crate::validate::hires::HiresSampler::new(
                    r.kind,
                    Some(r.sigmas),
                    Some(first_name),
                    first_label,
                )
            })
        }
    };
    let fields: Map<String, Value> = crate::validate::hires::FIELDS
        .iter()
        .filter_map(|f| get(body, f).map(|v| (f.to_string(), v.clone())))
        .collect();
    crate::validate::hires::validate_hires(&fields, first, sampler)
}

/// The first pass's `p.scheduler` as A1111's API sets it, which an absent `hr_scheduler`
/// takes: the request's `scheduler`, else the schedule written after the sampler's name
/// (`Euler Karras`) unless it is that sampler's own (`get_sampler_and_scheduler` turns
/// `DPM++ 2M Karras` into `Automatic`); `None`: Automatic.
fn first_pass_scheduler<'a>(
    body: &'a Map<String, Value>,
    first: &Resolved,
) -> Result<Option<&'a str>, ApiError> {
    if let Some(s) = opt_str(body, "scheduler")?.filter(|s| !s.is_empty()) {
        return Ok(Some(s));
    }
    let own = SAMPLERS
        .iter()
        .find(|s| s.name == first.sampler)
        .is_some_and(|s| s.automatic != SigmaSchedule::Uniform && s.automatic == first.sigmas);
    Ok((first.schedule != "Automatic" && !own).then(|| {
        SCHEDULES
            .iter()
            .find(|(_, label)| *label == first.schedule)
            .map_or("automatic", |(name, _)| *name)
    }))
}
