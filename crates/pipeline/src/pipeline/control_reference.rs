//! The sd-webui-controlnet extension's reference units in the denoising loop (scripts/hook.py,
//! "Handle attention and AdaIn control"). Before every UNet evaluation, each unit that steers
//! it (its guidance window and `hr_option`) noises its image's latents to the evaluation's
//! timestep (`predict_q_sample` at the timestep rounded half to even) and runs the UNet on them
//! once with the evaluation's prompts, its hooks writing ([`ReferenceBanks`]); the evaluation
//! then reads the banks. An inpainting (9-channel) UNet's reference input is the noised
//! latents, a zero mask and the latents (the extension's "Inpaint Hijack").
//!
//! The latents are the VAE distribution's mean times the scaling factor (the extension samples
//! them from torch's global generator, as for `inpaint_only`'s restore). `predict_q_sample`'s
//! noise is `torch.randn_like` there: torch's global generator, a stream apart from the
//! sampler's (A1111 draws the sampler's noise from each image's own generator, `ImageRNG`), so
//! a reference unit moves no ancestral draw. Here each image has a generator of its own for
//! it, seeded with the image's seed plus [`REFERENCE_SEED_OFFSET`] at the start of every pass
//! (A1111 seeds the global generator again in each pass's `ImageRNG.first`), drawing a
//! `[rows of the image, c, h, w]` tensor at each evaluation for its rows i, i + n, ...: a seed
//! repeats the image, and the sampler's draws are those of the request without the units.

use std::cell::RefCell;

use candle_core::{DType, Tensor};

use super::control::ControlPass;
use super::{GenerationParams, StableDiffusion};
use crate::controlnet::{CondRows, ReferenceUnit};
use crate::image_in::resize_lanczos;
use crate::rng::TorchRng;
use crate::unet::{ReferenceBanks, UNet2DConditionModel};
use crate::{PipelineError, Result};

/// What the seed of image i's reference-noise generator adds to the image's seed: 2^31, so
/// the generator (an MT19937 of the seed's low 32 bits) runs a stream that no image of a
/// batch (seeds `seed + i`) samples with.
pub(crate) const REFERENCE_SEED_OFFSET: u64 = 1 << 31;

/// A pass's reference units with their images' latents, the UNet's hooks, and the images'
/// generators for `predict_q_sample`'s noise.
pub(super) struct References {
    units: Vec<(ReferenceUnit, Tensor)>,
    banks: ReferenceBanks,
    hires: bool,
    rngs: RefCell<Vec<TorchRng>>,
}

impl StableDiffusion {
    /// The request's reference units that steer `pass`, each with the VAE latents
    /// (`[1, c, h / f, w / f]`) of its image (its hires image in the hires pass) resized to the
    /// pass's size; `None` without any. Refuses a UNet without the blocks the extension hooks.
    pub(super) fn prepare_references(
        &self,
        params: &GenerationParams,
        pass: ControlPass,
    ) -> Result<Option<References>> {
        let hires = pass == ControlPass::Hires;
        let steering: Vec<&ReferenceUnit> = params
            .references
            .iter()
            .filter(|u| u.hr_option.steers(hires, pass != ControlPass::Only))
            .collect();
        if steering.is_empty() {
            return Ok(None);
        }
        let banks = ReferenceBanks::new(&self.unet_config).map_err(|e| {
            PipelineError::InvalidRequest(format!("this model cannot run reference units: {e}"))
        })?;
        let (w, h) = (params.width, params.height);
        let mut units = Vec::with_capacity(steering.len());
        for unit in steering {
            let image = match (hires, &unit.hires_image) {
                (true, Some(i)) => i,
                _ => &unit.image,
            };
            if image.width == 0 || image.height == 0 {
                return Err(PipelineError::InvalidRequest(format!(
                    "the {} unit's image is empty",
                    unit.kind.name()
                )));
            }
            let x =
                crate::image_in::image_tensor(&resize_lanczos(image, w, h), w, h, &self.device)?;
            let latents = (self.encode_images(&[&x])?[0].mean.to_dtype(DType::F32)?
                * self.vae_scaling_factor)?;
            units.push((unit.clone(), latents));
        }
        let rngs = (0..params.batch_size)
            .map(|i| TorchRng::new(params.image_seed(i).wrapping_add(REFERENCE_SEED_OFFSET)))
            .collect();
        Ok(Some(References {
            units,
            banks,
            hires,
            rngs: RefCell::new(rngs),
        }))
    }
}

/// What a UNet evaluation's reference passes take.
pub(super) struct Evaluation<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// The UNet's input `[rows, in_channels, h, w]`, its timesteps and prompts.
    pub x: &'a Tensor,
    pub t: &'a Tensor,
    pub embeddings: &'a Tensor,
    pub timestep_cond: Option<&'a Tensor>,
    pub cond: CondRows,
    /// The step (UNet evaluations of the pass) and how many.
    pub step: usize,
    pub steps: usize,
    /// The training noise level at the timestep rounded half to even.
    pub sigma: f64,
}

impl References {
    /// Runs the reference pass of each unit that steers `e` (in unit order) and returns the
    /// banks for the evaluation to read; `None` where no unit steers it.
    pub(super) fn write(&self, e: &Evaluation<'_>) -> Result<Option<&ReferenceBanks>> {
        let steering: Vec<_> = self
            .units
            .iter()
            .filter(|(u, _)| u.steers(e.step, e.steps))
            .collect();
        if steering.is_empty() {
            return Ok(None);
        }
        let (rows, channels, h, w) = e.x.dims4()?;
        self.banks.begin(e.cond.first(rows).unwrap_or(rows));
        // predict_q_sample: sqrt(ac) x0 + sqrt(1 - ac) noise, with ac = 1 / (1 + sigma^2).
        let norm = (1.0 + e.sigma * e.sigma).sqrt();
        let (a, b) = (1.0 / norm, e.sigma / norm);
        for (unit, latents) in steering {
            let c = latents.dim(1)?;
            let noise = self.noise((rows, c, h, w), latents)?;
            let x0 = latents.broadcast_as((rows, c, h, w))?;
            let mut input = ((&x0 * a)? + (noise * b)?)?;
            if channels == 2 * c + 1 {
                let zeros = Tensor::zeros((rows, 1, h, w), DType::F32, latents.device())?;
                input = Tensor::cat(&[&input, &zeros, &x0.contiguous()?], 1)?;
            }
            let weight = Some(unit.weight);
            self.banks.write(
                weight.filter(|_| unit.kind.attention()),
                weight.filter(|_| unit.kind.adain()),
                unit.fidelity(self.hires),
            );
            let run = e.unet.forward_hooked(
                &input,
                e.t,
                e.embeddings,
                e.timestep_cond,
                (None, None),
                Some(&self.banks),
            );
            self.banks.read();
            run?;
        }
        Ok(Some(&self.banks))
    }

    /// `[rows, c, h, w]` normals: image i's rows (i, i + n, ... for n images) from its
    /// reference generator, drawn in one tensor per image, the images in order.
    fn noise(
        &self,
        (rows, c, h, w): (usize, usize, usize, usize),
        like: &Tensor,
    ) -> Result<Tensor> {
        let mut rngs = self.rngs.borrow_mut();
        let n = rngs.len();
        if n == 0 || !rows.is_multiple_of(n) {
            return Err(PipelineError::InvalidRequest(format!(
                "a UNet batch of {rows} rows for {n} images"
            )));
        }
        let per = c * h * w;
        let mut all = vec![0f32; rows * per];
        for (i, rng) in rngs.iter_mut().enumerate() {
            let drawn = rng.randn(rows / n * per);
            for (k, row) in drawn.chunks_exact(per).enumerate() {
                let r = i + k * n;
                all[r * per..(r + 1) * per].copy_from_slice(row);
            }
        }
        Ok(Tensor::from_vec(all, (rows, c, h, w), like.device())?)
    }
}
