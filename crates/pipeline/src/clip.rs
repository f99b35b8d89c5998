//! CLIP text encoder, as transformers' `CLIPTextModel` computes `last_hidden_state`
//! (after `final_layer_norm`), which is what Stable Diffusion conditions on.
//!
//! Pre-LN transformer: token + position embeddings, then per layer
//! `x += out_proj(attn(ln1(x)))` with a causal mask and `x += fc2(act(fc1(ln2(x))))`,
//! then the final layer norm. Layer norms and softmax run in f32 whatever the weights' dtype
//! (cast, compute, cast back), so f16/bf16 weights stay numerically sane.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::Deserialize;

use crate::error::{PipelineError, Result};

/// Where the config lives in a diffusers folder; used to name it in errors.
const CONFIG_PATH: &str = "text_encoder/config.json";

/// The activation between `fc1` and `fc2`, as transformers' `ACT2FN` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP models (SD 2.x).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
}

impl HiddenAct {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => match crate::kernels::act::quick_gelu(x)? {
                Some(y) => Ok(y),
                None => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            },
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`). Absent keys take the
/// `CLIPTextConfig` constructor defaults, as they do in transformers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "d_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_hidden_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "d_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_projection_dim")]
    pub projection_dim: usize,
    /// Not used for `last_hidden_state` (only for pooling); kept for completeness.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn d_vocab_size() -> usize {
    49408
}
fn d_hidden_size() -> usize {
    512
}
fn d_intermediate_size() -> usize {
    2048
}
fn d_num_hidden_layers() -> usize {
    12
}
fn d_num_attention_heads() -> usize {
    8
}
fn d_max_position_embeddings() -> usize {
    77
}
fn d_hidden_act() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn d_layer_norm_eps() -> f64 {
    1e-5
}
fn d_projection_dim() -> usize {
    512
}

impl ClipTextConfig {
    /// Reads `text_encoder/config.json` (any path), errors naming the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let cfg: Self = crate::error::read_json(path)?;
        cfg.validate().map_err(|m| PipelineError::config(path, m))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.layer_shape().validate(&[
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ])
    }
}

/// LayerNorm whose statistics are computed in f32; parameters kept in f32.
#[derive(Debug, Clone)]
pub(crate) struct F32LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl F32LayerNorm {
    pub(crate) fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get(size, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(size, "bias")?.to_dtype(DType::F32)?;
        Ok(Self { weight, bias, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let fast = crate::kernels::norm::layer_norm;
        if let Some(y) = fast(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        // Biased variance, as torch's layer_norm.
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

// Linear layers with the weight stored transposed on the CPU and the bias and residual folded
// into the gemm ([`crate::kernels::linear::Dense`]).
use crate::kernels::linear::Dense;

fn linear_fwd(l: &Dense, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
    l.forward(x, residual)
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

/// What one encoder layer's weights are shaped by: shared by the text encoder and the vision
/// encoder ([`crate::ip_adapter`]), whose layers are the same.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub act: HiddenAct,
    pub layer_norm_eps: f64,
}

impl LayerShape {
    /// The rules a config's layers must meet (the text and the vision encoder's alike), and
    /// its `other` sizes positive: an error naming the first field that breaks one.
    pub(crate) fn validate(&self, other: &[(&str, usize)]) -> std::result::Result<(), String> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.heads),
        ];
        if let Some((k, _)) = sizes.iter().chain(other).find(|(_, v)| *v == 0) {
            return Err(format!("{k} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

impl ClipTextConfig {
    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

impl Attention {
    fn new(cfg: &LayerShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.heads;
        Ok(Self {
            q_proj: Dense::load(h, h, true, vb.pp("q_proj"))?,
            k_proj: Dense::load(h, h, true, vb.pp("k_proj"))?,
            v_proj: Dense::load(h, h, true, vb.pp("v_proj"))?,
            out_proj: Dense::load(h, h, true, vb.pp("out_proj"))?,
            heads: cfg.heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `residual + out_proj(attention(x))`; `x`: [B, L, H]; `mask`: [L, L] f32 additive
    /// causal mask, or none (every token sees every other: the vision encoder).
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((linear_fwd(&self.q_proj, x, None)? * self.scale)?)?;
        let k = split(linear_fwd(&self.k_proj, x, None)?)?;
        let v = split(linear_fwd(&self.v_proj, x, None)?)?;
        // [B, heads, L, L]; mask and softmax in f32.
        let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        linear_fwd(&self.out_proj, &out, Some(residual))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: F32LayerNorm,
    self_attn: Attention,
    layer_norm2: F32LayerNorm,
    fc1: Dense,
    fc2: Dense,
    act: HiddenAct,
}

impl EncoderLayer {
    pub(crate) fn new(cfg: &LayerShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: F32LayerNorm::new(h, eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: F32LayerNorm::new(h, eps, vb.pp("layer_norm2"))?,
            fc1: Dense::load(h, cfg.intermediate_size, true, vb.pp("mlp.fc1"))?,
            fc2: Dense::load(cfg.intermediate_size, h, true, vb.pp("mlp.fc2"))?,
            act: cfg.act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask, x)?;
        let h = linear_fwd(&self.fc1, &self.layer_norm2.forward(&x)?, None)?;
        linear_fwd(&self.fc2, &self.act.apply(&h)?, Some(&x))
    }
}

/// transformers' `CLIPTextModel` up to `last_hidden_state`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: F32LayerNorm,
    max_positions: usize,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model from `vb` rooted at the weight file. Keys may carry the
    /// `text_model.` prefix (published SD 1.5, older transformers) or not (transformers 5);
    /// `text_model.embeddings.position_ids`, if present, is ignored (positions are 0..L).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|m| PipelineError::config(CONFIG_PATH, m))?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding =
            embedding(cfg.max_position_embeddings, h, emb.pp("position_embedding"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&cfg.layer_shape(), vb.pp(format!("encoder.layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = F32LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            max_positions: cfg.max_position_embeddings,
            device: vb.device().clone(),
        })
    }

    /// `ids`: [B, L] u32 token ids (L <= max_position_embeddings) -> [B, L, hidden] in the
    /// weights' dtype: the last hidden state after the final layer norm.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_skip(ids, 1, None)
    }

    /// Input embeddings of `ids` [B, L]: rows of the vocabulary, or of `extra` for ids from
    /// the vocabulary size on.
    fn token_embeddings(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let vocab = self.token_embedding.embeddings().dim(0)? as u32;
        let (b, l) = ids.dims2()?;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        if flat.iter().all(|&i| i < vocab) {
            return Ok(self.token_embedding.forward(ids)?);
        }
        let Some(extra) = extra else {
            return Err(PipelineError::InvalidRequest(format!(
                "token id past the vocabulary ({vocab}) without embeddings"
            )));
        };
        let rows = extra.dim(0)? as u32;
        if let Some(&bad) = flat.iter().find(|&&i| i >= vocab + rows) {
            return Err(PipelineError::InvalidRequest(format!(
                "token id {bad} past the vocabulary and the {rows} embedding vectors"
            )));
        }
        let dev = &self.device;
        let base_ids: Vec<u32> = flat
            .iter()
            .map(|&i| if i < vocab { i } else { 0 })
            .collect();
        let extra_ids: Vec<u32> = flat.iter().map(|&i| i.saturating_sub(vocab)).collect();
        let mask: Vec<u8> = flat.iter().map(|&i| u8::from(i >= vocab)).collect();
        let base = self
            .token_embedding
            .forward(&Tensor::from_vec(base_ids, (b, l), dev)?)?;
        let hidden = base.dim(2)?;
        let extra = extra
            .to_device(dev)?
            .to_dtype(base.dtype())?
            .index_select(&Tensor::from_vec(extra_ids, b * l, dev)?, 0)?
            .reshape((b, l, hidden))?;
        let mask = Tensor::from_vec(mask, (b, l, 1), dev)?.broadcast_as((b, l, hidden))?;
        Ok(mask.where_cond(&extra, &base)?)
    }

    /// The vocabulary size (rows of the token embedding).
    pub fn vocab_size(&self) -> usize {
        self.token_embedding.embeddings().dim(0).unwrap_or(0)
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// As [`ClipTextModel::forward`] with A1111's clip skip: transformers' `hidden_states[-clip_skip]`
    /// (the output `clip_skip - 1` layers before the last) through the final layer norm. 1 is
    /// `forward`; at most `num_layers() + 1` (the embeddings themselves). Ids from the
    /// vocabulary size on take their input embedding from the rows of `extra` (textual
    /// inversion).
    pub fn forward_skip(
        &self,
        ids: &Tensor,
        clip_skip: usize,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        if clip_skip == 0 || clip_skip > self.layers.len() + 1 {
            return Err(PipelineError::InvalidRequest(format!(
                "clip_skip {clip_skip} is outside 1..={} for a text encoder of {} layers",
                self.layers.len() + 1,
                self.layers.len()
            )));
        }
        let (_, l) = ids.dims2()?;
        if l > self.max_positions {
            return Err(PipelineError::InvalidRequest(format!(
                "{l} tokens but the text encoder has only {} positions",
                self.max_positions
            )));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let positions = Tensor::arange(0u32, l as u32, &self.device)?;
        let mut x = self
            .token_embeddings(&ids, extra)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(l, &self.device)?;
        for layer in &self.layers[..self.layers.len() + 1 - clip_skip] {
            x = layer.forward(&x, Some(&mask))?;
        }
        Ok(self.final_layer_norm.forward(&x)?)
    }
}

impl ClipTextModel {
    /// The weights a LoRA may change, by transformers module path (`text_model.encoder...`).
    pub(crate) fn lora_targets(&self) -> Vec<(String, crate::lora::Target<'_>)> {
        use crate::lora::Target;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("text_model.encoder.layers.{i}");
            let a = &l.self_attn;
            for (name, d) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.out_proj", &a.out_proj),
                ("mlp.fc1", &l.fc1),
                ("mlp.fc2", &l.fc2),
            ] {
                out.push((format!("{p}.{name}"), Target::Dense(d)));
            }
            for (name, n) in [
                ("layer_norm1", &l.layer_norm1),
                ("layer_norm2", &l.layer_norm2),
            ] {
                out.push((format!("{p}.{name}"), Target::Norm(&n.weight, &n.bias)));
            }
        }
        crate::lora::with_biases(out)
    }
}

/// [L, L] additive f32 mask: 0 on and below the diagonal, -inf above (a token sees only
/// itself and earlier tokens).
fn causal_mask(l: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (l, l), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use std::collections::HashMap;

    fn tiny_config() -> ClipTextConfig {
        serde_json::from_str(
            r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 6, "hidden_act": "gelu",
                "layer_norm_eps": 1e-5}"#,
        )
        .unwrap()
    }

    fn random_weights(cfg: &ClipTextConfig, prefix: &str) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        let mut w = HashMap::new();
        let mut put = |name: String, shape: &[usize]| {
            let t = Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
            w.insert(format!("{prefix}{name}"), t);
        };
        put(
            "embeddings.token_embedding.weight".into(),
            &[cfg.vocab_size, h],
        );
        put(
            "embeddings.position_embedding.weight".into(),
            &[cfg.max_position_embeddings, h],
        );
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layers.{i}.");
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(format!("{p}self_attn.{n}.weight"), &[h, h]);
                put(format!("{p}self_attn.{n}.bias"), &[h]);
            }
            for n in ["layer_norm1", "layer_norm2"] {
                put(format!("{p}{n}.weight"), &[h]);
                put(format!("{p}{n}.bias"), &[h]);
            }
            put(format!("{p}mlp.fc1.weight"), &[m, h]);
            put(format!("{p}mlp.fc1.bias"), &[m]);
            put(format!("{p}mlp.fc2.weight"), &[h, m]);
            put(format!("{p}mlp.fc2.bias"), &[h]);
        }
        put("final_layer_norm.weight".into(), &[h]);
        put("final_layer_norm.bias".into(), &[h]);
        w
    }

    #[test]
    fn config_defaults_and_activation_names() {
        let cfg: ClipTextConfig = serde_json::from_str(r#"{"hidden_act": "gelu_new"}"#).unwrap();
        assert_eq!(cfg.hidden_act, HiddenAct::GeluTanh);
        assert_eq!(
            (cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings),
            (49408, 512, 77)
        );
        assert!(serde_json::from_str::<ClipTextConfig>(r#"{"hidden_act": "relu"}"#).is_err());
        let bad: ClipTextConfig =
            serde_json::from_str(r#"{"hidden_size": 10, "num_attention_heads": 3}"#).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn quick_gelu_formula() {
        let x = Tensor::new(&[-2f32, 0.0, 1.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = HiddenAct::QuickGelu.apply(&x).unwrap().to_vec1().unwrap();
        for (xi, yi) in [-2f32, 0.0, 1.0].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((want - yi).abs() < 1e-6, "{xi}: {yi} vs {want}");
        }
    }

    #[test]
    fn causal_prefix_and_key_prefix_detection() {
        // A causal model's output at position i depends only on tokens 0..=i; and both weight
        // layouts (with/without `text_model.`) load the same model.
        let cfg = tiny_config();
        let plain = random_weights(&cfg, "");
        let prefixed: HashMap<String, Tensor> = plain
            .iter()
            .map(|(k, v)| (format!("text_model.{k}"), v.clone()))
            .collect();
        let m1 = ClipTextModel::new(
            VarBuilder::from_tensors(plain, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap();
        let m2 = ClipTextModel::new(
            VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap();
        let a = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 3, 9, 10, 0]], &Device::Cpu).unwrap();
        let ya = m1.forward(&a).unwrap();
        let yb = m1.forward(&b).unwrap();
        assert_eq!(ya.dims(), &[1, 6, 8]);
        let diff = max_abs_diff;
        assert!(diff(&ya.narrow(1, 0, 3).unwrap(), &yb.narrow(1, 0, 3).unwrap()) < 1e-6);
        assert!(diff(&ya.narrow(1, 3, 3).unwrap(), &yb.narrow(1, 3, 3).unwrap()) > 1e-3);
        assert!(diff(&ya, &m2.forward(&a).unwrap()) == 0.0);
        // More tokens than positions is refused.
        let long = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            m1.forward(&long),
            Err(PipelineError::InvalidRequest(_))
        ));
    }

    #[test]
    fn half_precision_stays_close_to_f32() {
        let cfg = tiny_config();
        let w = random_weights(&cfg, "");
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], &Device::Cpu).unwrap();
        let f32_out = ClipTextModel::new(
            VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap()
        .forward(&ids)
        .unwrap();
        let bf16 = ClipTextModel::new(VarBuilder::from_tensors(w, DType::BF16, &Device::Cpu), &cfg)
            .unwrap();
        let out = bf16.forward(&ids).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let d = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &f32_out);
        assert!(d < 0.1, "bf16 vs f32 max abs diff {d}");
    }
}
