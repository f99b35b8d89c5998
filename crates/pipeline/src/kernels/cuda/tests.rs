//! GPU kernels against CPU references (f32, from the same f16-rounded inputs). Built only with
//! the `cuda-core` feature; they need a CUDA device (tools/gpu_session.sh runs them on the lent
//! GPU from a test binary built without one).

use super::super::attn::{attention, tiled_shape, Variant, HEAD_DIMS};
use super::*;
use crate::attention::{merge_heads, sdpa, split_heads, AttentionSlicing};
use candle_core::D;

pub(in crate::kernels::cuda) fn gpu() -> Device {
    let d = Device::new_cuda(0).expect("these tests need a CUDA device");
    prepare_device(&d);
    d
}

/// ||a - b|| / ||b|| and max |a - b| over two f32 CPU tensors.
pub(in crate::kernels::cuda) fn errors(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f32);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.is_finite(), "non-finite output");
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
        max = max.max((x - y).abs());
    }
    ((num / den.max(1e-30)).sqrt() as f32, max)
}

pub(in crate::kernels::cuda) fn rand(shape: &[usize], seed: u64) -> Tensor {
    // Uniform in [-sqrt(3), sqrt(3)] (unit variance) from a seeded xorshift: distinct inputs
    // per case, the same on every run.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1.732
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub(in crate::kernels::cuda) fn half_round(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn attention_matches_f32_reference_for_every_head_dim_and_variant() -> Result<()> {
    let dev = gpu();
    let mut seed = 1;
    for &d in &HEAD_DIMS {
        // Self-attention with ragged tiles, and SD's 77-token cross-attention.
        for (b, heads, n, m) in [(2, 3, 200, 200), (1, 2, 70, 77), (2, 1, 16, 9)] {
            let c = heads * d;
            let q = half_round(&(rand(&[b, n, c], seed) * 2.0)?);
            let k = half_round(&(rand(&[b, m, c], seed + 1) * 2.0)?);
            let v = half_round(&rand(&[b, m, c], seed + 2));
            seed += 3;
            let scale = 1.0 / (d as f64).sqrt();
            let want = merge_heads(
                &sdpa(
                    &split_heads(&q, heads)?,
                    &split_heads(&k, heads)?,
                    &split_heads(&v, heads)?,
                    scale,
                    AttentionSlicing::Off,
                    false,
                )?,
                heads,
            )?;
            let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_device(&dev).unwrap();
            for variant in [
                Variant::Auto,
                Variant::Mma1,
                Variant::Simt,
                Variant::SimtWarp,
            ] {
                let got = attention(&h(&q), &h(&k), &h(&v), heads, scale, variant)?
                    .expect("kernel applies");
                assert_eq!(got.dims(), &[b, n, c]);
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let (rel, max) = errors(&got, &want);
                assert!(
                    rel < 3e-3 && max < 2e-2,
                    "d={d} b={b} heads={heads} n={n} m={m} {variant:?}: rel {rel} max {max}"
                );
            }
        }
    }
    Ok(())
}

/// The f32 reference: candle's unfused attention on the CPU, in f32.
fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (
        split_heads(q, heads)?,
        split_heads(k, heads)?,
        split_heads(v, heads)?,
    );
    let a = sdpa(&q, &k, &v, scale, AttentionSlicing::Off, false)?;
    merge_heads(&a, heads)
}

#[test]
fn f32_attention_matches_f32_reference_for_every_head_dim() -> Result<()> {
    let dev = gpu();
    let mut seed = 100;
    for &d in &HEAD_DIMS {
        // Ragged query and key tiles, SD's 77-token cross-attention, one row and one key, and a
        // 512x512 UNet level's shapes (d 40: 1024 queries, guidance batch 2, 8 heads).
        let mut cases = vec![
            (2, 3, 200, 200),
            (1, 2, 70, 77),
            (2, 1, 16, 9),
            (1, 1, 1, 1),
        ];
        if d == 40 {
            cases.extend([(2, 8, 1024, 77), (2, 8, 1024, 1024)]);
        }
        for (b, heads, n, m) in cases {
            let c = heads * d;
            let q = (rand(&[b, n, c], seed) * 2.0)?;
            let k = (rand(&[b, m, c], seed + 1) * 2.0)?;
            let v = rand(&[b, m, c], seed + 2);
            seed += 3;
            let scale = 1.0 / (d as f64).sqrt();
            let want = attention_ref(&q, &k, &v, heads, scale)?;
            let g = |t: &Tensor| t.to_device(&dev).unwrap();
            // The variant only picks among f16 kernels: f32 runs the tiled kernel for each.
            for variant in [Variant::Auto, Variant::Simt] {
                let got = attention(&g(&q), &g(&k), &g(&v), heads, scale, variant)?
                    .expect("kernel applies");
                assert_eq!((got.dims(), got.dtype()), (&[b, n, c][..], DType::F32));
                let (rel, max) = errors(&got.to_device(&Device::Cpu)?, &want);
                assert!(
                    rel < 2e-5 && max < 2e-4,
                    "f32 d={d} b={b} heads={heads} n={n} m={m} {variant:?}: rel {rel} max {max}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn attention_reads_views_at_an_offset() -> Result<()> {
    // q/k/v as views 4 values into a larger buffer (allowed: the tiled kernels' 4-value reads
    // stay aligned), and 2 values in (f32 declines, f16 takes the per-value kernel).
    let dev = gpu();
    let (b, heads, d, n) = (1, 2, 40, 50);
    let c = heads * d;
    for dtype in [DType::F32, DType::F16] {
        let buf = half_round(&rand(&[b * n * c + 8], 41));
        let scale = 1.0 / (d as f64).sqrt();
        for off in [4, 2] {
            let x = buf.narrow(0, off, b * n * c)?.reshape((b, n, c))?;
            let want = attention_ref(&x, &x, &x, heads, scale)?;
            let xg = buf
                .to_dtype(dtype)?
                .to_device(&dev)?
                .narrow(0, off, b * n * c)?
                .reshape((b, n, c))?;
            assert_eq!(xg.layout().start_offset(), off);
            let got = attention(&xg, &xg, &xg, heads, scale, Variant::Auto)?;
            if dtype == DType::F32 && off == 2 {
                assert!(got.is_none(), "f32 at offset 2 keeps candle's path");
                continue;
            }
            let got = got.expect("kernel applies");
            let (rel, max) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
            assert!(rel < 3e-3, "{dtype:?} offset {off}: rel {rel} max {max}");
        }
    }
    Ok(())
}

#[test]
fn tiled_attention_fits_every_gpu_and_variants_parse() {
    for &d in &HEAD_DIMS {
        let (rows, smem) = tiled_shape(d);
        assert!(
            rows % 4 == 0 && smem <= 48 << 10,
            "d={d}: {rows} rows, {smem} bytes"
        );
    }
    assert_eq!(Variant::parse(None), Variant::Auto);
    assert_eq!(Variant::parse(Some(" simt")), Variant::Simt);
    assert_eq!(Variant::parse(Some("simt_warp")), Variant::SimtWarp);
    assert_eq!(Variant::parse(Some("mma1")), Variant::Mma1);
}

#[test]
fn attention_declines_what_it_does_not_cover() -> Result<()> {
    let dev = gpu();
    let q = Tensor::zeros((1, 8, 3 * 24), DType::F16, &dev)?; // head dim 24: no instance
    assert!(attention(&q, &q, &q, 3, 0.2, Variant::Auto)?.is_none());
    let q32 = Tensor::zeros((1, 8, 3 * 24), DType::F32, &dev)?;
    assert!(attention(&q32, &q32, &q32, 3, 0.2, Variant::Auto)?.is_none());
    let bf = Tensor::zeros((1, 8, 2 * 40), DType::BF16, &dev)?; // bf16: candle's path
    assert!(attention(&bf, &bf, &bf, 2, 0.2, Variant::Auto)?.is_none());
    Ok(())
}

/// Plain f32 group norm (+ SiLU) on the CPU.
fn group_norm_ref(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, silu: bool) -> Tensor {
    let dims = x.dims().to_vec();
    let xg = x.reshape((dims[0], groups, ())).unwrap();
    let mean = xg.mean_keepdim(2).unwrap();
    let xc = xg.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
    let xn = xc
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    let mut ws = vec![1; dims.len()];
    ws[1] = dims[1];
    let y = xn
        .reshape(dims)
        .unwrap()
        .broadcast_mul(&w.reshape(ws.clone()).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(ws).unwrap())
        .unwrap();
    if silu {
        y.silu().unwrap()
    } else {
        y
    }
}

#[test]
fn group_norm_matches_reference_in_f32_and_f16() -> Result<()> {
    let dev = gpu();
    for (shape, groups) in [
        (vec![2, 64, 9, 7], 32),
        (vec![2, 320, 64, 64], 32),
        // Split over many blocks: one channel per chunk, 32 chunks per group.
        (vec![1, 128, 100, 90], 4),
        (vec![1, 6, 5], 3),
    ] {
        let c = shape[1];
        // An offset mean, as activations have: two-pass variance must not lose it.
        let x = (rand(&shape, 7) * 3.0)?.affine(1.0, 5.0)?;
        let w = rand(&[c], 8);
        let b = rand(&[c], 9);
        for silu in [false, true] {
            for dtype in [DType::F32, DType::F16] {
                let xin = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let want = group_norm_ref(&xin, groups, &w, &b, silu);
                let got = group_norm(
                    &x.to_dtype(dtype)?.to_device(&dev)?,
                    groups,
                    &w.to_device(&dev)?,
                    &b.to_device(&dev)?,
                    1e-5,
                    silu,
                )?
                .expect("kernel applies");
                assert_eq!(got.dtype(), dtype);
                let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let (rel, max) = errors(&got, &want);
                let tol = if dtype == DType::F16 { 2e-3 } else { 1e-5 };
                assert!(
                    rel < tol,
                    "{shape:?} silu={silu} {dtype:?}: rel {rel} max {max}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn layer_norm_and_geglu_match_reference() -> Result<()> {
    let dev = gpu();
    let x = (rand(&[2, 150, 320], 11) * 2.0)?.affine(1.0, -3.0)?;
    let w = rand(&[320], 12);
    let b = rand(&[320], 13);
    let h = (rand(&[2, 77, 2 * 640], 14) * 2.0)?;
    for dtype in [DType::F32, DType::F16] {
        let tol = if dtype == DType::F16 { 2e-3 } else { 1e-5 };
        let xin = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let mean = xin.mean_keepdim(D::Minus1)?;
        let xc = xin.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let want = xc
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        let got = layer_norm(
            &x.to_dtype(dtype)?.to_device(&dev)?,
            &w.to_device(&dev)?,
            &b.to_device(&dev)?,
            1e-5,
        )?
        .expect("kernel applies");
        let (rel, max) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < tol, "layer norm {dtype:?}: rel {rel} max {max}");

        let hin = h.to_dtype(dtype)?.to_dtype(DType::F32)?;
        let want =
            (hin.narrow(D::Minus1, 0, 640)? * hin.narrow(D::Minus1, 640, 640)?.gelu_erf()?)?;
        let got = geglu(&h.to_dtype(dtype)?.to_device(&dev)?)?.expect("kernel applies");
        assert_eq!(got.dims(), &[2, 77, 640]);
        let (rel, max) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < tol, "geglu {dtype:?}: rel {rel} max {max}");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn cudnn_conv_matches_cpu_convolution() -> Result<()> {
    let dev = gpu();
    for (x_shape, w_shape, stride, padding) in [
        ([2, 8, 17, 13], [16, 8, 3, 3], 1, 1),
        ([1, 8, 16, 16], [8, 8, 3, 3], 2, 1),
        ([2, 12, 9, 9], [4, 12, 1, 1], 1, 0),
    ] {
        let x = rand(&x_shape, 21);
        let w = (rand(&w_shape, 22) * 0.2)?;
        for dtype in [DType::F32, DType::F16] {
            let (xr, wr) = (half_round_if(&x, dtype), half_round_if(&w, dtype));
            let want = xr.conv2d(&wr, padding, stride, 1, 1)?;
            let got = super::super::conv::conv2d(
                &x.to_dtype(dtype)?.to_device(&dev)?,
                &w.to_dtype(dtype)?.to_device(&dev)?,
                stride,
                padding,
            )?
            .expect("applies");
            assert_eq!(got.dims(), want.dims());
            let (rel, max) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
            // f32 may run on TF32 tensor cores unless NVIDIA_TF32_OVERRIDE=0.
            assert!(
                rel < 3e-3,
                "{x_shape:?} {w_shape:?} s{stride} {dtype:?}: rel {rel} max {max}"
            );
        }
    }
    Ok(())
}

pub(in crate::kernels::cuda) fn half_round_if(t: &Tensor, dtype: DType) -> Tensor {
    if dtype == DType::F16 {
        half_round(t)
    } else {
        t.clone()
    }
}

#[test]
fn bias_add_covers_linear_conv_and_per_sample_biases() -> Result<()> {
    let dev = gpu();
    let y = rand(&[2, 6, 5, 4], 31);
    let r = rand(&[2, 6, 5, 4], 32);
    for dtype in [DType::F32, DType::F16] {
        let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let yr = half_round_if(&y, dtype);
        let rr = half_round_if(&r, dtype);
        // Per channel (a convolution's bias), with a residual.
        let b = half_round_if(&rand(&[6], 33), dtype);
        let want = (yr.broadcast_add(&b.reshape((1, 6, 1, 1))?)? + &rr)?;
        let got = bias_add(&g(&y), &g(&b), 20, Some(&g(&r)))?.expect("applies");
        let (rel, _) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < 2e-3, "conv bias {dtype:?}: {rel}");
        // Per (batch, channel) (ResNet's time embedding), and per last-dim element (linear).
        let t = half_round_if(&rand(&[2, 6, 1, 1], 34), dtype);
        let want = yr.broadcast_add(&t)?;
        let got = bias_add(&g(&y), &g(&t), 20, None)?.expect("applies");
        let (rel, _) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < 2e-3, "per-sample bias {dtype:?}: {rel}");
        let l = half_round_if(&rand(&[4], 35), dtype);
        let want = yr.broadcast_add(&l)?;
        let got = bias_add(&g(&y), &g(&l), 1, None)?.expect("applies");
        let (rel, _) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < 2e-3, "linear bias {dtype:?}: {rel}");
        // Odd rows (the f16 kernel's one-value-at-a-time path), per column and per row.
        let yo = rand(&[3, 5, 7], 36);
        let ro = rand(&[3, 5, 7], 37);
        let (yor, ror) = (half_round_if(&yo, dtype), half_round_if(&ro, dtype));
        let lo = half_round_if(&rand(&[7], 38), dtype);
        let want = (yor.broadcast_add(&lo)? + &ror)?;
        let got = bias_add(&g(&yo), &g(&lo), 1, Some(&g(&ro)))?.expect("applies");
        let (rel, _) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < 2e-3, "odd linear bias {dtype:?}: {rel}");
        let co = half_round_if(&rand(&[5], 39), dtype);
        let want = yor.broadcast_add(&co.reshape((1, 5, 1))?)?;
        let got = bias_add(&g(&yo), &g(&co), 7, None)?.expect("applies");
        let (rel, _) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        assert!(rel < 2e-3, "odd per-row bias {dtype:?}: {rel}");
    }
    Ok(())
}

#[test]
fn step_graph_replays_with_new_inputs() -> Result<()> {
    let dev = gpu();
    let w = rand(&[80, 80], 51).to_device(&dev)?;
    // Our kernels, candle's GEMM, a strided copy (dims and strides uploaded) and a small upload.
    let step = |x: &[Tensor]| -> Result<Tensor> {
        let h = x[0].broadcast_matmul(&w)?;
        let a = attention(&h, &x[1], &x[1], 2, 0.2, Variant::Auto)?.expect("applies");
        let t = a
            .transpose(1, 2)?
            .contiguous()?
            .transpose(1, 2)?
            .contiguous()?;
        let s = Tensor::from_vec(vec![0.5f32; 80], 80, &dev)?;
        let y = layer_norm(&t, &s, &s, 1e-5)?.expect("applies");
        y + &h
    };
    let mut graph = super::super::StepGraph::forced(&dev);
    for i in 0..5u64 {
        let q = rand(&[2, 70, 80], 60 + i).to_device(&dev)?;
        let kv = rand(&[2, 77, 80], 70 + i).to_device(&dev)?;
        let got = graph.run(&[&q, &kv], step)?;
        let want = step(&[q, kv])?;
        let (rel, max) = errors(
            &got.to_device(&Device::Cpu)?,
            &want.to_device(&Device::Cpu)?,
        );
        assert!(rel < 1e-6, "call {i}: rel {rel} max {max}");
        // Plain first call, captured from the second on.
        assert_eq!(graph.captured(), i > 0, "call {i}");
    }
    // A new shape starts over (plain, then captured).
    let q = rand(&[1, 30, 80], 80).to_device(&dev)?;
    let kv = rand(&[1, 77, 80], 81).to_device(&dev)?;
    graph.run(&[&q, &kv], step)?;
    assert!(!graph.captured());
    let got = graph.run(&[&q, &kv], step)?;
    assert!(graph.captured());
    let (rel, _) = errors(
        &got.to_device(&Device::Cpu)?,
        &step(&[q, kv])?.to_device(&Device::Cpu)?,
    );
    assert!(rel < 1e-6, "new shape: rel {rel}");
    Ok(())
}
