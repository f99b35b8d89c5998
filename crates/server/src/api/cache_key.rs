//! The response cache's key for a generation: what makes two requests' images the same.

use sdserve_pipeline::pipeline::GenerationParams;

/// Every parameter that changes the images, the resolved scheduler, the model version (with the
/// VAE, when the request names one) and the
/// adapter folders' fingerprint (a LoRA or embedding replaced under the same name changes the
/// image); init image and mask by the sha256 of their pixels.
pub(super) fn cache_key(p: &GenerationParams, model_version: &str, adapters: &str) -> String {
    let images = match &p.init_image {
        None => "txt2img".to_string(),
        Some(init) => format!(
            "{}\u{0}{}\u{0}{:016x}",
            crate::images::digest(&init.image),
            init.mask
                .as_ref()
                .map_or_else(|| "no mask".to_string(), crate::images::digest),
            init.strength.to_bits()
        ),
    };
    // Every field of the second pass (`Debug` writes floats exactly), and the sigma schedule.
    let images = format!(
        "{images}\u{0}{:?}\u{0}tiling {}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}",
        p.hires,
        p.tiling,
        p.variation,
        p.schedule,
        p.seed_resize_from,
        p.a1111_inpaint,
        p.step_rule
    );
    let images = format!("{images}\u{0}{:?} {:?}", p.resize_mode, p.guidance_rule);
    // Face restoration by its weight (its networks' files are in the model part).
    let images = format!(
        "{images}\u{0}faces {:?}",
        p.face_restore.as_ref().map(|f| f.weight.to_bits())
    );
    let images = format!(
        "{images}\u{0}noise {:016x} {:016x} {}",
        p.noise_multiplier.to_bits(),
        p.extra_noise.to_bits(),
        p.lama_noise
    );
    let (c, g) = (p.churn, p.negative_guidance);
    let images = format!(
        "{images}\u{0}churn {:016x} {:016x} {:016x} {:016x}\u{0}ngms {:016x} {} {:016x}",
        c.churn.to_bits(),
        c.tmin.to_bits(),
        c.tmax.to_bits(),
        c.noise.to_bits(),
        g.min_sigma.to_bits(),
        g.all_steps,
        g.skip_early.to_bits()
    );
    // Each ControlNet by name (its file is in the model part), control image and numbers; the
    // reference units after them (no name).
    let controlnets: Vec<_> = p
        .units_with_references()
        .iter()
        .map(|c| {
            format!(
                "{} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                c.model.name,
                crate::images::digest(&c.image),
                c.preprocessor,
                c.scale,
                c.guidance_start,
                c.guidance_end,
                c.hr_option,
                c.hires_image.as_ref().map(crate::images::digest),
                c.control_mode,
                c.mask.as_ref().map(crate::images::digest),
                c.hires_mask.as_ref().map(crate::images::digest),
            )
        })
        .collect();
    // Each IP-Adapter by name (its files are in the model part), image and scale.
    let ip_adapters: Vec<_> = p
        .ip_adapters
        .iter()
        .map(|u| {
            // An A1111 unit: its images and alphas, window and infotext.
            let extension = u.extension.as_ref().map(|run| {
                let images: Vec<_> = run
                    .images
                    .iter()
                    .map(|i| {
                        let alpha = i.alpha.as_ref().map(|a| {
                            use sha2::Digest as _;
                            sha2::Sha256::digest(a)
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<String>()
                        });
                        (crate::images::digest(&i.image), alpha)
                    })
                    .collect();
                let infotext = run.record.as_ref().map(|r| (r.position, &r.infotext));
                (images, run.guidance_start, run.guidance_end, infotext)
            });
            format!(
                "{} {} {:?} {extension:?}",
                u.model.name,
                crate::images::digest(&u.image),
                u.scale
            )
        })
        .collect();
    let images = format!("{images}\u{0}{controlnets:?}\u{0}{ip_adapters:?}");
    format!(
        "{model_version}\u{0}{adapters}\u{0}{:?}\u{0}{:?}\u{0}{}\u{0}{}x{}\u{0}{}\u{0}{:016x}\u{0}{}\u{0}{:?}\u{0}{}\u{0}{:?}\u{0}{}\u{0}{:?}\u{0}{images}",
        p.prompt,
        p.negative_prompt,
        p.steps,
        p.width,
        p.height,
        p.seed,
        p.guidance_scale.to_bits(),
        p.scheduler.map(|k| k.name()).unwrap_or("default"),
        p.prompt_syntax,
        p.clip_skip,
        p.loras
            .iter()
            .map(|l| (&l.name, l.weight.to_bits()))
            .collect::<Vec<_>>(),
        p.batch_size,
        p.eta.map(f64::to_bits),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_pipeline::pipeline::PromptSyntax;

    use sdserve_pipeline::pipeline::{InitImage, LoraWeight};

    #[test]
    fn cache_key_covers_every_parameter() {
        let base = GenerationParams {
            prompt: "a".into(),
            negative_prompt: String::new(),
            steps: 4,
            width: 256,
            height: 256,
            seed: 1,
            guidance_scale: 7.5,
            scheduler: Some(sdserve_pipeline::schedulers::SchedulerKind::Euler),
            ..Default::default()
        };
        let k = cache_key(&base, "m@1", "f1");
        let pixel = |v: u8| sdserve_pipeline::pipeline::RgbImage {
            width: 1,
            height: 1,
            pixels: vec![v; 3],
        };
        let init = InitImage {
            image: pixel(9),
            mask: None,
            strength: 0.8,
        };
        let variants = [
            GenerationParams {
                prompt: "b".into(),
                ..base.clone()
            },
            GenerationParams {
                lama_noise: false,
                ..base.clone()
            },
            GenerationParams {
                face_restore: Some(crate::face_restorers::named(0.5)),
                ..base.clone()
            },
            GenerationParams {
                face_restore: Some(crate::face_restorers::named(0.7)),
                ..base.clone()
            },
            GenerationParams {
                churn: sdserve_pipeline::schedulers::Churn {
                    churn: 1.0,
                    ..Default::default()
                },
                ..base.clone()
            },
            GenerationParams {
                churn: sdserve_pipeline::schedulers::Churn {
                    tmax: 5.0,
                    ..Default::default()
                },
                ..base.clone()
            },
            GenerationParams {
                negative_guidance: sdserve_pipeline::pipeline::NegativeGuidance {
                    min_sigma: 1.0,
                    all_steps: false,
                    skip_early: 0.0,
                },
                ..base.clone()
            },
            GenerationParams {
                negative_guidance: sdserve_pipeline::pipeline::NegativeGuidance {
                    skip_early: 0.2,
                    ..Default::default()
                },
                ..base.clone()
            },
            GenerationParams {
                negative_prompt: "n".into(),
                ..base.clone()
            },
            GenerationParams {
                steps: 5,
                ..base.clone()
            },
            GenerationParams {
                width: 320,
                ..base.clone()
            },
            GenerationParams {
                height: 320,
                ..base.clone()
            },
            GenerationParams {
                seed: 2,
                ..base.clone()
            },
            GenerationParams {
                guidance_scale: 7.0,
                ..base.clone()
            },
            GenerationParams {
                scheduler: Some(sdserve_pipeline::schedulers::SchedulerKind::Ddim),
                ..base.clone()
            },
            GenerationParams {
                prompt_syntax: PromptSyntax::A1111,
                ..base.clone()
            },
            GenerationParams {
                clip_skip: 2,
                ..base.clone()
            },
            GenerationParams {
                step_rule: sdserve_pipeline::pipeline::StepRule::A1111,
                ..base.clone()
            },
            GenerationParams {
                guidance_rule: sdserve_pipeline::pipeline::GuidanceRule::A1111,
                ..base.clone()
            },
            GenerationParams {
                loras: vec![LoraWeight {
                    name: "x".into(),
                    weight: 0.5,
                }],
                ..base.clone()
            },
            GenerationParams {
                batch_size: 2,
                ..base.clone()
            },
            GenerationParams {
                init_image: Some(init.clone()),
                ..base.clone()
            },
            GenerationParams {
                init_image: Some(InitImage {
                    strength: 0.5,
                    ..init.clone()
                }),
                ..base.clone()
            },
            GenerationParams {
                init_image: Some(InitImage {
                    mask: Some(pixel(255)),
                    ..init.clone()
                }),
                ..base.clone()
            },
            GenerationParams {
                init_image: Some(InitImage {
                    image: pixel(7),
                    ..init.clone()
                }),
                ..base.clone()
            },
        ];
        let hires = sdserve_pipeline::pipeline::Hires {
            width: 512,
            height: 512,
            upscale_width: 512,
            upscale_height: 512,
            upscaler: sdserve_pipeline::pipeline::Upscaler::Resize,
            steps: 4,
            strength: 0.7,
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        };
        let with_hires = |h: sdserve_pipeline::pipeline::Hires| GenerationParams {
            hires: Some(h),
            ..base.clone()
        };
        let hires_variants = [
            with_hires(hires.clone()),
            with_hires(sdserve_pipeline::pipeline::Hires {
                width: 448,
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                upscaler: sdserve_pipeline::pipeline::Upscaler::Lanczos,
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                steps: 5,
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                strength: 0.71,
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                prompt: Some("x".into()),
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                scheduler: Some(sdserve_pipeline::schedulers::SchedulerKind::Euler),
                ..hires.clone()
            }),
            with_hires(sdserve_pipeline::pipeline::Hires {
                scheduler: Some(sdserve_pipeline::schedulers::SchedulerKind::Euler),
                schedule: Some(sdserve_pipeline::schedulers::SigmaSchedule::Beta),
                ..hires.clone()
            }),
        ];
        let hires_keys: std::collections::HashSet<String> = hires_variants
            .iter()
            .map(|v| cache_key(v, "m@1", "f1"))
            .collect();
        assert_eq!(
            hires_keys.len(),
            hires_variants.len(),
            "each hires field counts"
        );
        assert!(!hires_keys.contains(&k));
        for v in variants {
            assert_ne!(cache_key(&v, "m@1", "f1"), k, "{v:?}");
        }
        let resized = |width, height| {
            let from = sdserve_pipeline::pipeline::SeedResize { width, height };
            let p = GenerationParams {
                seed_resize_from: Some(from),
                ..base.clone()
            };
            cache_key(&p, "m@1", "f1")
        };
        assert_ne!(resized(512, 512), k, "a seed resize counts");
        assert_ne!(resized(512, 512), resized(512, 576), "its size counts");
        assert_ne!(cache_key(&base, "m@2", "f1"), k);
        assert_ne!(
            cache_key(&base, "m@1", "f2"),
            k,
            "the adapter folders changed"
        );
        assert_eq!(cache_key(&base.clone(), "m@1", "f1"), k);
    }
}
