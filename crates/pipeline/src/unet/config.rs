//! `unet/config.json` as diffusers' `UNet2DConditionModel.__init__` reads it (SD 1.x / 2.x family).
//!
//! Defaults are diffusers' constructor defaults, so a key absent from the file means what it means
//! to diffusers. Keys for features we do not implement are read so that a non-default value is
//! refused with a clear message instead of being silently ignored.

use serde::Deserialize;

/// A value that diffusers accepts either once for every block or as a per-down-block list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// Expands to one value per down block, checking a list's length.
    pub fn expand(&self, n: usize, key: &str) -> Result<Vec<T>, String> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(format!(
                "`{key}` has {} entries but there are {n} down blocks",
                v.len()
            )),
        }
    }
}

fn d_in() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one_usize() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlayers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}

/// diffusers `UNet2DConditionModel` config. Unknown keys (`_class_name`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    /// `null` means no mid block.
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Misnamed in diffusers: unless `num_attention_heads` is set, this is the number of heads.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// The number of heads, when set (SD 2.x writes `null`).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// Read for completeness; diffusers ignores it for the block types of this family.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Read for completeness; diffusers ignores it for the block types of this family.
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Guidance-distilled (LCM) models: the width of the guidance scale embedding that
    /// `time_embedding.cond_proj` adds to the time embedding; the pipeline then runs without
    /// classifier-free guidance (diffusers' `do_classifier_free_guidance`).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
}

impl Default for UNetConfig {
    /// diffusers' defaults (which are SD 1.x's architecture with `cross_attention_dim` 1280).
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// Block kinds we build, after diffusers' `UNetRes` prefix stripping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Plain,
    CrossAttn,
}

/// Everything the model needs per down block, resolved from the config the way diffusers does.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub down_kinds: Vec<BlockKind>,
    pub up_kinds: Vec<BlockKind>,
    pub mid_cross_attn: bool,
    pub heads: Vec<usize>,
    pub cross_dim: Vec<usize>,
    pub layers: Vec<usize>,
    pub tlayers: Vec<usize>,
    pub only_cross: Vec<bool>,
    pub groups: usize,
    pub time_embed_dim: usize,
}

fn block_kind(name: &str, plain: &str, cross: &str) -> Result<BlockKind, String> {
    let name = name.strip_prefix("UNetRes").unwrap_or(name);
    if name == plain {
        Ok(BlockKind::Plain)
    } else if name == cross {
        Ok(BlockKind::CrossAttn)
    } else {
        Err(format!(
            "unsupported block type `{name}` (supported: {plain}, {cross})"
        ))
    }
}

pub(crate) fn check_act(name: &str, key: &str) -> Result<(), String> {
    match name {
        "silu" | "swish" | "gelu" | "relu" | "mish" => Ok(()),
        _ => Err(format!("unsupported `{key}` \"{name}\"")),
    }
}

/// One cross-attention of the UNet (a transformer block's `attn2`), where an IP-Adapter's
/// image keys and values join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossAttention {
    /// Module path: `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub name: String,
    /// Its query's width (the block's channels): the rows of `to_k_ip`.
    pub hidden_size: usize,
    /// The context's width: the columns of `to_k_ip`.
    pub cross_attention_dim: usize,
}

impl UNetConfig {
    /// The cross-attentions in diffusers' `attn_processors` order: the down blocks', the up
    /// blocks', then the mid block's (the order `UNet2DConditionModel` registers its modules
    /// in, which IP-Adapter files number their layers by).
    pub fn cross_attentions(&self) -> Result<Vec<CrossAttention>, String> {
        let r = self.resolve()?;
        let ch = &self.block_out_channels;
        let n = ch.len();
        let mut out = Vec::new();
        let mut push = |block: String, level: usize, attentions: usize| {
            for a in 0..attentions {
                for t in 0..r.tlayers[level] {
                    out.push(CrossAttention {
                        name: format!("{block}.attentions.{a}.transformer_blocks.{t}.attn2"),
                        hidden_size: ch[level],
                        cross_attention_dim: r.cross_dim[level],
                    });
                }
            }
        };
        for i in 0..n {
            if r.down_kinds[i] == BlockKind::CrossAttn {
                push(format!("down_blocks.{i}"), i, r.layers[i]);
            }
        }
        for i in 0..n {
            let j = n - 1 - i;
            if r.up_kinds[i] == BlockKind::CrossAttn {
                push(format!("up_blocks.{i}"), j, r.layers[j] + 1);
            }
        }
        if r.mid_cross_attn {
            push("mid_block".into(), n - 1, 1);
        }
        Ok(out)
    }

    /// Checks the config and resolves per-block values (including diffusers' head-count quirk).
    pub(crate) fn resolve(&self) -> Result<Resolved, String> {
        let n = self.down_block_types.len();
        if n == 0 {
            return Err("`down_block_types` is empty".into());
        }
        if self.block_out_channels.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) must have the same length",
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        let unsupported = |key: &str, what: &dyn std::fmt::Debug| {
            Err(format!(
                "unsupported `{key}`: {what:?} (only the SD 1.x/2.x UNet is implemented)"
            ))
        };
        if let Some(v) = &self.class_embed_type {
            return unsupported("class_embed_type", v);
        }
        if let Some(v) = self.num_class_embeds {
            return unsupported("num_class_embeds", &v);
        }
        if let Some(v) = &self.addition_embed_type {
            return unsupported("addition_embed_type", v);
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return unsupported("encoder_hid_dim_type", v);
        }
        if let Some(v) = self.encoder_hid_dim {
            return unsupported("encoder_hid_dim", &v);
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            if !v.is_null() {
                return unsupported("reverse_transformer_layers_per_block", v);
            }
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", &true);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if !matches!(
            self.resnet_time_scale_shift.as_str(),
            "default" | "scale_shift"
        ) {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        check_act(&self.act_fn, "act_fn")?;
        if let Some(a) = &self.time_embedding_act_fn {
            check_act(a, "time_embedding_act_fn")?;
        }
        if let Some(a) = &self.timestep_post_act {
            check_act(a, "timestep_post_act")?;
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("`conv_in_kernel` and `conv_out_kernel` must be odd".into());
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| "`norm_num_groups` null is not supported".to_string())?;
        if groups == 0 {
            return Err("`norm_num_groups` must be positive".into());
        }
        for &c in &self.block_out_channels {
            if c == 0 || c % groups != 0 {
                return Err(format!(
                    "`block_out_channels` entry {c} is not a multiple of `norm_num_groups` {groups}"
                ));
            }
        }

        let down_kinds = self
            .down_block_types
            .iter()
            .map(|t| block_kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let up_kinds = self
            .up_block_types
            .iter()
            .map(|t| block_kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let mid_cross_attn = match self.mid_block_type.as_deref() {
            None => false,
            Some("UNetMidBlock2DCrossAttn") => true,
            Some(other) => return unsupported("mid_block_type", &other),
        };

        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`, and the
        // attention blocks only ever look at that number of heads.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let cross_dim = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let only_cross = self
            .only_cross_attention
            .expand(n, "only_cross_attention")?;

        // Channels each attention block sees: down block i and up block n-1-i use
        // block_out_channels[i] with heads[i]; the mid block the last of both.
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            let used = down_kinds[i] == BlockKind::CrossAttn
                || up_kinds[n - 1 - i] == BlockKind::CrossAttn
                || (i == n - 1 && mid_cross_attn);
            if used && (h == 0 || c % h != 0) {
                return Err(format!(
                    "block {i}: {c} channels cannot be split into {h} attention heads"
                ));
            }
        }
        let time_embed_dim = self
            .time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4);
        Ok(Resolved {
            down_kinds,
            up_kinds,
            mid_cross_attn,
            heads,
            cross_dim,
            layers,
            tlayers,
            only_cross,
            groups,
            time_embed_dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_config_parses_and_resolves() {
        let json = r#"{
          "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
          "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
          "center_input_sample": false, "cross_attention_dim": 768,
          "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
          "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
          "out_channels": 4, "sample_size": 64,
          "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        }"#;
        let c: UNetConfig = serde_json::from_str(json).unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.heads, vec![8; 4]);
        assert_eq!(r.cross_dim, vec![768; 4]);
        assert_eq!(r.time_embed_dim, 1280);
        assert!(r.mid_cross_attn);
        assert_eq!(r.down_kinds[3], BlockKind::Plain);
        assert_eq!(c.freq_shift, 0.0);
        // IP-Adapter's layers: SD 1.5's 16 cross-attentions (h94's ids 1, 3, ..., 31) in
        // diffusers' order: down, up, then mid.
        let x = c.cross_attentions().unwrap();
        let at = |i: usize| {
            (
                x[i].name.as_str(),
                x[i].hidden_size,
                x[i].cross_attention_dim,
            )
        };
        assert_eq!(x.len(), 16);
        let first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
        assert_eq!(at(0), (first, 320, 768));
        let up = "up_blocks.1.attentions.0.transformer_blocks.0.attn2";
        assert_eq!(at(6), (up, 1280, 768));
        let last_up = "up_blocks.3.attentions.2.transformer_blocks.0.attn2";
        assert_eq!(at(14), (last_up, 320, 768));
        let mid = "mid_block.attentions.0.transformer_blocks.0.attn2";
        assert_eq!(at(15), (mid, 1280, 768));
    }

    #[test]
    fn sd2_head_dim_list_and_null_heads() {
        let json = r#"{"attention_head_dim": [5, 10, 20, 20], "num_attention_heads": null,
                       "use_linear_projection": true, "cross_attention_dim": 1024,
                       "upcast_attention": true, "transformer_layers_per_block": [1, 1, 2, 1]}"#;
        let c: UNetConfig = serde_json::from_str(json).unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.heads, vec![5, 10, 20, 20]);
        assert_eq!(r.tlayers, vec![1, 1, 2, 1]);
        // An explicit head count wins over attention_head_dim.
        let c: UNetConfig = serde_json::from_str(r#"{"num_attention_heads": 4}"#).unwrap();
        assert_eq!(c.resolve().unwrap().heads, vec![4; 4]);
    }

    #[test]
    fn rejects_unsupported_and_inconsistent() {
        for (json, needle) in [
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"num_class_embeds": 10}"#, "num_class_embeds"),
            (
                r#"{"addition_embed_type": "text_time"}"#,
                "addition_embed_type",
            ),
            (
                r#"{"time_embedding_type": "fourier"}"#,
                "time_embedding_type",
            ),
            (
                r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#,
                "mid_block_type",
            ),
            (r#"{"attention_head_dim": [8, 8]}"#, "attention_head_dim"),
            (
                r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
                "SimpleCrossAttnDownBlock2D",
            ),
            (r#"{"attention_head_dim": 7}"#, "attention heads"),
            (r#"{"act_fn": "tanh"}"#, "act_fn"),
            (r#"{"dual_cross_attention": true}"#, "dual_cross_attention"),
        ] {
            let c: UNetConfig = serde_json::from_str(json).unwrap();
            let e = c.resolve().unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn null_mid_block_means_none() {
        let c: UNetConfig = serde_json::from_str(r#"{"mid_block_type": null}"#).unwrap();
        assert!(c.mid_block_type.is_none());
        assert!(UNetConfig::default().mid_block_type.is_some());
    }
}
