//! `POST /controlnet/detect`, the sd-webui-controlnet extension's (`scripts/api.py`): each of
//! `controlnet_input_images` through the preprocessor `controlnet_module` with
//! `controlnet_processor_res`, `controlnet_threshold_a` and `_b` (as a unit's settings:
//! `controlnet_modules`), answered as `{images, info: "Success"}` (base64 PNGs, in order), with
//! `poses` (each image's pose JSON, as the extension's `json_pose_callback` gives it) for
//! the OpenPose modules.
//! `none` answers the images as they are. webuiapi 0.9.17's `controlnet_detect()` sends the
//! images as `controlnet_images`, which the extension ignores (its 422 "No image selected"):
//! taken here as the same list. The inpaint modules (`inpaint`, `inpaint_only`,
//! `inpaint_only+lama`) need one of `controlnet_masks` per image (the extension's
//! `requires_mask`) and answer what its `visualize_inpaint_mask` shows: the image as RGBA,
//! alpha `255 - mask // 2` (the mask's first channel); `inpaint_only+lama` the image LaMa
//! painted under the mask (its first display image, RGB); other modules ignore the masks, as `low_vram`. `shuffle` draws from numpy's generator, which the extension leaves
//! unseeded here (a new map each call): a random seed here too, or `controlnet_seed` (ours).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::super::request::required_body_object;
use crate::api::Shared;
use crate::error::ApiError;
use sdserve_pipeline::controlnet::preprocess::Preprocessor;

/// Images one call may preprocess.
pub const DETECT_MAX_IMAGES: usize = 16;

/// Body of `POST /controlnet/detect`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ControlNetDetectRequest)]
pub struct ControlNetDetectRequest {
    /// A module of `GET /controlnet/module_list` (name or label, any case).
    #[schema(default = "none")]
    pub controlnet_module: Option<String>,
    /// Base64 PNG, JPEG or WebP images (a `data:image/...;base64,` prefix is allowed), at most
    /// 4096 px a side and 16 MP; 1..=16 of them.
    #[schema(max_items = 16)]
    pub controlnet_input_images: Option<Vec<String>>,
    /// webuiapi's name for `controlnet_input_images` (used when that is absent or empty).
    #[schema(max_items = 16)]
    pub controlnet_images: Option<Vec<String>>,
    /// The processor resolution (not used by invert and tile_resample); -1 or outside the
    /// module's slider: its default (512).
    #[schema(default = -1)]
    pub controlnet_processor_res: Option<f64>,
    /// The module's first slider (canny: the low threshold; threshold and scribble_xdog: the
    /// threshold; blur_gaussian: sigma; tile_resample: the down sampling rate); -1 or outside
    /// it: its default.
    #[schema(default = -1)]
    pub controlnet_threshold_a: Option<f64>,
    /// The module's second slider (canny: the high threshold); -1 or outside it: its default.
    #[schema(default = -1)]
    pub controlnet_threshold_b: Option<f64>,
    /// One mask per image (base64, the image's size; its first channel), for the inpaint
    /// modules, which need them; ignored by the others.
    #[schema(max_items = 16)]
    pub controlnet_masks: Option<Vec<String>>,
    /// Accepted and ignored.
    pub low_vram: Option<bool>,
    /// Not the extension's: `shuffle`'s numpy seed (`np.random.seed`), the same map each
    /// time; absent or null: a random one, as the extension's unseeded generator.
    #[schema(minimum = 0, maximum = 4294967295_u32)]
    pub controlnet_seed: Option<u32>,
}

/// Answer of `POST /controlnet/detect`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ControlNetDetectResponse)]
pub struct ControlNetDetectResponse {
    /// The maps, base64 PNG, in the order of the images.
    pub images: Vec<String>,
    /// The OpenPose modules only: each image's people in the OpenPose JSON format (`people`
    /// with `pose_keypoints_2d`: x, y normalized by the padded image, 1 per keypoint, or 0,
    /// 0, 0; `hand_left_keypoints_2d`, `hand_right_keypoints_2d`, `face_keypoints_2d` the
    /// same where looked for and found, else null; `animals`, `canvas_height`,
    /// `canvas_width`), in the order of the images.
    #[schema(value_type = Option<Vec<Object>>)]
    pub poses: Option<Vec<Value>>,
    /// `Success`.
    pub info: String,
}

/// The images of the body: `controlnet_input_images`, else webuiapi's `controlnet_images`.
fn images(body: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    let list = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(|s| (format!("{key}[{i}]"), s.to_string()))
                    .ok_or_else(|| {
                        ApiError::validation(key, format!("[{i}]: a base64 image (a string)"))
                    })
            })
            .collect(),
        Some(_) => Err(ApiError::validation(key, "must be a list of base64 images")),
    };
    let mut found = list("controlnet_input_images")?;
    if found.is_empty() {
        found = list("controlnet_images")?;
    }
    if found.is_empty() {
        return Err(ApiError::validation(
            "controlnet_input_images",
            "No image selected: a list of 1 or more base64 images is required",
        ));
    }
    if found.len() > DETECT_MAX_IMAGES {
        return Err(ApiError::validation(
            "controlnet_input_images",
            format!("at most {DETECT_MAX_IMAGES} images, got {}", found.len()),
        ));
    }
    Ok(found)
}

/// A rule from `controlnet_modules::preprocessor` (`controlnet_<key>: <rule>`) as a field error.
fn named(message: String) -> ApiError {
    match message.split_once(": ") {
        Some((field, rule)) => ApiError::validation(field, rule),
        None => ApiError::validation("controlnet_module", message),
    }
}

/// The maps of the body's images, base64 PNGs, and the OpenPose modules' pose JSON of each.
/// Blocking (decodes and preprocesses).
fn detect_maps_and_poses(body: &Map<String, Value>) -> Result<(Vec<String>, Vec<Value>), ApiError> {
    let module = match body.get("controlnet_module") {
        None | Some(Value::Null) => "none",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(ApiError::validation(
                "controlnet_module",
                "must be a module name (GET /controlnet/module_list)",
            ))
        }
    };
    let numpy_seed = match body.get("controlnet_seed") {
        None | Some(Value::Null) => crate::api::random_seed(),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::validation("controlnet_seed", "must be an integer in 0..=4294967295")
            })?,
    };
    let preprocessor = super::controlnet_modules::preprocessor(
        module,
        body.get("controlnet_processor_res"),
        body.get("controlnet_threshold_a"),
        body.get("controlnet_threshold_b"),
        "controlnet_",
        numpy_seed,
    )
    .map_err(named)?;
    if let Some(p) = preprocessor.filter(|p| p.takes_mask()) {
        return Ok((inpaint_maps(module, p, body)?, Vec::new()));
    }
    let mut out = Vec::new();
    let mut poses = Vec::new();
    for (i, (field, b64)) in images(body)?.into_iter().enumerate() {
        let decoded =
            crate::images::decode_base64(&b64).map_err(|e| ApiError::validation(&field, e))?;
        let map = match &preprocessor {
            Some(p) => crate::validate::preprocessor::run_with_poses(p, &decoded.image, i)
                .map_err(|e| {
                    // The rule names the resolution as the native field; here it is this one.
                    let rule = e
                        .split_once(": ")
                        .map_or(e.as_str(), |(_, r)| r)
                        .to_string();
                    // tile_resample's rule is about its rate, the first slider.
                    let key = if e.contains(".down_sampling_rate: ") {
                        "controlnet_threshold_a"
                    } else if e.contains(".type: ") {
                        // A model-based module without its weights.
                        "controlnet_module"
                    } else {
                        "controlnet_processor_res"
                    };
                    ApiError::validation(key, format!("{field}: {rule}"))
                })?,
            None => (decoded.image, None),
        };
        let (map, pose) = map;
        poses.extend(pose);
        let png = crate::png::encode_with_text(&map, &[]).map_err(ApiError::Internal)?;
        out.push(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok((out, poses))
}

/// The inpaint modules' answer: each image with its mask (`controlnet_masks[i]`'s first
/// channel) as the extension's `visualize_inpaint_mask` shows it, RGBA with alpha
/// `255 - mask // 2`, base64 PNG; `inpaint_only+lama` the first of its display images, the
/// RGB of its result (the image painted by LaMa under the mask).
fn inpaint_maps(
    module: &str,
    p: Preprocessor,
    body: &Map<String, Value>,
) -> Result<Vec<String>, ApiError> {
    let images = images(body)?;
    let masks: Vec<&str> = match body.get("controlnet_masks") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if masks.len() != images.len() {
        return Err(ApiError::validation(
            "controlnet_masks",
            format!("Preprocessor {module} requires `controlnet_masks` param: one base64 mask per image"),
        ));
    }
    let mut out = Vec::with_capacity(images.len());
    for (i, ((field, image), mask)) in images.into_iter().zip(masks).enumerate() {
        let image = crate::images::decode_base64(&image)
            .map_err(|e| ApiError::validation(&field, e))?
            .image;
        let mask_field = format!("controlnet_masks[{i}]");
        let mask = crate::images::decode_base64(mask)
            .map_err(|e| ApiError::validation(&mask_field, e))?
            .image;
        if (mask.width, mask.height) != (image.width, image.height) {
            return Err(ApiError::validation(
                &mask_field,
                format!(
                    "{}x{}, its image {}x{}: they must be the same size",
                    mask.width, mask.height, image.width, image.height
                ),
            ));
        }
        if p == Preprocessor::InpaintOnlyLama {
            let first: Vec<u8> = mask.pixels.iter().step_by(3).copied().collect();
            let map = crate::validate::preprocessor::run_with_mask(&p, &image, &first, i).map_err(
                |e| {
                    let rule = e.split_once(": ").map_or(e.as_str(), |(_, r)| r);
                    ApiError::validation("controlnet_module", format!("{field}: {rule}"))
                },
            )?;
            let png = crate::png::encode_with_text(&map, &[]).map_err(ApiError::Internal)?;
            out.push(base64::engine::general_purpose::STANDARD.encode(png));
            continue;
        }
        let rgba: Vec<u8> = image
            .pixels
            .chunks_exact(3)
            .zip(mask.pixels.chunks_exact(3))
            .flat_map(|(c, m)| [c[0], c[1], c[2], 255 - m[0] / 2])
            .collect();
        let mut png = Vec::new();
        image::RgbaImage::from_raw(image.width, image.height, rgba)
            .expect("4 bytes a pixel")
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.push(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok(out)
}

/// The extension's `/controlnet/detect`.
#[utoipa::path(post, path = "/controlnet/detect", tag = "a1111", request_body = ControlNetDetectRequest,
    responses((status = 200, body = ControlNetDetectResponse), (status = 400, description = "`invalid_json`: not a JSON object", body = crate::error::ErrorBody), (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody), (status = 422, description = "A module not run here (the modules listed), no image or more than 16, an image that is not one or is too large, or too large at the processor resolution", body = crate::error::ErrorBody)))]
pub(super) async fn detect(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = required_body_object(app.max_body_bytes, body)?;
    let (images, poses) = crate::api::off_the_runtime(move || detect_maps_and_poses(&body)).await?;
    let mut answer = json!({"images": images, "info": "Success"});
    if !poses.is_empty() {
        answer["poses"] = json!(poses);
    }
    Ok(Json(answer))
}

/// The maps alone (the tests of the other modules).
#[cfg(test)]
fn detect_maps(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    detect_maps_and_poses(body).map(|(maps, _)| maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_pipeline::controlnet::preprocess::Preprocessor;
    use sdserve_pipeline::pipeline::RgbImage;

    fn png_b64(image: &RgbImage) -> String {
        let png = crate::png::encode_with_text(image, &[]).unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn detect_answers_each_image_s_map_and_names_broken_fields() {
        let photo = RgbImage {
            width: 20,
            height: 16,
            pixels: (0..20 * 16 * 3)
                .map(|i| if (i / 3) % 20 < 9 { 20 } else { 230 })
                .collect(),
        };
        let b64 = png_b64(&photo);
        let maps = detect_maps(&body(json!({
            "controlnet_module": "canny", "controlnet_input_images": [b64, b64],
            "controlnet_processor_res": 64, "controlnet_threshold_a": 50,
            "controlnet_threshold_b": -1})))
        .unwrap();
        let want = Preprocessor::Canny {
            low_threshold: 50.0,
            high_threshold: 200.0,
            resolution: 64,
        }
        .run(&photo)
        .unwrap();
        assert!(want.pixels.contains(&255));
        assert_eq!(maps, vec![png_b64(&want), png_b64(&want)]);
        // The other modules, each with its first slider as the extension names it.
        for (module, a, want) in [
            (
                "invert (from white bg & black line)",
                json!(-1),
                Preprocessor::Invert,
            ),
            (
                "threshold",
                json!(100),
                Preprocessor::Threshold {
                    threshold: 100.0,
                    resolution: 64,
                },
            ),
            (
                "blur_gaussian",
                json!(1.5),
                Preprocessor::BlurGaussian {
                    sigma: 1.5,
                    resolution: 64,
                },
            ),
            (
                "tile_resample",
                json!(2),
                Preprocessor::TileResample {
                    down_sampling_rate: 2.0,
                },
            ),
            (
                "t2ia_color_grid",
                json!(-1),
                Preprocessor::Color { resolution: 64 },
            ),
        ] {
            let maps = detect_maps(&body(json!({
                "controlnet_module": module, "controlnet_input_images": [b64],
                "controlnet_processor_res": 64, "controlnet_threshold_a": a})))
            .unwrap();
            assert_eq!(maps, vec![png_b64(&want.run(&photo).unwrap())], "{module}");
        }
        // shuffle: our `controlnet_seed` decides the map, else a random one (the extension's
        // unseeded numpy); its hidden resolution slider is 512 for 64.
        let shuffle = |seed: Value| {
            detect_maps(&body(json!({
                "controlnet_module": "shuffle", "controlnet_input_images": [b64],
                "controlnet_processor_res": 64, "controlnet_seed": seed})))
        };
        let seeded = Preprocessor::Shuffle {
            resolution: 512,
            seed: 9,
        }
        .run(&photo)
        .unwrap();
        assert_eq!(shuffle(json!(9)).unwrap(), vec![png_b64(&seeded)]);
        assert_ne!(shuffle(Value::Null).unwrap(), shuffle(Value::Null).unwrap());
        let e = shuffle(json!(-3)).unwrap_err();
        assert!(
            format!("{:?}", e.body()).contains("controlnet_seed"),
            "{:?}",
            e.body()
        );
        // A side shorter than the rate: no pixels left, a 422 naming the slider.
        let thin = png_b64(&RgbImage {
            width: 20,
            height: 3,
            pixels: vec![90; 20 * 3 * 3],
        });
        let e = detect_maps(&body(json!({
            "controlnet_module": "tile_resample", "controlnet_input_images": [thin],
            "controlnet_threshold_a": 8})))
        .unwrap_err();
        assert!(
            format!("{:?}", e.body()).contains("controlnet_threshold_a"),
            "{:?}",
            e.body()
        );
        // webuiapi's key; `none` answers the image itself.
        let same = detect_maps(&body(json!({"controlnet_images": [b64]}))).unwrap();
        assert_eq!(same, vec![b64.clone()]);
        for (v, field, needle) in [
            (
                json!({"controlnet_module": "canny"}),
                "controlnet_input_images",
                "No image selected",
            ),
            (
                json!({"controlnet_module": "depth_zoe", "controlnet_input_images": [b64]}),
                "controlnet_module",
                "is not run here; one of",
            ),
            (
                // A model-based module without ANNOTATOR_DIR.
                json!({"controlnet_module": "hed", "controlnet_input_images": [b64]}),
                "controlnet_module",
                "\\\"softedge_hed\\\" needs ControlNetHED.pth",
            ),
            (
                json!({"controlnet_module": "canny", "controlnet_input_images": [b64],
                       "controlnet_threshold_a": "high"}),
                "controlnet_threshold_a",
                "must be a number",
            ),
            (
                json!({"controlnet_input_images": ["bm90IGFuIGltYWdl"]}),
                "controlnet_input_images[0]",
                "",
            ),
            (
                json!({"controlnet_input_images": vec![b64.clone(); 17]}),
                "controlnet_input_images",
                "at most 16",
            ),
        ] {
            let e = detect_maps(&body(v)).unwrap_err();
            let text = format!("{:?}", e.body());
            assert!(
                text.contains(field) && text.contains(needle),
                "{field} {needle}: {text}"
            );
        }
    }

    #[test]
    fn inpaint_modules_answer_the_image_with_its_mask_as_alpha() {
        let image = RgbImage {
            width: 4,
            height: 2,
            pixels: (0..24).map(|i| (i * 10) as u8).collect(),
        };
        let mask = RgbImage {
            width: 4,
            height: 2,
            pixels: [0u8, 255, 128, 7, 255, 0, 1, 200]
                .iter()
                .flat_map(|&v| [v, 0, 0])
                .collect(),
        };
        for module in ["inpaint_only", "inpaint_global_harmonious"] {
            let maps = detect_maps(&body(json!({"controlnet_module": module,
                "controlnet_input_images": [png_b64(&image)],
                "controlnet_masks": [png_b64(&mask)]})))
            .unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&maps[0])
                .unwrap();
            let got = image::load_from_memory(&bytes).unwrap().to_rgba8();
            let want: Vec<u8> = image
                .pixels
                .chunks_exact(3)
                .zip([0u8, 255, 128, 7, 255, 0, 1, 200])
                .flat_map(|(c, m)| [c[0], c[1], c[2], 255 - m / 2])
                .collect();
            assert_eq!(got.into_raw(), want, "{module}");
        }
        // Without a mask per image: the extension's 422.
        let e = detect_maps(&body(json!({"controlnet_module": "inpaint",
            "controlnet_input_images": [png_b64(&image)]})))
        .unwrap_err();
        assert!(format!("{:?}", e.body()).contains("controlnet_masks"));
        let small = RgbImage {
            width: 2,
            height: 2,
            pixels: vec![0; 12],
        };
        let e = detect_maps(&body(json!({"controlnet_module": "inpaint",
            "controlnet_input_images": [png_b64(&image)],
            "controlnet_masks": [png_b64(&small)]})))
        .unwrap_err();
        assert!(format!("{:?}", e.body()).contains("same size"));
    }
}
