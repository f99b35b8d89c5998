//! diffusers' down, mid and up blocks (`unet_2d_blocks.py`): `DownBlock2D` /
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::resampling::{Downsample, Upsample};
use super::resnet::{ResnetBlock, ResnetParams};
use super::transformer::{block_path, Transformer2D, TransformerParams};
use super::{Out, RunOpts};
use crate::lora::{join, LoraTargets, Target};
use crate::unet::reference::down_key;

/// `DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
    /// `down_blocks.{i}`: the reference hooks' key.
    path: String,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        layers: usize,
        rp: &ResnetParams,
        tp: Option<&TransformerParams>,
        downsample_padding: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock::new(c, cout, rp, vb.pp("resnets").pp(i))?);
            if let Some(tp) = tp {
                attentions.push(Transformer2D::new(cout, tp, vb.pp("attentions").pp(i))?);
            }
        }
        let downsample = match downsample_padding {
            Some(p) => Some(Downsample::new(cout, p, vb.pp("downsamplers").pp(0))?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
            path: block_path(&vb.prefix()),
        })
    }

    /// Returns the output and pushes the skip connections onto `skips`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        o: RunOpts<'_>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            x = r.forward(&x, temb)?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, o)?;
            }
            x = o.renormalised(|| down_key(&self.path, Some(i)), x)?;
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsample {
            x = o.renormalised(|| down_key(&self.path, None), d.forward(&x)?)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    first: ResnetBlock,
    rest: Vec<(Transformer2D, ResnetBlock)>,
}

impl MidBlock {
    pub(crate) fn new(
        channels: usize,
        rp: &ResnetParams,
        tp: &TransformerParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        // diffusers builds it with its default num_layers=1.
        let num_layers = 1;
        let first = ResnetBlock::new(channels, channels, rp, vb.pp("resnets").pp(0))?;
        let rest = (0..num_layers)
            .map(|i| {
                Ok((
                    Transformer2D::new(channels, tp, vb.pp("attentions").pp(i))?,
                    ResnetBlock::new(channels, channels, rp, vb.pp("resnets").pp(i + 1))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { first, rest })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        o: RunOpts<'_>,
    ) -> Result<Tensor> {
        let mut x = self.first.forward(x, temb)?;
        for (a, r) in &self.rest {
            x = r.forward(&a.forward(&x, ctx, o)?, temb)?;
        }
        o.renormalised(|| "mid_block".to_string(), x)
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
    /// `up_blocks.{i}`: the reference hooks' key.
    path: String,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cin: usize,
        prev_out: usize,
        cout: usize,
        layers: usize,
        rp: &ResnetParams,
        tp: Option<&TransformerParams>,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let rin = if i == 0 { prev_out } else { cout };
            resnets.push(ResnetBlock::new(
                rin + skip,
                cout,
                rp,
                vb.pp("resnets").pp(i),
            )?);
            if let Some(tp) = tp {
                attentions.push(Transformer2D::new(cout, tp, vb.pp("attentions").pp(i))?);
            }
        }
        let upsample = if add_upsample {
            Some(Upsample::new(cout, vb.pp("upsamplers").pp(0))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
            path: block_path(&vb.prefix()),
        })
    }

    pub(crate) fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skip connections from the end of `skips` (last one first, as diffusers).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        upsample_size: Option<(usize, usize)>,
        o: RunOpts<'_>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = match skips.pop() {
                Some(s) => s,
                None => candle_core::bail!("UNet up block ran out of skip connections"),
            };
            // Booked apart when profiling on a GPU (docs/GPU.md: what "other" is).
            let cat = crate::kernels::cuda::profiled(x.device(), "concat", || {
                Tensor::cat(&[&x, &skip], 1)
            })?;
            x = r.forward(&cat, temb)?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, o)?;
            }
            // ldm's output block ends after the upsampler in the block's last one.
            if i + 1 < self.resnets.len() || self.upsample.is_none() {
                x = o.renormalised(|| format!("{}.{i}", self.path), x)?;
            }
        }
        let last = self.resnets.len() - 1;
        match &self.upsample {
            Some(u) => o.renormalised(
                || format!("{}.{last}", self.path),
                u.forward(&x, upsample_size)?,
            ),
            None => Ok(x),
        }
    }
}

/// The LoRA targets of a down or up block's `resnets.{i}` and `attentions.{i}`.
fn resnet_and_attention_targets<'a>(
    resnets: &'a [ResnetBlock],
    attentions: &'a [Transformer2D],
    p: &str,
    out: &mut Out<'a>,
) {
    for (i, r) in resnets.iter().enumerate() {
        r.lora_targets(&join(p, format!("resnets.{i}")), out);
    }
    for (i, a) in attentions.iter().enumerate() {
        a.lora_targets(&join(p, format!("attentions.{i}")), out);
    }
}

impl LoraTargets for DownBlock {
    fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
        resnet_and_attention_targets(&self.resnets, &self.attentions, p, out);
        if let Some(d) = &self.downsample {
            out.push((join(p, "downsamplers.0.conv"), Target::Conv(&d.conv)));
        }
    }
}

impl LoraTargets for MidBlock {
    fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
        self.first.lora_targets(&join(p, "resnets.0"), out);
        for (i, (a, r)) in self.rest.iter().enumerate() {
            a.lora_targets(&join(p, format!("attentions.{i}")), out);
            r.lora_targets(&join(p, format!("resnets.{}", i + 1)), out);
        }
    }
}

impl LoraTargets for UpBlock {
    fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
        resnet_and_attention_targets(&self.resnets, &self.attentions, p, out);
        if let Some(u) = &self.upsample {
            out.push((join(p, "upsamplers.0.conv"), Target::Conv(&u.conv)));
        }
    }
}
