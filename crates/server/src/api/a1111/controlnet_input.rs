//! A ControlNet unit's input as the extension reads it: its own image and mask in the forms
//! `get_input_images_rgba` takes, each decoded as `HWC3` does, and an inpaint unit's RGBA feed
//! (`choose_input_image`).

use serde_json::{Map, Value};

use crate::error::ApiError;
use sdserve_pipeline::pipeline::RgbImage;

use super::controlnet::bad;
use super::controlnet_img2img::Img2ImgInput;

/// An inpaint unit's RGBA feed as the extension's `choose_input_image` makes it: its own image
/// and its mask's first channel (none: zeros; a mask of another size is refused), or on
/// img2img the init image and A1111's mask as `prepare_mask` makes it (none: zeros); the
/// mask grey in three channels.
pub(super) fn rgba_feed(
    source: &Source<'_>,
    img2img: Option<&Img2ImgInput>,
    i: usize,
) -> Result<(RgbImage, RgbImage), ApiError> {
    let field = |k: &str, e: String| bad(format!("[{i}].{k}: {e}"));
    let (rgb, mask) = match source {
        Source::Own((text, mask)) => {
            let rgb = read_hwc3(text).map_err(|e| field("image", e))?.image;
            let mask = match mask {
                Some(m) => Some(read_hwc3(m).map_err(|e| field("mask", e))?.image),
                None => None,
            };
            (rgb, mask)
        }
        Source::Init(init) => (
            (*init).clone(),
            img2img.and_then(|input| input.mask.clone()),
        ),
    };
    let (w, h) = (rgb.width as usize, rgb.height as usize);
    let alpha = match mask {
        None => vec![0; w * h],
        Some(m) if (m.width, m.height) == (rgb.width, rgb.height) => {
            m.pixels.chunks_exact(3).map(|p| p[0]).collect()
        }
        Some(m) => {
            return Err(field(
                "mask",
                format!(
                    "{}x{}, its image {}x{}: they must be the same size",
                    m.width, m.height, w, h
                ),
            ))
        }
    };
    Ok((rgb, sdserve_pipeline::inpaint_a1111::grey(&alpha, w, h)))
}

/// A unit's image or mask as the extension reads it (`HWC3`: RGBA over white).
pub(super) fn read_hwc3(text: &str) -> Result<crate::images::RequestImage, String> {
    match crate::images::decode_hwc3_base64(text)? {
        Some(image) => Ok(image),
        None => crate::images::decode_base64(text),
    }
}

/// Where a unit's image comes from.
pub(super) enum Source<'a> {
    /// Its own image and mask, base64.
    Own((&'a str, Option<&'a str>)),
    /// img2img's init image.
    Init(&'a RgbImage),
}

/// A unit's own image and mask (base64) as the extension's `get_input_images_rgba` reads
/// them: `image` (or `input_image`) a string with `mask` (or `mask_image`, not both), an
/// `{image, mask}` object, or an `[image, mask]` pair; `None` without an image.
pub(super) fn own_image(
    unit: &Map<String, Value>,
    i: usize,
) -> Result<Option<(&str, Option<&str>)>, ApiError> {
    fn text<'a>(v: Option<&'a Value>, k: &str, i: usize) -> Result<Option<&'a str>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(bad(format!("[{i}].{k}: a base64 image is required"))),
        }
    }
    let text = |v, k| text(v, k, i);
    let (mask, mask_image) = (
        text(unit.get("mask"), "mask")?,
        text(unit.get("mask_image"), "mask_image")?,
    );
    if mask.is_some() && mask_image.is_some() {
        return Err(bad(format!("[{i}].mask_image: not with mask (its alias)")));
    }
    let mask = mask.or(mask_image);
    let own = match unit.get("image").or_else(|| unit.get("input_image")) {
        Some(Value::Object(o)) => {
            let image = text(o.get("image"), "image.image")?
                .ok_or_else(|| bad(format!("[{i}].image.image: a base64 image is required")))?;
            Some((image, text(o.get("mask"), "image.mask")?))
        }
        Some(Value::Array(a)) => match a.as_slice() {
            [image, m] if image.is_string() => Some((
                text(Some(image), "image[0]")?.ok_or_else(|| {
                    bad(format!("[{i}].image[0]: a base64 image is required"))
                })?,
                text(Some(m), "image[1]")?,
            )),
            _ => {
                return Err(bad(format!(
                    "[{i}].image: one image, as base64, {{\"image\", \"mask\"}} or [image, mask] (several images are not supported)"
                )))
            }
        },
        v => text(v, "image")?.map(|image| (image, mask)),
    };
    if own.is_none() && mask.is_some() {
        return Err(bad(format!(
            "[{i}].mask: a unit's mask needs the unit's image"
        )));
    }
    Ok(own)
}
