//! OpenCV 4.10's 8-bit colour conversions that the recolor modules use, written from how
//! `color_lab.cpp` and `color_hsv.simd.hpp` compute them, bit for bit (checked on every input
//! against opencv-python by tools/make_recolor_fixtures.py):
//! - RGB to Lab (`RGB2Lab_b`): the sRGB gamma as a 256-entry table (scaled by 8), the XYZ
//!   matrix over the D65 white in 12-bit fixed point, the cube root as a 3072-entry table in
//!   15-bit fixed point; L, a, b descaled and saturated.
//! - Lab to RGB (`Lab2RGBinteger`, the bit-exact integer path): L to y and f(y) by table,
//!   a and b by multiply-and-shift approximations of `/500` and `/200`, f back to x and z by a
//!   table, the inverse matrix in fixed point, and the inverse gamma as a 4096-entry table.
//! - RGB to HSV (`RGB2HSV_b`, H in 0..180): integer, with rounded reciprocal tables.
//! - HSV to RGB (`HSV2RGB_b`): float. OpenCV's vector body (blocks of 32 pixels, AVX2's 8
//!   lanes times 4, on x86 CPUs with AVX2) truncates `x * 255` and its compiler fuses
//!   `1 - s * h` into one rounding; the scalar tail of each row rounds to nearest. Which path a
//!   pixel takes depends on its column, so the conversion takes whole rows.
//!
//! The tables are computed here the way OpenCV computes them (its `softfloat` is IEEE single
//! precision, `softdouble` double), once.

use std::sync::OnceLock;

/// `CV_DESCALE`: `x / 2^n` rounded half up (arithmetic shift).
fn descale(x: i32, n: u32) -> i32 {
    x.wrapping_add(1 << (n - 1)) >> n
}

/// OpenCV's `cvRound` of a float: nearest, ties to even.
fn round_f32(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// sRGB to XYZ (`sRGB2XYZ_D65`), XYZ to sRGB (`XYZ2sRGB_D65`) and the D65 white point.
const RGB_TO_XYZ: [f64; 9] = [
    0.412453, 0.357580, 0.180423, 0.212671, 0.715160, 0.072169, 0.019334, 0.119193, 0.950227,
];
const XYZ_TO_RGB: [f64; 9] = [
    3.240479, -1.53715, -0.498535, -0.969256, 1.875991, 0.041556, 0.055648, -0.204043, 1.057311,
];
const D65: [f64; 3] = [0.950456, 1.0, 1.088754];

/// Fixed-point shifts: the XYZ matrices (`lab_shift`), the cube roots (`lab_shift2`), the
/// gamma table's extra bits (`gamma_shift`), the Lab-to-RGB base (`lab_base_shift`).
const LAB_SHIFT: u32 = 12;
const LAB_SHIFT2: u32 = 15;
const GAMMA_SHIFT: u32 = 3;
const LAB_BASE: i32 = 1 << 14;
const INV_GAMMA_TAB_SIZE: usize = 1 << 12;
/// The smallest `f(y) ± a/500, b/200` index Lab-to-RGB looks up (`minABvalue`).
const MIN_AB: i32 = -8145;

/// The sRGB transfer curve and its inverse as OpenCV writes them (`applyGamma`,
/// `applyInvGamma`): computed in double, kept as float.
fn apply_gamma(x: f32) -> f32 {
    let x = f64::from(x);
    let threshold = f64::from(809f32 / 20000f32);
    let y = if x <= threshold {
        x / f64::from(323f32 / 25f32)
    } else {
        let shift = f64::from(11f32 / 200f32);
        ((x + shift) / (1.0 + shift)).powf(f64::from(12f32 / 5f32))
    };
    y as f32
}

fn apply_inv_gamma(x: f32) -> f32 {
    let x = f64::from(x);
    let threshold = f64::from(7827f32 / 2500000f32);
    let y = if x <= threshold {
        x * f64::from(323f32 / 25f32)
    } else {
        let shift = f64::from(11f32 / 200f32);
        x.powf(1.0 / f64::from(12f32 / 5f32)) * (1.0 + shift) - shift
    };
    y as f32
}

/// The cube root as OpenCV's `softfloat` `cbrt` gives it for the table: rounded toward zero
/// to single precision (its nearest-rounded value differs at one entry, 324 of 3072, where
/// the table then takes 17746 for OpenCV's 17745; checked against cv2 on every colour).
fn cbrt_toward_zero(x: f32) -> f32 {
    let exact = f64::from(x).cbrt();
    let nearest = exact as f32;
    if f64::from(nearest) > exact {
        f32::from_bits(nearest.to_bits() - 1)
    } else {
        nearest
    }
}

struct LabTables {
    /// sRGB 8-bit to linear, times 255 * 8.
    gamma: [u16; 256],
    /// Cube root (or its linear toe) of `i / (255 * 8)`, times 2^15.
    cbrt: Vec<u16>,
    /// RGB to XYZ over the white point, times 2^12: rows X, Y, Z; columns R, G, B.
    to_xyz: [i32; 9],
    /// L (0..=255) to y and f(y), times 2^14.
    l_to_y: [(i32, i32); 256],
    /// f(x) or f(z) times 2^14, from `MIN_AB`, to x or z times 2^14.
    f_to_xz: Vec<i32>,
    /// XYZ to RGB times the white point, times 2^12: rows R, G, B; columns X, Y, Z.
    to_rgb: [i32; 9],
    /// Linear (times 4096) to sRGB 8-bit.
    inv_gamma: Vec<u8>,
}

fn lab_tables() -> &'static LabTables {
    static TABLES: OnceLock<LabTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut gamma = [0u16; 256];
        let int_scale = (255 * (1 << GAMMA_SHIFT)) as f32;
        for (i, g) in gamma.iter_mut().enumerate() {
            *g = round_f32(int_scale * apply_gamma(i as f32 / 255.0)) as u16;
        }
        let threshold = 216f32 / 24389f32;
        let (lscale, lbias) = (841f32 / 108f32, 16f32 / 116f32);
        let f = |x: f32| {
            if x < threshold {
                x.mul_add(lscale, lbias)
            } else {
                cbrt_toward_zero(x)
            }
        };
        let step = 1.0 / (255.0 * (1 << GAMMA_SHIFT) as f32);
        let cbrt = (0..256 * 3 / 2 * (1 << GAMMA_SHIFT))
            .map(|i| round_f32((1 << LAB_SHIFT2) as f32 * f(step * i as f32)) as u16)
            .collect();
        let lshift = f64::from(1 << LAB_SHIFT);
        let mut to_xyz = [0i32; 9];
        let mut to_rgb = [0i32; 9];
        for row in 0..3 {
            for col in 0..3 {
                let c = RGB_TO_XYZ[row * 3 + col];
                to_xyz[row * 3 + col] = (lshift * c / D65[row]).round_ties_even() as i32;
                let c = XYZ_TO_RGB[row * 3 + col];
                to_rgb[row * 3 + col] = (lshift * c * D65[col]).round_ties_even() as i32;
            }
        }
        let base = LAB_BASE as f32;
        let mut l_to_y = [(0, 0); 256];
        for (i, entry) in l_to_y.iter_mut().enumerate() {
            let i = i as i32;
            *entry = if i <= 20 {
                // The linear toe: y = L / 903.3, f = 7.787 y + 16 / 116.
                let y = (i * LAB_BASE * 20 * 9) as f32 / (17 * 29 * 29 * 29) as f32;
                let f = base * (16.0 / 116.0 + (i * 5) as f32 / (3 * 17 * 29) as f32);
                (round_f32(y), round_f32(f))
            } else {
                let f = (i * 100 * LAB_BASE) as f32 / (255 * 116) as f32
                    + (16 * LAB_BASE) as f32 / 116.0;
                (
                    round_f32(f * f * f / (LAB_BASE * LAB_BASE) as f32),
                    round_f32(f),
                )
            };
        }
        let f_to_xz = (MIN_AB..LAB_BASE * 9 / 4 + MIN_AB)
            .map(|i| {
                if i <= 3390 {
                    // Below 6/29: (f - 16/116) / 7.787, in integers as OpenCV has it.
                    i * 108 / 841 - LAB_BASE * 16 / 116 * 108 / 841
                } else {
                    i * i / LAB_BASE * i / LAB_BASE
                }
            })
            .collect();
        let inv_gamma = (0..INV_GAMMA_TAB_SIZE)
            .map(|i| {
                let x = (1.0 / INV_GAMMA_TAB_SIZE as f32) * i as f32;
                round_f32(255.0 * apply_inv_gamma(x)) as u8
            })
            .collect();
        LabTables {
            gamma,
            cbrt,
            to_xyz,
            l_to_y,
            f_to_xz,
            to_rgb,
            inv_gamma,
        }
    })
}

/// `cv2.cvtColor(.., COLOR_RGB2LAB)` of one 8-bit pixel: (L, a, b), L scaled to 0..=255, a
/// and b offset by 128.
pub fn rgb_to_lab(rgb: [u8; 3]) -> [u8; 3] {
    let t = lab_tables();
    let lin = rgb.map(|c| i32::from(t.gamma[usize::from(c)]));
    let f = |row: usize| {
        let m = &t.to_xyz[row * 3..row * 3 + 3];
        let v = descale(lin[0] * m[0] + lin[1] * m[1] + lin[2] * m[2], LAB_SHIFT);
        i32::from(t.cbrt[v as usize])
    };
    let (fx, fy, fz) = (f(0), f(1), f(2));
    let l_scale = (116 * 255 + 50) / 100;
    let l_shift = -((16 * 255 * (1 << LAB_SHIFT2) + 50) / 100);
    let l = descale(l_scale * fy + l_shift, LAB_SHIFT2);
    let a = descale(500 * (fx - fy) + 128 * (1 << LAB_SHIFT2), LAB_SHIFT2);
    let b = descale(200 * (fy - fz) + 128 * (1 << LAB_SHIFT2), LAB_SHIFT2);
    [l, a, b].map(|v| v.clamp(0, 255) as u8)
}

/// `cv2.cvtColor(.., COLOR_LAB2RGB)` of one 8-bit pixel.
pub fn lab_to_rgb(lab: [u8; 3]) -> [u8; 3] {
    let t = lab_tables();
    let [l, a, b] = lab.map(i32::from);
    let (y, fy) = t.l_to_y[l as usize];
    // a * 2^14 / 500 and b * 2^14 / 200 by multiplication and shift, as OpenCV approximates.
    let adiv = ((5 * a * 53687 + (1 << 7)) >> 13) - 128 * LAB_BASE / 500;
    let bdiv = ((b * 41943 + (1 << 4)) >> 9) - 128 * LAB_BASE / 200 + 1;
    let x = t.f_to_xz[(fy + adiv - MIN_AB) as usize];
    let z = t.f_to_xz[(fy - bdiv - MIN_AB) as usize];
    let shift = LAB_SHIFT + 2;
    let channel = |row: usize| {
        let m = &t.to_rgb[row * 3..row * 3 + 3];
        let v = m[0]
            .wrapping_mul(x)
            .wrapping_add(m[1].wrapping_mul(y))
            .wrapping_add(m[2].wrapping_mul(z));
        let v = descale(v, shift).clamp(0, INV_GAMMA_TAB_SIZE as i32 - 1);
        t.inv_gamma[v as usize]
    };
    [channel(0), channel(1), channel(2)]
}

/// `RGB2HSV_b`'s reciprocal tables: `255 * 2^12 / v` and `180 * 2^12 / (6 * diff)`, rounded.
fn hsv_tables() -> &'static ([i32; 256], [i32; 256]) {
    static TABLES: OnceLock<([i32; 256], [i32; 256])> = OnceLock::new();
    TABLES.get_or_init(|| {
        // Entry 0 stays 0 (a black or grey pixel: no division).
        let table = |f: fn(f64) -> f64| {
            let mut t = [0i32; 256];
            for (i, v) in t.iter_mut().enumerate().skip(1) {
                *v = f(i as f64).round_ties_even() as i32;
            }
            t
        };
        (
            table(|i| f64::from(255 << 12) / i),
            table(|i| f64::from(180 << 12) / (6.0 * i)),
        )
    })
}

/// `cv2.cvtColor(.., COLOR_RGB2HSV)` of one 8-bit pixel: H in 0..180, S and V in 0..=255.
pub fn rgb_to_hsv(rgb: [u8; 3]) -> [u8; 3] {
    let (sdiv, hdiv) = hsv_tables();
    let [r, g, b] = rgb.map(i32::from);
    let v = r.max(g).max(b);
    let diff = v - r.min(g).min(b);
    let s = (diff * sdiv[v as usize] + (1 << 11)) >> 12;
    let h = if v == r {
        g - b
    } else if v == g {
        b - r + 2 * diff
    } else {
        r - g + 4 * diff
    };
    let h = (h * hdiv[diff as usize] + (1 << 11)) >> 12;
    let h = if h < 0 { h + 180 } else { h };
    [h.clamp(0, 255) as u8, s as u8, v as u8]
}

/// OpenCV's block of HSV2RGB's vector body: 32 pixels (x86 with AVX2).
pub const HSV_BLOCK: usize = 32;

/// The four values an HSV pixel's channels take (`tab`), its sector, and whether it is grey.
fn hsv_parts(hsv: [u8; 3], vector: bool) -> ([f32; 4], usize, bool) {
    let hscale = 6.0f32 / 180.0;
    let mut h = f32::from(hsv[0]) * hscale;
    let s = f32::from(hsv[1]) * (1.0 / 255.0);
    let v = f32::from(hsv[2]) * (1.0 / 255.0);
    let sector = if vector {
        let pre = h.trunc();
        h -= pre;
        let sixths = (pre * (1.0 / 6.0)).trunc();
        (pre - sixths * 6.0) as usize
    } else {
        h %= 6.0;
        let pre = h.floor();
        h -= pre;
        pre as usize
    };
    let (sector, h) = if sector >= 6 { (0, 0.0) } else { (sector, h) };
    // `1 - s * h` and `1 - s * (1 - h)` are one fused multiply-add each in OpenCV's build.
    let tab = [
        v,
        v * (1.0 - s),
        v * (-s).mul_add(h, 1.0),
        v * (-s).mul_add(1.0 - h, 1.0),
    ];
    (tab, sector, s == 0.0)
}

/// Which of the four values R, G and B take in each sector (OpenCV's `sector_data`, there
/// for B, G, R).
const SECTORS: [[usize; 3]; 6] = [
    [0, 3, 1],
    [2, 0, 1],
    [1, 0, 3],
    [1, 2, 0],
    [3, 1, 0],
    [0, 1, 2],
];

/// `cv2.cvtColor(.., COLOR_HSV2RGB)` of one row of 8-bit pixels (`hsv` and `rgb` as
/// RGB-ordered triples), as OpenCV converts a row: the first whole blocks of
/// [`HSV_BLOCK`] pixels as its vector code, the rest as its scalar code.
pub fn hsv_to_rgb_row(hsv: &[u8], rgb: &mut [u8]) {
    let n = hsv.len() / 3;
    let vector_end = n / HSV_BLOCK * HSV_BLOCK;
    for (i, (src, dst)) in hsv.chunks_exact(3).zip(rgb.chunks_exact_mut(3)).enumerate() {
        let vector = i < vector_end;
        let (tab, sector, grey) = hsv_parts([src[0], src[1], src[2]], vector);
        let out = if grey && !vector {
            [tab[0]; 3]
        } else {
            SECTORS[sector].map(|k| tab[k])
        };
        for (d, x) in dst.iter_mut().zip(out) {
            let x = x * 255.0;
            *d = if vector {
                x.trunc().clamp(0.0, 255.0) as u8
            } else {
                x.round_ties_even().clamp(0.0, 255.0) as u8
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greys_keep_their_level_and_primaries_land_where_lab_and_hsv_put_them() {
        // Greys: a and b at 128, hue 0 and saturation 0; back to the same grey. (Not grey 1:
        // OpenCV's own round trip gives 2 there, and so does ours; tests/integration/recolor.rs holds every
        // colour to OpenCV's.)
        for v in [0u8, 50, 128, 254, 255] {
            let lab = rgb_to_lab([v, v, v]);
            assert_eq!((lab[1], lab[2]), (128, 128), "{v}");
            assert_eq!(lab_to_rgb(lab), [v, v, v], "{v}");
            assert_eq!(rgb_to_hsv([v, v, v]), [0, 0, v]);
        }
        assert_eq!(rgb_to_lab([255, 255, 255])[0], 255);
        // Green's hue is 60 of 180, blue's 120; a red row converts back.
        assert_eq!(rgb_to_hsv([0, 255, 0]), [60, 255, 255]);
        assert_eq!(rgb_to_hsv([0, 0, 255]), [120, 255, 255]);
        let mut rgb = [0u8; 3];
        hsv_to_rgb_row(&[0, 255, 255], &mut rgb);
        assert_eq!(rgb, [255, 0, 0]);
    }
}
