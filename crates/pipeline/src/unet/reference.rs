//! The sd-webui-controlnet extension's reference hooks inside the UNet (scripts/hook.py:
//! `hacked_basic_transformer_inner_forward`, `hacked_group_norm_forward` and the lists they are
//! installed on). A reference pass runs the UNet in "write" mode: each self-attention whose
//! threshold is below the unit's weight banks its normed input (reference_only), each hooked
//! block banks its output's per-channel mean and variance (reference_adain). The real pass then
//! reads: self-attention attends over its own tokens and the banked ones, hooked outputs are
//! renormalised to the banked statistics (AdaIN); the negative prompt's rows are mixed back
//! towards the plain result by the style fidelity. Reading empties the banks.
//!
//! Which modules are hooked, in the extension's terms (ldm's `UNetModel`): every transformer
//! block, sorted by width (widest first, a stable sort of the model's module order: input
//! blocks, middle block, output blocks), the i-th of n at threshold `i / n`; the middle block
//! at 0, input blocks 4, 5, 7, 8, 10, 11 at `2 (1 - w / 6)` and output blocks 0..=7 at
//! `2 w / 8` (w their place in those lists; SD 1.x / 2.x's indices, which the extension fixes).
//! An ldm input block is a down block's resnet with its attention, or its downsampler; an
//! output block an up block's resnet with its attention and, last in the block, the upsampler.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use super::config::UNetConfig;

/// The extension's AdaIN epsilon (`hacked_group_norm_forward`).
const ADAIN_EPS: f64 = 1e-6;
/// ldm input blocks the extension renormalises (SD 1.x / 2.x).
const INPUT_BLOCKS: [usize; 6] = [4, 5, 7, 8, 10, 11];
/// ldm output blocks the extension renormalises.
const OUTPUT_BLOCKS: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
/// Below this style fidelity the negative prompt's rows are not recomputed (the extension's
/// `style_cfg > 1e-5`).
const MIN_FIDELITY: f64 = 1e-5;

/// The key of a down block's output that the hook may renormalise: its `layer`-th resnet (with
/// its attention), or with `None` its downsampler.
pub(crate) fn down_key(block: &str, layer: Option<usize>) -> String {
    match layer {
        Some(j) => format!("{block}.{j}"),
        None => format!("{block}.down"),
    }
}

#[derive(Debug, Default)]
struct AttentionBank {
    tokens: Vec<Tensor>,
    fidelities: Vec<f64>,
}

#[derive(Debug, Default)]
struct StatsBank {
    means: Vec<Tensor>,
    vars: Vec<Tensor>,
    fidelities: Vec<f64>,
}

#[derive(Debug, Default)]
struct HookState {
    /// `Some(weight)`: the attention hooks write (`attention_auto_machine == Write`).
    attention_write: Option<f64>,
    /// `Some(weight)`: the GroupNorm hooks write.
    stats_write: Option<f64>,
    fidelity: f64,
    /// The call's negative-prompt rows: the first `uc_rows` of the batch.
    uc_rows: usize,
    attention: HashMap<String, AttentionBank>,
    stats: HashMap<String, StatsBank>,
}

/// The hooks' thresholds for one UNet and their banks (one request's, used by one thread).
#[derive(Debug)]
pub struct ReferenceBanks {
    attention_thresholds: HashMap<String, f64>,
    stats_thresholds: HashMap<String, f64>,
    state: RefCell<HookState>,
}

impl ReferenceBanks {
    /// The extension's module lists for `config`'s UNet; refuses a UNet whose layout lacks
    /// the ldm blocks the extension indexes (it would fail there).
    pub fn new(config: &UNetConfig) -> std::result::Result<Self, String> {
        let r = config.resolve()?;
        let n = config.block_out_channels.len();
        // Transformer blocks in ldm's module order (input, middle, output) with their widths.
        let mut blocks: Vec<(String, usize)> = Vec::new();
        let cross = config.cross_attentions()?;
        let key = |name: &str| name.trim_end_matches(".attn2").to_string();
        for part in ["down_blocks.", "mid_block.", "up_blocks."] {
            for c in cross.iter().filter(|c| c.name.starts_with(part)) {
                blocks.push((key(&c.name), c.hidden_size));
            }
        }
        blocks.sort_by_key(|(_, width)| std::cmp::Reverse(*width));
        let count = blocks.len() as f64;
        let attention_thresholds = blocks
            .into_iter()
            .enumerate()
            .map(|(i, (k, _))| (k, i as f64 / count))
            .collect();

        let mut inputs = Vec::new();
        for l in 0..n {
            for j in 0..r.layers[l] {
                inputs.push(down_key(&format!("down_blocks.{l}"), Some(j)));
            }
            if l + 1 < n {
                inputs.push(down_key(&format!("down_blocks.{l}"), None));
            }
        }
        let mut outputs = Vec::new();
        for i in 0..n {
            for j in 0..=r.layers[n - 1 - i] {
                outputs.push(format!("up_blocks.{i}.{j}"));
            }
        }
        let mut stats_thresholds = HashMap::new();
        if !r.mid_cross_attn {
            return Err("reference_adain needs a UNet with a mid block".into());
        }
        stats_thresholds.insert("mid_block".to_string(), 0.0);
        for (w, &i) in INPUT_BLOCKS.iter().enumerate() {
            // ldm's input_blocks[0] is conv_in.
            let Some(k) = inputs.get(i - 1) else {
                return Err(format!(
                    "the reference modules renormalise ldm input block {i}; this UNet has {}",
                    inputs.len() + 1
                ));
            };
            let t = 1.0 - w as f64 / INPUT_BLOCKS.len() as f64;
            stats_thresholds.insert(k.clone(), 2.0 * t);
        }
        for (w, &i) in OUTPUT_BLOCKS.iter().enumerate() {
            let Some(k) = outputs.get(i) else {
                return Err(format!(
                    "the reference modules renormalise ldm output block {i}; this UNet has {}",
                    outputs.len()
                ));
            };
            stats_thresholds.insert(k.clone(), 2.0 * w as f64 / OUTPUT_BLOCKS.len() as f64);
        }
        Ok(Self {
            attention_thresholds,
            stats_thresholds,
            state: RefCell::default(),
        })
    }

    /// A new UNet evaluation: the banks emptied (the extension's "Clear attention and AdaIn
    /// cache"), both hooks reading, `uc_rows` the leading rows of the negative prompt.
    pub fn begin(&self, uc_rows: usize) {
        let mut s = self.state.borrow_mut();
        *s = HookState {
            uc_rows,
            ..HookState::default()
        };
    }

    /// A reference pass: the attention hooks write where `attention` holds the unit's weight,
    /// the GroupNorm hooks where `stats` does; the other kind keeps reading. `fidelity` goes
    /// into the banks with what they store.
    pub fn write(&self, attention: Option<f64>, stats: Option<f64>, fidelity: f64) {
        let mut s = self.state.borrow_mut();
        s.attention_write = attention;
        s.stats_write = stats;
        s.fidelity = fidelity;
    }

    /// Both hooks back to reading (after a reference pass).
    pub fn read(&self) {
        let mut s = self.state.borrow_mut();
        s.attention_write = None;
        s.stats_write = None;
    }

    /// A transformer block's self-attention (`key` its module path) of the normed input `n`,
    /// plus the residual `x`: `attn(n, context, x)` computes `to_out(attention) + x` with
    /// `None` for self-attention over `n`.
    pub(crate) fn self_attention(
        &self,
        key: &str,
        n: &Tensor,
        x: &Tensor,
        attn: impl Fn(&Tensor, Option<&Tensor>, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let threshold = self.attention_thresholds.get(key).copied();
        let bank = {
            let mut s = self.state.borrow_mut();
            if let Some(weight) = s.attention_write {
                if threshold.is_some_and(|t| weight > t) {
                    let fidelity = s.fidelity;
                    let b = s.attention.entry(key.to_string()).or_default();
                    b.tokens.push(n.clone());
                    b.fidelities.push(fidelity);
                }
                None
            } else {
                s.attention.remove(key).map(|b| (b, s.uc_rows))
            }
        };
        let Some((bank, uc_rows)) = bank.filter(|(b, _)| !b.tokens.is_empty()) else {
            return attn(n, None, x);
        };
        let fidelity = mean(&bank.fidelities);
        let mut context = vec![n.clone()];
        context.extend(bank.tokens);
        let with_bank = attn(n, Some(&Tensor::cat(&context, 1)?), x)?;
        mix_uc_rows(&with_bank, uc_rows, fidelity, |k| {
            attn(&n.narrow(0, 0, k)?, None, &x.narrow(0, 0, k)?)
        })
    }

    /// A hooked block's output `x` (`key`: see the module's doc): its statistics banked, or
    /// renormalised to the banked ones; unchanged otherwise.
    pub(crate) fn group_norm(&self, key: &str, x: &Tensor) -> Result<Tensor> {
        let Some(&threshold) = self.stats_thresholds.get(key) else {
            return Ok(x.clone());
        };
        let mut s = self.state.borrow_mut();
        if let Some(weight) = s.stats_write {
            if weight > threshold {
                let (mean, var) = var_mean(x)?;
                let fidelity = s.fidelity;
                let b = s.stats.entry(key.to_string()).or_default();
                b.means.push(mean);
                b.vars.push(var);
                b.fidelities.push(fidelity);
            }
            return Ok(x.clone());
        }
        let uc_rows = s.uc_rows;
        let Some(bank) = s.stats.remove(key).filter(|b| !b.means.is_empty()) else {
            return Ok(x.clone());
        };
        drop(s);
        let fidelity = mean(&bank.fidelities);
        let x32 = x.to_dtype(DType::F32)?;
        let (mean_x, var_x) = var_mean(&x32)?;
        let std_x = var_x.maximum(ADAIN_EPS)?.sqrt()?;
        let count = bank.means.len() as f64;
        let mean_ref = (Tensor::stack(&bank.means, 0)?.sum(0)? / count)?;
        let var_ref = (Tensor::stack(&bank.vars, 0)?.sum(0)? / count)?;
        let std_ref = var_ref.maximum(ADAIN_EPS)?.sqrt()?;
        let adain = x32
            .broadcast_sub(&mean_x)?
            .broadcast_div(&std_x)?
            .broadcast_mul(&std_ref)?
            .broadcast_add(&mean_ref)?;
        let y = mix_uc_rows(&adain, uc_rows, fidelity, |k| x32.narrow(0, 0, k))?;
        y.to_dtype(x.dtype())
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// `fidelity * c + (1 - fidelity) * with_bank`, where `c` is `with_bank` with its first
/// `uc_rows` rows replaced by `plain(uc_rows)` (the extension's `self_attn1_c` / `y_c`); just
/// `with_bank` where no row or no fidelity asks for it.
fn mix_uc_rows(
    with_bank: &Tensor,
    uc_rows: usize,
    fidelity: f64,
    plain: impl FnOnce(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    if uc_rows == 0 || fidelity <= MIN_FIDELITY {
        return Ok(with_bank.clone());
    }
    let rows = with_bank.dim(0)?;
    let mut parts = vec![plain(uc_rows)?.to_dtype(with_bank.dtype())?];
    if uc_rows < rows {
        parts.push(with_bank.narrow(0, uc_rows, rows - uc_rows)?);
    }
    let c = Tensor::cat(&parts, 0)?;
    (c * fidelity)? + (with_bank * (1.0 - fidelity))?
}

/// Per row and channel of `[B, C, H, W]`: (mean, population variance), `[B, C, 1, 1]` f32
/// (`torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)`).
fn var_mean(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c, _, _) = x.dims4()?;
    let flat = x.to_dtype(DType::F32)?.flatten_from(2)?;
    let mean = flat.mean_keepdim(2)?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    Ok((mean.reshape((b, c, 1, 1))?, var.reshape((b, c, 1, 1))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UNetConfig {
        serde_json::from_str(
            r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D"], "attention_head_dim": 8}"#,
        )
        .unwrap()
    }

    #[test]
    fn thresholds_follow_the_extension_on_sd15() {
        let b = ReferenceBanks::new(&sd15()).unwrap();
        let a = &b.attention_thresholds;
        assert_eq!(a.len(), 16);
        // Widest first in module order: input blocks 7, 8, the middle, output blocks 3..=5.
        assert_eq!(a["down_blocks.2.attentions.0.transformer_blocks.0"], 0.0);
        assert_eq!(
            a["down_blocks.2.attentions.1.transformer_blocks.0"],
            1.0 / 16.0
        );
        assert_eq!(a["mid_block.attentions.0.transformer_blocks.0"], 2.0 / 16.0);
        assert_eq!(
            a["up_blocks.1.attentions.2.transformer_blocks.0"],
            5.0 / 16.0
        );
        assert_eq!(
            a["down_blocks.1.attentions.0.transformer_blocks.0"],
            6.0 / 16.0
        );
        assert_eq!(
            a["up_blocks.3.attentions.2.transformer_blocks.0"],
            15.0 / 16.0
        );
        let s = &b.stats_thresholds;
        assert_eq!(s.len(), 15);
        // input_blocks[4] = down_blocks.1's first resnet; [10] = down_blocks.3's first.
        assert_eq!(s["down_blocks.1.0"], 2.0);
        assert_eq!(s["down_blocks.3.1"], 2.0 * (1.0 - 5.0 / 6.0));
        assert_eq!(s["mid_block"], 0.0);
        assert_eq!(s["up_blocks.0.0"], 0.0);
        assert_eq!(s["up_blocks.2.1"], 2.0 * 7.0 / 8.0);
        assert!(!s.contains_key("down_blocks.0.down"));
    }

    #[test]
    fn a_unet_without_the_indexed_blocks_is_refused() {
        let mut c = sd15();
        c.block_out_channels = vec![32, 64];
        c.down_block_types = vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()];
        c.up_block_types = vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()];
        let e = ReferenceBanks::new(&c).err().unwrap();
        assert!(e.contains("input block 7"), "{e}");
    }

    #[test]
    fn adain_takes_the_banked_statistics_and_mixes_the_uc_rows() -> Result<()> {
        let b = ReferenceBanks::new(&sd15()).unwrap();
        let dev = candle_core::Device::Cpu;
        let key = "mid_block";
        let reference = (Tensor::randn(0f32, 3.0, (2, 4, 5, 5), &dev)? + 7.0)?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 5, 5), &dev)?;
        b.begin(1);
        b.write(None, Some(1.0), 0.5);
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        // Writing leaves the output as it is.
        assert_eq!(close(&b.group_norm(key, &reference)?, &reference)?, 0.0);
        b.read();
        let y = b.group_norm(key, &x)?;
        let (m_ref, v_ref) = var_mean(&reference)?;
        let (m_y, v_y) = var_mean(&y)?;
        // The prompt's row takes the reference's statistics.
        assert!(close(&m_y.narrow(0, 1, 1)?, &m_ref.narrow(0, 1, 1)?)? < 1e-4);
        assert!(close(&v_y.narrow(0, 1, 1)?, &v_ref.narrow(0, 1, 1)?)? < 1e-3);
        // The negative prompt's row is halfway between its own and the renormalised one.
        let (m_x, _) = var_mean(&x)?;
        let half = ((m_x.narrow(0, 0, 1)? + m_ref.narrow(0, 0, 1)?)? * 0.5)?;
        assert!(close(&m_y.narrow(0, 0, 1)?, &half)? < 1e-4);
        // Reading emptied the bank.
        assert!(close(&b.group_norm(key, &x)?, &x)? == 0.0);
        Ok(())
    }
}
