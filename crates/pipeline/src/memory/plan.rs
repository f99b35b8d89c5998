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

pub use super::estimate::{
    estimate, unet_activation_bytes, vae_activation_bytes, vae_encoder_activation_bytes,
};
pub use super::request::{check_request, plan_for_request, unet_rows, OverBudget};

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
    /// The ControlNets the request runs (none for the start-up plan).
    pub controlnets: ControlNetLoad,
}

/// A request's ControlNets, as the planner counts them: their weights resident on the device
/// for the whole run (the server reads them there, in the model's dtype, and keeps no other
/// ControlNet there on a GPU), and each unit's forward pass and residuals beside the UNet's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlNetLoad {
    /// Units (several may share one model: each runs its own forward pass).
    pub units: usize,
    /// Parameters of the distinct models the units use.
    pub params: u64,
    /// Reference units (`reference_only` and the others: no weights; a second UNet pass
    /// before each evaluation, whose banks the evaluation reads beside its own tokens).
    pub references: usize,
    /// The IP-Adapters' image encoding, before the denoising loop (none: default).
    pub image_prompts: ImagePromptLoad,
}

/// A request's IP-Adapters as the planner counts them: while their images are encoded, one
/// unit at a time before the denoising loop, the image encoder and that unit's adapter are on
/// the device beside what the plan keeps resident, and the encoder's activations for one
/// image (both are read for the request and dropped after it). What the UNet stage keeps of
/// them (each cross-attention's image keys and values, a few tokens) is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImagePromptLoad {
    /// Parameters of the image encoder and of the largest adapter of the request.
    pub params: u64,
    /// The encoder's shape; `None` without IP-Adapters.
    pub encoder: Option<super::footprint::ImageEncoderShape>,
}

/// Estimated peak device memory of each stage, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StageEstimate {
    pub text: u64,
    /// IP-Adapter images through the image encoder (0 without IP-Adapters).
    pub image_prompts: u64,
    /// The VAE encoder on an init image (img2img, inpainting), resized to the request's size.
    pub encode: u64,
    pub unet: u64,
    /// The VAE decoder, one image at a time.
    pub vae: u64,
}

impl StageEstimate {
    pub fn peak(&self) -> u64 {
        self.text
            .max(self.image_prompts)
            .max(self.encode)
            .max(self.unet)
            .max(self.vae)
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
                "levers: {levers}; vae {}; estimated peak {} MiB (text {}{} / encode {} / unet {} / vae {}) of {} MiB{}",
                self.vae_dtype.as_str(),
                mb(e.peak()),
                mb(e.text),
                match e.image_prompts {
                    0 => String::new(),
                    b => format!(" / image prompts {}", mb(b)),
                },
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

pub(super) fn is_half(d: DType) -> bool {
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

pub(super) fn peak_of(p: &MemoryPlan) -> u64 {
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
pub(crate) mod tests {
    use super::*;
    use crate::memory::footprint::WeightCounts;

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

    pub(crate) fn request(budget_mb: u64, size: usize, dtype: DType) -> PlanRequest {
        PlanRequest {
            budget_bytes: budget_mb << 20,
            max_width: size,
            max_height: size,
            batch: 2,
            dtype,
            overrides: LeverOverrides::default(),
            controlnets: ControlNetLoad::default(),
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
}
