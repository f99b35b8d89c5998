//! "Only masked": A1111's crop region around the mask (`modules/masking.py`
//! `get_crop_region_v2`, `expand_crop_region`) and `modules/images.py` `resize_image`'s modes
//! (0 resize, 1 crop and resize, 2 resize and fill), on Pillow's resampling.

use crate::image_in::{resize_with, Filter};
use crate::pipeline::RgbImage;

/// `(x1, y1, x2, y2)`, right and bottom exclusive.
pub type Region = (i64, i64, i64, i64);

/// `get_crop_region_v2(mask, pad)`: the bounding box of the mask's non-zero pixels (PIL's
/// `getbbox`), grown by `pad` and clipped to the image; `None` for an all-black mask.
pub fn crop_region(mask: &[u8], width: usize, height: usize, pad: u32) -> Option<Region> {
    let mut bbox: Option<Region> = None;
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] != 0 {
                let (x, y) = (x as i64, y as i64);
                bbox = Some(match bbox {
                    None => (x, y, x + 1, y + 1),
                    Some((x1, y1, x2, y2)) => (x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1)),
                });
            }
        }
    }
    let (x1, y1, x2, y2) = bbox?;
    let pad = pad as i64;
    Some((
        (x1 - pad).max(0),
        (y1 - pad).max(0),
        (x2 + pad).min(width as i64),
        (y2 + pad).min(height as i64),
    ))
}

/// `expand_crop_region`: the region grown along one axis to the processing size's aspect,
/// kept inside the image (Python's floor division and int truncation).
pub fn expand_crop_region(
    (mut x1, mut y1, mut x2, mut y2): Region,
    processing_width: usize,
    processing_height: usize,
    image_width: usize,
    image_height: usize,
) -> Region {
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = processing_width as f64 / processing_height as f64;
    let (iw, ih) = (image_width as i64, image_height as i64);
    // One axis grows: (lo, hi) within 0..limit.
    let grow = |lo: &mut i64, hi: &mut i64, desired: f64, limit: i64| {
        let diff = (desired - (*hi - *lo) as f64) as i64;
        *lo -= diff.div_euclid(2);
        *hi += diff - diff.div_euclid(2);
        if *hi >= limit {
            let over = *hi - limit;
            *hi -= over;
            *lo -= over;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        if *hi >= limit {
            *hi = limit;
        }
    };
    if ratio_crop > ratio_processing {
        let desired_height = (x2 - x1) as f64 / ratio_processing;
        grow(&mut y1, &mut y2, desired_height, ih);
    } else {
        let desired_width = (y2 - y1) as f64 * ratio_processing;
        grow(&mut x1, &mut x2, desired_width, iw);
    }
    (x1, y1, x2, y2)
}

/// `image.crop((x1, y1, x2, y2))` of a region inside the image.
pub fn crop(image: &RgbImage, (x1, y1, x2, y2): Region) -> RgbImage {
    let w = image.width as usize;
    let (x1, y1, x2, y2) = (x1 as usize, y1 as usize, x2 as usize, y2 as usize);
    let mut pixels = Vec::with_capacity((x2 - x1) * (y2 - y1) * 3);
    for y in y1..y2 {
        pixels.extend_from_slice(&image.pixels[(y * w + x1) * 3..(y * w + x2) * 3]);
    }
    RgbImage {
        width: (x2 - x1) as u32,
        height: (y2 - y1) as u32,
        pixels,
    }
}

/// `Image.paste(src, box=(x, y))` onto `dst` (RGB, no mask), clipped to `dst`.
fn paste(dst: &mut RgbImage, src: &RgbImage, x: i64, y: i64) {
    let (dw, dh) = (dst.width as i64, dst.height as i64);
    for sy in 0..src.height as i64 {
        for sx in 0..src.width as i64 {
            let (tx, ty) = (x + sx, y + sy);
            if (0..dw).contains(&tx) && (0..dh).contains(&ty) {
                let s = ((sy * src.width as i64 + sx) * 3) as usize;
                let d = ((ty * dw + tx) * 3) as usize;
                dst.pixels[d..d + 3].copy_from_slice(&src.pixels[s..s + 3]);
            }
        }
    }
}

fn black(width: usize, height: usize) -> RgbImage {
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels: vec![0; width * height * 3],
    }
}

/// `images.resize_image(mode, im, width, height)` without an upscaler (Lanczos): 0 resizes,
/// 1 resizes to cover and crops the centre, 2 resizes to fit and fills the borders by
/// stretching the image's edge rows or columns.
pub fn resize_image(mode: u8, im: &RgbImage, width: usize, height: usize) -> RgbImage {
    let lanczos = |im: &RgbImage, w: usize, h: usize| resize_with(im, w, h, Filter::Lanczos, None);
    if mode == 0 {
        return lanczos(im, width, height);
    }
    let (iw, ih) = (im.width as usize, im.height as usize);
    let ratio = width as f64 / height as f64;
    let src_ratio = iw as f64 / ih as f64;
    let (src_w, src_h) = if mode == 1 {
        (
            if ratio > src_ratio {
                width
            } else {
                iw * height / ih
            },
            if ratio <= src_ratio {
                height
            } else {
                ih * width / iw
            },
        )
    } else {
        (
            if ratio < src_ratio {
                width
            } else {
                iw * height / ih
            },
            if ratio >= src_ratio {
                height
            } else {
                ih * width / iw
            },
        )
    };
    let resized = lanczos(im, src_w, src_h);
    let mut res = black(width, height);
    let (px, py) = (
        (width / 2) as i64 - (src_w / 2) as i64,
        (height / 2) as i64 - (src_h / 2) as i64,
    );
    paste(&mut res, &resized, px, py);
    if mode == 2 {
        let (rw, rh) = (resized.width as f32, resized.height as f32);
        // The border strips take `Image.resize`'s default filter (bicubic).
        let strip = |w: usize, h: usize, bbox: [f32; 4]| {
            resize_with(&resized, w, h, Filter::Bicubic, Some(bbox))
        };
        if ratio < src_ratio {
            let fill_height = (height / 2) as i64 - (src_h / 2) as i64;
            if fill_height > 0 {
                let fh = fill_height as usize;
                paste(
                    &mut res,
                    &strip(width, fh, [0.0, 0.0, width as f32, 0.0]),
                    0,
                    0,
                );
                let bottom = strip(width, fh, [0.0, rh, width as f32, rh]);
                paste(&mut res, &bottom, 0, fill_height + src_h as i64);
            }
        } else if ratio > src_ratio {
            let fill_width = (width / 2) as i64 - (src_w / 2) as i64;
            if fill_width > 0 {
                let fw = fill_width as usize;
                paste(
                    &mut res,
                    &strip(fw, height, [0.0, 0.0, 0.0, height as f32]),
                    0,
                    0,
                );
                let right = strip(fw, height, [rw, 0.0, rw, height as f32]);
                paste(&mut res, &right, fill_width + src_w as i64, 0);
            }
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_is_the_masks_bounding_box_padded_and_clipped() {
        let mut mask = vec![0u8; 10 * 8];
        mask[3 * 10 + 4] = 1;
        mask[5 * 10 + 6] = 200;
        assert_eq!(crop_region(&mask, 10, 8, 0), Some((4, 3, 7, 6)));
        assert_eq!(crop_region(&mask, 10, 8, 2), Some((2, 1, 9, 8)));
        assert_eq!(crop_region(&mask, 10, 8, 9), Some((0, 0, 10, 8)));
        assert_eq!(crop_region(&[0; 80], 10, 8, 4), None);
    }

    #[test]
    fn the_region_grows_to_the_processing_aspect() {
        // 128x32 drawn, 512x512 processing: 128x128 (A1111's docstring example).
        assert_eq!(
            expand_crop_region((100, 200, 228, 232), 512, 512, 1024, 1024),
            (100, 152, 228, 280)
        );
        // At the bottom edge it shifts up instead.
        assert_eq!(
            expand_crop_region((0, 90, 40, 100), 64, 64, 100, 100),
            (0, 60, 40, 100)
        );
    }
}
