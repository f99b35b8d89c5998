//! Tests of the CPU attention kernels: against candle ops and an f64 reference on every ISA,
//! stability with growing scores, half precision declined, and a fused-vs-blocked timing (ignored).

use super::*;
use crate::test_util::max_abs_diff;

/// Reference with candle ops: split heads, full score matrix, softmax, merge.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
    let split = |t: &Tensor| {
        let (b, n, c) = t.dims3().unwrap();
        t.reshape((b, n, heads, c / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (qh, kh, vh) = (split(q), split(k), split(v));
    let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
    let o = p.matmul(&vh).unwrap();
    let (b, h, n, d) = o.dims4().unwrap();
    o.transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, n, h * d))
        .unwrap()
}

#[test]
fn matches_reference_on_odd_shapes() -> Result<()> {
    let dev = Device::Cpu;
    // (batch, n, m, heads, dh, dv): self-attention, cross-attention with 77 keys, blocks
    // that do not divide N, one head with a wide dim, dv != dh.
    for &(b, n, m, heads, dh, dv) in &[
        (2, 37, 37, 3, 8, 8),
        (2, 100, 77, 4, 16, 16),
        (1, 1000, 1000, 1, 24, 24),
        (1, 9, 13, 2, 5, 7),
    ] {
        let q = Tensor::randn(0f32, 1.0, (b, n, heads * dh), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, m, heads * dh), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let got = attention(&q, &k, &v, heads, scale)?.expect("fast path");
        let want = reference(&q, &k, &v, heads, scale);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{b} {n} {m} {heads} {dh} {dv}: {d}");
    }
    Ok(())
}

fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    // xorshift: deterministic values in [-2, 2).
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// Plain f64 reference over the `[B, N, heads*d]` layout.
fn reference_f64(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32) -> Vec<f32> {
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    let mut out = vec![0f32; s.batch * s.n * cv];
    let mut p = vec![0f64; s.m];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.n {
                let qi = &q[(b * s.n + i) * cq + h * s.dh..][..s.dh];
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &k[(b * s.m + j) * cq + h * s.dh..][..s.dh];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    *pj = dot * scale as f64;
                }
                let mx = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = p.iter().map(|&x| (x - mx).exp()).sum();
                for c in 0..s.dv {
                    let acc: f64 = (0..s.m)
                        .map(|j| (p[j] - mx).exp() * v[(b * s.m + j) * cv + h * s.dv + c] as f64)
                        .sum();
                    out[(b * s.n + i) * cv + h * s.dv + c] = (acc / z) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn fused_matches_f64_reference_on_every_isa() {
    // Blocks that do not divide N or M, several key blocks, M = 77 (cross-attention), dv
    // wider than one register tile, dv != dh, a single key, SD's head dims 40 and 80.
    for &(b, n, m, heads, dh, dv) in &[
        (2, 37, 37, 3, 8, 8),
        (2, 100, 77, 4, 16, 16),
        (1, 70, 300, 2, 40, 40),
        (1, 65, 129, 1, 80, 80),
        (1, 9, 13, 2, 5, 7),
        (1, 5, 1, 1, 3, 100),
        (1, 130, 260, 1, 24, 168),
    ] {
        let s = AttnShape {
            batch: b,
            n,
            m,
            heads,
            dh,
            dv,
        };
        let q = rand_vec(b * n * heads * dh, 1);
        let k = rand_vec(b * m * heads * dh, 2);
        let v = rand_vec(b * m * heads * dv, 3);
        let scale = 1.0 / (dh as f32).sqrt();
        let want = reference_f64(&q, &k, &v, &s, scale);
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; want.len()];
            attention_fused_f32(&q, &k, &v, &s, scale, &mut got, isa);
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(
                    0f32,
                    |a, x| if x.is_nan() { f32::INFINITY } else { a.max(x) },
                );
            assert!(d < 2e-5, "{isa:?} {s:?}: {d}");
        }
    }
}

/// Large scores (sharp softmax) where a running max that grows block after block matters.
#[test]
fn fused_is_stable_with_growing_scores() {
    let s = AttnShape {
        batch: 1,
        n: 3,
        m: 1000,
        heads: 1,
        dh: 1,
        dv: 2,
    };
    let q = vec![1.0f32, 50.0, -50.0];
    let k: Vec<f32> = (0..1000).map(|j| j as f32 * 0.1).collect();
    let v: Vec<f32> = (0..2000).map(|i| (i % 7) as f32).collect();
    let want = reference_f64(&q, &k, &v, &s, 1.0);
    for isa in Isa::available() {
        let mut got = vec![0f32; 6];
        attention_fused_f32(&q, &k, &v, &s, 1.0, &mut got, isa);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{isa:?} {got:?} {want:?}"
            );
        }
    }
}

/// Times the blocked and fused kernels on SD 1.5's shapes at 512x512 with CFG:
/// `cargo test --release -p sdserve-pipeline --lib fused_vs_blocked -- --ignored --nocapture`.
#[test]
#[ignore]
fn fused_vs_blocked_timing() {
    for &(n, m, heads, dh) in &[
        (4096, 4096, 8, 40),
        (4096, 77, 8, 40),
        (1024, 1024, 8, 80),
        (256, 256, 8, 160),
        (4096, 4096, 1, 512),
    ] {
        let s = AttnShape {
            batch: 2,
            n,
            m,
            heads,
            dh,
            dv: dh,
        };
        let q = rand_vec(2 * n * heads * dh, 1);
        let k = rand_vec(2 * m * heads * dh, 2);
        let v = rand_vec(2 * m * heads * dh, 3);
        let mut out = vec![0f32; q.len()];
        let scale = 1.0 / (dh as f32).sqrt();
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            let mut ts: Vec<f64> = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f(&mut out);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(f64::total_cmp);
            ts[2]
        };
        let blocked = time(&mut |o| attention_blocked_f32(&q, &k, &v, &s, scale, o));
        let mut line = format!("n={n} m={m} heads={heads} dh={dh}: blocked {blocked:.4}s");
        for isa in Isa::available() {
            let t = time(&mut |o| attention_fused_f32(&q, &k, &v, &s, scale, o, isa));
            line += &format!(", {isa:?} {t:.4}s ({:.2}x)", blocked / t);
        }
        eprintln!("{line}");
    }
}

#[test]
fn declines_half_precision() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 4, 8), DType::F16, &dev)?;
    assert!(attention(&q, &q, &q, 2, 0.5)?.is_none());
    Ok(())
}

/// The packed-QKV front end against the reference on q, k and v cut from the packed rows, at a
/// ViT's shape (class token + a patch grid: N not a multiple of any block) and a small one.
#[test]
fn packed_qkv_matches_reference() -> Result<()> {
    let dev = Device::Cpu;
    for &(b, n, heads, dh) in &[(1, 1 + 7 * 9, 4, 16), (2, 5, 1, 8), (1, 300, 3, 64)] {
        let c = heads * dh;
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let got = attention_packed_qkv(&qkv, heads, scale)?.expect("fast path");
        let part = |i: usize| qkv.narrow(2, i * c, c).unwrap().contiguous().unwrap();
        let want = reference(&part(0), &part(1), &part(2), heads, scale);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{b} {n} {heads} {dh}: {d}");
        // Not the same as reading the thirds in another order (the test can fail).
        let swapped = reference(&part(1), &part(0), &part(2), heads, scale);
        assert!(max_abs_diff(&got, &swapped) > 1e-3);
    }
    assert!(attention_packed_qkv(&Tensor::zeros((1, 4, 12), DType::F16, &dev)?, 2, 1.0)?.is_none());
    Ok(())
}
