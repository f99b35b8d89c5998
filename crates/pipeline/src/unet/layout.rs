//! The UNet's parts and the layout its config fixes: which blocks, with which parameters, built
//! from a `VarBuilder` rooted at the UNet's keys (by the resident model and the streamed parts
//! alike).

use candle_nn::VarBuilder;

use super::blocks::{
    conv2d, Act, Conv2d, DownBlock, GroupNorm, MidBlock, ResnetParams, TransformerParams, UpBlock,
};
use super::config::{BlockKind, Resolved, UNetConfig};
use super::time_embedding::TimestepEmbedding;
use super::CONFIG_PATH;
use crate::{PipelineError, Result};

/// conv_in and the time embedding: the first part a forward pass runs.
#[derive(Debug, Clone)]
pub(super) struct Stem {
    pub(super) conv_in: Conv2d,
    pub(super) time_embedding: TimestepEmbedding,
    pub(super) time_embed_act: Option<Act>,
}

/// conv_norm_out, its activation and conv_out: the last part a forward pass runs.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub(super) conv_norm_out: GroupNorm,
    pub(super) conv_act: Act,
    pub(super) conv_out: Conv2d,
}

/// Every part, built on the device once.
#[derive(Debug, Clone)]
pub(super) struct ResidentParts {
    pub(super) stem: Stem,
    pub(super) down_blocks: Vec<DownBlock>,
    pub(super) mid_block: Option<MidBlock>,
    pub(super) up_blocks: Vec<UpBlock>,
    pub(super) head: Head,
}

/// What the config fixes about every part. Builds any part from a `VarBuilder` rooted at the
/// UNet's keys, so the resident model and the streamed parts are built by the same code.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) config: UNetConfig,
    pub(super) resolved: Resolved,
    pub(super) act: Act,
    pub(super) post_act: Option<Act>,
    pub(super) time_embed_act: Option<Act>,
    pub(super) resnet: ResnetParams,
}

fn act(name: &str) -> Result<Act> {
    Act::from_name(name).map_err(|e| PipelineError::config(CONFIG_PATH, e))
}

impl Layout {
    pub(super) fn new(config: &UNetConfig) -> Result<Self> {
        let resolved = config
            .resolve()
            .map_err(|m| PipelineError::config(CONFIG_PATH, m))?;
        let act_fn = act(&config.act_fn)?;
        let resnet = ResnetParams {
            groups: resolved.groups,
            eps: config.norm_eps,
            temb_channels: resolved.time_embed_dim,
            act: act_fn,
            scale_shift: config.resnet_time_scale_shift == "scale_shift",
            // diffusers does not pass `resnet_skip_time_act` / `resnet_out_scale_factor` to the
            // block types built here (only to the Simple*/ResnetDownsample* blocks): their
            // resnets always activate temb and use scale 1 (the mid block: mid_block_scale_factor).
            output_scale_factor: 1.0,
        };
        Ok(Self {
            config: config.clone(),
            post_act: config.timestep_post_act.as_deref().map(act).transpose()?,
            time_embed_act: config
                .time_embedding_act_fn
                .as_deref()
                .map(act)
                .transpose()?,
            resolved,
            act: act_fn,
            resnet,
        })
    }

    /// Resolution levels: down blocks, and as many up blocks.
    pub(super) fn levels(&self) -> usize {
        self.config.block_out_channels.len()
    }

    pub(super) fn has_mid_block(&self) -> bool {
        self.resolved.mid_cross_attn
    }

    /// Stem, down blocks, mid block, up blocks, head.
    pub(super) fn parts_per_forward(&self) -> usize {
        2 + 2 * self.levels() + usize::from(self.has_mid_block())
    }

    pub(super) fn transformer(&self, level: usize, only_cross: bool) -> TransformerParams {
        let r = &self.resolved;
        TransformerParams {
            heads: r.heads[level],
            cross_dim: r.cross_dim[level],
            layers: r.tlayers[level],
            groups: r.groups,
            linear_projection: self.config.use_linear_projection,
            only_cross,
            upcast: self.config.upcast_attention,
        }
    }

    pub(super) fn build_stem(&self, vb: &VarBuilder) -> Result<Stem> {
        let c = &self.config;
        let ch0 = c.block_out_channels[0];
        let dim = self.resolved.time_embed_dim;
        let conv_in = conv2d(
            c.in_channels,
            ch0,
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
            vb.pp("conv_in"),
        )?;
        let te = vb.pp("time_embedding");
        let cond_proj = match c.time_cond_proj_dim {
            Some(d) => Some(candle_nn::linear_no_bias(d, ch0, te.pp("cond_proj"))?),
            None => None,
        };
        let time_embedding = TimestepEmbedding {
            cond_proj,
            linear_1: candle_nn::linear(ch0, dim, te.pp("linear_1"))?,
            act: self.act,
            linear_2: candle_nn::linear(dim, dim, te.pp("linear_2"))?,
            post_act: self.post_act,
        };
        Ok(Stem {
            conv_in,
            time_embedding,
            time_embed_act: self.time_embed_act,
        })
    }

    pub(super) fn build_down(&self, i: usize, vb: &VarBuilder) -> Result<DownBlock> {
        let (c, r) = (&self.config, &self.resolved);
        let ch = &c.block_out_channels;
        let cin = if i == 0 { ch[0] } else { ch[i - 1] };
        let tp = self.transformer(i, r.only_cross[i]);
        let is_final = i == self.levels() - 1;
        Ok(DownBlock::new(
            cin,
            ch[i],
            r.layers[i],
            &self.resnet,
            (r.down_kinds[i] == BlockKind::CrossAttn).then_some(&tp),
            (!is_final).then_some(c.downsample_padding),
            vb.pp("down_blocks").pp(i),
        )?)
    }

    /// `None` for a config without a mid block.
    pub(super) fn build_mid(&self, vb: &VarBuilder) -> Result<Option<MidBlock>> {
        if !self.has_mid_block() {
            return Ok(None);
        }
        let n = self.levels();
        let mrp = ResnetParams {
            output_scale_factor: self.config.mid_block_scale_factor,
            ..self.resnet.clone()
        };
        // The mid block never takes `only_cross_attention` in diffusers.
        let tp = self.transformer(n - 1, false);
        let channels = self.config.block_out_channels[n - 1];
        Ok(Some(MidBlock::new(
            channels,
            &mrp,
            &tp,
            vb.pp("mid_block"),
        )?))
    }

    pub(super) fn build_up(&self, i: usize, vb: &VarBuilder) -> Result<UpBlock> {
        let (c, r) = (&self.config, &self.resolved);
        let ch = &c.block_out_channels;
        let n = ch.len();
        let j = n - 1 - i; // the matching down block
                           // The previous up block's output (the mid block's for the first).
        let prev_out = if i == 0 { ch[n - 1] } else { ch[j + 1] };
        let cin = ch[j.saturating_sub(1)];
        let tp = self.transformer(j, r.only_cross[j]);
        Ok(UpBlock::new(
            cin,
            prev_out,
            ch[j],
            r.layers[j] + 1,
            &self.resnet,
            (r.up_kinds[i] == BlockKind::CrossAttn).then_some(&tp),
            i != n - 1,
            vb.pp("up_blocks").pp(i),
        )?)
    }

    pub(super) fn build_head(&self, vb: &VarBuilder) -> Result<Head> {
        let c = &self.config;
        let ch0 = c.block_out_channels[0];
        Ok(Head {
            conv_norm_out: GroupNorm::new(
                self.resolved.groups,
                ch0,
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_act: self.act,
            conv_out: conv2d(
                ch0,
                c.out_channels,
                c.conv_out_kernel,
                1,
                (c.conv_out_kernel - 1) / 2,
                vb.pp("conv_out"),
            )?,
        })
    }

    /// Builds every part once and drops each right after: reads (and checks) every tensor the
    /// model needs while holding at most one part's modules (an f32 CPU build keeps its linears
    /// transposed, a second copy of them while the part lives). Returns the weights a LoRA may
    /// change (module path, canonical dims), as [`UNet2DConditionModel::lora_targets`] lists
    /// them for the resident model.
    pub(super) fn build_each(&self, vb: &VarBuilder) -> Result<Vec<(String, Vec<usize>)>> {
        use crate::lora::{join, shapes_of, LoraTargets};
        let mut shapes = Vec::new();
        let mut keep = |part: &dyn LoraTargets, prefix: String| {
            let mut targets = Vec::new();
            part.lora_targets(&prefix, &mut targets);
            shapes.extend(shapes_of(&crate::lora::with_biases(targets)));
        };
        drop(self.build_stem(vb)?);
        for i in 0..self.levels() {
            keep(&self.build_down(i, vb)?, join("down_blocks", i));
        }
        if let Some(m) = self.build_mid(vb)? {
            keep(&m, "mid_block".into());
        }
        for i in 0..self.levels() {
            keep(&self.build_up(i, vb)?, join("up_blocks", i));
        }
        drop(self.build_head(vb)?);
        Ok(shapes)
    }

    pub(super) fn build_all(&self, vb: &VarBuilder) -> Result<ResidentParts> {
        let n = self.levels();
        Ok(ResidentParts {
            stem: self.build_stem(vb)?,
            down_blocks: (0..n)
                .map(|i| self.build_down(i, vb))
                .collect::<Result<_>>()?,
            mid_block: self.build_mid(vb)?,
            up_blocks: (0..n)
                .map(|i| self.build_up(i, vb))
                .collect::<Result<_>>()?,
            head: self.build_head(vb)?,
        })
    }
}
