//! Images in requests (`init_image`, `mask_image`): base64 (optionally a `data:image/...;base64,`
//! URL) of a PNG, JPEG or WebP, decoded with the `image` crate.
//!
//! The size is read from the header and checked before any pixel buffer exists, so a tiny file
//! claiming 60000x60000 costs nothing; the decoder also runs under allocation limits, so a
//! header that lies cannot make it allocate more. Corrupt or truncated data is an error naming
//! what is wrong, never a panic.

use std::io::Cursor;

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use sdserve_pipeline::pipeline::RgbImage;
use sha2::{Digest, Sha256};

/// The largest side accepted, in pixels.
pub const MAX_SIDE: u32 = 4096;
/// The most pixels accepted (16 MP).
pub const MAX_PIXELS: u64 = 16 * 1024 * 1024;

/// A decoded request image and the digest of its pixels (for the response cache's key).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestImage {
    pub image: RgbImage,
    pub sha256: String,
}

/// Decodes a request image; the error is the broken rule, for a 422 naming the field.
pub fn decode_base64(text: &str) -> Result<RequestImage, String> {
    #[cfg(test)]
    test_gate::hold(text);
    decode_bytes(&base64_bytes(text)?)
}

/// The file bytes of a base64 request image (a `data:image/...;base64,` URL or plain base64).
pub fn base64_bytes(text: &str) -> Result<Vec<u8>, String> {
    let data = strip_data_url(text)?;
    // Base64 of any length up to the body limit: decoded size is 3/4 of it.
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("must be base64 ({e})"))
}

/// Tests hold the decode of one chosen image here, to see what the server does meanwhile.
#[cfg(test)]
pub(crate) mod test_gate {
    use std::sync::mpsc::{Receiver, Sender};
    use std::sync::Mutex;
    use std::time::Duration;

    pub struct Gate {
        /// The base64 text whose decode is held (other tests' images pass).
        pub text: String,
        /// Told when the decode reached the gate.
        pub entered: Sender<()>,
        /// The decode goes on once this receives (or after a minute).
        pub release: Receiver<()>,
    }

    pub static GATE: Mutex<Option<Gate>> = Mutex::new(None);

    pub fn hold(text: &str) {
        let gate = {
            let mut g = GATE.lock().unwrap_or_else(|e| e.into_inner());
            if g.as_ref().is_none_or(|g| g.text != text) {
                return;
            }
            g.take()
        };
        if let Some(g) = gate {
            let _ = g.entered.send(());
            let _ = g.release.recv_timeout(Duration::from_secs(60));
        }
    }
}

/// `data:image/png;base64,....` -> the base64 part; plain base64 as is.
fn strip_data_url(text: &str) -> Result<&str, String> {
    let Some(rest) = text.strip_prefix("data:") else {
        return Ok(text);
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or("is a data: URL without a comma before its data")?;
    if !meta.starts_with("image/") || !meta.ends_with(";base64") {
        return Err(format!(
            "must be base64 or a data:image/...;base64, URL (got data:{meta})"
        ));
    }
    Ok(data)
}

/// Decodes PNG, JPEG or WebP bytes to RGB8 (alpha dropped, grey repeated), checking the size
/// from the header first.
pub fn decode_bytes(bytes: &[u8]) -> Result<RequestImage, String> {
    let (format, _, _) = header(bytes)?;
    Ok(request_image(decode_image(bytes, format)?.to_rgb8()))
}

/// The decoded image of bytes whose header passed [`header`], under allocation limits, turned
/// upright by its EXIF Orientation tag (phones write rotated JPEGs): Pillow's
/// `ImageOps.exif_transpose`, which diffusers' `load_image` and A1111's `images.read` (its
/// API's every uploaded image) apply. A tag that cannot be read leaves the image as stored, as
/// A1111's `fix_image` does.
fn decode_image(bytes: &[u8], format: ImageFormat) -> Result<DynamicImage, String> {
    let unreadable =
        |e: image::ImageError| format!("is not a readable {} image ({e})", name(format));
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // RGBA16 of the largest image: room for the decoder's own buffer, no more.
    limits.max_alloc = Some(MAX_PIXELS * 8 + (1 << 20));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    limits.reserve(decoder.total_bytes()).map_err(unreadable)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn request_image(rgb: image::RgbImage) -> RequestImage {
    let image = RgbImage {
        width: rgb.width(),
        height: rgb.height(),
        pixels: rgb.into_raw(),
    };
    let sha256 = digest(&image);
    RequestImage { image, sha256 }
}

/// An A1111 img2img `mask` as its API reads it (`decode_base64_to_image`, then
/// `create_binary_mask` with `mask_round` as `round`): an image Pillow opens as RGBA whose
/// alpha is not all 255 is its alpha channel, white above 128 and black at or below when
/// `round`, its levels as they are when not; any other is read as every request image is (its
/// colours, whose luminance the pipeline takes).
pub fn decode_a1111_mask_base64(text: &str, round: bool) -> Result<RequestImage, String> {
    let bytes = base64_bytes(text)?;
    let (format, _, _) = header(&bytes)?;
    let decoded = decode_image(&bytes, format)?;
    let alpha: Option<Vec<u8>> = match &decoded {
        _ if !pillow_opens_as_rgba(&bytes, format) => None,
        DynamicImage::ImageRgba8(i) => Some(i.pixels().map(|p| p[3]).collect()),
        // Pillow keeps each 16-bit sample's high byte.
        DynamicImage::ImageRgba16(i) => Some(i.pixels().map(|p| (p[3] >> 8) as u8).collect()),
        _ => None,
    };
    let Some(alpha) = alpha.filter(|a| a.iter().any(|&v| v != 255)) else {
        return Ok(request_image(decoded.to_rgb8()));
    };
    let pixels = alpha
        .iter()
        .map(|&a| match round {
            true if a > 128 => 255,
            true => 0,
            false => a,
        })
        .flat_map(|a| [a; 3])
        .collect();
    let grey = image::RgbImage::from_raw(decoded.width(), decoded.height(), pixels)
        .ok_or("has an alpha channel of the wrong length")?;
    Ok(request_image(grey))
}

/// A sd-webui-controlnet unit's image or mask as the extension reads it (`to_base64_nparray`,
/// then `HWC3`): an image Pillow opens as RGBA is composited over white in float32
/// (`color * a + 255 * (1 - a)`, `a = alpha / 255`, truncated to u8); any other is read as
/// every request image is. `None`: not RGBA (the upload can be used as sent).
pub fn decode_hwc3_base64(text: &str) -> Result<Option<RequestImage>, String> {
    let bytes = base64_bytes(text)?;
    let (format, _, _) = header(&bytes)?;
    if !pillow_opens_as_rgba(&bytes, format) {
        return Ok(None);
    }
    let decoded = decode_image(&bytes, format)?;
    // The decoded size: an EXIF Orientation may have turned it.
    let (w, h) = (decoded.width(), decoded.height());
    let rgba: Vec<[u8; 4]> = match decoded {
        // Pillow keeps each 16-bit sample's high byte.
        DynamicImage::ImageRgba16(i) => i.pixels().map(|p| p.0.map(|v| (v >> 8) as u8)).collect(),
        other => other.to_rgba8().pixels().map(|p| p.0).collect(),
    };
    let pixels = rgba
        .iter()
        .flat_map(|p| {
            let a = f32::from(p[3]) / 255.0;
            [0, 1, 2].map(|c| (f32::from(p[c]) * a + 255.0 * (1.0 - a)).clamp(0.0, 255.0) as u8)
        })
        .collect();
    let rgb = image::RgbImage::from_raw(w, h, pixels).ok_or("has pixels of the wrong length")?;
    Ok(Some(request_image(rgb)))
}

/// Whether Pillow opens these bytes as RGBA (A1111's `images.read` included): a PNG of colour
/// type RGBA; a palette PNG whose `tRNS` is more than one fully transparent entry among opaque
/// ones (Pillow keeps that one `P` with a transparent index, `fix_png_transparency` converts
/// the others); a WebP with alpha (decoded as RGBA). Never an LA PNG, an RGB or grey PNG with
/// a transparent colour, or a JPEG.
fn pillow_opens_as_rgba(bytes: &[u8], format: ImageFormat) -> bool {
    match format {
        ImageFormat::WebP => true,
        ImageFormat::Png => {
            let Ok(reader) = png::Decoder::new(Cursor::new(bytes)).read_info() else {
                return false;
            };
            let info = reader.info();
            match info.color_type {
                png::ColorType::Rgba => true,
                // Pillow's `_simple_palette`: `^\xff*\x00\xff*$`.
                png::ColorType::Indexed => info.trns.as_deref().is_some_and(|t| {
                    !(t.iter().filter(|&&a| a == 0).count() == 1
                        && t.iter().all(|&a| a == 0 || a == 255))
                }),
                _ => false,
            }
        }
        _ => false,
    }
}

/// The format and size of PNG, JPEG or WebP bytes, from the header alone; the size rule
/// ([`check_dimensions`]) checked.
pub fn header(bytes: &[u8]) -> Result<(ImageFormat, u32, u32), String> {
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP))
        .ok_or("must be a PNG, JPEG or WebP image")?;
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("is not a readable {} image ({e})", name(format)))?;
    check_dimensions(w, h)?;
    Ok((format, w, h))
}

fn name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        _ => "WebP",
    }
}

/// The size rule: at most [`MAX_SIDE`] a side and [`MAX_PIXELS`] in all.
pub fn check_dimensions(w: u32, h: u32) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("has no pixels ({w}x{h})"));
    }
    if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!(
            "is {w}x{h}; at most {MAX_SIDE} pixels a side and {} MP are accepted",
            MAX_PIXELS >> 20
        ));
    }
    Ok(())
}

/// sha256 of the size and pixels, hex.
pub fn digest(image: &RgbImage) -> String {
    let mut h = Sha256::new();
    h.update(image.width.to_le_bytes());
    h.update(image.height.to_le_bytes());
    h.update(&image.pixels);
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// `floor(side / 64) * 64` clamped to the API's size range: the default width or height of a
/// request with an init image.
pub fn default_side(side: u32, min: u64, max: u64, multiple: u64) -> usize {
    let floored = u64::from(side) / multiple * multiple;
    floored.clamp(min, max) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i % 251) as u8).collect(),
        };
        crate::png::encode(&img, "").unwrap()
    }

    #[test]
    fn decodes_png_plain_and_as_a_data_url() {
        let bytes = png_bytes(5, 3);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let a = decode_base64(&b64).unwrap();
        assert_eq!((a.image.width, a.image.height), (5, 3));
        assert_eq!(a.image.pixels[..6], [0, 1, 2, 3, 4, 5]);
        let b = decode_base64(&format!("data:image/png;base64,{b64}")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.sha256.len(), 64);
    }

    #[test]
    fn decodes_jpeg_and_webp() {
        let rgb =
            image::RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 90]));
        for format in [ImageFormat::Jpeg, ImageFormat::WebP] {
            let mut out = Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(rgb.clone())
                .write_to(&mut out, format)
                .unwrap();
            let d = decode_bytes(out.get_ref()).unwrap();
            assert_eq!((d.image.width, d.image.height), (16, 8), "{format:?}");
        }
    }

    #[test]
    fn refuses_garbage_truncation_and_huge_headers() {
        assert!(decode_base64("!!!not base64")
            .unwrap_err()
            .contains("base64"));
        let text = base64::engine::general_purpose::STANDARD.encode(b"hello, not an image");
        assert!(decode_base64(&text)
            .unwrap_err()
            .contains("PNG, JPEG or WebP"));
        let bytes = png_bytes(64, 64);
        let cut = &bytes[..bytes.len() / 2];
        assert!(decode_bytes(cut)
            .unwrap_err()
            .contains("not a readable PNG"));
        // A few bytes of PNG claiming 60000x60000 pixels: refused from the header alone.
        let mut huge = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut huge, 60000, 60000);
            enc.set_color(png::ColorType::Rgb);
            let mut w = enc.write_header().unwrap();
            // One tiny IDAT (an empty zlib stream): the file is well formed up to its data.
            w.write_chunk(
                png::chunk::IDAT,
                &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
            )
            .unwrap();
        }
        assert!(huge.len() < 100, "{}", huge.len());
        let started = std::time::Instant::now();
        let err = decode_bytes(&huge).unwrap_err();
        assert!(err.contains("60000x60000"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(check_dimensions(4096, 4096).is_ok());
        assert!(check_dimensions(4096, 4097).is_err());
        assert!(check_dimensions(4096, 4096 + 1).is_err());
    }

    /// A1111's own masks for files of every kind (tools/make_a1111_mask_alpha_fixtures.py):
    /// through the pipeline's luminance (PIL's `L`), ours are its, pixel for pixel; read as
    /// other images are (native, OpenAI) the transparent ones are not. With `mask_round` false
    /// the alpha's levels are kept, as A1111's `create_binary_mask(round=False)`.
    #[test]
    fn a1111_masks_read_transparency_as_a1111_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/a1111-mask-alpha");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        let cases = meta["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let file = std::fs::read(dir.join(case["file"].as_str().unwrap())).unwrap();
            let reference = |key: &str| {
                image::open(dir.join(case[key].as_str().unwrap()))
                    .unwrap()
                    .into_luma8()
                    .into_raw()
            };
            let (expected, unrounded) = (reference("expected"), reference("unrounded"));
            let text = base64::engine::general_purpose::STANDARD.encode(&file);
            let luma = |read: &dyn Fn(&str) -> Result<RequestImage, String>| {
                sdserve_pipeline::inpaint_a1111::luma(&read(&text).unwrap().image)
            };
            for (round, want) in [(true, &expected), (false, &unrounded)] {
                let ours = luma(&|t| decode_a1111_mask_base64(t, round));
                let differing = ours.iter().zip(want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differing, 0,
                    "{case} round {round}: {differing} pixels differ"
                );
            }
            let alpha_used = case["alpha_used"].as_bool().unwrap();
            assert_eq!(luma(&decode_base64) != expected, alpha_used, "{case}");
            assert_eq!(unrounded != expected, alpha_used, "{case}");
        }
    }

    /// Files with each EXIF Orientation (tools/make_exif_orientation_fixtures.py: 4:4:4 JPEGs of
    /// flat 8x8 blocks for 1..=8, a PNG's eXIf, a WebP's EXIF) come out as Pillow's
    /// `exif_transpose` (diffusers' `load_image`, A1111's `images.read`) gives them, pixel for
    /// pixel, in every reader of request images.
    #[test]
    fn exif_orientation_is_applied_as_pillow_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/exif-orientation");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        let cases = meta["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 11);
        let stored = image::open(dir.join("jpeg-1.jpg")).unwrap().to_rgb8();
        for case in cases {
            let file = std::fs::read(dir.join(case["file"].as_str().unwrap())).unwrap();
            let want = image::open(dir.join(case["expected"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            let text = base64::engine::general_purpose::STANDARD.encode(&file);
            for (reader, got) in [
                ("decode_base64", decode_base64(&text).unwrap()),
                ("decode_bytes", decode_bytes(&file).unwrap()),
                ("a1111 mask", decode_a1111_mask_base64(&text, true).unwrap()),
            ] {
                let got = got.image;
                assert_eq!(
                    (got.width, got.height),
                    want.dimensions(),
                    "{case} {reader}"
                );
                let differing = got
                    .pixels
                    .iter()
                    .zip(want.as_raw())
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(differing, 0, "{case} {reader}: {differing} bytes differ");
            }
            // Not as stored, but for orientation 1: each tag does something.
            let turned = case["orientation"] != 1;
            assert_eq!(want != stored, turned, "{case}");
        }
    }

    #[test]
    fn default_side_floors_and_clamps() {
        assert_eq!(default_side(700, 256, 768, 64), 640);
        assert_eq!(default_side(100, 256, 768, 64), 256);
        assert_eq!(default_side(3000, 256, 768, 64), 768);
    }
}
