//! The LoRA figures of the stages bench (`--lora`, and with `--offload` the offloaded builds).

use candle_core::DType;
use sdserve_pipeline::memory::Offload;
use sdserve_pipeline::pipeline::{GenerationParams, LoraWeight, StableDiffusion};
use sdserve_pipeline::rng::TorchRng;

use super::{reset_peak_rss, stat_of, status_kb, time_once, Args, Stat};

/// What a request with the LoRA `name` (weight 1) costs: the merge and the restore on their own,
/// then whole text-to-image generations with the LoRA from base weights (merge included) and
/// without it right after (restore included), interleaved so both see the same machine load.
pub(super) fn lora_stats(
    model: &StableDiffusion,
    name: &str,
    args: &Args,
    prompt: &str,
) -> Vec<Stat> {
    let with = [LoraWeight {
        name: name.to_owned(),
        weight: 1.0,
    }];
    let mut stats = Vec::new();
    let (mut merges, mut restores) = (Vec::new(), Vec::new());
    reset_peak_rss();
    for _ in 0..args.repeats.max(3) {
        merges.push(time_once(&mut || {
            model.prepare_loras(&with).expect("merge")
        }));
        restores.push(time_once(&mut || {
            model.prepare_loras(&[]).expect("restore")
        }));
    }
    let peak = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
    stats.push(stat_of(&format!("lora_merge_{name}"), merges, peak));
    stats.push(stat_of(&format!("lora_restore_{name}"), restores, peak));
    if model.memory_plan().offload != Offload::None {
        stats.extend(offloaded_lora_stats(
            model,
            &with,
            args.repeats.max(3),
            prompt,
        ));
    }
    let steps = args.lora_steps.unwrap_or(args.steps);
    for &size in &args.lora_sizes {
        let base = GenerationParams {
            prompt: prompt.into(),
            steps,
            width: size,
            height: size,
            ..Default::default()
        };
        let lora = GenerationParams {
            loras: with.to_vec(),
            ..base.clone()
        };
        let run = |p: &GenerationParams| {
            model
                .generate(p, &mut |_| std::ops::ControlFlow::Continue(()))
                .expect("generate");
        };
        let (mut with_lora, mut without) = (Vec::new(), Vec::new());
        reset_peak_rss();
        for _ in 0..args.repeats.clamp(1, 2) {
            with_lora.push(time_once(&mut || run(&lora)));
            without.push(time_once(&mut || run(&base)));
        }
        let peak = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
        let w = stat_of(
            &format!("generate_{steps}steps_{size}_lora"),
            with_lora,
            peak,
        );
        let b = stat_of(
            &format!("generate_{steps}steps_{size}_after_lora"),
            without,
            peak,
        );
        eprintln!(
            "    with LoRA / without: {:.3} (wall), {:.3} (cpu)",
            w.median_s / b.median_s,
            w.cpu_median_s / b.cpu_median_s
        );
        stats.extend([w, b]);
    }
    stats
}

/// Under offload, what LoRAs add to a run's builds: a prompt encode and one UNet pass on an 8x8
/// latent (both parts built for the call, as a run builds them) with a new LoRA set (`_first`),
/// with the same set again (`_again`), and without LoRA (`_base`). `_again` - `_base` is what a
/// LoRA costs each run that repeats the last run's set.
fn offloaded_lora_stats(
    model: &StableDiffusion,
    with: &[LoraWeight],
    repeats: usize,
    prompt: &str,
) -> Vec<Stat> {
    let channels = model.unet_in_channels();
    let latents = TorchRng::new(0)
        .randn_tensor((1, channels, 8, 8), model.device(), DType::F32)
        .expect("noise");
    let builds = || {
        let embeddings = model.encode_prompt(prompt, "", true).expect("encode");
        model
            .predict_noise(&latents, 500.0, &embeddings, 7.5)
            .expect("unet");
    };
    let name = &with[0].name;
    let (mut first, mut again, mut base) = (Vec::new(), Vec::new(), Vec::new());
    reset_peak_rss();
    for _ in 0..repeats {
        model.prepare_loras(&[]).expect("restore");
        base.push(time_once(&mut || builds()));
        first.push(time_once(&mut || {
            model.prepare_loras(with).expect("merge");
            builds()
        }));
        again.push(time_once(&mut || builds()));
    }
    let peak = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let stats = vec![
        stat_of(&format!("offload_builds_{name}_first"), first, peak),
        stat_of(&format!("offload_builds_{name}_again"), again, peak),
        stat_of("offload_builds_base", base, peak),
    ];
    eprintln!(
        "    LoRA per run, same set: {:.3} CPU-s; new set: {:.3} CPU-s",
        stats[1].cpu_median_s - stats[2].cpu_median_s,
        stats[0].cpu_median_s - stats[2].cpu_median_s
    );
    stats
}
