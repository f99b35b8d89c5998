//! Estimated peak device memory of each stage under a memory plan: the big tensors each stage
//! keeps alive at once (weights resident, activations, attention scores per piece).

use candle_core::DType;

use super::footprint::{Footprint, ImageEncoderShape, ModelShapes};
use super::plan::{MemoryPlan, Offload, PlanRequest, StageEstimate};
use crate::attention::{AttentionSlicing, AUTO_SLICE_BYTES};

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
    let skips = unet_skip_bytes(shapes, h, w, b, s);
    let c0 = shapes.unet_channels.first().copied().unwrap_or(0) as u64;
    let working = b * (h * w) as u64 * c0 * (15 * s + 12);
    attention + skips + working
}

/// The skip connections of a `h` x `w` latent grid, `layers + 1` feature maps per level: also
/// what one set of ControlNet residuals takes (one per skip, the same shapes).
fn unet_skip_bytes(shapes: &ModelShapes, h: usize, w: usize, b: u64, s: u64) -> u64 {
    let mut skips = 0u64;
    for (i, &c) in shapes.unet_channels.iter().enumerate() {
        let n = (div_ceil_pow2(h, i) * div_ceil_pow2(w, i)) as u64;
        skips += (shapes.unet_layers_per_block as u64 + 1) * b * c as u64 * n * s;
    }
    skips
}

/// What a request's ControlNets add to the UNet stage's activations, bytes. A unit's forward
/// pass is the UNet's down half (no larger than the UNet's own pass, which runs after it), but
/// its residuals outlive it: one set while the UNet runs, two while a further unit computes
/// its own beside their running sum (`pipeline::control`). The control image, repeated over
/// the rows, feeds the conditioning embedding at pixel resolution (its first convolutions are
/// 16 channels wide: input and output alive).
pub fn controlnet_activation_bytes(
    shapes: &ModelShapes,
    width: usize,
    height: usize,
    batch: usize,
    dtype: DType,
    units: usize,
) -> u64 {
    if units == 0 {
        return 0;
    }
    let s = dtype.size_in_bytes() as u64;
    let f = shapes.vae_scale_factor;
    let (h, w) = (height.div_ceil(f), width.div_ceil(f));
    let b = batch as u64;
    let residual_sets = units.min(2) as u64;
    let hint = b * (width * height) as u64 * (3 + 2 * 16) * s;
    residual_sets * unet_skip_bytes(shapes, h, w, b, s) + hint
}

/// What a request's reference units add to the UNet stage's activations, bytes. Each unit's
/// pass before an evaluation is a UNet forward like the evaluation's (one at a time), but it
/// leaves its banks: every transformer block's normed input (`2 * layers + 1` blocks a level,
/// the down and up blocks', of all rows), kept until the evaluation reads them. The
/// evaluation's self-attention then runs over its own and every unit's tokens: its scores'
/// keys `1 + units` times as many, and the concatenated tokens with their keys and values
/// beside it. (AdaIN's banks are a mean and a variance a channel: nothing here.)
pub fn reference_activation_bytes(
    shapes: &ModelShapes,
    width: usize,
    height: usize,
    batch: usize,
    dtype: DType,
    slicing: AttentionSlicing,
    units: usize,
) -> u64 {
    if units == 0 {
        return 0;
    }
    let s = dtype.size_in_bytes() as u64;
    let f = shapes.vae_scale_factor;
    let (h, w) = (height.div_ceil(f), width.div_ceil(f));
    let (b, u) = (batch as u64, units as u64);
    let blocks = 2 * shapes.unet_layers_per_block as u64 + 1;
    let (mut banks, mut longer) = (0u64, 0u64);
    for lvl in &shapes.attention_levels {
        let n = (div_ceil_pow2(h, lvl.level) * div_ceil_pow2(w, lvl.level)) as u64;
        let c = lvl.channels as u64;
        let bh = b * lvl.heads as u64;
        banks += u * blocks * b * n * c * s;
        let scores = attention_piece(bh, n, (1 + u) * n, slicing)
            .saturating_sub(attention_piece(bh, n, n, slicing))
            * (2 * s + 8);
        longer = longer.max(scores + 3 * u * b * n * c * s);
    }
    banks + longer
}

/// The image encoder's activations for one image (IP-Adapter images are encoded one at a
/// time): per token a layer's input, its normed copy, queries, keys, values and the attention's
/// output (6 x hidden) and the MLP's intermediate and its activation (2 x intermediate); one
/// layer's scores of every head, `2s + 8` bytes each as in the UNet (unsliced).
pub fn image_encoder_activation_bytes(shape: &ImageEncoderShape, dtype: DType) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let n = shape.tokens as u64;
    let per_token = (6 * shape.hidden + 2 * shape.intermediate) as u64 * s;
    n * per_token + shape.heads as u64 * n * n * (2 * s + 8)
}

/// The VAE mid block's attention over the `n` cells of the latent grid (one head of `n x n`
/// scores, `2s + 8` bytes each as in the UNet) next to its `c` channels' input and projections.
fn vae_mid_attention_bytes(n: u64, c: u64, s: u64, slicing: AttentionSlicing) -> u64 {
    attention_piece(1, n, n, slicing) * (2 * s + 8) + n * c * 4 * s
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
        peak = peak.max(vae_mid_attention_bytes((h * w) as u64, prev, s, slicing));
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
        peak = peak.max(vae_mid_attention_bytes(n, prev, s, slicing));
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
    // A request's ControlNets stay on the device through every stage (read there before the
    // run); their activations join the UNet's.
    let cn = req.controlnets.params * s;
    let all = te + unet + enc + dec;
    let (w, h) = (req.max_width, req.max_height);
    // Text encoder: 77 tokens, a few MB of activations; 64 MiB covers any SD 1.x encoder.
    let text_act = 64u64 << 20;
    let unet_act = unet_activation_bytes(&fp.shapes, w, h, req.batch, req.dtype, plan.attention)
        + controlnet_activation_bytes(
            &fp.shapes,
            w,
            h,
            req.batch,
            req.dtype,
            req.controlnets.units,
        )
        + reference_activation_bytes(
            &fp.shapes,
            w,
            h,
            req.batch,
            req.dtype,
            plan.attention,
            req.controlnets.references,
        );
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
    // IP-Adapter images are encoded after the prompt, with what the plan keeps resident.
    let image = &req.controlnets.image_prompts;
    let image_prompts = match &image.encoder {
        None => 0,
        Some(shape) => {
            let resident = match plan.offload {
                Offload::None => all,
                Offload::Model | Offload::Sequential => 0,
            };
            cn + resident + image.params * s + image_encoder_activation_bytes(shape, req.dtype)
        }
    };
    // The text embeddings and latents live through the whole run; they are tiny.
    StageEstimate {
        text: cn + text_w + text_act,
        image_prompts,
        encode: cn + enc_w + enc_act,
        unet: cn + unet_w + unet_act,
        vae: cn + vae_w + vae_act,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::footprint::{AttentionLevel, WeightCounts};
    use crate::memory::plan::LeverOverrides;

    /// A batch of 2 at 16x16 in f16 under a budget that never binds, for the toy model.
    fn toy_request() -> PlanRequest {
        PlanRequest {
            budget_bytes: 1 << 40,
            max_width: 16,
            max_height: 16,
            batch: 2,
            dtype: DType::F16,
            overrides: LeverOverrides::default(),
            controlnets: Default::default(),
        }
    }

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
        let req = toy_request();
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

    #[test]
    fn encoder_estimate_counts_its_own_weights_when_offloaded() {
        let mut fp = toy();
        fp.weights.vae_encoder = 30;
        let req = toy_request();
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

    #[test]
    fn controlnets_stay_resident_and_their_residuals_join_the_unet_stage() {
        let fp = toy();
        let bare = toy_request();
        let one = PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                units: 1,
                params: 40,
                references: 0,
                ..Default::default()
            },
            ..bare
        };
        let two = PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                units: 3,
                params: 40,
                references: 0,
                ..Default::default()
            },
            ..bare
        };
        for offload in [Offload::None, Offload::Model, Offload::Sequential] {
            let mut p = MemoryPlan::cpu(DType::F16);
            p.offload = offload;
            let (b, o, t) = (
                estimate(&fp, &bare, &p),
                estimate(&fp, &one, &p),
                estimate(&fp, &two, &p),
            );
            // 40 f16 parameters on the device at every stage, whatever the offload.
            assert_eq!(o.text - b.text, 40 * 2, "{offload:?}");
            assert_eq!(o.encode - b.encode, 40 * 2);
            assert_eq!(o.vae - b.vae, 40 * 2);
            // 16x16 -> 2x2 latent, batch 2, one level of 4 channels with 1 layer: 2 skips of
            // 2 * 4 * 4 values; the control image and 2 x 16 channels at 16x16 per row.
            let skips = 2 * 2 * 4 * 4 * 2;
            let hint = 2 * 16 * 16 * (3 + 32) * 2;
            assert_eq!(o.unet - b.unet, 40 * 2 + skips + hint);
            // Several units: their running sum beside one unit's residuals, never more.
            assert_eq!(t.unet - b.unet, 40 * 2 + 2 * skips + hint);
        }
    }

    #[test]
    fn ip_adapters_add_an_image_prompt_stage_beside_what_stays_resident() {
        let fp = toy();
        let bare = toy_request();
        let shape = ImageEncoderShape {
            tokens: 5,
            hidden: 4,
            intermediate: 8,
            heads: 2,
        };
        let with = |cn_params| PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                units: usize::from(cn_params > 0),
                params: cn_params,
                image_prompts: crate::memory::plan::ImagePromptLoad {
                    params: 100,
                    encoder: Some(shape),
                },
                ..Default::default()
            },
            ..bare
        };
        // 5 tokens x (6 x 4 + 2 x 8) values of 2 bytes, and 2 heads of 5 x 5 scores at 12
        // bytes (f16 scores, their f32 copy and softmax, f16 probabilities).
        let act = 5 * (6 * 4 + 2 * 8) * 2 + 2 * 5 * 5 * 12;
        assert_eq!(image_encoder_activation_bytes(&shape, DType::F16), act);
        // Everything resident (text 50, UNet 110, decoder 20 parameters) only without offload.
        for (offload, resident) in [
            (Offload::None, (50 + 110 + 20) * 2),
            (Offload::Model, 0),
            (Offload::Sequential, 0),
        ] {
            let mut p = MemoryPlan::cpu(DType::F16);
            p.offload = offload;
            let (b, one, cn) = (
                estimate(&fp, &bare, &p),
                estimate(&fp, &with(0), &p),
                estimate(&fp, &with(40), &p),
            );
            assert_eq!(b.image_prompts, 0, "{offload:?}");
            assert_eq!(one.image_prompts, resident + 100 * 2 + act, "{offload:?}");
            // The ControlNets are on the device through every stage.
            assert_eq!(cn.image_prompts, one.image_prompts + 40 * 2);
            // The other stages do not change.
            let others = |e: StageEstimate| (e.text, e.encode, e.unet, e.vae);
            assert_eq!(others(one), others(b), "{offload:?}");
            // The stage counts in the peak: an encoder larger than the rest sets it.
            let big = PlanRequest {
                controlnets: crate::memory::plan::ControlNetLoad {
                    image_prompts: crate::memory::plan::ImagePromptLoad {
                        params: 1 << 30,
                        encoder: Some(shape),
                    },
                    ..Default::default()
                },
                ..bare
            };
            let e = estimate(&fp, &big, &p);
            assert_eq!(e.peak(), e.image_prompts);
        }
    }

    #[test]
    fn reference_units_add_their_banks_and_longer_keys_to_the_unet_stage() {
        let fp = toy();
        let bare = toy_request();
        let with = |references| PlanRequest {
            controlnets: crate::memory::plan::ControlNetLoad {
                references,
                ..Default::default()
            },
            ..bare
        };
        let p = MemoryPlan::cpu(DType::F16);
        let (b, one, two) = (
            estimate(&fp, &bare, &p),
            estimate(&fp, &with(1), &p),
            estimate(&fp, &with(2), &p),
        );
        // No weights: the other stages are as they were.
        assert_eq!((one.text, one.encode, one.vae), (b.text, b.encode, b.vae));
        // 16x16 -> 2x2 latent: 4 tokens of 4 channels, batch 2, f16; 1 layer a block: 3
        // transformer blocks bank 2 * 4 * 4 values each. 2 rows x 2 heads of 4 queries over 8
        // keys instead of 4 (12 bytes a score: f16 scores, their f32 copy and softmax, f16
        // probabilities); the concatenated tokens with keys and values: 3 x 2 * 4 * 4.
        let banks = 3 * 2 * 4 * 4 * 2;
        let scores = 4 * 4 * (8 - 4) * 12;
        let kv = 3 * 2 * 4 * 4 * 2;
        assert_eq!(one.unet - b.unet, banks + scores + kv);
        // Two units: twice the banks, keys three times as many.
        assert_eq!(
            two.unet - b.unet,
            2 * banks + 4 * 4 * (12 - 4) * 12 + 2 * kv
        );
        // SD 1.5 in f16, one image with guidance (2 rows): what one unit adds.
        let sd = crate::memory::plan::tests::sd15();
        for side in [512, 768] {
            let bytes = |slicing| {
                reference_activation_bytes(&sd.shapes, side, side, 2, DType::F16, slicing, 1)
            };
            let (whole, auto) = (bytes(AttentionSlicing::Off), bytes(AttentionSlicing::Auto));
            eprintln!(
                "SD 1.5 {side}x{side}, one reference unit: {} MiB unsliced, {} MiB sliced",
                whole >> 20,
                auto >> 20
            );
            assert!(auto < whole);
        }
    }
}
