//! The sd-webui-controlnet extension's control modes and its hires pass's soft weights
//! (`scripts/controlnet.py`, `ControlParams(soft_injection=..., cfg_injection=...)`, and
//! `scripts/hook.py`, `UnetHook.hook.forward`), as they change a ControlNet's residuals:
//!
//! - `Balanced`: every residual times the unit's weight, on every row of the UNet batch
//!   (diffusers' `controlnet_conditioning_scale`).
//! - `My prompt is more important` (`soft_injection`): residual `i` of the 13 (the skip
//!   connections from the top, the mid block's last) times `weight * 0.825 ** (12 - i)`.
//! - `ControlNet is more important` (`soft_injection` and `cfg_injection`): the same soft
//!   weights, and the residuals multiplied by `cond_mark`: only the rows of the batch that
//!   carry the prompt are steered, the negative prompt's are not.
//! - A ControlNet whose config pools its residuals (`global_average_pooling`, diffusers'
//!   `global_pool_conditions`) steers the prompt's rows only in every mode, as the extension
//!   marks them and as diffusers forces `guess_mode`.
//! - In the hires fix's second pass the extension forces the soft weights on a unit whose
//!   preprocessor's name holds `canny` or `mlsd` (`high_res_fix_forced_soft_injection`).
//!
//! The extension zips the 13 weights with the residuals: a ControlNet with fewer (SDXL's 10)
//! takes the first ones; one with more than 13 has no soft weights and is refused.

use crate::{PipelineError, Result};

/// The extension's `ControlMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ControlMode {
    #[default]
    Balanced,
    /// "My prompt is more important".
    Prompt,
    /// "ControlNet is more important".
    ControlNet,
}

impl ControlMode {
    pub const ALL: [Self; 3] = [Self::Balanced, Self::Prompt, Self::ControlNet];

    /// The native API's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::Prompt => "prompt",
            Self::ControlNet => "controlnet",
        }
    }

    /// From [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The extension's label (its `ControlMode` value, the infotext's `Control Mode:`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Balanced => "Balanced",
            Self::Prompt => "My prompt is more important",
            Self::ControlNet => "ControlNet is more important",
        }
    }

    /// The extension's index of the mode (its radio buttons' order; API units may send it).
    pub fn index(self) -> usize {
        self as usize
    }

    /// `soft_injection = control_mode != BALANCED`.
    pub fn soft(self) -> bool {
        self != Self::Balanced
    }

    /// `cfg_injection = control_mode == CONTROL`.
    pub fn cond_only(self) -> bool {
        self == Self::ControlNet
    }
}

/// How many residuals the extension has weights for (SD 1.x/2.x: 12 skip connections and the
/// mid block).
pub const SOFT_WEIGHT_COUNT: usize = 13;
/// The soft weights' ratio from one residual to the next.
const SOFT_RATIO: f64 = 0.825;

/// The weight of each of `count` residuals (skip connections from the top, the mid block's
/// last): `weight` each, or with `soft` the extension's `weight * 0.825 ** (12 - i)`.
pub fn residual_weights(weight: f64, count: usize, soft: bool) -> Result<Vec<f64>> {
    if !soft {
        return Ok(vec![weight; count]);
    }
    if count > SOFT_WEIGHT_COUNT {
        return Err(PipelineError::InvalidRequest(format!(
            "the extension's soft weights cover {SOFT_WEIGHT_COUNT} ControlNet residuals; this \
             ControlNet has {count}"
        )));
    }
    Ok((0..count)
        .map(|i| weight * SOFT_RATIO.powf((SOFT_WEIGHT_COUNT - 1 - i) as f64))
        .collect())
}

/// Which rows of a UNet batch carry the prompt (the extension's `cond_mark`, 1 on the rows of
/// `conditioning`, 0 on those of `unconditional_conditioning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondRows {
    /// Every row: guidance off, or the prompt's pass of two.
    All,
    /// No row: the negative prompt's pass of two.
    None,
    /// The rows from this one on: a guided batch `[uncond x n, cond x ...]`.
    From(usize),
}

impl CondRows {
    /// The first row a cond-only residual reaches in a batch of `rows`, or `None` when it
    /// reaches none.
    pub fn first(self, rows: usize) -> Option<usize> {
        match self {
            Self::All => Some(0),
            Self::None => None,
            Self::From(k) if k < rows => Some(k),
            Self::From(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_weights_grow_towards_the_mid_block() {
        // Balanced: the weight everywhere.
        assert_eq!(residual_weights(0.6, 13, false).unwrap(), vec![0.6; 13]);
        let w = residual_weights(2.0, 13, true).unwrap();
        // The mid block (last) keeps the weight; each residual above it 0.825 of the next.
        assert_eq!(w[12], 2.0);
        for i in 0..12 {
            assert!((w[i] / w[i + 1] - SOFT_RATIO).abs() < 1e-12, "{i}: {w:?}");
        }
        // Fewer residuals take the first weights (the extension's zip), not the last.
        assert_eq!(residual_weights(2.0, 7, true).unwrap(), w[..7].to_vec());
        assert!(residual_weights(1.0, 14, true).is_err());
        assert_eq!(residual_weights(1.0, 14, false).unwrap().len(), 14);
    }

    #[test]
    fn modes_read_as_the_extension_sets_its_flags() {
        let flags: Vec<_> = ControlMode::ALL
            .iter()
            .map(|m| (m.soft(), m.cond_only()))
            .collect();
        assert_eq!(flags, [(false, false), (true, false), (true, true)]);
        for m in ControlMode::ALL {
            assert_eq!(ControlMode::from_name(m.name()), Some(m));
            assert_eq!(ControlMode::ALL[m.index()], m);
        }
        assert_eq!(CondRows::From(2).first(4), Some(2));
        assert_eq!(CondRows::From(2).first(2), None);
        assert_eq!(CondRows::None.first(4), None);
        assert_eq!(CondRows::All.first(4), Some(0));
    }
}
