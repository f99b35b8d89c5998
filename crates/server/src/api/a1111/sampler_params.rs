//! A1111 1.10's sampler parameters in native terms: `s_churn`, `s_tmin`, `s_tmax`, `s_noise`
//! (request fields and options) and `s_min_uncond` (request field and option),
//! `s_min_uncond_all` and `skip_early_cond` (options). See `validate::sampler_params` for what
//! they do.

use serde_json::{Map, Value};

/// The request fields; the native names and A1111's, for error messages (an option's value
/// is reported under the request field's name).
pub const FIELDS: [&str; 5] = ["s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond"];
pub const FIELD_NAMES: [(&str, &str); 7] = [
    ("sigma_churn", "s_churn"),
    ("sigma_tmin", "s_tmin"),
    ("sigma_tmax", "s_tmax"),
    ("sigma_noise", "s_noise"),
    ("negative_guidance_min_sigma", "s_min_uncond"),
    (
        "negative_guidance_all_steps",
        "override_settings.s_min_uncond_all",
    ),
    (
        "negative_guidance_skip_early",
        "override_settings.skip_early_cond",
    ),
];

/// The churn fields, their native names and the options' defaults (shared_options.py; `s_tmax`
/// 0 is infinity, as natively).
const CHURN: [(&str, &str, f64); 4] = [
    ("s_churn", "sigma_churn", 0.0),
    ("s_tmin", "sigma_tmin", 0.0),
    ("s_tmax", "sigma_tmax", 0.0),
    ("s_noise", "sigma_noise", 1.0),
];

/// Adds the native fields of the request's values: `get` reads the request, `setting` its
/// `override_settings`, else the posted options.
///
/// The churn: `processing.py` fills each field with the request's value, else the option's,
/// and `Sampler.initialize` passes that to `sample_euler`/`_heun`/`_dpm_2`, but an option set
/// away from its default wins over the request. `s_min_uncond`: the request's, else the
/// option's; `s_min_uncond_all` and `skip_early_cond`: the options (A1111 reads `opts` in its
/// CFG denoiser; `override_settings` sets them for the request).
pub fn add_native<'a>(
    get: impl Fn(&str) -> Option<&'a Value>,
    setting: impl Fn(&str) -> Option<&'a Value>,
    native: &mut Map<String, Value>,
) {
    for (field, ours, default) in CHURN {
        let option = setting(field).filter(|v| v.as_f64() != Some(default));
        if let Some(v) = option.or_else(|| get(field)) {
            native.insert(ours.into(), v.clone());
        }
    }
    if let Some(v) = get("s_min_uncond").or_else(|| setting("s_min_uncond")) {
        native.insert("negative_guidance_min_sigma".into(), v.clone());
    }
    if let Some(v) = setting("s_min_uncond_all") {
        native.insert("negative_guidance_all_steps".into(), v.clone());
    }
    if let Some(v) = setting("skip_early_cond") {
        native.insert("negative_guidance_skip_early".into(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::translate::{translate, Mode};
    use super::*;

    fn run(body: Value, options: Value) -> Result<super::super::translate::Translated, String> {
        let options = options.as_object().unwrap().clone();
        translate(body.as_object().unwrap(), Mode::Txt2Img, &options, || 1)
            .map_err(|e| e.fields()[0].field.clone())
    }

    #[test]
    fn request_values_reach_the_sampler_unless_an_option_is_set() {
        let none = json!({});
        // The request's values (`s_tmax` 0: no bound).
        let body = json!({"prompt": "p", "s_churn": 4, "s_tmin": 0.5, "s_tmax": 0,
                          "s_noise": 0.9, "s_min_uncond": 2});
        let t = run(body.clone(), none.clone()).unwrap();
        let c = t.valid.churn;
        assert_eq!(
            (c.churn, c.tmin, c.tmax, c.noise),
            (4.0, 0.5, f64::INFINITY, 0.9)
        );
        assert_eq!(t.valid.negative_guidance.min_sigma, 2.0);
        assert!(t.ignored.is_empty(), "{:?}", t.ignored);
        // An option away from its default wins over the request (`Sampler.initialize`); one at
        // its default does not. `s_min_uncond`: the request's over the option's.
        let options = json!({"s_churn": 0.0, "s_noise": 0.8, "s_min_uncond": 3.0,
                             "s_min_uncond_all": true, "skip_early_cond": 0.25});
        let t = run(body.clone(), options.clone()).unwrap();
        assert_eq!((t.valid.churn.churn, t.valid.churn.noise), (4.0, 0.8));
        let g = t.valid.negative_guidance;
        assert_eq!((g.min_sigma, g.all_steps, g.skip_early), (2.0, true, 0.25));
        let over = json!({"prompt": "p", "s_churn": 4, "override_settings": {"s_churn": 1.5}});
        assert_eq!(run(over, none.clone()).unwrap().valid.churn.churn, 1.5);
        // Only the options: they apply.
        let t = run(json!({"prompt": "p"}), options).unwrap();
        assert_eq!(t.valid.negative_guidance.min_sigma, 3.0);
        // Out of A1111's slider ranges: a 422 naming A1111's field.
        assert_eq!(
            run(json!({"prompt": "p", "s_churn": 101}), none.clone()).unwrap_err(),
            "s_churn"
        );
        assert_eq!(
            run(json!({"prompt": "p", "s_noise": "x"}), none.clone()).unwrap_err(),
            "s_noise"
        );
        assert_eq!(
            run(json!({"prompt": "p", "s_min_uncond": -1}), none.clone()).unwrap_err(),
            "s_min_uncond"
        );
        assert_eq!(
            run(json!({"prompt": "p"}), json!({"s_min_uncond_all": "yes"})).unwrap_err(),
            "override_settings.s_min_uncond_all"
        );
        assert_eq!(
            run(json!({"prompt": "p"}), json!({"skip_early_cond": 1.5})).unwrap_err(),
            "override_settings.skip_early_cond"
        );
    }
}
