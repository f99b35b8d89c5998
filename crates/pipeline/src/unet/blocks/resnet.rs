//! diffusers' `ResnetBlock2D` (`resnet.py`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::{conv2d, Act, Conv2d, GroupNorm, Out};
use crate::lora::{join, LoraTargets, Target};

#[derive(Debug, Clone)]
pub(crate) struct ResnetParams {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
    pub act: Act,
    pub scale_shift: bool,
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` (pre-norm, no up/down sampling inside).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    p: ResnetParams,
}

impl ResnetBlock {
    pub(crate) fn new(cin: usize, cout: usize, p: &ResnetParams, vb: VarBuilder) -> Result<Self> {
        let temb_out = if p.scale_shift { 2 * cout } else { cout };
        Ok(Self {
            norm1: GroupNorm::new(p.groups, cin, p.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: candle_nn::linear(p.temb_channels, temb_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(p.groups, cout, p.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            p: p.clone(),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let act = self.p.act;
        let h = self.norm1.forward_act(x, act)?;
        let h = self.conv1.forward(&h)?;
        let t = crate::kernels::dense::linear_forward(&self.time_emb_proj, &act.forward(temb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = if self.p.scale_shift {
            let c = t.dim(1)? / 2;
            let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
            let h = self
                .norm2
                .forward(&h)?
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?;
            act.forward(&h)?
        } else {
            // The time embedding is a per-(batch, channel) bias over h.
            let hw = h.dim(2)? * h.dim(3)?;
            let ht = match crate::kernels::cuda::bias_add(&h, &t, hw, None)? {
                Some(ht) => ht,
                None => h.broadcast_add(&t)?,
            };
            self.norm2.forward_act(&ht, act)?
        };
        let h = self.conv2.forward(&h)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.p.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.p.output_scale_factor
        }
    }
}

impl LoraTargets for ResnetBlock {
    fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
        out.push((join(p, "norm1"), self.norm1.lora_target()));
        out.push((join(p, "norm2"), self.norm2.lora_target()));
        out.push((join(p, "conv1"), Target::Conv(&self.conv1)));
        out.push((
            join(p, "time_emb_proj"),
            Target::Linear(&self.time_emb_proj),
        ));
        out.push((join(p, "conv2"), Target::Conv(&self.conv2)));
        if let Some(c) = &self.conv_shortcut {
            out.push((join(p, "conv_shortcut"), Target::Conv(c)));
        }
    }
}
