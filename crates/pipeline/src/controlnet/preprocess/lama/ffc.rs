//! LaMa's generator, `FFCResNetGenerator` (`saicinpainting/training/modules/ffc.py`) as the
//! extension's `annotator/lama/config.yaml` builds it (`ffc_resnet`, `add_out_act: sigmoid`,
//! `enable_lfu: false` everywhere, padding 'reflect' in every conv), every BatchNorm in eval
//! mode (eps 1e-5) folded into the conv before it.
//! - `ReflectionPad2d(3)`, a 7x7 conv from the 4 input channels (colour and mask), BN, ReLU;
//! - `n_downsampling` (3, config.yaml's; this is the one count the weights cannot say)
//!   stride-2 3x3 convs (reflect padding 1), BN, ReLU; the last one splits its output into a
//!   local part and a global part (config's `ratio_gout` 0.75 in the resnet blocks: the widths
//!   are read from `convl2l` and `convl2g`);
//! - the resnet blocks (as many as the file has): twice an `FFC_BN_ACT`: local out =
//!   `BN(convl2l(l) + convg2l(g))`, global out = `BN(convl2g(l) + SpectralTransform(g))`, each
//!   ReLU'd (3x3 convs with reflect padding 1); then `l + l'`, `g + g'`. `SpectralTransform`
//!   (stride 1, no LFU): `conv1` (1x1, BN, ReLU) to half the width, then `conv2(x + fu(x))`
//!   (1x1) back, `fu` the [`FourierUnit`];
//! - `ConcatTupleLayer` (local channels first), `n_downsampling` stride-2 3x3 transposed convs
//!   (padding 1, output padding 1), BN, ReLU; `ReflectionPad2d(3)`, a 7x7 conv to 3 channels,
//!   the sigmoid.
//!
//! Held as one tensor whose first channels are the local part: a block's local output is one
//! conv of the whole (`convl2l` and `convg2l` side by side), its global output a conv of the
//! local part plus the spectral transform of the global part, BN scaling both.

use candle_core::{Device, Tensor};

use super::super::depth_anything::State;
use super::super::lineart::{reflection_pad, ConvTranspose};
use super::fourier::FourierUnit;
use crate::kernels::Conv2d;
use crate::Result;

/// `nn.BatchNorm2d`'s default eps.
const BN_EPS: f64 = 1e-5;
/// config.yaml's `generator.n_downsampling`.
const N_DOWNSAMPLING: usize = 3;

/// An eval-mode BatchNorm as `x * scale + shift`.
struct Bn {
    scale: Tensor,
    shift: Tensor,
}

impl Bn {
    fn load(s: &State, key: &str, n: usize) -> Result<Self> {
        let w = s.get(&format!("{key}.weight"), &[n])?;
        let b = s.get(&format!("{key}.bias"), &[n])?;
        let mean = s.get(&format!("{key}.running_mean"), &[n])?;
        let var = s.get(&format!("{key}.running_var"), &[n])?;
        let scale = w.div(&(var + BN_EPS)?.sqrt()?)?;
        let shift = b.sub(&mean.mul(&scale)?)?;
        Ok(Self { scale, shift })
    }

    /// Both halves' norms as one, the local channels first.
    fn cat(a: &Bn, b: &Bn) -> Result<Self> {
        Ok(Self {
            scale: Tensor::cat(&[&a.scale, &b.scale], 0)?,
            shift: Tensor::cat(&[&a.shift, &b.shift], 0)?,
        })
    }

    /// A conv weight `[out, ...]` scaled per output channel.
    fn fold(&self, weight: &Tensor) -> Result<Tensor> {
        let shape: Vec<usize> = std::iter::once(weight.dim(0)?)
            .chain(std::iter::repeat_n(1, weight.rank() - 1))
            .collect();
        Ok(weight.broadcast_mul(&self.scale.reshape(shape)?)?)
    }
}

/// A conv weight without bias, `[out, in, k, k]` with `out` read from the file.
fn weight(s: &State, key: &str, input: usize, k: usize) -> Result<Tensor> {
    let w = s.any(&format!("{key}.weight"))?;
    let out = w.dim(0)?;
    s.get(&format!("{key}.weight"), &[out, input, k, k])
}

/// A reflect-padded conv with its BN folded in (and the ReLU after it).
struct ConvBnRelu {
    conv: Conv2d,
    pad: usize,
}

impl ConvBnRelu {
    fn new(weight: &Tensor, bn: &Bn, stride: usize, pad: usize) -> Result<Self> {
        let conv = Conv2d::new(bn.fold(weight)?, Some(bn.shift.clone()), stride, 0);
        Ok(Self { conv, pad })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        Ok(self.conv.forward(&reflection_pad(x, self.pad)?)?.relu()?)
    }

    fn out(&self) -> usize {
        self.conv.weight().dims()[0]
    }
}

/// One `FFC_BN_ACT` of a resnet block (ratio in = ratio out).
struct FfcBnAct {
    /// `convl2l | convg2l` over the whole input, `bn_l`.
    local: Conv2d,
    /// `convl2g` over the local input, scaled by `bn_g`, with its shift.
    local_to_global: Conv2d,
    /// `SpectralTransform.conv1` with its BN.
    spectral_in: Conv2d,
    fu: FourierUnit,
    /// `SpectralTransform.conv2` scaled by `bn_g`.
    spectral_out: Conv2d,
    local_width: usize,
}

impl FfcBnAct {
    fn load(s: &State, key: &str, local: usize, global: usize) -> Result<Self> {
        let ffc = format!("{key}.ffc");
        let l2l = s.get(&format!("{ffc}.convl2l.weight"), &[local, local, 3, 3])?;
        let g2l = s.get(&format!("{ffc}.convg2l.weight"), &[local, global, 3, 3])?;
        let l2g = s.get(&format!("{ffc}.convl2g.weight"), &[global, local, 3, 3])?;
        let bn_l = Bn::load(s, &format!("{key}.bn_l"), local)?;
        let bn_g = Bn::load(s, &format!("{key}.bn_g"), global)?;
        let st = format!("{ffc}.convg2g");
        let half = s.any(&format!("{st}.conv1.0.weight"))?.dim(0)?;
        let conv1 = s.get(&format!("{st}.conv1.0.weight"), &[half, global, 1, 1])?;
        let bn1 = Bn::load(s, &format!("{st}.conv1.1"), half)?;
        let fu = s.get(
            &format!("{st}.fu.conv_layer.weight"),
            &[2 * half, 2 * half, 1, 1],
        )?;
        let fu_bn = Bn::load(s, &format!("{st}.fu.bn"), 2 * half)?;
        let conv2 = s.get(&format!("{st}.conv2.weight"), &[global, half, 1, 1])?;
        let whole = Tensor::cat(&[&l2l, &g2l], 1)?;
        Ok(Self {
            local: Conv2d::new(bn_l.fold(&whole)?, Some(bn_l.shift), 1, 0),
            local_to_global: Conv2d::new(bn_g.fold(&l2g)?, Some(bn_g.shift.clone()), 1, 0),
            spectral_in: Conv2d::new(bn1.fold(&conv1)?, Some(bn1.shift), 1, 0),
            fu: FourierUnit {
                conv: Conv2d::new(fu_bn.fold(&fu)?, Some(fu_bn.shift), 1, 0),
            },
            spectral_out: Conv2d::new(bn_g.fold(&conv2)?, None, 1, 0),
            local_width: local,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        let padded = reflection_pad(x, 1)?;
        let local = self.local.forward(&padded)?.relu()?;
        let global_in = x.narrow(1, self.local_width, x.dim(1)? - self.local_width)?;
        let from_local = self
            .local_to_global
            .forward(&padded.narrow(1, 0, self.local_width)?)?;
        let y = self.spectral_in.forward(&global_in)?.relu()?;
        let spectral = self.spectral_out.forward(&(&y + self.fu.forward(&y)?)?)?;
        let global = (from_local + spectral)?.relu()?;
        Ok(Tensor::cat(&[&local, &global], 1)?)
    }
}

/// `FFCResnetBlock`: `x + conv2(conv1(x))`, local and global parts alike.
struct ResnetBlock([FfcBnAct; 2]);

/// A transposed conv with its BN folded in, then ReLU.
struct Up(ConvTranspose);

/// `FFCResNetGenerator` with its weights, on one device in f32.
pub struct LamaNetwork {
    head: ConvBnRelu,
    down: Vec<ConvBnRelu>,
    blocks: Vec<ResnetBlock>,
    up: Vec<Up>,
    tail: Conv2d,
}

impl std::fmt::Debug for LamaNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LamaNetwork")
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl LamaNetwork {
    /// The generator of a `ControlNetLama.pth` (its state dict: `model.<i>....`, the indices
    /// of the `nn.Sequential`), onto `device` in f32.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state(path)?,
            device,
            what: "LaMa (FFCResNetGenerator)",
        };
        let key = |i: usize| format!("model.{i}");
        let head_w = weight(&s, &format!("{}.ffc.convl2l", key(1)), 4, 7)?;
        let bn = Bn::load(&s, &format!("{}.bn_l", key(1)), head_w.dim(0)?)?;
        let head = ConvBnRelu::new(&head_w, &bn, 1, 3)?;
        let mut width = head.out();
        let mut down = Vec::with_capacity(N_DOWNSAMPLING);
        let (mut local, mut global) = (0, 0);
        for d in 0..N_DOWNSAMPLING {
            let k = key(2 + d);
            let l = weight(&s, &format!("{k}.ffc.convl2l"), width, 3)?;
            let bn_l = Bn::load(&s, &format!("{k}.bn_l"), l.dim(0)?)?;
            let layer = if d + 1 < N_DOWNSAMPLING {
                ConvBnRelu::new(&l, &bn_l, 2, 1)?
            } else {
                // The last one's output is split (ratio_gout of the resnet blocks).
                let g = weight(&s, &format!("{k}.ffc.convl2g"), width, 3)?;
                let bn_g = Bn::load(&s, &format!("{k}.bn_g"), g.dim(0)?)?;
                (local, global) = (l.dim(0)?, g.dim(0)?);
                ConvBnRelu::new(&Tensor::cat(&[&l, &g], 0)?, &Bn::cat(&bn_l, &bn_g)?, 2, 1)?
            };
            width = layer.out();
            down.push(layer);
        }
        let mut blocks = Vec::new();
        let mut i = 2 + N_DOWNSAMPLING;
        while s
            .tensors
            .contains_key(&format!("{}.conv1.ffc.convl2l.weight", key(i)))
        {
            let conv = |c: &str| FfcBnAct::load(&s, &format!("{}.{c}", key(i)), local, global);
            blocks.push(ResnetBlock([conv("conv1")?, conv("conv2")?]));
            i += 1;
        }
        // ConcatTupleLayer at i, then (ConvTranspose2d, BN, ReLU) per level.
        let mut up = Vec::with_capacity(N_DOWNSAMPLING);
        for u in 0..N_DOWNSAMPLING {
            let (t, b) = (key(i + 1 + 3 * u), key(i + 2 + 3 * u));
            let w = s.any(&format!("{t}.weight"))?;
            let out = w.dim(1)?;
            let w = s.get(&format!("{t}.weight"), &[width, out, 3, 3])?;
            let bias = s.get(&format!("{t}.bias"), &[out])?;
            let bn = Bn::load(&s, &b, out)?;
            // [in, out, k, k]: BN scales dim 1.
            let w = w.broadcast_mul(&bn.scale.reshape((1, out, 1, 1))?)?;
            let bias = (bias.mul(&bn.scale)? + &bn.shift)?;
            up.push(Up(ConvTranspose::new(&w, bias, 1, 1)?));
            width = out;
        }
        // ReflectionPad2d(3) at i + 1 + 3n, the last conv after it.
        let t = key(i + 2 + 3 * N_DOWNSAMPLING);
        let tail_w = s.get(&format!("{t}.weight"), &[3, width, 7, 7])?;
        let tail = Conv2d::new(tail_w, Some(s.get(&format!("{t}.bias"), &[3])?), 1, 0);
        Ok(Self {
            head,
            down,
            blocks,
            up,
            tail,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.tail.weight().device()
    }

    /// The generator on a `[1, 4, H, W]` feed (colour zeroed under the mask, the mask): the
    /// `[1, 3, H, W]` image in 0..1 (sides multiples of 8 give the same sides back).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        let mut x = self.head.forward(x)?;
        for d in &self.down {
            x = d.forward(&x)?;
        }
        for ResnetBlock(convs) in &self.blocks {
            let mut y = x.clone();
            for conv in convs {
                y = conv.forward(&y)?;
            }
            x = (x + y)?;
        }
        for Up(t) in &self.up {
            x = t.forward(&x)?.relu()?;
        }
        let y = self.tail.forward(&reflection_pad(&x, 3)?)?;
        Ok(candle_nn::ops::sigmoid(&y)?)
    }
}
