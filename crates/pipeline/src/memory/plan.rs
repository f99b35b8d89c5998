//! The memory planner: from a model's [`Footprint`], the largest image a request may ask for and
//! a device-memory budget (`VRAM_LIMIT_MB`), pick the fastest set of memory levers whose estimated
//! peak fits. Levers, from cheapest to dearest:
//!
//! 1. attention computed in slices (`AttentionSlicing::Auto` instead of `Off`),
//! 2. the VAE decoded in overlapping tiles (smaller tiles if needed),
//! 3. model offload: text encoder, UNet and VAE each on the GPU only for their stage,
//! 4. sequential offload: UNet blocks streamed to the GPU one at a time.
//!
//! The estimates count the big tensors each stage keeps alive at once (see the `*_bytes`
//! functions); they are estimates, calibrated by reading the code, not measured on a GPU yet.

use candle_core::DType;

use super::footprint::{Footprint, ModelShapes};
use crate::attention::{AttentionSlicing, AUTO_SLICE_BYTES};

/// Where the components live between their stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    /// Everything stays on the device (fastest).
    None,
    /// Text encoder, UNet and VAE kept in host memory and moved to the device for their stage.
    Model,
    /// As `Model`, and the UNet's blocks streamed to the device one at a time.
    Sequential,
}

/// Tiled VAE decoding: tiles of `tile_latent` latent cells, neighbours overlapping by `overlap`
/// of a tile and blended linearly across the overlap (diffusers' `tiled_decode`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct VaeTiling {
    pub tile_latent: usize,
    pub overlap: f64,
}

impl VaeTiling {
    /// diffusers' `tile_overlap_factor`.
    pub const DEFAULT_OVERLAP: f64 = 0.25;

    pub fn new(tile_latent: usize) -> Self {
        Self {
            tile_latent,
            overlap: Self::DEFAULT_OVERLAP,
        }
    }
}

/// What the operator fixed; `None` leaves the lever to the planner.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LeverOverrides {
    pub attention: Option<AttentionSlicing>,
    /// `Some(false)`: never tile; `Some(true)`: always tile (size still planned).
    pub vae_tiling: Option<bool>,
    pub offload: Option<Offload>,
    /// The VAE's dtype (default: f32 when the config says `force_upcast`, else the model dtype).
    pub vae_dtype: Option<DType>,
}

/// What to plan for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRequest {
    /// Device memory sdserve may use, in bytes.
    pub budget_bytes: u64,
    /// The largest image a request may ask for (the API allows up to 768x768).
    pub max_width: usize,
    pub max_height: usize,
    /// Images per UNet call: 2 with classifier-free guidance.
    pub batch: usize,
    /// The UNet's and text encoder's dtype.
    pub dtype: DType,
    pub overrides: LeverOverrides,
}

/// Estimated peak device memory of each stage, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StageEstimate {
    pub text: u64,
    pub unet: u64,
    pub vae: u64,
}

impl StageEstimate {
    pub fn peak(&self) -> u64 {
        self.text.max(self.unet).max(self.vae)
    }
}

/// The levers chosen for a model on a device.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    #[serde(serialize_with = "ser_slicing")]
    pub attention: AttentionSlicing,
    pub vae_tiling: Option<VaeTiling>,
    pub offload: Offload,
    #[serde(serialize_with = "ser_dtype")]
    pub vae_dtype: DType,
    /// The VAE runs in half precision: a decode with NaN/Inf is redone in f32.
    pub vae_nan_retry: bool,
    /// `None` on the CPU (no device budget).
    pub budget_bytes: Option<u64>,
    pub estimate: Option<StageEstimate>,
    /// False when even the leanest plan is estimated over budget (it is used anyway).
    pub fits: bool,
}

fn ser_slicing<S: serde::Serializer>(s: &AttentionSlicing, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&match s {
        AttentionSlicing::Off => "off".to_string(),
        AttentionSlicing::Auto => "sliced".to_string(),
        AttentionSlicing::Heads(n) => format!("sliced:{n}"),
    })
}

fn ser_dtype<S: serde::Serializer>(d: &DType, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(d.as_str())
}

impl MemoryPlan {
    /// The CPU plan: no device budget, attention sliced to bound host memory, nothing else.
    pub fn cpu(dtype: DType) -> Self {
        Self {
            attention: AttentionSlicing::Auto,
            vae_tiling: None,
            offload: Offload::None,
            vae_dtype: dtype,
            vae_nan_retry: is_half(dtype),
            budget_bytes: None,
            estimate: None,
            fits: true,
        }
    }

    /// Names of the levers in use, for logs and /health.
    pub fn levers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.attention != AttentionSlicing::Off {
            out.push("sliced_attention".to_string());
        }
        if let Some(t) = self.vae_tiling {
            out.push(format!("tiled_vae:{}", t.tile_latent));
        }
        match self.offload {
            Offload::None => {}
            Offload::Model => out.push("model_offload".into()),
            Offload::Sequential => out.push("sequential_offload".into()),
        }
        if self.vae_nan_retry {
            out.push("vae_nan_retry".into());
        }
        out
    }

    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        let levers = self.levers();
        let levers = if levers.is_empty() {
            "none".to_string()
        } else {
            levers.join(", ")
        };
        let mb = |b: u64| b / (1 << 20);
        match (self.budget_bytes, self.estimate) {
            (Some(budget), Some(e)) => format!(
                "levers: {levers}; vae {}; estimated peak {} MiB (text {} / unet {} / vae {}) of {} MiB{}",
                self.vae_dtype.as_str(),
                mb(e.peak()),
                mb(e.text),
                mb(e.unet),
                mb(e.vae),
                mb(budget),
                if self.fits { "" } else { " - OVER BUDGET even with every lever" }
            ),
            _ => format!("levers: {levers}; vae {}; no device budget", self.vae_dtype.as_str()),
        }
    }
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16)
}

/// Memory the CUDA context, cuBLAS/cuDNN handles and workspaces take outside our tensors.
pub const RESERVED_BYTES: u64 = 512 << 20;
/// Allocator fragmentation and estimate error: the estimated peak times this must fit.
pub const SAFETY_FACTOR: f64 = 1.15;

/// The part of `budget` the estimated peak may use.
pub fn usable_bytes(budget: u64) -> u64 {
    (budget.saturating_sub(RESERVED_BYTES) as f64 / SAFETY_FACTOR) as u64
}

fn div_ceil_pow2(x: usize, level: usize) -> usize {
    x.div_ceil(1 << level)
}

/// Elements of one attention piece under `slicing`, for `total` score elements made of
/// `heads` (batch x heads) matrices of `per_head` elements: mirrors `attention::sdpa`.
fn attention_piece(total: u64, bh: u64, per_head: u64, slicing: AttentionSlicing) -> u64 {
    let auto = (AUTO_SLICE_BYTES / 4) as u64; // elements of f32 scores per piece
    match slicing {
        AttentionSlicing::Off => total,
        AttentionSlicing::Auto => {
            let hp = (auto / per_head.max(1)).clamp(1, bh);
            if hp == 1 && per_head > auto {
                auto
            } else {
                hp * per_head
            }
        }
        AttentionSlicing::Heads(n) => {
            let hp = (n as u64).clamp(1, bh);
            if hp == 1 && per_head > auto {
                auto
            } else {
                hp * per_head
            }
        }
    }
}

/// Peak bytes of the UNet's activations for a `width` x `height` request.
///
/// Attention: per score element, the matmul output (dtype), its f32 copy, the f32 softmax and the
/// probabilities back in the dtype are alive at once: `2 * s + 8` bytes. Features: the skip
/// connections (`layers + 1` per level) plus the working set of the full-resolution level
/// (group-norm f32 temporaries, GEGLU's `8C` projection and `4C` product).
pub fn unet_activation_bytes(
    shapes: &ModelShapes,
    width: usize,
    height: usize,
    batch: usize,
    dtype: DType,
    slicing: AttentionSlicing,
) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let f = shapes.vae_scale_factor;
    let (h, w) = (height.div_ceil(f), width.div_ceil(f));
    let b = batch as u64;
    let mut attention = 0u64;
    for lvl in &shapes.attention_levels {
        let n = (div_ceil_pow2(h, lvl.level) * div_ceil_pow2(w, lvl.level)) as u64;
        let bh = b * lvl.heads as u64;
        let piece = attention_piece(bh * n * n, bh, n * n, slicing);
        attention = attention.max(piece * (2 * s + 8));
    }
    let mut skips = 0u64;
    for (i, &c) in shapes.unet_channels.iter().enumerate() {
        let n = (div_ceil_pow2(h, i) * div_ceil_pow2(w, i)) as u64;
        skips += (shapes.unet_layers_per_block as u64 + 1) * b * c as u64 * n * s;
    }
    let c0 = shapes.unet_channels.first().copied().unwrap_or(0) as u64;
    let working = b * (h * w) as u64 * c0 * (15 * s + 12);
    attention + skips + working
}

/// Peak bytes of the VAE decoder's activations for one image of `width` x `height` pixels
/// (one tile when tiling).
///
/// At each up block the first resnet holds its input (`c_in` channels), the f32 group-norm
/// temporaries (12 bytes per input value), the activation, the conv output and the shortcut
/// (`c_out` channels): `c_in * (2s + 12) + c_out * 2s` per pixel. The mid-block attention over
/// the latent grid is one head of `N x N` scores.
pub fn vae_activation_bytes(
    shapes: &ModelShapes,
    width: usize,
    height: usize,
    dtype: DType,
    slicing: AttentionSlicing,
) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let f = shapes.vae_scale_factor;
    let (h, w) = (height.div_ceil(f), width.div_ceil(f));
    let ch: Vec<u64> = shapes.vae_channels.iter().rev().map(|&c| c as u64).collect();
    let mut prev = ch.first().copied().unwrap_or(0);
    let mut peak = 0u64;
    for (i, &out) in ch.iter().enumerate() {
        let px = ((h << i) * (w << i)) as u64;
        peak = peak.max(px * (prev * (2 * s + 12) + out * 2 * s));
        if i + 1 < ch.len() {
            // The upsampler: nearest-2x copy and its conv output, at twice the resolution.
            peak = peak.max(4 * px * out * 2 * s);
        }
        prev = out;
    }
    if shapes.vae_mid_attention {
        let n = (h * w) as u64;
        let piece = attention_piece(n * n, 1, n * n, slicing);
        peak = peak.max(piece * (2 * s + 8) + n * prev * 4 * s);
    }
    // The output image (f32 for postprocessing) and the latents.
    peak + (3 * height * width) as u64 * 4
}

/// Estimated peak of each stage under `plan` for the largest request of `req`.
pub fn estimate(fp: &Footprint, req: &PlanRequest, plan: &MemoryPlan) -> StageEstimate {
    let s = req.dtype.size_in_bytes() as u64;
    let sv = plan.vae_dtype.size_in_bytes() as u64;
    let wts = &fp.weights;
    let (te, unet, vae) = (wts.text_encoder * s, wts.unet_total() * s, wts.vae_decoder * sv);
    let (w, h) = (req.max_width, req.max_height);
    // Text encoder: 77 tokens, a few MB of activations; 64 MiB covers any SD 1.x encoder.
    let text_act = 64u64 << 20;
    let unet_act = unet_activation_bytes(&fp.shapes, w, h, req.batch, req.dtype, plan.attention);
    let vae_act = match plan.vae_tiling {
        Some(t) => {
            let px = t.tile_latent * fp.shapes.vae_scale_factor;
            // Decoded tiles wait for blending: about the whole image again, in the VAE dtype.
            vae_activation_bytes(&fp.shapes, px.min(w), px.min(h), plan.vae_dtype, plan.attention)
                + (3 * w * h) as u64 * sv * 2
        }
        None => vae_activation_bytes(&fp.shapes, w, h, plan.vae_dtype, plan.attention),
    };
    // What must be resident during each stage.
    let (text_w, unet_w, vae_w) = match plan.offload {
        Offload::None => (te + unet + vae, te + unet + vae, te + unet + vae),
        Offload::Model => (te, unet, vae),
        // One block computing, the next one arriving, plus the small always-resident parts.
        Offload::Sequential => (te, (wts.unet_other() + 2 * wts.unet_largest_block()) * s, vae),
    };
    // The text embeddings and latents live through the whole run; they are tiny.
    StageEstimate {
        text: text_w + text_act,
        unet: unet_w + unet_act,
        vae: vae_w + vae_act,
    }
}

/// The VAE's dtype: f32 when the config says the VAE overflows in half precision
/// (`force_upcast`, true for SD 1.5), else the model's dtype.
pub fn default_vae_dtype(shapes: &ModelShapes, dtype: DType) -> DType {
    if shapes.vae_force_upcast {
        DType::F32
    } else {
        dtype
    }
}

/// Tile sizes (latent cells) to try, largest first: the VAE's own sample size (64 for SD 1.5,
/// as diffusers), then 3/4, 1/2 and 1/4 of it; only sizes smaller than the request's latent.
pub fn tile_candidates(shapes: &ModelShapes, max_latent: usize) -> Vec<usize> {
    let f = shapes.vae_scale_factor.max(1);
    let base = shapes.vae_sample_size.map(|s| s / f).unwrap_or(64).max(8);
    let mut out: Vec<usize> = [base, base * 3 / 4, base / 2, base / 4]
        .into_iter()
        .filter(|&t| t >= 8 && t < max_latent)
        .collect();
    out.dedup();
    if out.is_empty() && max_latent > 8 {
        out.push((max_latent / 2).max(8));
    }
    out
}

/// Every plan the overrides allow, fastest first (offload, then attention, then tiling), each
/// with its estimate and whether it fits.
pub fn candidates(fp: &Footprint, req: &PlanRequest) -> Vec<MemoryPlan> {
    let o = req.overrides;
    let vae_dtype = o
        .vae_dtype
        .unwrap_or_else(|| default_vae_dtype(&fp.shapes, req.dtype));
    let max_latent = req.max_width.max(req.max_height) / fp.shapes.vae_scale_factor.max(1);
    let offloads: Vec<Offload> = match o.offload {
        Some(x) => vec![x],
        None => vec![Offload::None, Offload::Model, Offload::Sequential],
    };
    let attentions: Vec<AttentionSlicing> = match o.attention {
        Some(x) => vec![x],
        None => vec![AttentionSlicing::Off, AttentionSlicing::Auto],
    };
    let tiled = tile_candidates(&fp.shapes, max_latent)
        .into_iter()
        .map(|t| Some(VaeTiling::new(t)));
    let mut tiles: Vec<Option<VaeTiling>> = match o.vae_tiling {
        Some(false) => vec![None],
        Some(true) => tiled.collect(),
        None => std::iter::once(None).chain(tiled).collect(),
    };
    if tiles.is_empty() {
        tiles.push(None); // the image is smaller than any tile
    }
    let usable = usable_bytes(req.budget_bytes);
    let mut out = Vec::new();
    for &offload in &offloads {
        for &attention in &attentions {
            for &vae_tiling in &tiles {
                let mut p = MemoryPlan {
                    attention,
                    vae_tiling,
                    offload,
                    vae_dtype,
                    vae_nan_retry: is_half(vae_dtype),
                    budget_bytes: Some(req.budget_bytes),
                    estimate: None,
                    fits: false,
                };
                let e = estimate(fp, req, &p);
                p.estimate = Some(e);
                p.fits = e.peak() <= usable;
                out.push(p);
            }
        }
    }
    out
}

fn peak_of(p: &MemoryPlan) -> u64 {
    p.estimate.map(|e| e.peak()).unwrap_or(u64::MAX)
}

/// Picks the fastest plan whose estimated peak fits the budget; if none does, the leanest one
/// (with `fits = false`).
pub fn plan(fp: &Footprint, req: &PlanRequest) -> MemoryPlan {
    let all = candidates(fp, req);
    if let Some(p) = all.iter().find(|p| p.fits) {
        return p.clone();
    }
    all.into_iter()
        .min_by_key(peak_of)
        .expect("at least one candidate")
}

/// The next plan after `current` (in [`candidates`] order) with a smaller estimated peak: where
/// the OOM circuit breaker goes when the estimates proved too optimistic. `None` when `current`
/// is already the leanest.
pub fn leaner(fp: &Footprint, req: &PlanRequest, current: &MemoryPlan) -> Option<MemoryPlan> {
    let all = candidates(fp, req);
    let current_peak = estimate(fp, req, current).peak();
    let start = all
        .iter()
        .position(|p| {
            p.attention == current.attention
                && p.vae_tiling == current.vae_tiling
                && p.offload == current.offload
        })
        .map(|i| i + 1)
        .unwrap_or(0);
    all.into_iter()
        .skip(start)
        .find(|p| peak_of(p) < current_peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::footprint::{AttentionLevel, WeightCounts};

    /// A toy model with round numbers, to check the formulas by hand.
    fn toy() -> Footprint {
        Footprint {
            weights: WeightCounts {
                unet: [("down_blocks.0".to_string(), 100), ("other".to_string(), 10)]
                    .into_iter()
                    .collect(),
                text_encoder: 50,
                vae_decoder: 20,
            },
            shapes: ModelShapes {
                latent_channels: 4,
                vae_scale_factor: 8,
                unet_channels: vec![4],
                unet_layers_per_block: 1,
                attention_levels: vec![AttentionLevel {
                    level: 0,
                    heads: 2,
                    channels: 4,
                }],
                context_len: 77,
                vae_channels: vec![2],
                vae_mid_attention: false,
                vae_force_upcast: false,
                vae_sample_size: Some(64),
            },
        }
    }

    #[test]
    fn unet_activation_formula() {
        let fp = toy();
        // 16x16 pixels -> 2x2 latent, N = 4 tokens; batch 2, 2 heads -> 4 * 16 scores.
        let b = unet_activation_bytes(&fp.shapes, 16, 16, 2, DType::F32, AttentionSlicing::Off);
        let attention = 4 * 16 * (2 * 4 + 8);
        let skips = 2 * 2 * 4 * 4 * 4; // (layers+1) * B * C * N * s
        let working = 2 * 4 * 4 * (15 * 4 + 12);
        assert_eq!(b, (attention + skips + working) as u64);
    }

    #[test]
    fn slicing_bounds_the_attention_piece() {
        let auto = (AUTO_SLICE_BYTES / 4) as u64;
        assert_eq!(attention_piece(100, 4, 25, AttentionSlicing::Off), 100);
        assert_eq!(attention_piece(100, 4, 25, AttentionSlicing::Auto), 100);
        assert_eq!(attention_piece(100, 4, 25, AttentionSlicing::Heads(1)), 25);
        let big = 3 * auto;
        assert_eq!(attention_piece(4 * big, 4, big, AttentionSlicing::Auto), auto);
    }

    #[test]
    fn offload_changes_what_is_resident() {
        let fp = toy();
        let req = PlanRequest {
            budget_bytes: 1 << 40,
            max_width: 16,
            max_height: 16,
            batch: 2,
            dtype: DType::F16,
            overrides: LeverOverrides::default(),
        };
        let mut p = MemoryPlan::cpu(DType::F16);
        let none = estimate(&fp, &req, &p);
        p.offload = Offload::Model;
        let model = estimate(&fp, &req, &p);
        // Without offload every stage carries all 180 parameters; with it, only its own.
        assert_eq!(none.text - model.text, (110 + 20) * 2);
        assert_eq!(none.unet - model.unet, (50 + 20) * 2);
        p.offload = Offload::Sequential;
        let seq = estimate(&fp, &req, &p);
        // Streaming: `other` plus two copies of the largest block instead of the whole UNet.
        assert_eq!(seq.unet - model.unet, ((10 + 2 * 100) - 110) * 2);
        assert!(seq.unet > model.unet, "a toy with one block streams more than it saves");
    }
}
