//! Timings behind the linear layers' choices (ignored tests, run by hand).

mod timing {
    use crate::kernels::linear::Dense;
    use candle_core::{DType, Device, Result, Tensor};

    /// CLIP's 72 linear layers at 154 rows with distinct (cold) weights, both layouts:
    /// `cargo test --release -p sdserve-pipeline --lib clip_linear_chain -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn clip_linear_chain_timing() -> Result<()> {
        let dev = Device::Cpu;
        let mut layers = Vec::new();
        for _ in 0..12 {
            for &(n, k) in &[
                (768, 768),
                (768, 768),
                (768, 768),
                (768, 768),
                (3072, 768),
                (768, 3072),
            ] {
                let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
                let l = candle_nn::Linear::new(w, Some(Tensor::zeros(n, DType::F32, &dev)?));
                layers.push((l.clone(), Dense::new(l)?));
            }
        }
        let x768 = Tensor::randn(0f32, 1.0, (2, 77, 768), &dev)?;
        let x3072 = Tensor::randn(0f32, 1.0, (2, 77, 3072), &dev)?;
        let input = |l: &candle_nn::Linear| {
            if l.weight().dim(1).unwrap() == 768 {
                &x768
            } else {
                &x3072
            }
        };
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for (l, _) in &layers {
                candle_core::Module::forward(l, input(l))?;
            }
            let candle = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for (l, d) in &layers {
                d.forward(input(l), None)?;
            }
            let dense = t.elapsed().as_secs_f64();
            eprintln!(
                "72 linears: candle {candle:.3} s, Dense {dense:.3} s ({:.1} GF/s)",
                26.1 / dense
            );
        }
        Ok(())
    }
}

mod layout_timing {
    use crate::kernels::linear::gemm_strided;

    /// gemm with the weight as stored in the file (`[n, k]`, read through strides) against the
    /// transposed copy (`[k, n]` contiguous), on distinct (cold) weights, the shapes of SD 1.5:
    /// `cargo test -p sdserve-pipeline --lib layout_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn weight_layout_timing() {
        // (what, m, k, n)
        let shapes = [
            ("clip qkvo 154", 154, 768, 768),
            ("clip fc1 154", 154, 768, 3072),
            ("clip fc2 154", 154, 3072, 768),
            ("unet attn2 kv 154", 154, 768, 320),
            ("unet attn2 kv 154 c1280", 154, 768, 1280),
            ("unet temb 2", 2, 1280, 1280),
            ("unet 512 l1 qkv", 8192, 320, 320),
            ("unet 512 l1 ff1", 8192, 320, 2560),
            ("unet 512 l1 ff2", 8192, 1280, 320),
            ("unet 512 l2 qkv", 2048, 640, 640),
            ("unet 512 l2 ff1", 2048, 640, 5120),
            ("unet 512 l3 qkv", 512, 1280, 1280),
            ("unet 512 l3 ff1", 512, 1280, 10240),
            ("unet 512 l3 ff2", 512, 5120, 1280),
            ("unet 512 mid qkv", 128, 1280, 1280),
            ("unet 256 l1 qkv", 2048, 320, 320),
            ("unet 256 l3 qkv", 128, 1280, 1280),
            ("unet 256 mid ff1", 32, 1280, 10240),
        ];
        for (what, m, k, n) in shapes {
            let copies = (256usize << 20).div_ceil(k * n * 4).clamp(2, 64);
            let ws: Vec<Vec<f32>> = (0..copies)
                .map(|c| (0..k * n).map(|i| ((i + c) % 97) as f32 * 1e-3).collect())
                .collect();
            let wts: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| crate::weights::transpose_f32(n, k, w))
                .collect();
            let x: Vec<f32> = (0..m * k).map(|i| (i % 89) as f32 * 1e-2).collect();
            let mut out = vec![0f32; m * n];
            let mut out2 = vec![0f32; m * n];
            let reps = (4e9 / (2.0 * (m * k * n) as f64)).clamp(copies as f64, 2000.0) as usize;
            let mut best = [f64::MAX; 2];
            for _ in 0..3 {
                for (li, layout) in [0, 1].into_iter().enumerate() {
                    let t = std::time::Instant::now();
                    for r in 0..reps {
                        let c = r % copies;
                        // Layout 0: W^T `[k, n]` row-major; layout 1: W `[n, k]` as stored,
                        // read through strides. Each writes its own output, compared below.
                        let (dst, w, w_strides) = if layout == 0 {
                            (out.as_mut_ptr(), wts[c].as_ptr(), (n as isize, 1))
                        } else {
                            (out2.as_mut_ptr(), ws[c].as_ptr(), (1, k as isize))
                        };
                        // SAFETY: buffers sized for the shapes and strides given.
                        unsafe {
                            gemm_strided(
                                (m, n, k),
                                dst,
                                (n as isize, 1),
                                x.as_ptr(),
                                (k as isize, 1),
                                w,
                                w_strides,
                                false,
                            )
                        }
                    }
                    best[li] = best[li].min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            let same = out
                .iter()
                .zip(&out2)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            eprintln!(
                "{what:26} m={m:5} k={k:5} n={n:5}: transposed {:8.1} us, as stored {:8.1} us, ratio {:.2}, bit-identical {same}",
                best[0] * 1e6,
                best[1] * 1e6,
                best[1] / best[0]
            );
        }
    }
}
