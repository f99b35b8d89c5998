//! The native `ip_adapters` field: `[{model, image, scale}]`, diffusers' `load_ip_adapter`
//! (one adapter of IP_ADAPTER_DIR per object), `ip_adapter_image` and `set_ip_adapter_scale`.

use serde_json::Value;

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
        });
    }
    Ok(out)
}
