//! The cuBLASLt linear layers against candle's matmul and broadcast add on the CPU in f32 (from
//! the same f16-rounded inputs for f16). Built only with `cuda-core`; they need a CUDA device.

use super::super::imp::tests::{errors, gpu, half_round_if, rand};
use super::*;
use candle_core::Device;

/// `x w^T + bias (+ residual)` on the CPU in f32.
fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: Option<&Tensor>) -> Tensor {
    let mut y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(r) = r {
        y = (y + r).unwrap();
    }
    y
}

/// Runs one case on the GPU in `dtype` and returns (relative L2, max abs) error against the
/// f32 reference of the same rounded inputs.
fn case(
    dev: &Device,
    dtype: DType,
    x_dims: &[usize],
    n: usize,
    bias: bool,
    residual: bool,
    seed: u64,
) -> Result<(f32, f32)> {
    let k = x_dims[x_dims.len() - 1];
    let mut out_dims = x_dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    let x = half_round_if(&rand(x_dims, seed), dtype);
    // Weights scaled like a trained layer's (unit-variance outputs), so f16 stays in range.
    let w = half_round_if(&(rand(&[n, k], seed + 1) / (k as f64).sqrt())?, dtype);
    let b = bias.then(|| half_round_if(&rand(&[n], seed + 2), dtype));
    let r = residual.then(|| half_round_if(&rand(&out_dims, seed + 3), dtype));
    let want = reference(&x, &w, b.as_ref(), r.as_ref());
    let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let (gb, gr) = (b.as_ref().map(g), r.as_ref().map(g));
    let got = linear(&g(&x), &g(&w), gb.as_ref(), gr.as_ref())?.expect("cuBLASLt applies");
    assert_eq!(got.dims(), out_dims.as_slice());
    assert_eq!(got.dtype(), dtype);
    Ok(errors(
        &got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        &want,
    ))
}

/// Every linear shape of SD 1.5's UNet with guidance (batch 2) at 512x512, its time
/// embedding, the text encoder's, and one without guidance: (input dims, out features, bias,
/// residual).
fn unet_shapes() -> Vec<(Vec<usize>, usize, bool, bool)> {
    let mut v = Vec::new();
    for (c, tokens) in [(320, 4096), (640, 1024), (1280, 256), (1280, 64)] {
        let x = vec![2, tokens, c];
        v.push((x.clone(), c, true, false)); // proj_in (1x1 conv as a linear layer), proj_out
        v.push((x.clone(), c, false, false)); // to_q
        v.push((x.clone(), c, true, true)); // to_out.0 + residual
        v.push((x.clone(), 8 * c, true, false)); // GEGLU's proj: 2 x 4c
        v.push((vec![2, tokens, 4 * c], c, true, true)); // ff.net.2 + residual
        v.push((vec![2, 77, 768], c, false, false)); // cross-attention to_k / to_v
        v.push((vec![2, 1280], c, true, false)); // ResNets' time_emb_proj
    }
    v.push((vec![2, 320], 1280, true, false)); // time_embedding.linear_1
    v.push((vec![2, 1280], 1280, true, false)); // time_embedding.linear_2
    v.push((vec![2, 77, 768], 768, true, true)); // CLIP out_proj / fc2 + residual
    v.push((vec![2, 77, 768], 3072, true, false)); // CLIP fc1
    v.push((vec![1, 4096, 320], 320, true, true)); // guidance off: one row of the batch
    v
}

#[test]
fn lt_linear_matches_cpu_matmul_for_every_unet_shape() -> Result<()> {
    let dev = gpu();
    for dtype in [DType::F32, DType::F16] {
        for (i, (x, n, bias, res)) in unet_shapes().into_iter().enumerate() {
            let (rel, max) = case(&dev, dtype, &x, n, bias, res, 1000 + 10 * i as u64)?;
            // f32: no TF32 (its 10-bit mantissa: rel 1e-4 and more; f32 sums of up to 5120
            // products differ from the CPU's by about 1e-6); f16: one rounding of the output.
            let tol = if dtype == DType::F32 { 5e-5 } else { 1e-3 };
            assert!(
                rel < tol,
                "{dtype:?} x {x:?} n {n} bias {bias} residual {res}: rel {rel} max {max}"
            );
        }
    }
    Ok(())
}

#[test]
fn lt_linear_reads_views_at_an_offset_and_declines_what_it_does_not_cover() -> Result<()> {
    let dev = gpu();
    for dtype in [DType::F32, DType::F16] {
        // Rows of 40 values from the second row on: 80 (f16) or 160 (f32) bytes past an
        // aligned start, so the plan is made for a 16- or 32-byte alignment.
        let all = half_round_if(&rand(&[33, 40], 7), dtype);
        let x = all.narrow(0, 1, 32)?;
        let w = half_round_if(&(rand(&[24, 40], 8) / 6.0)?, dtype);
        let b = half_round_if(&rand(&[24], 9), dtype);
        let r = half_round_if(&rand(&[32, 24], 10), dtype);
        let want = reference(&x, &w, Some(&b), Some(&r));
        let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let gx = g(&all).narrow(0, 1, 32)?;
        assert!(gx.is_contiguous());
        let got = linear(&gx, &g(&w), Some(&g(&b)), Some(&g(&r)))?.expect("applies");
        let (rel, max) = errors(&got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, &want);
        let tol = if dtype == DType::F32 { 5e-5 } else { 1e-3 };
        assert!(rel < tol, "{dtype:?} view: rel {rel} max {max}");

        // Declined: mixed dtypes, a bias or residual of the wrong size, a strided weight.
        let other = if dtype == DType::F32 {
            DType::F16
        } else {
            DType::F32
        };
        let wo = w.to_dtype(other)?.to_device(&dev)?;
        assert!(linear(&gx, &wo, None, None)?.is_none());
        assert!(linear(&gx, &g(&w), Some(&g(&b.narrow(0, 0, 20)?)), None)?.is_none());
        assert!(linear(&gx, &g(&w), None, Some(&g(&r.narrow(0, 0, 16)?)))?.is_none());
        let wt = g(&w.t()?.contiguous()?).t()?;
        assert!(!wt.is_contiguous());
        assert!(linear(&gx, &wt, None, None)?.is_none());
    }
    Ok(())
}

#[test]
fn lt_linear_is_captured_by_the_step_graph() -> Result<()> {
    let dev = gpu();
    let w1 = (rand(&[160, 80], 21) / 9.0)?.to_device(&dev)?;
    let b1 = rand(&[160], 22).to_device(&dev)?;
    let w2 = (rand(&[80, 160], 23) / 13.0)?.to_device(&dev)?;
    let b2 = rand(&[80], 24).to_device(&dev)?;
    // Two linear layers, the second with the input as its residual (a feed-forward block).
    let step = |x: &[Tensor]| -> Result<Tensor> {
        let h = linear(&x[0], &w1, Some(&b1), None)?.expect("applies");
        linear(&h, &w2, Some(&b2), Some(&x[0]))?
            .ok_or_else(|| candle_core::Error::Msg("declined".into()))
    };
    let mut graph = super::super::StepGraph::forced(&dev);
    for i in 0..4u64 {
        let x = rand(&[2, 70, 80], 30 + i).to_device(&dev)?;
        let got = graph.run(&[&x], step)?;
        assert_eq!(
            graph.captured(),
            i > 0,
            "call {i}: plain first, then captured"
        );
        let c = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let h = reference(&c(&x), &c(&w1), Some(&c(&b1)), None);
        let want = reference(&h, &c(&w2), Some(&c(&b2)), Some(&c(&x)));
        let (rel, max) = errors(&got.to_device(&Device::Cpu)?, &want);
        assert!(rel < 1e-5, "call {i}: rel {rel} max {max}");
        // And the replay equals a plain run on the device exactly.
        let plain = step(&[x])?;
        let (rel, _) = errors(
            &got.to_device(&Device::Cpu)?,
            &plain.to_device(&Device::Cpu)?,
        );
        assert!(
            rel < 1e-6,
            "call {i}: graph differs from the plain run: {rel}"
        );
    }
    Ok(())
}

/// Each transformer level of SD 1.5's UNet at 512x512 with guidance, and one without:
/// (batch, channels, height, width).
const LEVELS: [(usize, usize, usize, usize); 5] = [
    (2, 320, 64, 64),
    (2, 640, 32, 32),
    (2, 1280, 16, 16),
    (2, 1280, 8, 8),
    (1, 320, 64, 64),
];

#[test]
fn nchw_projections_match_transpose_and_matmul() -> Result<()> {
    let dev = gpu();
    let mut seed = 2000;
    for dtype in [DType::F32, DType::F16] {
        let g = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let back = |t: Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let tol = if dtype == DType::F32 { 5e-5 } else { 1e-3 };
        for (i, &(b, c, h, w)) in LEVELS.iter().enumerate() {
            seed += 10;
            let x = half_round_if(&rand(&[b, c, h, w], seed), dtype);
            let wi = half_round_if(&(rand(&[c, c], seed + 1) / (c as f64).sqrt())?, dtype);
            let bi = half_round_if(&rand(&[c], seed + 2), dtype);
            // proj_in: the image as tokens, then the linear layer (with a bias but the last).
            let bias = (i != LEVELS.len() - 1).then_some(&bi);
            let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
            let want = reference(&tokens, &wi, bias, None);
            let got =
                linear_from_nchw(&g(&x), &g(&wi), bias.map(g).as_ref())?.expect("cuBLASLt applies");
            assert_eq!(got.dims(), &[b, h * w, c]);
            let (rel, max) = errors(&back(got), &want);
            assert!(
                rel < tol,
                "proj_in {dtype:?} {b}x{c}x{h}x{w}: rel {rel} max {max}"
            );

            // proj_out: the linear layer, back to NCHW, plus the transformer's input.
            let t = half_round_if(&rand(&[b, h * w, c], seed + 3), dtype);
            let wo = half_round_if(&(rand(&[c, c], seed + 4) / (c as f64).sqrt())?, dtype);
            let bo = half_round_if(&rand(&[c], seed + 5), dtype);
            let bias = (i != LEVELS.len() - 1).then_some(&bo);
            let y = reference(&t, &wo, bias, None);
            let want = (y.transpose(1, 2)?.reshape((b, c, h, w))? + &x)?;
            let got = linear_to_nchw_add(&g(&t), &g(&wo), bias.map(g).as_ref(), &g(&x))?
                .expect("cuBLASLt applies");
            assert_eq!(got.dims(), &[b, c, h, w]);
            let (rel, max) = errors(&back(got), &want);
            // f16: the GEMM's output is rounded before the bias pass adds the bias.
            assert!(
                rel < 2.0 * tol,
                "proj_out {dtype:?} {b}x{c}x{h}x{w}: rel {rel} max {max}"
            );
        }
        // Declined: channels that do not match the weight, a residual of another size.
        let x = g(&rand(&[1, 8, 4, 4], 1));
        let w8 = g(&rand(&[6, 8], 2));
        assert!(linear_from_nchw(&x, &g(&rand(&[6, 7], 3)), None)?.is_none());
        let t = g(&rand(&[1, 16, 8], 4));
        assert!(linear_to_nchw_add(&t, &w8, None, &x)?.is_none());
    }
    Ok(())
}

/// The GEMM descriptions themselves (no GPU: cuBLASLt's documented semantics on the CPU)
/// against candle's CPU ops: the layouts, transpositions and batch strides each caller
/// builds say what it means.
#[test]
fn gemm_descriptions_mean_what_the_callers_compute() -> Result<()> {
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (b, k, h, w, n) = (2, 6, 3, 5, 4);
    let hw = h * w;
    let wt = rand(&[n, k], 1);
    let bias = rand(&[n], 2);
    // linear: x [b, hw, k] -> [b, hw, n], with a residual.
    let x = rand(&[b, hw, k], 3);
    let r = rand(&[b, hw, n], 4);
    let got = Gemm::linear(b * hw, n, k).emulate(&v(&wt), &v(&x), Some(&v(&r)), Some(&v(&bias)));
    let want = reference(&x, &wt, Some(&bias), Some(&r));
    let got = Tensor::from_vec(got, (b, hw, n), &Device::Cpu)?;
    assert!(errors(&got, &want).0 < 1e-6, "linear");
    // from NCHW: img [b, k, h, w] -> tokens [b, hw, n].
    let img = rand(&[b, k, h, w], 5);
    let got = Gemm::from_nchw(b, k, hw, n).emulate(&v(&wt), &v(&img), None, Some(&v(&bias)));
    let tokens = img.reshape((b, k, hw))?.transpose(1, 2)?.contiguous()?;
    let want = reference(&tokens, &wt, Some(&bias), None);
    let got = Tensor::from_vec(got, (b, hw, n), &Device::Cpu)?;
    assert!(errors(&got, &want).0 < 1e-6, "from_nchw");
    // to NCHW: tokens [b, hw, k] -> [b, n, h, w] + residual image (bias added apart).
    let res = rand(&[b, n, h, w], 6);
    let got = Gemm::to_nchw(b, hw, k, n).emulate(&v(&x), &v(&wt), Some(&v(&res)), None);
    let y = reference(&x, &wt, None, None);
    let want = (y.transpose(1, 2)?.reshape((b, n, h, w))? + &res)?;
    let got = Tensor::from_vec(got, (b, n, h, w), &Device::Cpu)?;
    assert!(errors(&got, &want).0 < 1e-6, "to_nchw");
    Ok(())
}
