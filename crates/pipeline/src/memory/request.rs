//! One request's memory: whether a size and batch fit the budget at all (checked before the
//! request is queued), and the plan it runs under when the server's plan is not enough.

use super::footprint::Footprint;
use super::plan::{candidates, estimate, peak_of, usable_bytes, MemoryPlan, PlanRequest};
use crate::attention::{AttentionSlicing, AUTO_SLICE_BYTES};

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
    use crate::memory::estimate::vae_encoder_activation_bytes;
    use crate::memory::plan::tests::{request, sd15};
    use crate::memory::plan::{leaner, plan, Offload, DEFAULT_MAX_SIDE};
    use candle_core::DType;

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

    /// SD 1.5's ControlNet copies the UNet's stem, down blocks and mid block (plus a small
    /// hint encoder and zero convolutions, left out here).
    fn sd15_controlnet(units: usize) -> crate::memory::plan::ControlNetLoad {
        let w = &sd15().weights;
        let params = w
            .unet
            .iter()
            .filter(|(k, _)| !k.starts_with("up_blocks"))
            .map(|(_, n)| n)
            .sum();
        crate::memory::plan::ControlNetLoad {
            units,
            params,
            references: 0,
            ..Default::default()
        }
    }

    /// SD 1.5's IP-Adapter encoder, ViT-H/14 (h94/IP-Adapter's `models/image_encoder/
    /// config.json`: hidden 1280, intermediate 5120, 32 layers, 16 heads, 224 pixels in 14-pixel
    /// patches, projection 1024), and ip-adapter_sd15 (a 1024 -> 4 x 768 projection with its
    /// norm; to_k_ip and to_v_ip of 768 columns at the 16 cross-attentions, 12,480 rows in all).
    fn sd15_ip_adapter() -> crate::memory::plan::ImagePromptLoad {
        let (hidden, inter, layers, tokens) = (1280u64, 5120u64, 32u64, 257u64);
        let layer =
            4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden;
        let embeddings = 3 * 14 * 14 * hidden + hidden + tokens * hidden;
        let encoder = embeddings + 2 * 2 * hidden + layers * layer + hidden * 1024;
        let adapter = 1024 * 3072 + 3072 + 2 * 768 + 2 * 12_480 * 768;
        crate::memory::plan::ImagePromptLoad {
            params: encoder + adapter,
            encoder: Some(crate::memory::footprint::ImageEncoderShape {
                tokens: tokens as usize,
                hidden: hidden as usize,
                intermediate: inter as usize,
                heads: 16,
            }),
        }
    }

    #[test]
    fn ip_adapters_image_encoder_counts_before_the_denoising_loop() {
        let fp = sd15();
        let req = base(5120);
        let current = plan(&fp, &req);
        let image = sd15_ip_adapter();
        assert_eq!(image.params - 22_319_616, 632_076_800, "ViT-H/14's count");
        // Two ControlNets of different models.
        let two = crate::memory::plan::ControlNetLoad {
            units: 2,
            params: 2 * sd15_controlnet(1).params,
            ..Default::default()
        };
        let with = |controlnets| PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                image_prompts: image,
                ..controlnets
            },
            ..req
        };
        let without = |controlnets| PlanRequest { controlnets, ..req };
        let chosen = |r: &PlanRequest| plan_for_request(&fp, r, &current, 512, 512, 1, true);
        let (alone, bare) = (chosen(&with(Default::default())), chosen(&req));
        let (both, cn_only) = (chosen(&with(two)), chosen(&without(two)));
        let (alone, bare, both, cn_only) = (
            alone.unwrap(),
            bare.unwrap(),
            both.unwrap(),
            cn_only.unwrap(),
        );
        eprintln!(
            "512, 5 GB: {}\n  an IP-Adapter: {}\n  two ControlNets: {}\n  both: {}",
            bare.summary(),
            alone.summary(),
            cn_only.summary(),
            both.summary()
        );
        // Alone, the encoder (1.2 GiB in f16) fits beside the resident model: the stage is
        // counted (above the text stage, which holds the same weights and the text encoder's
        // 64 MiB of activations) and the levers stay.
        let e = alone.estimate.unwrap();
        assert!(e.image_prompts > e.text, "{}", alone.summary());
        assert_eq!(alone.levers(), bare.levers());
        // Beside two ControlNets it does not: the model leaves the device while the images
        // are encoded, where the two ControlNets alone keep everything resident.
        assert_eq!(cn_only.offload, Offload::None, "{}", cn_only.summary());
        let over = estimate(&fp, &sized(&with(two), 512, 512, 2), &cn_only);
        assert!(over.image_prompts > usable_bytes(req.budget_bytes));
        assert!(
            both.fits && both.offload > Offload::None,
            "{}",
            both.summary()
        );
        let e = both.estimate.unwrap();
        assert_eq!(
            e.image_prompts,
            (two.params + image.params) * 2 + {
                crate::memory::estimate::image_encoder_activation_bytes(
                    &image.encoder.unwrap(),
                    DType::F16,
                )
            }
        );
    }

    #[test]
    fn controlnets_take_leaner_levers_under_the_5_gb_plan() {
        let fp = sd15();
        let req = base(5120);
        let current = plan(&fp, &req);
        let one = PlanRequest {
            controlnets: sd15_controlnet(1),
            ..req
        };
        let two = PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                units: 2,
                params: 2 * sd15_controlnet(1).params,
                references: 0,
                ..Default::default()
            },
            ..req
        };
        let bare = plan_for_request(&fp, &req, &current, 768, 768, 1, true).unwrap();
        let with_one = plan_for_request(&fp, &one, &current, 768, 768, 1, true).unwrap();
        let with_two = plan_for_request(&fp, &two, &current, 768, 768, 1, true).unwrap();
        eprintln!(
            "768, 5 GB: {}\n  one ControlNet: {}\n  two: {}",
            bare.summary(),
            with_one.summary(),
            with_two.summary()
        );
        assert_eq!(bare.levers(), current.levers());
        // The start-up plan's estimate with the ControlNet passes the budget: leaner levers.
        assert!(estimate(&fp, &one, &current).peak() > usable_bytes(req.budget_bytes));
        assert!(with_one.fits && with_two.fits);
        assert!(no_faster_than(&with_one, &current, 96));
        assert!(
            with_one.levers() != current.levers(),
            "{}",
            with_one.summary()
        );
        // Two need more again: one's plan does not hold them.
        assert!(estimate(&fp, &two, &with_one).peak() > usable_bytes(req.budget_bytes));
        assert!(no_faster_than(&with_two, &current, 96));
        // At 512 one ControlNet keeps everything on the device.
        let small = plan_for_request(&fp, &one, &current, 512, 512, 1, true).unwrap();
        assert_eq!(small.offload, Offload::None, "{}", small.summary());
        // The batch that fits shrinks with ControlNets.
        let largest = |r: &PlanRequest| match check_request(&fp, r, 768, 768, 8, true) {
            Ok(()) => 8,
            Err(o) => o.largest_batch_size,
        };
        assert!(
            largest(&one) < largest(&req),
            "{} {}",
            largest(&one),
            largest(&req)
        );
    }
}
