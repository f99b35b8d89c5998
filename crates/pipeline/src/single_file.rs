//! Single-file checkpoints (original LDM / CompVis key names, as most fine-tunes are shared)
//! converted to the diffusers folder layout the loader reads, plus load-time weight validation.
//!
//! Conversion ([`convert_single_file`]) is a pure key rename (and the VAE attention 1x1-conv ->
//! linear reshape): tensor bytes are copied unchanged, in their stored dtype, one tensor at a
//! time. It follows diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` (loaders/single_file_utils.py, diffusers 0.42.1).
//!
//! Configs: with [`ConvertOptions::config_dir`] the folder's configs are used verbatim (as
//! diffusers' `from_single_file(path, config=...)`). Without, everything the tensor shapes imply
//! is read from them (channels, block counts, layers per block, which blocks have attention,
//! cross-attention width, linear vs conv projections, text encoder width/depth/vocabulary,
//! latent channels); what shapes cannot say takes the Stable Diffusion 1.5 value: UNet
//! `attention_head_dim` 8, text encoder heads = hidden/64, `norm_num_groups` 32, eps 1e-5,
//! VAE `scaling_factor` 0.18215, quick_gelu, and SD 1.5's PNDM `scheduler_config.json`.
//!
//! Sources: `.safetensors` (memory-mapped) or a pickle checkpoint read by [`crate::ckpt`]
//! (never executed). SD 2.x (OpenCLIP) and SDXL single files are refused with a clear error.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use safetensors::Dtype;
use serde_json::json;

use crate::ckpt::{Checkpoint, TensorRef};
use crate::error::{PipelineError, Result};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// File names of the diffusers layout we write (the published SD 1.5 names).
pub const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
pub const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
pub const TEXT_ENCODER_WEIGHTS: &str = "text_encoder/model.safetensors";

/// Does this path look like a single-file checkpoint (by extension)?
pub fn is_single_file(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
    )
}

/// How to fill in what a single file does not carry.
#[derive(Debug, Default, Clone)]
pub struct ConvertOptions<'a> {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/`, `scheduler/` configs (and
    /// `tokenizer/`, if it has one) are used instead of inferred ones.
    pub config_dir: Option<&'a Path>,
    /// Tokenizer files `(file name, bytes)` written to `tokenizer/` when `config_dir` has none
    /// (the server bundles the real CLIP tokenizer: single files carry none).
    pub tokenizer_files: &'a [(&'a str, &'a [u8])],
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    /// Tensors written per component: unet, vae, text_encoder.
    pub tensors: [usize; 3],
    /// Keys of the file that belong to none of the three models (EMA copies, schedules...).
    pub ignored: usize,
    /// Whether the configs were inferred (no `config_dir`).
    pub inferred_configs: bool,
}

/// One tensor of the source file.
struct SrcTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    ckpt: Option<TensorRef>,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Ckpt(Checkpoint),
}

struct SourceFile {
    path: PathBuf,
    source: Source,
    tensors: BTreeMap<String, SrcTensor>,
}

impl SourceFile {
    fn open(path: &Path) -> Result<Self> {
        let is_st = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if is_st {
            // SAFETY: the file is mapped read-only; we do not modify it while mapped.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| weights(path, e))?;
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(name, v)| {
                    (
                        name,
                        SrcTensor {
                            dtype: v.dtype(),
                            shape: v.shape().to_vec(),
                            ckpt: None,
                        },
                    )
                })
                .collect();
            Ok(Self {
                path: path.to_path_buf(),
                source: Source::Safetensors(st),
                tensors,
            })
        } else {
            let ck = Checkpoint::open(path)?;
            let tensors = ck
                .state_dict()?
                .into_iter()
                .map(|(name, t)| {
                    (
                        name,
                        SrcTensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            ckpt: Some(t),
                        },
                    )
                })
                .collect();
            Ok(Self {
                path: path.to_path_buf(),
                source: Source::Ckpt(ck),
                tensors,
            })
        }
    }

    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match &self.source {
            Source::Safetensors(st) => {
                let v = st.get(name).map_err(|e| weights(&self.path, e))?;
                Ok(Cow::Borrowed(v.data()))
            }
            Source::Ckpt(ck) => {
                let t = self.tensors[name].ckpt.as_ref().expect("ckpt tensor");
                Ok(Cow::Owned(ck.read_tensor(t)?))
            }
        }
    }
}

fn weights(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// One output tensor: diffusers name, source name, output shape.
struct Planned {
    name: String,
    src: String,
    shape: Vec<usize>,
}

/// Converts a single-file checkpoint into a diffusers folder at `out_dir` (which must not
/// exist). The folder is assembled under a temporary name beside it and renamed into place
/// only when complete, so a crash never leaves a half-written model where a whole one is expected.
pub fn convert_single_file(
    src: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    let file = SourceFile::open(src)?;
    let parts = split_components(&file)?;
    let ([unet, vae, clip], ignored) = parts;

    let configs = match opts.config_dir {
        Some(dir) => Configs::from_dir(dir)?,
        None => Configs::infer(&file, &unet, &vae, &clip)?,
    };
    let layers = configs.unet["layers_per_block"].as_u64().ok_or_else(|| {
        PipelineError::config("unet/config.json", "layers_per_block must be an integer")
    })? as usize;
    let n_vae = configs.vae["block_out_channels"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);

    let mut plans: [Vec<Planned>; 3] = Default::default();
    for (src_name, k) in &unet {
        let name = map_unet_key(k, layers)
            .ok_or_else(|| weights(src, format!("unrecognised UNet key `{src_name}`")))?;
        plans[0].push(Planned {
            name,
            src: src_name.clone(),
            shape: file.tensors[src_name].shape.clone(),
        });
    }
    for (src_name, k) in &vae {
        let Some(name) = map_vae_key(k, n_vae) else {
            return Err(weights(src, format!("unrecognised VAE key `{src_name}`")));
        };
        let mut shape = file.tensors[src_name].shape.clone();
        // LDM keeps the VAE mid-block attention projections as 1x1 convolutions.
        if name.contains(".mid_block.attentions.0.") && name.ends_with(".weight") && shape.len() > 2
        {
            if shape[2..].iter().any(|&d| d != 1) {
                return Err(weights(
                    src,
                    format!("`{src_name}` is not a 1x1 projection: {shape:?}"),
                ));
            }
            shape.truncate(2);
        }
        plans[1].push(Planned {
            name,
            src: src_name.clone(),
            shape,
        });
    }
    for (src_name, k) in &clip {
        let name = if k.starts_with("text_model.") {
            k.clone()
        } else {
            format!("text_model.{k}")
        };
        plans[2].push(Planned {
            name,
            src: src_name.clone(),
            shape: file.tensors[src_name].shape.clone(),
        });
    }
    for (plan, what) in plans.iter().zip(["UNet", "VAE", "text encoder"]) {
        if plan.is_empty() {
            return Err(weights(
                src,
                format!("no {what} weights found: not a Stable Diffusion 1.x single file"),
            ));
        }
        let mut seen = HashMap::new();
        for p in plan {
            if let Some(prev) = seen.insert(p.name.as_str(), p.src.as_str()) {
                return Err(weights(
                    src,
                    format!("`{prev}` and `{}` both map to `{}`", p.src, p.name),
                ));
            }
        }
    }

    // Token ids past the embedding table would fail at the first request; fail now instead.
    let vocab_json = match &configs.tokenizer_dir {
        Some(dir) => std::fs::read(dir.join("vocab.json")).ok(),
        None => opts
            .tokenizer_files
            .iter()
            .find(|(n, _)| *n == "vocab.json")
            .map(|(_, b)| b.to_vec()),
    };
    let vocab_len = vocab_json
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_object().map(|o| o.len()));
    if let (Some(n), Some(rows)) = (vocab_len, configs.text_encoder["vocab_size"].as_u64()) {
        if n as u64 > rows {
            return Err(weights(
                src,
                format!(
                    "the text encoder embeds {rows} tokens but the tokenizer has {n}; \
                     give a config folder whose tokenizer matches the checkpoint"
                ),
            ));
        }
    }

    // Assemble beside the target, rename when complete.
    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| PipelineError::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        out_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        for (plan, rel) in plans
            .iter()
            .zip([UNET_WEIGHTS, VAE_WEIGHTS, TEXT_ENCODER_WEIGHTS])
        {
            write_safetensors(&file, plan, &tmp.join(rel))?;
        }
        configs.write(&tmp, opts)?;
        validate_folder(&tmp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, out_dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished the same conversion first: theirs is as good as ours.
        if !out_dir.join("model_index.json").is_file() {
            return Err(PipelineError::io(out_dir, e));
        }
    }
    Ok(ConvertSummary {
        tensors: [plans[0].len(), plans[1].len(), plans[2].len()],
        ignored,
        inferred_configs: opts.config_dir.is_none(),
    })
}

/// Splits the file's keys into UNet / VAE / text-encoder maps (source name -> key without the
/// prefix) and counts the keys that belong to none.
#[allow(clippy::type_complexity)]
fn split_components(file: &SourceFile) -> Result<([Vec<(String, String)>; 3], usize)> {
    let names: Vec<&String> = file.tensors.keys().collect();
    if names
        .iter()
        .any(|k| k.starts_with("cond_stage_model.model.") || k.starts_with("conditioner."))
    {
        return Err(weights(
            &file.path,
            "this is an SD 2.x (OpenCLIP) or SDXL single file; only Stable Diffusion 1.x is supported",
        ));
    }
    let vae_prefix = VAE_PREFIXES
        .iter()
        .copied()
        .find(|p| names.iter().any(|k| k.starts_with(p)))
        .unwrap_or(VAE_PREFIXES[0]);
    let mut out: [Vec<(String, String)>; 3] = Default::default();
    let mut ignored = 0;
    for k in names {
        if let Some(rest) = k.strip_prefix(UNET_PREFIX) {
            out[0].push((k.clone(), rest.to_string()));
        } else if let Some(rest) = k.strip_prefix(vae_prefix) {
            // Some files keep the VAE's training loss (discriminator, LPIPS) weights.
            if rest.starts_with("loss.") {
                ignored += 1;
            } else {
                out[1].push((k.clone(), rest.to_string()));
            }
        } else if let Some(rest) = k.strip_prefix(CLIP_PREFIX) {
            out[2].push((k.clone(), rest.to_string()));
        } else {
            ignored += 1; // model_ema.*, alphas_cumprod, betas, ...
        }
    }
    Ok((out, ignored))
}

const RESNET_UNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

fn resnet_unet(rest: &str) -> Option<String> {
    RESNET_UNET
        .iter()
        .find_map(|(l, d)| rest.strip_prefix(l).map(|t| format!("{d}{t}")))
}

/// Splits `"<a>.<b>.<rest>"` into the two leading integers and the rest.
fn two_ints(s: &str) -> Option<(usize, usize, &str)> {
    let (a, s) = s.split_once('.')?;
    let (b, rest) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?, rest))
}

/// LDM UNet key (without `model.diffusion_model.`) -> diffusers key, for `layers` resnets per
/// down block (up blocks have `layers + 1`).
pub fn map_unet_key(k: &str, layers: usize) -> Option<String> {
    const SIMPLE: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(m) = SIMPLE
        .iter()
        .find_map(|(l, d)| k.strip_prefix(l).map(|t| format!("{d}{t}")))
    {
        return Some(m);
    }
    let per = layers + 1;
    if let Some(s) = k.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_ints(s)?;
        if i == 0 {
            return None;
        }
        let (b, layer) = ((i - 1) / per, (i - 1) % per);
        return match j {
            0 if rest.starts_with("op.") => (layer == layers)
                .then(|| format!("down_blocks.{b}.downsamplers.0.conv.{}", &rest[3..])),
            0 if layer < layers => Some(format!(
                "down_blocks.{b}.resnets.{layer}.{}",
                resnet_unet(rest)?
            )),
            1 if layer < layers => Some(format!("down_blocks.{b}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = k.strip_prefix("middle_block.") {
        let (i, rest) = s.split_once('.')?;
        return match i {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet_unet(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet_unet(rest)?)),
            _ => None,
        };
    }
    if let Some(s) = k.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_ints(s)?;
        let (b, layer) = (i / per, i % per);
        return match j {
            0 => Some(format!(
                "up_blocks.{b}.resnets.{layer}.{}",
                resnet_unet(rest)?
            )),
            1 | 2 if rest.starts_with("conv.") => {
                (layer == layers).then(|| format!("up_blocks.{b}.upsamplers.0.{rest}"))
            }
            1 => Some(format!("up_blocks.{b}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// LDM VAE key (without `first_stage_model.`) -> diffusers key, for `n` resolution levels.
pub fn map_vae_key(k: &str, n: usize) -> Option<String> {
    let (side, rest) = k.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some(k.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(k.to_string());
    }
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{t}"));
    }
    let level = if side == "encoder" { "down." } else { "up." };
    if let Some(s) = rest.strip_prefix(level) {
        let (i, s) = s.split_once('.')?;
        let i: usize = i.parse().ok()?;
        if i >= n {
            return None;
        }
        // LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        let bi = if side == "encoder" { i } else { n - 1 - i };
        let blocks = if side == "encoder" {
            "down_blocks"
        } else {
            "up_blocks"
        };
        if let Some(s) = s.strip_prefix("block.") {
            let (j, t) = s.split_once('.')?;
            let j: usize = j.parse().ok()?;
            return Some(format!("{side}.{blocks}.{bi}.resnets.{j}.{}", resnet(t)));
        }
        let samp = if side == "encoder" {
            "downsample.conv."
        } else {
            "upsample.conv."
        };
        let samplers = if side == "encoder" {
            "downsamplers"
        } else {
            "upsamplers"
        };
        return s
            .strip_prefix(samp)
            .map(|t| format!("{side}.{blocks}.{bi}.{samplers}.0.conv.{t}"));
    }
    if let Some(s) = rest.strip_prefix("mid.") {
        if let Some(t) = s.strip_prefix("block_1.") {
            return Some(format!("{side}.mid_block.resnets.0.{}", resnet(t)));
        }
        if let Some(t) = s.strip_prefix("block_2.") {
            return Some(format!("{side}.mid_block.resnets.1.{}", resnet(t)));
        }
        if let Some(t) = s.strip_prefix("attn_1.") {
            let (name, param) = t.split_once('.')?;
            let new = match name {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            return Some(format!("{side}.mid_block.attentions.0.{new}.{param}"));
        }
    }
    None
}

/// Streams tensors into a safetensors file, one source tensor in memory at a time.
fn write_safetensors(file: &SourceFile, plan: &[Planned], out: &Path) -> Result<()> {
    let mut plan: Vec<&Planned> = plan.iter().collect();
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for p in &plan {
        let t = &file.tensors[&p.src];
        let n = p.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        header.insert(
            p.name.clone(),
            json!({"dtype": t.dtype, "shape": p.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut hdr = serde_json::to_vec(&header).map_err(|e| weights(out, e))?;
    while !hdr.len().is_multiple_of(8) {
        hdr.push(b' ');
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
    }
    let f = std::fs::File::create(out).map_err(|e| PipelineError::io(out, e))?;
    let mut w = std::io::BufWriter::new(f);
    let io = |e| PipelineError::io(out, e);
    w.write_all(&(hdr.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hdr).map_err(io)?;
    for p in &plan {
        let data = file.read(&p.src)?;
        w.write_all(&data).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| PipelineError::io(out, e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}

/// The JSON configs of the output folder.
struct Configs {
    unet: serde_json::Value,
    vae: serde_json::Value,
    text_encoder: serde_json::Value,
    scheduler: serde_json::Value,
    /// Tokenizer folder of `config_dir`, if it has one.
    tokenizer_dir: Option<PathBuf>,
    /// `config_dir`, whose config files are copied byte for byte.
    copy_from: Option<PathBuf>,
}

fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    crate::error::read_json(path)
}

impl Configs {
    fn from_dir(dir: &Path) -> Result<Self> {
        let tok = dir.join("tokenizer");
        Ok(Self {
            unet: read_json_value(&dir.join("unet/config.json"))?,
            vae: read_json_value(&dir.join("vae/config.json"))?,
            text_encoder: read_json_value(&dir.join("text_encoder/config.json"))?,
            scheduler: read_json_value(&dir.join("scheduler/scheduler_config.json"))?,
            tokenizer_dir: tok.join("vocab.json").is_file().then_some(tok),
            copy_from: Some(dir.to_path_buf()),
        })
    }

    fn infer(
        file: &SourceFile,
        unet: &[(String, String)],
        vae: &[(String, String)],
        clip: &[(String, String)],
    ) -> Result<Self> {
        let shape = |prefix: &str, parts: &[(String, String)], key: &str| -> Result<Vec<usize>> {
            parts
                .iter()
                .find(|(_, k)| k == key)
                .map(|(s, _)| file.tensors[s].shape.clone())
                .ok_or_else(|| weights(&file.path, format!("tensor `{prefix}{key}` is missing")))
        };
        Ok(Self {
            unet: infer_unet(unet, &|k| shape(UNET_PREFIX, unet, k))?,
            vae: infer_vae(vae, &|k| shape(VAE_PREFIXES[0], vae, k))?,
            text_encoder: infer_clip(clip, &|k| shape(CLIP_PREFIX, clip, k))?,
            scheduler: sd15_scheduler_config(),
            tokenizer_dir: None,
            copy_from: None,
        })
    }

    fn write(&self, dir: &Path, opts: &ConvertOptions) -> Result<()> {
        let put = |rel: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| PipelineError::io(d, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| PipelineError::io(&p, e))
        };
        let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON");
        for (rel, value) in [
            ("unet/config.json", &self.unet),
            ("vae/config.json", &self.vae),
            ("text_encoder/config.json", &self.text_encoder),
            ("scheduler/scheduler_config.json", &self.scheduler),
        ] {
            match &self.copy_from {
                Some(src) => {
                    let p = src.join(rel);
                    put(
                        rel,
                        &std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?,
                    )?
                }
                None => put(rel, &pretty(value))?,
            }
        }
        let scheduler_class = self.scheduler["_class_name"]
            .as_str()
            .unwrap_or("PNDMScheduler");
        put(
            "model_index.json",
            &pretty(&json!({
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [null, null],
                "requires_safety_checker": false,
                "safety_checker": [null, null],
                "scheduler": ["diffusers", scheduler_class],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            })),
        )?;
        if let Some(tok) = &self.tokenizer_dir {
            for entry in std::fs::read_dir(tok).map_err(|e| PipelineError::io(tok, e))? {
                let entry = entry.map_err(|e| PipelineError::io(tok, e))?;
                if entry.path().is_file() {
                    let bytes = std::fs::read(entry.path())
                        .map_err(|e| PipelineError::io(entry.path(), e))?;
                    put(
                        &format!("tokenizer/{}", entry.file_name().to_string_lossy()),
                        &bytes,
                    )?;
                }
            }
        } else if opts.tokenizer_files.is_empty() {
            return Err(PipelineError::Tokenizer(
                "a single-file checkpoint carries no tokenizer and none was supplied".into(),
            ));
        } else {
            for (name, bytes) in opts.tokenizer_files {
                put(&format!("tokenizer/{name}"), bytes)?;
            }
        }
        Ok(())
    }
}

type ShapeOf<'a> = dyn Fn(&str) -> Result<Vec<usize>> + 'a;

fn indices(parts: &[(String, String)], prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = parts
        .iter()
        .filter_map(|(_, k)| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn has(parts: &[(String, String)], prefix: &str) -> bool {
    parts.iter().any(|(_, k)| k.starts_with(prefix))
}

fn infer_unet(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    let bad = |m: String| PipelineError::config("unet (inferred from the single file)", m);
    let inputs = indices(parts, "input_blocks.");
    let max_in = *inputs.last().ok_or_else(|| bad("no input_blocks".into()))?;
    let ops: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|i| has(parts, &format!("input_blocks.{i}.0.op.")))
        .collect();
    // Each level holds `layers` resnets plus a downsampler, except the last.
    let (layers, levels) = match ops.first() {
        Some(&first) => (first - 1, ops.len() + 1),
        None => (max_in, 1),
    };
    if layers == 0 || max_in != levels * (layers + 1) - 1 {
        return Err(bad(format!(
            "input_blocks do not form a regular UNet ({} blocks)",
            max_in + 1
        )));
    }
    let mut channels = Vec::new();
    let mut down = Vec::new();
    for b in 0..levels {
        let first = 1 + b * (layers + 1);
        channels.push(shape(&format!("input_blocks.{first}.0.out_layers.3.weight"))?[0]);
        down.push(if has(parts, &format!("input_blocks.{first}.1.")) {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
    }
    let mut up = Vec::new();
    for b in 0..levels {
        let attn = has(parts, &format!("output_blocks.{}.1.", b * (layers + 1)))
            && !has(
                parts,
                &format!("output_blocks.{}.1.conv.", b * (layers + 1)),
            );
        up.push(if attn {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
    }
    let conv_in = shape("input_blocks.0.0.weight")?;
    let conv_out = shape("out.2.weight")?;
    let time = shape("time_embed.0.weight")?;
    if time != [4 * channels[0], channels[0]] {
        return Err(bad(format!(
            "time embedding {time:?} is not 4x{}",
            channels[0]
        )));
    }
    let attn_keys: Vec<&String> = parts
        .iter()
        .map(|(_, k)| k)
        .filter(|k| k.ends_with("attn2.to_k.weight"))
        .collect();
    let cross = match attn_keys.first() {
        Some(k) => shape(k)?[1],
        None => 768,
    };
    let linear = match parts
        .iter()
        .map(|(_, k)| k)
        .find(|k| k.ends_with("proj_in.weight"))
    {
        Some(k) => shape(k)?.len() == 2,
        None => false,
    };
    // Transformer depth: count of transformer_blocks in the first attention of the file.
    let depth = parts
        .iter()
        .filter_map(|(_, k)| {
            let rest = k.strip_prefix("middle_block.1.transformer_blocks.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(1, |m| m + 1);
    let mid = if has(parts, "middle_block.1.") {
        "UNetMidBlock2DCrossAttn"
    } else {
        "UNetMidBlock2D"
    };
    Ok(json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": channels,
        "center_input_sample": false,
        "cross_attention_dim": cross,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": conv_in[1],
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "mid_block_type": mid,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": conv_out[0],
        "sample_size": 64,
        "transformer_layers_per_block": depth,
        "up_block_types": up,
        "use_linear_projection": linear,
    }))
}

fn infer_vae(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    let levels = indices(parts, "encoder.down.").len();
    if levels == 0 {
        return Err(PipelineError::config(
            "vae (inferred from the single file)",
            "no encoder.down blocks",
        ));
    }
    let layers = indices(parts, "encoder.down.0.block.").len();
    let channels: Vec<usize> = (0..levels)
        .map(|i| shape(&format!("encoder.down.{i}.block.0.conv2.weight")).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let latent = shape("decoder.conv_in.weight")?[1];
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "in_channels": shape("encoder.conv_in.weight")?[1],
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "out_channels": shape("decoder.conv_out.weight")?[0],
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "use_quant_conv": has(parts, "quant_conv."),
        "use_post_quant_conv": has(parts, "post_quant_conv."),
    }))
}

fn infer_clip(parts: &[(String, String)], shape: &ShapeOf) -> Result<serde_json::Value> {
    // Keys may or may not carry `text_model.`; normalise for lookups.
    let norm: Vec<(String, String)> = parts
        .iter()
        .map(|(s, k)| {
            (
                s.clone(),
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
            )
        })
        .collect();
    let shape_n = |k: &str| -> Result<Vec<usize>> {
        let full = parts
            .iter()
            .zip(&norm)
            .find(|(_, (_, n))| n == k)
            .map(|((_, orig), _)| orig.clone())
            .ok_or_else(|| {
                weights(
                    Path::new("text encoder"),
                    format!("tensor `{k}` is missing"),
                )
            })?;
        shape(&full)
    };
    let tok = shape_n("embeddings.token_embedding.weight")?;
    let pos = shape_n("embeddings.position_embedding.weight")?;
    let layers = indices(&norm, "encoder.layers.").len();
    let inter = shape_n("encoder.layers.0.mlp.fc1.weight")?[0];
    let hidden = tok[1];
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": pos[0],
        "model_type": "clip_text_model",
        "num_attention_heads": (hidden / 64).max(1),
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "vocab_size": tok[0],
    }))
}

/// `scheduler/scheduler_config.json` of stable-diffusion-v1-5 (keys absent there take the
/// scheduler class defaults, so none are added).
pub fn sd15_scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null
    })
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Number of elements looked at per tensor by the NaN/Inf check (evenly spaced, plus the last).
const FINITE_SAMPLES: usize = 4096;

/// Distance between the elements the NaN/Inf check looks at in a tensor of `n` elements: it
/// looks at `0, step, 2 * step, ..` and at the last one.
pub(crate) fn finite_sample_step(n: usize) -> usize {
    (n / FINITE_SAMPLES).max(1)
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Index of the first non-finite element among a sample of a float tensor's raw bytes.
pub(crate) fn first_non_finite(dtype: Dtype, data: &[u8]) -> Option<usize> {
    let es = dtype.bitsize() / 8;
    let n = data.len() / es.max(1);
    if n == 0 || !is_float(dtype) {
        return None;
    }
    let step = finite_sample_step(n);
    let bad = |i: usize| -> bool {
        let b = &data[i * es..(i + 1) * es];
        // All exponent bits set <=> Inf or NaN, in every IEEE format.
        match dtype {
            Dtype::F16 => u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00,
            Dtype::BF16 => u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80,
            Dtype::F32 => u32::from_le_bytes(b.try_into().expect("4")) & 0x7F80_0000 == 0x7F80_0000,
            Dtype::F64 => {
                u64::from_le_bytes(b.try_into().expect("8")) & 0x7FF0_0000_0000_0000
                    == 0x7FF0_0000_0000_0000
            }
            _ => false,
        }
    };
    (0..n)
        .step_by(step)
        .chain(std::iter::once(n - 1))
        .find(|&i| bad(i))
}

/// Checks every tensor of one safetensors file: weights are floating point (integer tensors only
/// for `position_ids`) and a sample of each tensor's values is finite. Errors name file and tensor.
pub fn validate_safetensors(path: &Path) -> Result<usize> {
    // SAFETY: read-only mapping of a file we do not modify.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| weights(path, e))?;
    let tensors = st.tensors();
    for (name, view) in &tensors {
        check_view(path, name, view.dtype(), view.data())?;
        // SAFETY: `view` points into `st`'s read-only file mapping; the samples were read.
        unsafe { crate::weights::release_mapped(view.data()) };
    }
    Ok(tensors.len())
}

fn check_view(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<()> {
    check_dtype(path, name, dtype)?;
    match first_non_finite(dtype, data) {
        Some(i) => Err(non_finite(path, name, i)),
        None => Ok(()),
    }
}

fn check_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<()> {
    if !is_float(dtype) && !name.ends_with("position_ids") {
        return Err(weights(
            path,
            format!("tensor `{name}` has dtype {dtype:?}; weights must be floating point"),
        ));
    }
    Ok(())
}

fn non_finite(path: &Path, name: &str, element: usize) -> PipelineError {
    weights(
        path,
        format!("tensor `{name}` holds NaN or Inf (element {element})"),
    )
}

/// The diffusers variant in a weight file name: `model.fp16.safetensors` -> `fp16`,
/// `model.fp16-00001-of-00002.safetensors` -> `fp16`, `diffusion_pytorch_model.non_ema.safetensors`
/// -> `non_ema`; plain names have none.
pub fn weight_variant(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".safetensors")?;
    // Drop a shard suffix `-00001-of-00002`.
    let stem = match stem.rsplit_once("-of-") {
        Some((head, tail)) if tail.chars().all(|c| c.is_ascii_digit()) => head
            .rsplit_once('-')
            .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
            .map_or(stem, |(h, _)| h),
        _ => stem,
    };
    stem.rsplit_once('.').map(|(_, v)| v)
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`): the fp16
/// variant (`*.fp16.safetensors`, all shards) when `prefer_fp16` and present, else the plain
/// ones, else the fp16 ones. Other variants (`non_ema`, `ema`) are never picked.
pub fn component_weight_files(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let mut plain = Vec::new();
    let mut fp16 = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir, e))? {
        let p = entry.map_err(|e| PipelineError::io(dir, e))?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(".safetensors") {
            continue;
        }
        match weight_variant(&name) {
            None => plain.push(p),
            Some("fp16") => fp16.push(p),
            Some(_) => {}
        }
    }
    plain.sort();
    fp16.sort();
    let pick = if (prefer_fp16 && !fp16.is_empty()) || plain.is_empty() {
        fp16
    } else {
        plain
    };
    if pick.is_empty() {
        return Err(weights(dir, "no .safetensors weights in this folder"));
    }
    Ok(pick)
}

/// Validates a diffusers folder's weights (dtype, sampled NaN/Inf) and that its configs parse.
/// Shapes are checked against the configs by loading through [`checked_var_builder`].
pub fn validate_folder(dir: &Path) -> Result<()> {
    for comp in ["unet", "vae", "text_encoder"] {
        let cdir = dir.join(comp);
        read_json_value(&cdir.join("config.json"))?;
        for f in component_weight_files(&cdir, false)? {
            validate_safetensors(&f)?;
        }
    }
    read_json_value(&dir.join("scheduler/scheduler_config.json"))?;
    Ok(())
}

/// A VarBuilder backend over safetensors files that checks, for every tensor the model code asks
/// for (i.e. every tensor its config implies), that it exists, has the asked shape, a floating
/// point dtype and finite sampled values, with errors naming the file and the tensor.
pub struct CheckedSafetensors {
    files: Vec<(PathBuf, crate::weights::SafetensorsFile)>,
    routing: HashMap<String, usize>,
}

impl CheckedSafetensors {
    pub fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            crate::weights::prefetch(p);
            let st = crate::weights::SafetensorsFile::open(p).map_err(|e| weights(p, e))?;
            for name in st.names() {
                routing.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(Self { files, routing })
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn fetch(
        &self,
        name: &str,
        want: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // `X^T`: the transpose of the matrix `X`, written transposed from the file.
        let (name, transposed) = match name.strip_suffix(crate::weights::TRANSPOSED) {
            Some(base) => (base, true),
            None => (name, false),
        };
        let Some(&i) = self.routing.get(name) else {
            let implied = want
                .map(|s| format!(" (the config implies shape {:?})", s.dims()))
                .unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "bad weights in {}: tensor `{name}` is missing{implied}",
                self.files_list()
            )));
        };
        let (path, st) = &self.files[i];
        let Some((view, _)) = st.view(name) else {
            candle_core::bail!(
                "bad weights in {}: tensor `{name}` is unreadable",
                path.display()
            );
        };
        if let Some(s) = want {
            // A transposed read is asked for `[in, out]` of a stored `[out, in]` (or
            // `[out, in, 1, 1]`); errors name the stored shape the config implies.
            let stored = crate::weights::matrix_dims(view.shape());
            let fits = match (transposed, s.dims()) {
                (false, dims) => view.shape() == dims,
                (true, &[cols, rows]) => stored == Some((rows, cols)),
                (true, _) => false,
            };
            if !fits {
                let implied = match (transposed, s.dims()) {
                    (true, &[cols, rows]) => {
                        let mut d = vec![rows, cols];
                        d.extend(view.shape().iter().skip(2));
                        d
                    }
                    (_, dims) => dims.to_vec(),
                };
                return Err(candle_core::Error::Msg(format!(
                    "bad weights in {}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    path.display(),
                    view.shape(),
                    implied
                )));
            }
        }
        let msg = |e: PipelineError| candle_core::Error::Msg(e.to_string());
        check_dtype(path, name, view.dtype()).map_err(msg)?;
        let (t, bad, in_mapping) = if transposed {
            let bad = first_non_finite(view.dtype(), view.data());
            let t = crate::weights::load_view_transposed(&view, dtype, dev)?;
            (t, bad, false)
        } else {
            // Storage in the mapping where it can be; a copy looks at the samples in what it
            // just wrote (in cache), not in the mapping.
            st.load(name, dtype, dev)?
        };
        if let Some(i) = bad {
            return Err(msg(non_finite(path, name, i)));
        }
        if !in_mapping {
            // The copy (or upload) is done, so its pages can leave the resident set: loading
            // holds the weights once.
            st.release(view.data());
        }
        Ok(t)
    }
}

impl SimpleBackend for CheckedSafetensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let base = name
            .strip_suffix(crate::weights::TRANSPOSED)
            .unwrap_or(name);
        self.routing.contains_key(base)
    }
}

/// A VarBuilder that validates each tensor as the model code loads it (see [`CheckedSafetensors`]).
pub fn checked_var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let backend = CheckedSafetensors::new(paths)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_follow_diffusers_layout() {
        let l = 2;
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.3.0.out_layers.3.weight",
                "up_blocks.1.resnets.0.conv2.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, want) in cases {
            assert_eq!(map_unet_key(ldm, l).as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(map_unet_key("input_blocks.1.0.op.weight", l), None);
        assert_eq!(map_unet_key("label_emb.0.0.weight", l), None);
    }

    #[test]
    fn vae_keys_follow_diffusers_layout() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.0.block.2.conv1.weight",
                "decoder.up_blocks.3.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.3.upsample.conv.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.block_2.norm1.bias",
                "encoder.mid_block.resnets.1.norm1.bias",
            ),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (ldm, want) in cases {
            assert_eq!(map_vae_key(ldm, 4).as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(map_vae_key("decoder.up.4.block.0.conv1.weight", 4), None);
    }

    #[test]
    fn weight_files_skip_other_variants() {
        let dir = std::env::temp_dir().join(format!("sdserve-variants-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.non_ema.safetensors",
            "diffusion_pytorch_model.bin",
        ] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(component_weight_files(&dir, false).unwrap()),
            ["diffusion_pytorch_model.safetensors"]
        );
        assert_eq!(
            names(component_weight_files(&dir, true).unwrap()),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(
            names(component_weight_files(&dir, false).unwrap()),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        assert_eq!(
            weight_variant("model.fp16-00001-of-00002.safetensors"),
            Some("fp16")
        );
        assert_eq!(weight_variant("model-00001-of-00002.safetensors"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finite_check_sees_nan_and_inf_in_every_float_format() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &f32s), Some(1));
        let ok: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &ok), None);
        assert_eq!(
            first_non_finite(Dtype::F16, &[0x00, 0x3C, 0x00, 0x7C]),
            Some(1)
        ); // 1.0, +inf
        assert_eq!(
            first_non_finite(Dtype::BF16, &[0x80, 0x3F, 0xC0, 0xFF]),
            Some(1)
        ); // 1.0, NaN
        assert_eq!(first_non_finite(Dtype::F16, &[0xFF, 0x7B]), None); // f16::MAX
    }
}
