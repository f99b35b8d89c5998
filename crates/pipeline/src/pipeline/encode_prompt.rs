//! The `encode_prompt` stage: prompt text to CLIP conditioning (plain or A1111 syntax, clip
//! skip, emphasis, chunks).

use candle_core::{DType, Tensor};

use super::{GenerationParams, PromptSyntax, StableDiffusion};
use crate::prompt::Chunk;
use crate::prompt_schedule::PromptPlan;
use crate::{PipelineError, Result};

impl StableDiffusion {
    /// The text conditioning of a request: its prompt (and negative prompt when classifier-free
    /// guidance is on) read with its `prompt_syntax` and encoded with its `clip_skip`. Prompt and
    /// negative prompt of the same length go through the UNet as one batch; otherwise as two
    /// passes (A1111's default).
    pub fn encode_conditioning(&self, params: &GenerationParams) -> Result<Conditioning> {
        let do_cfg = self.do_cfg(params);
        let texts: Vec<&str> = match do_cfg {
            true => vec![&params.negative_prompt, &params.prompt],
            false => vec![&params.prompt],
        };
        let mut z = self.encode_texts(&texts, params)?;
        let cond = z.pop().expect("one tensor per text");
        let Some(uncond) = z.pop() else {
            return Ok(Conditioning::Cond(cond));
        };
        if uncond.dim(1)? == cond.dim(1)? {
            return Ok(Conditioning::Joint(Tensor::cat(&[&uncond, &cond], 0)?));
        }
        Ok(Conditioning::Separate { uncond, cond })
    }

    /// Whether the negative prompt runs ([`GenerationParams::runs_negative_prompt`]): never for
    /// a guidance-distilled (LCM) UNet, which takes the guidance scale as an embedding instead
    /// (denoise).
    fn do_cfg(&self, params: &GenerationParams) -> bool {
        params.runs_negative_prompt() && !self.is_guidance_distilled()
    }

    /// Each text read with the request's `prompt_syntax` and encoded with its `clip_skip`:
    /// `[1, 77 * chunks, D]` each. Offloaded, the encoder comes to the device once for all of
    /// them; every chunk of every text goes through it as one batch (each row only attends to
    /// itself).
    fn encode_texts(&self, texts: &[&str], params: &GenerationParams) -> Result<Vec<Tensor>> {
        let chunked = texts
            .iter()
            .map(|t| self.prompt_chunks(t, params.prompt_syntax))
            .collect::<Result<Vec<_>>>()?;
        let encoder = self.text_encoder_for_run()?;
        let rows: Vec<&Chunk> = chunked.iter().flatten().collect();
        let len = rows[0].ids.len();
        let ids: Vec<u32> = rows.iter().flat_map(|c| c.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), len), &self.device)?;
        let z = encoder.forward_skip(&ids, params.clip_skip, self.embedding_vectors.as_ref())?;
        drop(encoder);
        let z = if rows.iter().all(|c| c.unweighted()) {
            z
        } else {
            let weighted = rows
                .iter()
                .enumerate()
                .map(|(i, c)| emphasis(&z.narrow(0, i, 1)?, c))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&weighted, 0)?
        };
        let mut start = 0;
        let mut out = Vec::with_capacity(texts.len());
        for chunks in &chunked {
            out.push(join_chunks(&z, start, chunks.len())?);
            start += chunks.len();
        }
        Ok(out)
    }

    /// The conditioning of every UNet evaluation of one pass: A1111's prompt editing,
    /// alternation and AND parts (`prompt_syntax: a1111`), each distinct text encoded once.
    /// `steps`/`hires_steps` as [`crate::prompt_schedule::schedule`] takes them (A1111's
    /// counts: the steps times the sampler's evaluations per step). A prompt without any of
    /// these is encoded as [`encode_conditioning`](Self::encode_conditioning) does.
    pub fn encode_schedule(
        &self,
        params: &GenerationParams,
        steps: usize,
        hires_steps: Option<usize>,
    ) -> Result<ScheduledConditioning> {
        let fixed = |c| ScheduledConditioning {
            steps,
            inner: Schedule::Fixed(c),
        };
        if params.prompt_syntax == PromptSyntax::Plain {
            return Ok(fixed(self.encode_conditioning(params)?));
        }
        let do_cfg = self.do_cfg(params);
        let mut plan = PromptPlan::new(&params.prompt, None, steps, hires_steps);
        if plan.composed() && self.is_guidance_distilled() {
            return Err(PipelineError::InvalidRequest(
                "AND parts and prompt weights (`a :1.2`) combine classifier-free guidance \
                 predictions; a guidance-distilled (LCM) model makes none"
                    .into(),
            ));
        }
        if do_cfg || plan.composed() {
            plan = PromptPlan::new(
                &params.prompt,
                Some(&params.negative_prompt),
                steps,
                hires_steps,
            );
        }
        let single = |s: &[(usize, usize)], text: &str| s.len() == 1 && plan.texts[s[0].1] == text;
        if !plan.composed()
            && single(&plan.parts[0].1, &params.prompt)
            && plan
                .negative
                .as_ref()
                .is_none_or(|n| single(n, &params.negative_prompt))
        {
            return Ok(fixed(self.encode_conditioning(params)?));
        }
        let texts: Vec<&str> = plan.texts.iter().map(String::as_str).collect();
        let embeddings = self.encode_texts(&texts, params)?;
        Ok(ScheduledConditioning {
            steps,
            inner: Schedule::Planned {
                cfg: do_cfg,
                plan,
                embeddings,
            },
        })
    }

    /// Token rows of one prompt: one row of exactly `max_length` ids for `Plain` (diffusers'
    /// truncation), chunks of `BOS + 75 + EOS` with weights for `A1111`.
    fn prompt_chunks(&self, text: &str, syntax: PromptSyntax) -> Result<Vec<Chunk>> {
        match syntax {
            PromptSyntax::Plain => {
                let ids = self.tokenizer.encode(text)?;
                let weights = vec![1.0; ids.len()];
                Ok(vec![Chunk { ids, weights }])
            }
            PromptSyntax::A1111 => {
                crate::prompt::chunks(&self.tokenizer, &crate::prompt::parse_attention(text))
            }
        }
    }

    /// CLIP embeddings, `[uncond, cond]` along the batch when classifier-free guidance is on
    /// (plain prompts, last layer; never for a guidance-distilled UNet).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        do_cfg: bool,
    ) -> Result<Tensor> {
        let params = GenerationParams {
            prompt: prompt.into(),
            negative_prompt: negative_prompt.into(),
            guidance_scale: if do_cfg { 7.5 } else { 1.0 },
            ..Default::default()
        };
        match self.encode_conditioning(&params)? {
            Conditioning::Cond(z) | Conditioning::Joint(z) => Ok(z),
            Conditioning::Separate { uncond, cond } => Ok(Tensor::cat(&[&uncond, &cond], 0)?),
        }
    }
}

/// Text conditioning for the denoising loop.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// Guidance off: the prompt's embeddings, `[1, L, D]`.
    Cond(Tensor),
    /// `[uncond, cond]` as one batch, `[2, L, D]`.
    Joint(Tensor),
    /// Prompt and negative prompt of different lengths: two UNet passes per step.
    Separate { uncond: Tensor, cond: Tensor },
}

/// A pass's text conditioning over its UNet evaluations ([`StableDiffusion::encode_schedule`]).
#[derive(Debug, Clone)]
pub struct ScheduledConditioning {
    /// The step count the schedules were made for (A1111's count).
    steps: usize,
    inner: Schedule,
}

#[derive(Debug, Clone)]
enum Schedule {
    /// The same at every evaluation.
    Fixed(Conditioning),
    /// `embeddings[i]` is `plan.texts[i]` encoded, `[1, L_i, D]`.
    Planned {
        plan: PromptPlan,
        embeddings: Vec<Tensor>,
        cfg: bool,
    },
}

/// What one UNet evaluation is conditioned on.
#[derive(Debug, Clone)]
pub(crate) enum StepConditioning {
    Single(Conditioning),
    /// AND parts (composable diffusion): `conds` `[P, L, D]` (padded to one length), one weight
    /// each, and the negative prompt's `[1, L', D]`.
    Composed {
        uncond: Tensor,
        conds: Tensor,
        weights: Vec<f64>,
    },
}

impl StepConditioning {
    /// The conditioning of an evaluation that skips the negative prompt (A1111's `skip_uncond`):
    /// the prompt alone, unguided; AND parts keep their weights against the first part, which
    /// stands in for the negative prompt (A1111's `fake_uncond`, guidance 1).
    pub(crate) fn prompt_only(self) -> Result<Self> {
        Ok(match self {
            StepConditioning::Single(Conditioning::Joint(e)) => {
                StepConditioning::Single(Conditioning::Cond(e.narrow(0, 1, 1)?))
            }
            StepConditioning::Single(Conditioning::Separate { cond, .. }) => {
                StepConditioning::Single(Conditioning::Cond(cond))
            }
            StepConditioning::Composed { conds, weights, .. } => StepConditioning::Composed {
                uncond: conds.narrow(0, 0, 1)?,
                conds,
                weights,
            },
            single => single,
        })
    }
}

impl ScheduledConditioning {
    /// The step count the schedules were made for (a hires pass's schedules go on from it).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// True when every evaluation takes the same conditioning and the prompt has no AND.
    pub fn is_fixed(&self) -> bool {
        matches!(self.inner, Schedule::Fixed(_))
    }

    /// The conditioning of UNet evaluation `step` (0-based, as A1111's denoiser counts).
    pub(crate) fn at(&self, step: usize) -> Result<StepConditioning> {
        let (plan, embeddings, cfg) = match &self.inner {
            Schedule::Fixed(c) => return Ok(StepConditioning::Single(c.clone())),
            Schedule::Planned {
                plan,
                embeddings,
                cfg,
            } => (plan, embeddings, *cfg),
        };
        let (parts, negative) = plan.at(step);
        let negative = negative.map(|i| &embeddings[i]);
        if !plan.composed() {
            let cond = embeddings[parts[0].0].clone();
            return Ok(StepConditioning::Single(match negative.filter(|_| cfg) {
                None => Conditioning::Cond(cond),
                Some(u) if u.dim(1)? == cond.dim(1)? => {
                    Conditioning::Joint(Tensor::cat(&[u, &cond], 0)?)
                }
                Some(u) => Conditioning::Separate {
                    uncond: u.clone(),
                    cond,
                },
            }));
        }
        // A1111's stack_conds: a shorter part repeats its last token's vector up to the longest.
        let len = parts
            .iter()
            .map(|(i, _)| embeddings[*i].dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let conds = parts
            .iter()
            .map(|(i, _)| {
                let e = &embeddings[*i];
                let short = len - e.dim(1)?;
                if short == 0 {
                    return Ok(e.clone());
                }
                let last = e.narrow(1, e.dim(1)? - 1, 1)?;
                let pad = last.broadcast_as((1, short, e.dim(2)?))?;
                Ok(Tensor::cat(&[e, &pad.contiguous()?], 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StepConditioning::Composed {
            uncond: negative
                .expect("a composed plan has the negative prompt's schedule")
                .clone(),
            conds: Tensor::cat(&conds, 0)?,
            weights: parts.iter().map(|(_, w)| *w).collect(),
        })
    }
}

/// A1111's emphasis on one encoded chunk `z` `[1, L, D]`: `m0 = mean(z)`, `z *= weight` per token,
/// `z *= m0 / mean(z)`; computed in f32.
fn emphasis(z: &Tensor, chunk: &Chunk) -> Result<Tensor> {
    if chunk.unweighted() {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let before = z.mean_all()?;
    let weights = Tensor::from_slice(&chunk.weights, (1, chunk.weights.len(), 1), z.device())?;
    let z = z.broadcast_mul(&weights)?;
    let after = z.mean_all()?;
    let ratio = (before / after)?;
    Ok(z.broadcast_mul(&ratio)?.to_dtype(dtype)?)
}

/// Rows `start..start + count` of `z` `[R, L, D]` joined along the sequence: `[1, count * L, D]`.
fn join_chunks(z: &Tensor, start: usize, count: usize) -> Result<Tensor> {
    if count == 1 {
        return Ok(z.narrow(0, start, 1)?);
    }
    let rows = (start..start + count)
        .map(|i| z.narrow(0, i, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 1)?)
}
