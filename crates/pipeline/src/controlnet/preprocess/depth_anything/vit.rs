//! One DINOv2 block (`dinov2_layers/block.py`'s `Block` with `MemEffAttention`, `Mlp` and
//! `LayerScale`): `x + ls1 * attn(norm1(x))`, then `x + ls2 * mlp(norm2(x))`.
//!
//! For f32 on the CPU it runs our kernels (`crate::kernels`): LayerNorm, the `qkv` linear into
//! one packed buffer that the fused attention reads in place (no head split, no score
//! matrices), `proj` and `fc2` with their layer scale folded into the weights (`ls * (W y + b)`
//! is `(ls W) y + ls b`) and the residual added inside the gemm, GELU (erf) in one parallel
//! pass. The weights are kept transposed, as those gemms stream them. Elsewhere candle's ops.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use crate::kernels::{act, attention, linear, norm};
use crate::Result;

/// A linear layer as the CPU kernels take it: `W^T` `[in, out]` and the bias.
struct Transposed {
    wt: Tensor,
    bias: Tensor,
}

impl Transposed {
    /// `linear`'s weight transposed, each output (a column of `W^T`) times `scale[j]` when given
    /// (the bias too).
    fn new(l: &Linear, scale: Option<&Tensor>) -> Result<Self> {
        let (out, inp) = l.weight().dims2()?;
        let w = l.weight().flatten_all()?.to_vec1::<f32>()?;
        let mut wt = crate::weights::transpose_f32(out, inp, &w);
        let mut bias = match l.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; out],
        };
        if let Some(s) = scale {
            let s = s.to_vec1::<f32>()?;
            for row in wt.chunks_exact_mut(out) {
                row.iter_mut().zip(&s).for_each(|(w, &s)| *w *= s);
            }
            bias.iter_mut().zip(&s).for_each(|(b, &s)| *b *= s);
        }
        Ok(Self {
            wt: Tensor::from_vec(wt, (inp, out), &Device::Cpu)?,
            bias: Tensor::from_vec(bias, out, &Device::Cpu)?,
        })
    }

    /// `x W^T + bias (+ residual)`.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        fast(linear::linear(x, &self.wt, Some(&self.bias), residual)?)
    }
}

/// A kernel's answer, which the CPU path only takes where the kernels apply (f32 on the CPU).
fn fast(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| {
        candle_core::Error::Msg("a CPU kernel declined an f32 CPU tensor".into()).into()
    })
}

enum Layers {
    /// f32 on the CPU: the layer scales folded into `proj` and `fc2`.
    Cpu {
        qkv: Transposed,
        proj: Transposed,
        fc1: Transposed,
        fc2: Transposed,
    },
    Candle {
        qkv: Linear,
        proj: Linear,
        ls1: Tensor,
        fc1: Linear,
        fc2: Linear,
        ls2: Tensor,
    },
}

pub(in crate::controlnet::preprocess) struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    /// LayerNorm's eps (candle's `LayerNorm` does not give it back).
    eps: f64,
    layers: Layers,
}

/// A block's weights as the file has them.
pub(in crate::controlnet::preprocess) struct BlockWeights {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub ls1: Tensor,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub ls2: Tensor,
}

impl Block {
    pub(in crate::controlnet::preprocess) fn new(w: BlockWeights, eps: f64) -> Result<Self> {
        let cpu_f32 =
            w.qkv.weight().dtype() == DType::F32 && matches!(w.qkv.weight().device(), Device::Cpu);
        let layers = if cpu_f32 {
            Layers::Cpu {
                qkv: Transposed::new(&w.qkv, None)?,
                proj: Transposed::new(&w.proj, Some(&w.ls1))?,
                fc1: Transposed::new(&w.fc1, None)?,
                fc2: Transposed::new(&w.fc2, Some(&w.ls2))?,
            }
        } else {
            Layers::Candle {
                qkv: w.qkv,
                proj: w.proj,
                ls1: w.ls1,
                fc1: w.fc1,
                fc2: w.fc2,
                ls2: w.ls2,
            }
        };
        Ok(Self {
            norm1: w.norm1,
            norm2: w.norm2,
            eps,
            layers,
        })
    }

    pub(in crate::controlnet::preprocess) fn forward(
        &self,
        x: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        let scale = ((c / heads) as f64).powf(-0.5);
        match &self.layers {
            Layers::Cpu {
                qkv,
                proj,
                fc1,
                fc2,
            } => {
                let ln = |n: &LayerNorm, x: &Tensor| -> Result<Tensor> {
                    let b = n
                        .bias()
                        .ok_or_else(|| candle_core::Error::Msg("no bias".into()))?;
                    fast(norm::layer_norm(x, n.weight(), b, self.eps)?)
                };
                let packed = qkv.forward(&ln(&self.norm1, x)?, None)?;
                let y = fast(attention::attention_packed_qkv(&packed, heads, scale)?)?;
                drop(packed);
                let x = proj.forward(&y, Some(x))?;
                let h = fast(act::gelu_erf(&fc1.forward(&ln(&self.norm2, &x)?, None)?)?)?;
                fc2.forward(&h, Some(&x))
            }
            Layers::Candle {
                qkv,
                proj,
                ls1,
                fc1,
                fc2,
                ls2,
            } => {
                let (b, n, c) = x.dims3()?;
                let hd = c / heads;
                let qkv = qkv
                    .forward(&self.norm1.forward(x)?)?
                    .reshape((b, n, 3, heads, hd))?
                    .permute((2, 0, 3, 1, 4))?;
                // One head at a time: a wide image's attention matrix for all heads is large.
                let mut outs = Vec::with_capacity(heads);
                for h in 0..heads {
                    let pick = |i: usize| -> Result<Tensor> {
                        Ok(qkv.get(i)?.narrow(1, h, 1)?.contiguous()?)
                    };
                    let q = (pick(0)? * scale)?;
                    let attn = q.matmul(&pick(1)?.t()?.contiguous()?)?;
                    let attn = candle_nn::ops::softmax_last_dim(&attn)?;
                    outs.push(attn.matmul(&pick(2)?)?);
                }
                let y = Tensor::cat(&outs, 1)?.transpose(1, 2)?.reshape((b, n, c))?;
                let x = (x + proj.forward(&y)?.broadcast_mul(ls1)?)?;
                let y = fc2.forward(&fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
                Ok((&x + y.broadcast_mul(ls2)?)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    /// Random block weights at DINOv2's head width (64) with 2 heads, a 4x MLP and layer scales
    /// away from 1, so a dropped or misplaced scale shows.
    fn weights(seed: u64, c: usize) -> BlockWeights {
        let mut rng = crate::rng::TorchRng::new(seed);
        let mut r = |shape: &[usize], std: f64, mean: f64| {
            let t = rng.randn_tensor(shape, &Device::Cpu, DType::F32).unwrap();
            ((t * std).unwrap() + mean).unwrap()
        };
        let lin = |r: &mut dyn FnMut(&[usize], f64, f64) -> Tensor, o: usize, i: usize| {
            Linear::new(
                r(&[o, i], 1.0 / (i as f64).sqrt(), 0.0),
                Some(r(&[o], 0.1, 0.0)),
            )
        };
        let ln = |r: &mut dyn FnMut(&[usize], f64, f64) -> Tensor| {
            LayerNorm::new(r(&[c], 0.2, 1.0), r(&[c], 0.1, 0.0), 1e-6)
        };
        BlockWeights {
            norm1: ln(&mut r),
            qkv: lin(&mut r, 3 * c, c),
            proj: lin(&mut r, c, c),
            ls1: r(&[c], 0.3, 0.6),
            norm2: ln(&mut r),
            fc1: lin(&mut r, 4 * c, c),
            fc2: lin(&mut r, c, 4 * c),
            ls2: r(&[c], 0.3, 0.6),
        }
    }

    fn candle_block(w: BlockWeights) -> Block {
        Block {
            norm1: w.norm1,
            norm2: w.norm2,
            eps: 1e-6,
            layers: Layers::Candle {
                qkv: w.qkv,
                proj: w.proj,
                ls1: w.ls1,
                fc1: w.fc1,
                fc2: w.fc2,
                ls2: w.ls2,
            },
        }
    }

    /// The kernels' block against candle's ops on the same weights: a class token and a 7x9
    /// grid (N = 64: not a multiple of the attention's blocks), values of a ViT's residual
    /// stream (a few units).
    #[test]
    fn cpu_kernels_match_candle_ops() -> Result<()> {
        let (c, heads, n) = (128, 2, 1 + 7 * 9);
        let cpu = Block::new(weights(5, c), 1e-6)?;
        assert!(matches!(cpu.layers, Layers::Cpu { .. }));
        let reference = candle_block(weights(5, c));
        let x = (crate::rng::TorchRng::new(6)
            .randn_tensor((1, n, c), &Device::Cpu, DType::F32)
            .unwrap()
            * 3.0)?;
        let got = cpu.forward(&x, heads)?;
        let want = reference.forward(&x, heads)?;
        let d = max_abs_diff(&got, &want);
        let top = want.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("block: largest difference {d:e} of values up to {top}");
        assert!(d < 1e-5 * top.max(1.0), "{d}");
        // One head of 128 is a different attention: the comparison can tell.
        let one_head = reference.forward(&x, 1)?;
        assert!(max_abs_diff(&got, &one_head) > 1e-3);
        Ok(())
    }
}
