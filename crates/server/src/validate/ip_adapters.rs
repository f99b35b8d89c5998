//! The native `ip_adapters` field: `[{model, image, scale}]`, diffusers' `load_ip_adapter`
//! (one adapter of IP_ADAPTER_DIR per object), `ip_adapter_image` and `set_ip_adapter_scale`.

use serde_json::Value;

use sdserve_pipeline::ip_adapter::{ExtensionImage, ExtensionRecord, ExtensionRun};

use crate::images::RequestImage;

/// Adapters one request may use (each adds an attention term to every cross-attention).
pub const IP_ADAPTERS_MAX: usize = 3;
/// `scale`: the sd-webui-controlnet extension's weight slider range, as for ControlNets.
pub const SCALE_MIN: f64 = 0.0;
pub const SCALE_MAX: f64 = 2.0;
const NAME_MAX: usize = 255;

/// One IP-Adapter of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidIpAdapter {
    /// A name of IP_ADAPTER_DIR (`GET /ip-adapters`), checked before the job is queued.
    pub model: String,
    /// The image prompt (any size: the image processor resizes and crops it).
    pub image: RequestImage,
    pub scale: f64,
    /// An A1111 ControlNet unit with an ip-adapter module, run as the sd-webui-controlnet
    /// extension runs it (made by the A1111 dialect; `None` for the native field).
    pub a1111: Option<A1111IpUnit>,
    /// The adapter's file and the image encoder's folder as IP_ADAPTER_DIR's check before
    /// queueing found them (the memory check counts them); the worker finds them again.
    pub files: Option<IpAdapterFiles>,
}

/// Where an adapter and its image encoder were found.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterFiles {
    pub adapter: std::path::PathBuf,
    pub image_encoder: std::path::PathBuf,
}

/// An ip-adapter unit of `alwayson_scripts.controlnet.args`, as the extension runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct A1111IpUnit {
    /// Its index in `alwayson_scripts.controlnet.args` (errors name it).
    pub arg: usize,
    /// Its images (at least one; their tokens are averaged), each with the alpha its `clip`
    /// preprocessor reads (the unit's mask's first channel, grey in three channels; `None`:
    /// no mask, alpha 0).
    pub images: Vec<(RequestImage, Option<RequestImage>)>,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// Its place among the request's enabled units, and its infotext entry.
    pub position: usize,
    pub infotext: String,
}

/// `ip_adapters`: at most [`IP_ADAPTERS_MAX`] objects; `model` a name (1..=255 characters),
/// `image` a base64 PNG/JPEG/WebP, `scale` 0..=2 (1; 0 adds nothing).
pub fn read(v: &Value) -> Result<Vec<ValidIpAdapter>, String> {
    let rule = format!(
        "must be an array of at most {IP_ADAPTERS_MAX} objects {{\"model\": string, \"image\": base64 image, \"scale\": {SCALE_MIN}..={SCALE_MAX}}}"
    );
    let items = v.as_array().ok_or_else(|| rule.clone())?;
    if items.len() > IP_ADAPTERS_MAX {
        return Err(rule);
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("[{i}]: {rule}"))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !["model", "image", "scale"].contains(&k.as_str()))
        {
            return Err(format!("[{i}]: unknown key {k:?}; {rule}"));
        }
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .map(super::fields::sanitize_text)
            .filter(|n| !n.is_empty() && n.chars().count() <= NAME_MAX)
            .ok_or_else(|| {
                format!("[{i}].model: a name of 1..={NAME_MAX} characters is required")
            })?;
        let image = obj
            .get("image")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("[{i}].image: a base64 image is required"))?;
        let image = crate::images::decode_base64(image).map_err(|e| format!("[{i}].image: {e}"))?;
        let scale = match obj.get("scale") {
            None | Some(Value::Null) => 1.0,
            Some(v) => v
                .as_f64()
                .filter(|x| (SCALE_MIN..=SCALE_MAX).contains(x))
                .ok_or_else(|| {
                    format!("[{i}].scale: must be a number between {SCALE_MIN} and {SCALE_MAX}")
                })?,
        };
        out.push(ValidIpAdapter {
            model,
            image,
            scale,
            a1111: None,
            files: None,
        });
    }
    Ok(out)
}

/// The pipeline's run of an A1111 unit; the Plus negative side's file is found where the job
/// runs (`ip_adapters::with_ip_adapter_files`).
pub fn extension_run(u: &A1111IpUnit) -> ExtensionRun {
    ExtensionRun {
        images: u
            .images
            .iter()
            .map(|(image, alpha)| ExtensionImage {
                image: image.image.clone(),
                alpha: alpha.as_ref().map(|a| first_channel(&a.image)),
            })
            .collect(),
        guidance_start: u.guidance_start,
        guidance_end: u.guidance_end,
        plus_uncond: None,
        record: Some(ExtensionRecord {
            position: u.position,
            infotext: u.infotext.clone(),
        }),
    }
}

/// The first channel of a grey image (an alpha kept as a three-channel image).
pub fn first_channel(grey: &sdserve_pipeline::pipeline::RgbImage) -> Vec<u8> {
    grey.pixels.chunks_exact(3).map(|p| p[0]).collect()
}
