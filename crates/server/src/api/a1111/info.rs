//! What A1111 answers besides images: `info` (its `Processed.js()`) and `png-info`'s parsed
//! infotext.

use serde_json::{json, Map, Value};

use super::translate::Translated;

/// The seed of batch `k`: A1111's `seed + k * batch_size`, wrapping at 2^32 like the pipeline,
/// which seeds its generator with the low 32 bits.
pub fn batch_seed(seed: u32, k: u32, batch_size: u32) -> u32 {
    seed.wrapping_add(k.wrapping_mul(batch_size))
}

/// What one finished image contributes to `info`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub seed: u64,
    pub infotext: String,
}

/// A1111's `info`: `Processed.js()`, a JSON object serialised to a string.
pub fn info_string(
    t: &Translated,
    images: &[ImageInfo],
    model_name: &str,
    model_hash: &str,
    vae: Option<&crate::vaes::VaeUse>,
    job_timestamp: &str,
) -> String {
    let n = images.len();
    let prompt = t.valid.prompt.clone();
    let negative = t.valid.negative_prompt.clone();
    let seeds: Vec<u64> = images.iter().map(|i| i.seed).collect();
    let clip_skip = t.native.get("clip_skip").cloned().unwrap_or(json!(1));
    // A1111's subseeds: image i's variation seed (+ i over the request), -1 without one.
    let strength = t.valid.variation_strength;
    let subseeds: Vec<i64> = (0..n)
        .map(|i| match t.valid.variation_seed {
            Some(v) if strength > 0.0 => i64::from(v.wrapping_add(i as u32)),
            _ => -1,
        })
        .collect();
    json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); n],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); n],
        "seed": seeds.first().copied().unwrap_or(u64::from(t.seed)),
        "all_seeds": seeds,
        "subseed": subseeds.first().copied().unwrap_or(-1),
        "all_subseeds": subseeds,
        "subseed_strength": strength,
        "width": t.valid.width,
        "height": t.valid.height,
        "sampler_name": t.sampler.sampler,
        "cfg_scale": t.valid.guidance_scale,
        "steps": t.valid.steps,
        "batch_size": t.batch_size,
        "restore_faces": t.valid.restore_faces.is_some(),
        "face_restoration_model": t
            .valid
            .restore_faces
            .map(|_| sdserve_pipeline::face_restore::restorer::NAME),
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": vae.map(|v| &v.name),
        "sd_vae_hash": vae.map(|v| &v.hash),
        // As sent (-1 when absent), like A1111's `Processed`.
        "seed_resize_from_w": t.parameters.get("seed_resize_from_w"),
        "seed_resize_from_h": t.parameters.get("seed_resize_from_h"),
        "denoising_strength": match &t.valid.hires {
            Some(h) => json!(h.params.strength),
            None => t.native.get("strength").cloned().unwrap_or(Value::Null),
        },
        "extra_generation_params": extra_generation_params(t),
        "index_of_first_image": 0,
        "infotexts": images.iter().map(|i| i.infotext.clone()).collect::<Vec<_>>(),
        "styles": t.styles,
        "job_timestamp": job_timestamp,
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": concat!("sdserve ", env!("CARGO_PKG_VERSION")),
    })
    .to_string()
}

/// `Schedule type`, and the hires pass's keys as its infotext writes them.
fn extra_generation_params(t: &Translated) -> Value {
    let mut extra = Map::new();
    extra.insert("Schedule type".into(), json!(t.sampler.schedule));
    for (k, v) in t.valid.hires.iter().flat_map(|h| &h.infotext) {
        extra.insert(k.to_string(), json!(v));
    }
    Value::Object(extra)
}

/// A1111's `parse_generation_parameters` for the infotext we write: `Prompt`, `Negative
/// prompt`, then each `Key: value` of the last line (values as strings); a value `WxH` (its
/// `re_imagesize`, `^(\d+)x(\d+)$`) split into `Key-1` and `Key-2`: `Size-1`, `Size-2`, `Seed
/// resize from-1`, `Hires resize-1`, ...
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.pop().unwrap_or_default();
    // A last line without "Key: value" pairs is part of the prompt.
    let params: Vec<(&str, &str)> = last
        .split(", ")
        .filter_map(|kv| kv.split_once(": "))
        .collect();
    if params.is_empty() {
        lines.push(last);
    }
    let mut prompt = Vec::new();
    let mut negative: Option<Vec<&str>> = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt: ") {
            negative = Some(vec![rest]);
        } else if let Some(n) = negative.as_mut() {
            n.push(line);
        } else {
            prompt.push(line);
        }
    }
    out.insert("Prompt".into(), json!(prompt.join("\n")));
    out.insert(
        "Negative prompt".into(),
        json!(negative.map(|n| n.join("\n")).unwrap_or_default()),
    );
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    for (k, v) in params {
        match v.split_once('x') {
            Some((w, h)) if digits(w) && digits(h) => {
                out.insert(format!("{k}-1"), json!(w));
                out.insert(format!("{k}-2"), json!(h));
            }
            _ => {
                out.insert(k.to_string(), json!(v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::a1111::translate::{translate, Mode};

    fn tr(body: Value) -> Translated {
        translate(
            body.as_object().unwrap(),
            Mode::Txt2Img,
            &Map::new(),
            || 1234,
        )
        .unwrap()
    }

    #[test]
    fn batch_seeds_follow_a1111() {
        assert_eq!(batch_seed(10, 0, 2), 10);
        assert_eq!(batch_seed(10, 2, 2), 14);
        assert_eq!(batch_seed(u32::MAX, 1, 1), 0);
    }

    #[test]
    fn infotext_parses_like_a1111() {
        let text = "a cat\n(on a mat)\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 256x320, Model: m@1";
        let p = parse_infotext(text);
        assert_eq!(p["Prompt"], "a cat\n(on a mat)");
        assert_eq!(p["Negative prompt"], "dog");
        assert_eq!(p["Steps"], "4");
        assert_eq!(p["Sampler"], "Euler a");
        assert_eq!(p["Seed"], "42");
        assert_eq!(
            (p["Size-1"].as_str(), p["Size-2"].as_str()),
            (Some("256"), Some("320"))
        );
        assert_eq!(parse_infotext("just a prompt")["Prompt"], "just a prompt");
        // Every `WxH` value splits (A1111's `re_imagesize`), other values stay whole.
        let p = parse_infotext("p\nSteps: 4, Seed resize from: 512x768, Model: 1x2y, Size: 64x64");
        assert_eq!(p["Seed resize from-1"], "512");
        assert_eq!(p["Seed resize from-2"], "768");
        assert_eq!(p["Model"], "1x2y");
        assert!(p.get("Seed resize from").is_none());
    }

    #[test]
    fn info_is_a_json_string_with_seeds() {
        let t = tr(json!({"prompt": "p", "seed": 5, "batch_size": 1, "n_iter": 2}));
        let imgs = [
            ImageInfo {
                seed: 5,
                infotext: "p\nSeed: 5".into(),
            },
            ImageInfo {
                seed: 6,
                infotext: "p\nSeed: 6".into(),
            },
        ];
        let s = info_string(&t, &imgs, "tiny", "abc", None, "20261204000000");
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["seed"], 5);
        assert_eq!(v["all_seeds"], json!([5, 6]));
        assert_eq!(v["infotexts"][1], "p\nSeed: 6");
        assert_eq!(v["sampler_name"], "Euler");
        assert_eq!(v["all_prompts"], json!(["p", "p"]));
        assert_eq!(
            (
                v["seed_resize_from_w"].clone(),
                v["seed_resize_from_h"].clone()
            ),
            (json!(-1), json!(-1))
        );
        let t = tr(json!({"prompt": "p", "seed_resize_from_w": 640, "seed_resize_from_h": 0}));
        let v: Value =
            serde_json::from_str(&info_string(&t, &imgs, "tiny", "abc", None, "")).unwrap();
        // As sent, even where A1111 resizes nothing (one side at 0).
        assert_eq!(
            (
                v["seed_resize_from_w"].clone(),
                v["seed_resize_from_h"].clone()
            ),
            (json!(640), json!(0))
        );
    }
}
