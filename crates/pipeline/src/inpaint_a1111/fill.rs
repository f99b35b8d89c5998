//! "Masked content: fill" (`modules/masking.py` `fill`): the kept pixels, premultiplied by the
//! inverted mask, blurred wider and narrower (Pillow's `GaussianBlur`, radii 256 down to 0)
//! and composited over each other, so the hole takes the colours around it. Pillow's integer
//! arithmetic step for step: `BoxBlur.c` (three box passes per axis), `Convert.c`'s
//! unpremultiply, `AlphaComposite.c`.

use super::composite::{alpha_composite, div255, unpremultiply};
use crate::pipeline::RgbImage;

/// `masking.fill`'s layers: (blur radius, composites).
const LAYERS: [(u32, usize); 6] = [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)];

/// Pillow's `_gaussian_blur_radius` (float arithmetic as C promotes it): the box radius whose
/// `passes` box blurs approximate a Gaussian of standard deviation `radius`.
fn box_radius(radius: f32, passes: u32) -> f32 {
    let sigma2: f32 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a: f32 = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// `ImagingLineBoxBlur32` over one line of RGBa pixels.
// `c` is the channel within each pixel, not an index into `out`.
#[allow(clippy::needless_range_loop)]
fn box_line(line: &[[u8; 4]], radius: i64, ww: u32, fw: u32) -> Vec<[u8; 4]> {
    let n = line.len() as i64;
    let lastx = n - 1;
    let edge_a = (radius + 1).min(n);
    let edge_b = (n - radius - 1).max(0);
    let px = |i: i64| line[i as usize];
    let mut out = vec![[0u8; 4]; line.len()];
    for c in 0..4 {
        let at = |i: i64| px(i)[c] as u32;
        let mut acc: u32 = at(0).wrapping_mul((radius + 1) as u32);
        for x in 0..edge_a - 1 {
            acc = acc.wrapping_add(at(x));
        }
        acc = acc.wrapping_add(at(lastx).wrapping_mul((radius - edge_a + 1) as u32));
        let mut step = |x: i64, sub: i64, add: i64, left: i64, right: i64| {
            acc = acc.wrapping_add(at(add)).wrapping_sub(at(sub));
            let bulk = acc
                .wrapping_mul(ww)
                .wrapping_add((at(left) + at(right)).wrapping_mul(fw));
            out[x as usize][c] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
        };
        if edge_a <= edge_b {
            for x in 0..edge_a {
                step(x, 0, x + radius, 0, x + radius + 1);
            }
            for x in edge_a..edge_b {
                step(
                    x,
                    x - radius - 1,
                    x + radius,
                    x - radius - 1,
                    x + radius + 1,
                );
            }
            for x in edge_b..=lastx {
                step(x, x - radius - 1, lastx, x - radius - 1, lastx);
            }
        } else {
            for x in 0..edge_b {
                step(x, 0, x + radius, 0, x + radius + 1);
            }
            for x in edge_b..edge_a {
                step(x, 0, lastx, 0, lastx);
            }
            for x in edge_a..=lastx {
                step(x, x - radius - 1, lastx, x - radius - 1, lastx);
            }
        }
    }
    out
}

/// `ImagingHorizontalBoxBlur` on every row of a `width`-wide image.
fn box_rows(pixels: &mut [[u8; 4]], width: usize, radius: f32) {
    let r = radius as i64;
    let ww = (16_777_216f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = (16_777_216u32.wrapping_sub(((r * 2 + 1) as u32).wrapping_mul(ww))) / 2;
    for row in pixels.chunks_exact_mut(width) {
        let out = box_line(row, r, ww, fw);
        row.copy_from_slice(&out);
    }
}

fn transpose(pixels: &[[u8; 4]], width: usize, height: usize) -> Vec<[u8; 4]> {
    let mut out = vec![[0u8; 4]; pixels.len()];
    for y in 0..height {
        for x in 0..width {
            out[x * height + y] = pixels[y * width + x];
        }
    }
    out
}

/// `image.filter(ImageFilter.GaussianBlur(radius))` on an RGBa image (`ImagingBoxBlur`:
/// three passes along rows, then three along columns; radius 0 is a copy).
pub fn gaussian_blur(pixels: &[[u8; 4]], width: usize, height: usize, radius: u32) -> Vec<[u8; 4]> {
    let mut out = pixels.to_vec();
    if radius == 0 {
        return out;
    }
    let r = box_radius(radius as f32, 3);
    if r != 0.0 {
        for _ in 0..3 {
            box_rows(&mut out, width, r);
        }
        let mut t = transpose(&out, width, height);
        for _ in 0..3 {
            box_rows(&mut t, height, r);
        }
        out = transpose(&t, height, width);
    }
    out
}

/// `masking.fill(image, mask)`: `mask` is L, the image's size.
pub fn fill(image: &RgbImage, mask: &[u8]) -> RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    // Image.new('RGBa').paste(image as RGBa, mask=invert(mask)): DIV255(in * (255 - m)).
    let masked: Vec<[u8; 4]> = image
        .pixels
        .chunks_exact(3)
        .zip(mask)
        .map(|(p, &m)| {
            let keep = 255 - m as u32;
            let c = |v: u8| div255(v as u32 * keep) as u8;
            [c(p[0]), c(p[1]), c(p[2]), div255(255 * keep) as u8]
        })
        .collect();
    let mut out = vec![[0u8; 4]; w * h];
    for (radius, repeats) in LAYERS {
        let blurred: Vec<[u8; 4]> = gaussian_blur(&masked, w, h, radius)
            .iter()
            .map(|p| unpremultiply(*p))
            .collect();
        for _ in 0..repeats {
            for (dst, src) in out.iter_mut().zip(&blurred) {
                *dst = alpha_composite(dst, src);
            }
        }
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: out.iter().flat_map(|p| [p[0], p[1], p[2]]).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_radius_follows_pillows_formula() {
        // sigma 2 over 3 passes: sigma^2 = 4/3, L = sqrt(17), l = 1.
        let r = box_radius(2.0, 3);
        let (s2, l) = (4.0f64 / 3.0, 1.0f64);
        let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * s2) / (6.0 * (s2 - (l + 1.0).powi(2)));
        assert!((r as f64 - (l + a)).abs() < 1e-5, "{r}");
    }

    #[test]
    fn a_hole_takes_the_colour_around_it() {
        let image = RgbImage {
            width: 5,
            height: 1,
            pixels: [
                [200, 100, 50],
                [200, 100, 50],
                [0, 0, 0],
                [200, 100, 50],
                [200, 100, 50],
            ]
            .concat(),
        };
        let out = fill(&image, &[0, 0, 255, 0, 0]);
        // Integer rounding on the way may take a level off.
        let near = |p: &[u8]| {
            p.iter()
                .zip([200u8, 100, 50])
                .all(|(a, b)| a.abs_diff(b) <= 1)
        };
        assert!(near(&out.pixels[6..9]), "{:?}", out.pixels);
        assert!(near(&out.pixels[..3]), "{:?}", out.pixels);
    }
}
