//! The memory planner: from a model's [`Footprint`], the largest image a request may ask for and
//! a device-memory budget (`VRAM_LIMIT_MB`), pick the fastest set of memory levers whose estimated
//! peak fits. Levers, from cheapest to dearest:
//!
//! 1. attention computed in slices (`AttentionSlicing::Auto` instead of `Off`),
//! 2. the VAE decoded in overlapping tiles (smaller tiles if needed),
//! 3. model offload: text encoder, UNet and VAE each on the GPU only for their stage,
//! 4. sequential offload: as 3., and the UNet's weights kept in host memory, its parts (stem,
//!    each down block, mid block, each up block, head) put on the GPU one at a time during each
//!    forward pass (`unet::UNet2DConditionModel::streamed`).
//!
//! The estimates count the big tensors each stage keeps alive at once (see the `*_bytes`
//! functions); they are estimates, calibrated by reading the code and checked on an H200 (docs/GPU.md).

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
    /// Text encoder and VAE as under `Model`; the UNet's weights stay in host memory (in the
    /// compute dtype) and each of its parts is built on the device just before it runs in a
    /// forward pass and dropped right after (slowest: the weights cross to the device every
    /// step).
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
    /// Rows per UNet call: the request's `batch_size`, twice that with classifier-free
    /// guidance (the start-up plan is made for one image with guidance: 2).
    pub batch: usize,
    /// The UNet's and text encoder's dtype.
    pub dtype: DType,
    pub overrides: LeverOverrides,
}

/// Estimated peak device memory of each stage, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StageEstimate {
    pub text: u64,
    /// The VAE encoder on an init image (img2img, inpainting), resized to the request's size.
    pub encode: u64,
    pub unet: u64,
    /// The VAE decoder, one image at a time.
    pub vae: u64,
}

impl StageEstimate {
    pub fn peak(&self) -> u64 {
        self.text.max(self.encode).max(self.unet).max(self.vae)
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
    /// The largest image side (pixels) the plan was made for.
    pub max_side: usize,
}

fn ser_slicing<S: serde::Serializer>(s: &AttentionSlicing, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&match s {
        AttentionSlicing::Off => "off".to_string(),
        AttentionSlicing::Auto => "sliced".to_string(),
        AttentionSlicing::Heads(n) => format!("sliced:{n}_heads"),
        AttentionSlicing::MaxBytes(b) => format!("sliced:{}MiB", b >> 20),
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
            max_side: DEFAULT_MAX_SIDE,
        }
    }

    /// Names of the levers in use, for logs and /health.
    pub fn levers(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.attention {
            AttentionSlicing::Off => {}
            AttentionSlicing::MaxBytes(b) if b < AUTO_SLICE_BYTES => {
                out.push(format!("sliced_attention:{}MiB", b >> 20))
            }
            _ => out.push("sliced_attention".to_string()),
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
                "levers: {levers}; vae {}; estimated peak {} MiB (text {} / encode {} / unet {} / vae {}) of {} MiB{}",
                self.vae_dtype.as_str(),
                mb(e.peak()),
                mb(e.text),
                mb(e.encode),
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

/// The API's largest width/height (the API contract, README "API").
pub const DEFAULT_MAX_SIDE: usize = 768;

/// Memory the CUDA context, cuBLAS/cuDNN handles and workspaces take outside our tensors.
pub const RESERVED_BYTES: u64 = 512 << 20;
/// Allocator fragmentation and estimate error: the estimated peak times this must fit.
pub const SAFETY_FACTOR: f64 = 1.15;

/// Score bytes per attention piece on the leanest rung (a quarter of the default slices).
pub const LEAN_SLICE_BYTES: usize = AUTO_SLICE_BYTES / 4;

/// The part of `budget` the estimated peak may use.
pub fn usable_bytes(budget: u64) -> u64 {
    (budget.saturating_sub(RESERVED_BYTES) as f64 / SAFETY_FACTOR) as u64
}

fn div_ceil_pow2(x: usize, level: usize) -> usize {
    x.div_ceil(1 << level)
}

/// Elements of one attention piece under `slicing` for `bh` (batch x heads) score matrices of
/// `n` query rows by `m` keys: mirrors the piece sizes of `attention::sdpa`.
fn attention_piece(bh: u64, n: u64, m: u64, slicing: AttentionSlicing) -> u64 {
    let per_head = n * m;
    let by_budget = |budget: u64, hp: u64| {
        if hp == 1 && per_head * 4 > budget {
            (budget / (4 * m).max(1)).clamp(1, n) * m
        } else {
            hp * per_head
        }
    };
    let auto = AUTO_SLICE_BYTES as u64;
    match slicing {
        AttentionSlicing::Off => bh * per_head,
        AttentionSlicing::Heads(h) => by_budget(auto, (h as u64).clamp(1, bh)),
        AttentionSlicing::Auto => by_budget(auto, (auto / (4 * per_head).max(1)).clamp(1, bh)),
        AttentionSlicing::MaxBytes(b) => {
            let b = b as u64;
            by_budget(b, (b / (4 * per_head).max(1)).clamp(1, bh))
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
        let piece = attention_piece(bh, n, n, slicing);
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
    let ch: Vec<u64> = shapes
        .vae_channels
        .iter()
        .rev()
        .map(|&c| c as u64)
        .collect();
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
        let piece = attention_piece(1, n, n, slicing);
        peak = peak.max(piece * (2 * s + 8) + n * prev * 4 * s);
    }
    // The output image (f32 for postprocessing) and the latents.
    peak + (3 * height * width) as u64 * 4
}

/// Peak bytes of the VAE encoder's activations for one image of `width` x `height` pixels (one
/// tile when tiling): the decoder's formula run the other way. At each down block the first
/// resnet holds its input, the f32 group-norm temporaries, the activation, the conv output and
/// the shortcut; the mid-block attention over the latent grid is one head of `N x N` scores.
pub fn vae_encoder_activation_bytes(
    shapes: &ModelShapes,
    width: usize,
    height: usize,
    dtype: DType,
    slicing: AttentionSlicing,
) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let ch: Vec<u64> = shapes.vae_channels.iter().map(|&c| c as u64).collect();
    let mut prev = ch.first().copied().unwrap_or(0);
    let mut peak = 0u64;
    for (i, &out) in ch.iter().enumerate() {
        let px = (height.div_ceil(1 << i) * width.div_ceil(1 << i)) as u64;
        peak = peak.max(px * (prev * (2 * s + 12) + out * 2 * s));
        prev = out;
    }
    let f = shapes.vae_scale_factor;
    let n = (height.div_ceil(f) * width.div_ceil(f)) as u64;
    if shapes.vae_mid_attention {
        let piece = attention_piece(1, n, n, slicing);
        peak = peak.max(piece * (2 * s + 8) + n * prev * 4 * s);
    }
    peak
}

/// The request's pixels on the device while its latents are prepared: the init image, the
/// mask and the masked image in f32 (7 planes), at the request's size.
fn init_image_bytes(width: usize, height: usize) -> u64 {
    (7 * width * height) as u64 * 4
}

/// Estimated peak of each stage under `plan` for the largest request of `req`.
pub fn estimate(fp: &Footprint, req: &PlanRequest, plan: &MemoryPlan) -> StageEstimate {
    let s = req.dtype.size_in_bytes() as u64;
    let sv = plan.vae_dtype.size_in_bytes() as u64;
    let wts = &fp.weights;
    // The VAE encoder is a component like the decoder: resident with the others, or (offload)
    // on the device only while it encodes the init image, as the decoder only while it decodes.
    let (te, unet, enc, dec) = (
        wts.text_encoder * s,
        wts.unet_total() * s,
        wts.vae_encoder * sv,
        wts.vae_decoder * sv,
    );
    let all = te + unet + enc + dec;
    let (w, h) = (req.max_width, req.max_height);
    // Text encoder: 77 tokens, a few MB of activations; 64 MiB covers any SD 1.x encoder.
    let text_act = 64u64 << 20;
    let unet_act = unet_activation_bytes(&fp.shapes, w, h, req.batch, req.dtype, plan.attention);
    let vae_act = match plan.vae_tiling {
        Some(t) => {
            let px = t.tile_latent * fp.shapes.vae_scale_factor;
            // Decoded tiles wait for blending: about the whole image again, in the VAE dtype.
            vae_activation_bytes(
                &fp.shapes,
                px.min(w),
                px.min(h),
                plan.vae_dtype,
                plan.attention,
            ) + (3 * w * h) as u64 * sv * 2
        }
        None => vae_activation_bytes(&fp.shapes, w, h, plan.vae_dtype, plan.attention),
    };
    // The encoder sees the init image resized to the request's size; tiled when the plan tiles
    // the VAE (as diffusers' `use_tiling` covers both halves) and the image is over a tile.
    let enc_act = init_image_bytes(w, h)
        + match plan.vae_tiling {
            Some(t) => {
                let px = t.tile_latent * fp.shapes.vae_scale_factor;
                let f = fp.shapes.vae_scale_factor.max(1) as u64;
                // Moments tiles (2 x latent channels) wait for blending: about the latent again.
                vae_encoder_activation_bytes(
                    &fp.shapes,
                    px.min(w),
                    px.min(h),
                    plan.vae_dtype,
                    plan.attention,
                ) + (2 * fp.shapes.latent_channels * w * h) as u64 / (f * f) * sv * 2
            }
            None => vae_encoder_activation_bytes(&fp.shapes, w, h, plan.vae_dtype, plan.attention),
        };
    // What must be resident during each stage.
    let (text_w, enc_w, unet_w, vae_w) = match plan.offload {
        Offload::None => (all, all, all, all),
        Offload::Model => (te, enc, unet, dec),
        // One block computing, the next one arriving, plus the small always-resident parts.
        Offload::Sequential => (
            te,
            enc,
            (wts.unet_other() + 2 * wts.unet_largest_block()) * s,
            dec,
        ),
    };
    // The text embeddings and latents live through the whole run; they are tiny.
    StageEstimate {
        text: text_w + text_act,
        encode: enc_w + enc_act,
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
        None => vec![
            AttentionSlicing::Off,
            AttentionSlicing::Auto,
            AttentionSlicing::MaxBytes(LEAN_SLICE_BYTES),
        ],
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
                    max_side: req.max_width.max(req.max_height),
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

/// Why a request cannot run under the budget whatever the levers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// The leanest plan's estimated peak for the request, bytes.
    pub needed_bytes: u64,
    /// What the budget leaves for it (after the reserve and the safety factor), bytes.
    pub usable_bytes: u64,
    /// The largest `batch_size` that fits at the request's size with every lever (0: none).
    pub largest_batch_size: usize,
}

impl OverBudget {
    /// For an error message: what it needs, what there is, what would fit.
    pub fn describe(&self, width: usize, height: usize, batch_size: usize) -> String {
        let mb = |b: u64| b.div_ceil(1 << 20);
        let advice = match self.largest_batch_size {
            0 => "no batch fits at this size: ask for a smaller image".to_string(),
            n => format!("at most batch_size {n} fits at this size"),
        };
        format!(
            "batch_size {batch_size} at {width}x{height} needs an estimated {} MiB of device \
             memory even with the leanest memory levers allowed (sliced attention, tiled VAE, \
             sequential offload); VRAM_LIMIT_MB leaves {} MiB for it: {advice}",
            mb(self.needed_bytes),
            mb(self.usable_bytes)
        )
    }
}

/// UNet rows of one call: the images, twice over with classifier-free guidance.
pub fn unet_rows(batch_size: usize, guidance: bool) -> usize {
    batch_size.max(1) * if guidance { 2 } else { 1 }
}

fn sized(base: &PlanRequest, width: usize, height: usize, rows: usize) -> PlanRequest {
    PlanRequest {
        max_width: width,
        max_height: height,
        batch: rows,
        ..*base
    }
}

/// Whether a `width` x `height` request of `batch_size` images fits the budget of `base` with
/// the leanest levers its overrides allow: the check made before a request is queued, so that
/// a batch that cannot fit is refused rather than failing out of memory half-way.
pub fn check_request(
    fp: &Footprint,
    base: &PlanRequest,
    width: usize,
    height: usize,
    batch_size: usize,
    guidance: bool,
) -> Result<(), OverBudget> {
    let leanest_peak = |batch: usize| {
        candidates(fp, &sized(base, width, height, unet_rows(batch, guidance)))
            .iter()
            .map(peak_of)
            .min()
            .unwrap_or(u64::MAX)
    };
    let usable = usable_bytes(base.budget_bytes);
    let needed = leanest_peak(batch_size);
    if needed <= usable {
        return Ok(());
    }
    let largest_batch_size = (1..batch_size)
        .rev()
        .find(|&b| leanest_peak(b) <= usable)
        .unwrap_or(0);
    Err(OverBudget {
        needed_bytes: needed,
        usable_bytes: usable,
        largest_batch_size,
    })
}

/// How much a lever setting saves, for comparing plans lever by lever.
fn attention_rank(a: AttentionSlicing) -> u8 {
    match a {
        AttentionSlicing::Off => 0,
        AttentionSlicing::MaxBytes(b) if b < AUTO_SLICE_BYTES => 2,
        _ => 1,
    }
}

/// True when `p` is at least as lean as `floor` in every lever for an image of `max_latent`
/// cells a side (tiles at least that large leave it whole: as good as no tiling).
fn no_faster_than(p: &MemoryPlan, floor: &MemoryPlan, max_latent: usize) -> bool {
    let tiling = match (floor.vae_tiling, p.vae_tiling) {
        (None, _) => true,
        (Some(f), None) => max_latent <= f.tile_latent,
        (Some(f), Some(t)) => t.tile_latent <= f.tile_latent,
    };
    p.offload >= floor.offload
        && attention_rank(p.attention) >= attention_rank(floor.attention)
        && tiling
}

/// The levers for one request of `width` x `height` and `batch_size` images, given `current`,
/// the plan in use (made at start-up for one image with guidance at the largest size, and
/// possibly stepped down since by the out-of-memory breaker): `current` itself when its
/// estimate for this request fits, else the fastest plan, no faster than `current` in any
/// lever, that fits (a batch of 8 at 768x768 needs more levers than one image). Attention
/// and the UNet's activations grow with the batch; the VAE runs one image at a time and the
/// encoder once per request, so they do not.
pub fn plan_for_request(
    fp: &Footprint,
    base: &PlanRequest,
    current: &MemoryPlan,
    width: usize,
    height: usize,
    batch_size: usize,
    guidance: bool,
) -> Result<MemoryPlan, OverBudget> {
    check_request(fp, base, width, height, batch_size, guidance)?;
    let req = sized(base, width, height, unet_rows(batch_size, guidance));
    let usable = usable_bytes(req.budget_bytes);
    let mut same = current.clone();
    let e = estimate(fp, &req, current);
    if e.peak() <= usable {
        same.estimate = Some(e);
        same.fits = true;
        return Ok(same);
    }
    let max_latent = width.max(height) / fp.shapes.vae_scale_factor.max(1);
    let all = candidates(fp, &req);
    // `check_request` found a fitting candidate; one no faster than `current` comes first.
    let chosen = all
        .iter()
        .find(|p| p.fits && no_faster_than(p, current, max_latent))
        .or_else(|| all.iter().find(|p| p.fits))
        .cloned()
        .unwrap_or(same);
    Ok(MemoryPlan {
        // The VAE's attention rows stay sized for the start-up plan's side.
        max_side: current.max_side,
        ..chosen
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::footprint::{AttentionLevel, WeightCounts};

    /// A toy model with round numbers, to check the formulas by hand.
    fn toy() -> Footprint {
        Footprint {
            weights: WeightCounts {
                unet: [
                    ("down_blocks.0".to_string(), 100),
                    ("other".to_string(), 10),
                ]
                .into_iter()
                .collect(),
                text_encoder: 50,
                vae_decoder: 20,
                vae_encoder: 0,
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
        assert_eq!(attention_piece(4, 5, 5, AttentionSlicing::Off), 100);
        assert_eq!(attention_piece(4, 5, 5, AttentionSlicing::Auto), 100);
        assert_eq!(attention_piece(4, 5, 5, AttentionSlicing::Heads(1)), 25);
        // 2 heads of 5x5 f32 scores fit in 200 bytes; one row of 5 in 20.
        assert_eq!(
            attention_piece(4, 5, 5, AttentionSlicing::MaxBytes(200)),
            50
        );
        assert_eq!(attention_piece(4, 5, 5, AttentionSlicing::MaxBytes(40)), 10);
        assert_eq!(attention_piece(4, 5, 5, AttentionSlicing::MaxBytes(1)), 5);
        // SD 1.5 at 512x512: 4096 tokens, one head is 64 MiB of f32 scores: 4 heads per piece.
        let auto = attention_piece(16, 4096, 4096, AttentionSlicing::Auto);
        assert_eq!(auto * 4, AUTO_SLICE_BYTES as u64);
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
        assert!(
            seq.unet > model.unet,
            "a toy with one block streams more than it saves"
        );
    }

    /// The real SD 1.5 sizes (tools/make_sd15_footprint.py: parameter counts of diffusers'
    /// models built from the SD 1.5 configs).
    pub(crate) fn sd15() -> Footprint {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/sd15-footprint.json")).unwrap();
        let weights = WeightCounts {
            unet: serde_json::from_value(v["unet"].clone()).unwrap(),
            text_encoder: v["text_encoder"].as_u64().unwrap(),
            vae_decoder: v["vae_decoder"].as_u64().unwrap(),
            vae_encoder: v["vae_encoder"].as_u64().unwrap_or(0),
        };
        let unet: crate::unet::UNetConfig =
            serde_json::from_value(v["unet_config"].clone()).unwrap();
        let vae: crate::vae::VaeConfig = serde_json::from_value(v["vae_config"].clone()).unwrap();
        Footprint {
            weights,
            shapes: ModelShapes::from_configs(&unet, &vae, 77).unwrap(),
        }
    }

    fn request(budget_mb: u64, size: usize, dtype: DType) -> PlanRequest {
        PlanRequest {
            budget_bytes: budget_mb << 20,
            max_width: size,
            max_height: size,
            batch: 2,
            dtype,
            overrides: LeverOverrides::default(),
        }
    }

    fn levers(mb: u64, dtype: DType) -> (Vec<String>, MemoryPlan) {
        let p = plan(&sd15(), &request(mb, 768, dtype));
        eprintln!("{mb:>6} MiB {}: {}", dtype.as_str(), p.summary());
        (p.levers(), p)
    }

    #[test]
    fn sd15_fp16_budgets_pick_the_expected_levers() {
        // 24 GB: everything on the device, attention unsliced, VAE whole.
        let (l, p) = levers(24576, DType::F16);
        assert!(l.is_empty() && p.fits, "{l:?}");
        // 6 GB and the 5 GB default: sliced attention and a tiled (f32) VAE.
        for mb in [6144, 5120] {
            let (l, p) = levers(mb, DType::F16);
            assert_eq!(l, ["sliced_attention", "tiled_vae:64"], "{mb}");
            assert_eq!(p.vae_dtype, DType::F32, "SD 1.5's VAE says force_upcast");
            assert!(p.fits);
        }
        // 4 GB: lean slices and smaller tiles, everything still resident (docs/GPU.md's table).
        let (l, p) = levers(4096, DType::F16);
        assert_eq!(l, ["sliced_attention:64MiB", "tiled_vae:48"]);
        assert!(p.fits);
        // 2.5 GB: UNet blocks streamed.
        let (_, p) = levers(2560, DType::F16);
        assert_eq!(p.offload, Offload::Sequential);
        assert!(p.fits);
        // 3 GB: the components take turns on the device.
        let (_, p) = levers(3072, DType::F16);
        assert_eq!(p.offload, Offload::Model);
        assert!(p.fits);
        // 1.5 GB: UNet blocks streamed; our estimate says even that is over budget, and the
        // plan says so rather than pretending.
        let (_, p) = levers(1536, DType::F16);
        assert_eq!(p.offload, Offload::Sequential);
        assert!(!p.fits);
    }

    #[test]
    fn sd15_fp32_needs_more() {
        // f32 weights are twice the size: 6 GB is no longer enough to keep everything resident.
        let (_, p16) = levers(6144, DType::F16);
        let (_, p32) = levers(6144, DType::F32);
        assert!(p32.estimate.unwrap().peak() > p16.estimate.unwrap().peak());
        assert!(p32.offload > Offload::None || p32.attention != AttentionSlicing::Auto);
    }

    #[test]
    fn chosen_plan_is_the_fastest_that_fits() {
        let fp = sd15();
        let mut last_index = 0;
        for mb in (1024..=32768).rev().step_by(512) {
            let req = request(mb, 768, DType::F16);
            let all = candidates(&fp, &req);
            let chosen = plan(&fp, &req);
            let index = all.iter().position(|p| *p == chosen).expect("a candidate");
            if chosen.fits {
                assert!(
                    all[..index].iter().all(|p| !p.fits),
                    "{mb}: a faster plan fits"
                );
                assert!(chosen.estimate.unwrap().peak() <= usable_bytes(req.budget_bytes));
            } else {
                assert!(all.iter().all(|p| !p.fits));
            }
            // Less memory never buys a faster plan.
            assert!(
                index >= last_index || !chosen.fits,
                "{mb}: {index} < {last_index}"
            );
            if chosen.fits {
                last_index = index;
            }
        }
    }

    #[test]
    fn overrides_are_respected() {
        let fp = sd15();
        let mut req = request(5120, 768, DType::F16);
        req.overrides.vae_tiling = Some(false);
        let p = plan(&fp, &req);
        assert_eq!(p.vae_tiling, None);
        assert!(
            p.offload != Offload::None,
            "without tiling 5 GB needs offload: {}",
            p.summary()
        );
        req.overrides = LeverOverrides {
            offload: Some(Offload::None),
            attention: Some(AttentionSlicing::Off),
            ..Default::default()
        };
        let p = plan(&fp, &req);
        assert_eq!(
            (p.offload, p.attention),
            (Offload::None, AttentionSlicing::Off)
        );
        assert!(!p.fits, "unsliced attention at 768x768 needs ~17 GB");
        req.overrides = LeverOverrides {
            vae_dtype: Some(DType::F16),
            ..Default::default()
        };
        let p = plan(&fp, &req);
        assert_eq!(p.vae_dtype, DType::F16);
        assert!(p.vae_nan_retry, "a half-precision VAE gets the f32 retry");
    }

    #[test]
    fn leaner_steps_down_until_the_leanest() {
        let fp = sd15();
        let req = request(5120, 768, DType::F16);
        let mut p = plan(&fp, &req);
        let mut steps = 0;
        while let Some(next) = leaner(&fp, &req, &p) {
            assert!(next.estimate.unwrap().peak() < p.estimate.unwrap().peak());
            p = next;
            steps += 1;
            assert!(steps < 100);
        }
        assert!(steps >= 2, "{steps}");
        assert_eq!(p.offload, Offload::Sequential, "{}", p.summary());
    }

    #[test]
    fn smaller_images_need_less() {
        let fp = sd15();
        let big = plan(&fp, &request(5120, 768, DType::F16));
        let small = plan(&fp, &request(5120, 512, DType::F16));
        assert!(small.levers().len() <= big.levers().len());
        let e = |p: &MemoryPlan, size| estimate(&fp, &request(5120, size, DType::F16), p).peak();
        assert!(e(&big, 512) < e(&big, 768));
    }

    #[test]
    fn weights_are_counted_from_safetensors_headers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
        let w = WeightCounts::from_model_dir(&dir, DType::F32).unwrap();
        let size = |p: &str| std::fs::metadata(dir.join(p)).unwrap().len();
        // f32 files: 4 bytes per element plus a header of at most a few tens of KB.
        let unet = size("unet/diffusion_pytorch_model.safetensors");
        assert!(w.unet_total() * 4 <= unet && w.unet_total() * 4 + 65536 > unet);
        let text = size("text_encoder/model.safetensors");
        assert!(w.text_encoder * 4 <= text && w.text_encoder * 4 + 65536 > text);
        // Both halves of the VAE file are counted, each on its own.
        let vae = size("vae/diffusion_pytorch_model.safetensors");
        assert!(w.vae_decoder > 0 && w.vae_decoder * 4 + 65536 < vae);
        assert!(w.vae_encoder > 0 && w.vae_encoder * 4 + 65536 < vae);
        let both = (w.vae_decoder + w.vae_encoder) * 4;
        assert!(both <= vae && both + 65536 > vae);
        assert!(w.unet.contains_key("down_blocks.0") && w.unet.contains_key("other"));
        let fp = Footprint::from_model_dir(&dir, DType::F32).unwrap();
        assert_eq!(fp.shapes.vae_scale_factor, 2);
        assert_eq!(fp.shapes.attention_levels.len(), 1);
    }

    fn base(budget_mb: u64) -> PlanRequest {
        request(budget_mb, DEFAULT_MAX_SIDE, DType::F16)
    }

    #[test]
    fn a_batch_of_8_at_768_needs_levers_one_image_does_not() {
        let fp = sd15();
        let req = base(5120);
        let current = plan(&fp, &req);
        let one = plan_for_request(&fp, &req, &current, 768, 768, 1, true).unwrap();
        assert_eq!(
            one.levers(),
            current.levers(),
            "one image runs the start-up plan"
        );
        let eight = plan_for_request(&fp, &req, &current, 768, 768, 8, true).unwrap();
        eprintln!("batch 1: {}\nbatch 8: {}", one.summary(), eight.summary());
        assert!(eight.fits);
        assert!(
            eight.offload > current.offload
                || attention_rank(eight.attention) > attention_rank(current.attention),
            "batch 8 needs more than {}: {}",
            current.summary(),
            eight.summary()
        );
        // The estimate grows with the batch (16 UNet rows with guidance against 2) ...
        let e = |p: &MemoryPlan, rows| estimate(&fp, &sized(&req, 768, 768, rows), p).unet;
        assert!(e(&current, 16) > e(&current, 2));
        assert!(e(&current, 16) > usable_bytes(req.budget_bytes));
        // ... and guidance doubles the rows: 4 images with guidance cost as 8 without.
        assert_eq!(
            e(&current, unet_rows(4, true)),
            e(&current, unet_rows(8, false))
        );
        // Never faster than the plan in use, in any lever.
        assert!(no_faster_than(&eight, &current, 96));
        // A leaner plan in use (after out-of-memory errors) is kept for small requests.
        let stepped = leaner(&fp, &req, &current).unwrap();
        let small = plan_for_request(&fp, &req, &stepped, 512, 512, 1, true).unwrap();
        assert_eq!(small.levers(), stepped.levers());
    }

    #[test]
    fn a_batch_that_cannot_fit_is_refused_up_front() {
        let fp = sd15();
        // 2.5 GB: one image at 768 fits with levers; eight do not with any.
        let req = base(2560);
        let current = plan(&fp, &req);
        assert!(current.fits, "{}", current.summary());
        assert!(check_request(&fp, &req, 768, 768, 1, true).is_ok());
        let over = check_request(&fp, &req, 768, 768, 8, true).unwrap_err();
        eprintln!("{over:?}: {}", over.describe(768, 768, 8));
        assert!(over.needed_bytes > over.usable_bytes);
        assert!((1..8).contains(&over.largest_batch_size), "{over:?}");
        // The largest batch it names fits, the next one does not.
        let n = over.largest_batch_size;
        assert!(check_request(&fp, &req, 768, 768, n, true).is_ok());
        assert!(check_request(&fp, &req, 768, 768, n + 1, true).is_err());
        // Without guidance the UNet sees half the rows: more images fit.
        let plain = check_request(&fp, &req, 768, 768, 8, false);
        assert!(
            plain.is_ok() || plain.unwrap_err().largest_batch_size > n,
            "{plain:?}"
        );
        assert_eq!(
            plan_for_request(&fp, &req, &current, 768, 768, 8, true),
            Err(over)
        );
        let text = over.describe(768, 768, 8);
        assert!(text.contains(&format!("at most batch_size {n}")), "{text}");
        // A budget below the weights refuses even one image, and says so.
        let tiny = check_request(&fp, &base(600), 256, 256, 1, true).unwrap_err();
        assert_eq!(tiny.largest_batch_size, 0);
        assert!(tiny.describe(256, 256, 1).contains("smaller image"));
    }

    #[test]
    fn the_plan_tiles_the_encoder_where_it_would_pass_the_budget_whole() {
        let fp = sd15();
        let mut turned_on = 0;
        for mb in (1024..=24576).step_by(256) {
            let req = base(mb);
            let usable = usable_bytes(req.budget_bytes);
            let chosen = plan(&fp, &req);
            if !chosen.fits {
                continue;
            }
            let e = chosen.estimate.unwrap();
            assert!(e.encode <= usable, "{mb}: {}", chosen.summary());
            let whole = MemoryPlan {
                vae_tiling: None,
                ..chosen.clone()
            };
            if estimate(&fp, &req, &whole).encode > usable {
                assert!(chosen.vae_tiling.is_some(), "{mb}: {}", chosen.summary());
                turned_on += 1;
            }
        }
        assert!(turned_on > 0, "no budget where the whole encoder passes it");
        // Tiling bounds the encoder by the tile: a 768 image costs about what a 512 one does.
        let p = plan(&fp, &base(5120));
        let t = p.vae_tiling.expect("5 GB tiles at 768");
        assert_eq!(t.tile_latent, 64, "the VAE's sample_size 512 / 8");
        let act =
            |side| vae_encoder_activation_bytes(&fp.shapes, side, side, DType::F32, p.attention);
        assert!(act(768) > 2 * act(512));
    }

    #[test]
    fn encoder_estimate_counts_its_own_weights_when_offloaded() {
        let mut fp = toy();
        fp.weights.vae_encoder = 30;
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
        // Resident: every weight (110 + 50 + 30 + 20) at every stage; offloaded: its own 30.
        assert_eq!(none.encode - model.encode, (110 + 50 + 20) * 2);
        assert_eq!(none.vae - model.vae, (110 + 50 + 30) * 2);
        let act = vae_encoder_activation_bytes(&fp.shapes, 16, 16, DType::F16, p.attention);
        assert_eq!(model.encode, 30 * 2 + act + init_image_bytes(16, 16));
    }
}
