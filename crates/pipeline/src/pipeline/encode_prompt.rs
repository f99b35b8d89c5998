//! The `encode_prompt` stage: prompt text to CLIP conditioning (plain or A1111 syntax, clip
//! skip, emphasis, chunks).

use candle_core::{DType, Tensor};

use super::{GenerationParams, PromptSyntax, StableDiffusion};
use crate::prompt::Chunk;
use crate::Result;

impl StableDiffusion {
    /// The text conditioning of a request: its prompt (and negative prompt when classifier-free
    /// guidance is on) read with its `prompt_syntax` and encoded with its `clip_skip`. Prompt and
    /// negative prompt of the same length go through the UNet as one batch; otherwise as two
    /// passes (A1111's default).
    pub fn encode_conditioning(&self, params: &GenerationParams) -> Result<Conditioning> {
        // diffusers' do_classifier_free_guidance: never for a guidance-distilled (LCM) UNet,
        // which takes the guidance scale as an embedding instead (denoise).
        let do_cfg = params.guidance_scale > 1.0 && self.unet_config.time_cond_proj_dim.is_none();
        let cond = self.prompt_chunks(&params.prompt, params.prompt_syntax)?;
        let uncond = match do_cfg {
            true => self.prompt_chunks(&params.negative_prompt, params.prompt_syntax)?,
            false => Vec::new(),
        };
        // Offloaded: the encoder comes to the device once for both prompts. Every chunk of
        // both prompts goes through it as one batch (each row only attends to itself).
        let encoder = self.text_encoder_for_run()?;
        let rows: Vec<&Chunk> = uncond.iter().chain(&cond).collect();
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
        if !do_cfg {
            return Ok(Conditioning::Cond(join_chunks(&z, 0, cond.len())?));
        }
        if uncond.len() == cond.len() {
            if cond.len() == 1 {
                return Ok(Conditioning::Joint(z));
            }
            let u = join_chunks(&z, 0, uncond.len())?;
            let c = join_chunks(&z, uncond.len(), cond.len())?;
            return Ok(Conditioning::Joint(Tensor::cat(&[&u, &c], 0)?));
        }
        Ok(Conditioning::Separate {
            uncond: join_chunks(&z, 0, uncond.len())?,
            cond: join_chunks(&z, uncond.len(), cond.len())?,
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
