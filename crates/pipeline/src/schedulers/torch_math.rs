//! torch's CPU float32 `log`, `exp` and `expm1` (torch 2.11 from PyPI, x86): the values a
//! float32 tensor, 0-dim included, gets from them. DPM++ SDE needs them to the last bit: it
//! queries its Brownian tree at `exp(-(-ln sigma))`, quantised to 1e-6, and a last-bit
//! difference there can move the query to a neighbouring tree node (a different draw).
//!
//! * `expm1` comes from the SLEEF library's 1-ulp vector function (`Sleef_expm1f16_u10`), not
//!   correctly rounded; reproduced here bit for bit from SLEEF's published algorithm (same
//!   polynomial, double-float steps and fused multiply-adds).
//! * `log` and `exp` come from Intel MKL's VML (`vsLn`, `vsExp`, high accuracy), closed source:
//!   we take the correctly rounded value, which is torch's for ~95% of logs and ~99% of exps;
//!   the rest differ by one ulp. (torch builds without MKL use SLEEF for them too.)
//!
//! Checked against torch by `tools/make_sde_fixtures.py` (tests/integration/sde.rs).

// The constants are written as SLEEF publishes them; the compiler rounds them to float32 as C does.
#![allow(clippy::excessive_precision)]

/// A float32 value and its rounding error (SLEEF's "double-float").
#[derive(Debug, Clone, Copy)]
struct Df {
    x: f32,
    y: f32,
}

fn df(x: f32, y: f32) -> Df {
    Df { x, y }
}

/// `x * y - z`, one rounding.
fn fmapn(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, -z)
}

fn add2_df_f(x: Df, y: f32) -> Df {
    let s = x.x + y;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y - v);
    df(s, t + x.y)
}

fn add2_df_df(x: Df, y: Df) -> Df {
    let s = x.x + y.x;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y.x - v);
    df(s, t + (x.y + y.y))
}

fn add_f_df(x: f32, y: Df) -> Df {
    let s = x + y.x;
    df(s, ((x - s) + y.x) + y.y)
}

fn mul_df_f(x: Df, y: f32) -> Df {
    let s = x.x * y;
    df(s, x.y.mul_add(y, fmapn(x.x, y, s)))
}

fn mul_df_df(x: Df, y: Df) -> Df {
    let s = x.x * y.x;
    df(s, x.x.mul_add(y.y, x.y.mul_add(y.x, fmapn(x.x, y.x, s))))
}

fn squ_df(x: Df) -> Df {
    let s = x.x * x.x;
    df(s, (x.x + x.x).mul_add(x.y, fmapn(x.x, x.x, s)))
}

/// ln 2 split for the argument reduction, and 1 / ln 2 (float32).
const L2U: f32 = 0.693_145_751_953_125;
const L2L: f32 = 1.428_606_765_330_187e-6;
const R_LN2: f32 = std::f32::consts::LOG2_E;

/// `2^q` for `q` in the normal exponent range.
fn pow2i(q: i32) -> f32 {
    f32::from_bits(((q + 0x7f) as u32) << 23)
}

/// `d * 2^e` in two halves, as SLEEF's `vldexp2`.
fn ldexp2(d: f32, e: i32) -> f32 {
    d * pow2i(e >> 1) * pow2i(e - (e >> 1))
}

/// Round to nearest, ties to even (`cvtps2dq` in the default rounding mode).
fn rint(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// torch's float32 `log` as close as we can: the correctly rounded value.
pub fn log(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// torch's float32 `exp` as close as we can: the correctly rounded value.
pub fn exp(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// SLEEF's `expk2f`: `exp` of a double-float, as a double-float.
fn expk2(d: Df) -> Df {
    let q = rint((d.x + d.y) * R_LN2);
    let qf = q as f32;
    let mut s = add2_df_f(d, qf * -L2U);
    s = add2_df_f(s, qf * -L2L);
    let mut u = 0.198_096_022_4e-3f32;
    u = u.mul_add(s.x, 0.139_425_648_4e-2);
    u = u.mul_add(s.x, 0.833_345_670_3e-2);
    u = u.mul_add(s.x, 0.416_663_736_1e-1);
    let mut t = add2_df_f(mul_df_f(s, u), 0.166_666_659_414_234_244_790_680_580_464);
    t = add2_df_f(mul_df_df(s, t), 0.5);
    t = add2_df_df(s, mul_df_df(squ_df(s), t));
    t = add_f_df(1.0, t);
    if d.x < -104.0 {
        return df(0.0, 0.0);
    }
    df(ldexp2(t.x, q), ldexp2(t.y, q))
}

/// torch's float32 `expm1` (SLEEF `xexpm1f`).
pub fn expm1(a: f32) -> f32 {
    if a.is_nan() {
        return a;
    }
    if a > 88.722_831_726_074_218_75 {
        return f32::INFINITY;
    }
    if a < -16.635_532_333_438_687 {
        return -1.0;
    }
    if a == 0.0 && a.is_sign_negative() {
        return -0.0;
    }
    let d = add2_df_f(expk2(df(a, 0.0)), -1.0);
    d.x + d.y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_the_c_library() {
        for i in 1..2000 {
            let x = i as f32 * 0.0137;
            for (ours, libm) in [
                (log(x), x.ln()),
                (exp(x - 10.0), (x - 10.0).exp()),
                (expm1(x - 12.0), (x - 12.0).exp_m1()),
            ] {
                assert!(
                    (ours - libm).abs() <= 2.0 * f32::EPSILON * libm.abs(),
                    "{x}"
                );
            }
        }
        assert_eq!(log(1.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(expm1(0.0), 0.0);
    }
}
