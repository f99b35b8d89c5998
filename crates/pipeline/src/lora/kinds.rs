//! The module types of a kohya-named LoRA file's layers, as A1111's Lora extension applies
//! them (`extensions-builtin/Lora/network_*.py`): LoRA/LoCon (`up @ down`, LoCon's CP form with
//! `lora_mid`), LyCORIS LoHa (`(w1a @ w1b) * (w2a @ w2b)`, Tucker form with `hada_t1`/`hada_t2`),
//! LoKr (`kron(w1, w2)`, each factor whole or low-rank, Tucker `lokr_t2`) and full diffs
//! (`diff`, with `diff_b` the bias's), and IA3 (`weight`, `on_input`: its delta is made from
//! the weight, as are GLoRA's and that of a layer with DoRA's `dora_scale` beside any type's
//! keys; `from_weight`), OFT/BOFT (`oft_blocks`, `oft_diag`: the weight's rows rotated, made
//! from the weight too; `oft`), and norm layers' diffs (`w_norm` added to a GroupNorm's or
//! LayerNorm's weight, `b_norm` to its bias). Parts A1111 knows and this server does not apply
//! (`diff_b` on another type, which A1111 ignores, and the weight-shaped `bias`) are kept as
//! refused layers: the file is listed and a request naming it is refused, naming the LoRA and
//! the type.
//!
//! Each layer's delta is `[rows, cols]` (`cols` the weight's input dims flattened), reshaped
//! to the target's dims by the caller, and scaled by A1111's `calc_scale`: the layer's `scale`
//! when the file has one, else `alpha / dim` when it has an alpha and the type a rank (`dim`),
//! else 1.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Tensor};

use super::products::{cp_decomposition, kron, make_weight_cp};
pub(super) use super::shapes::DeltaShape;

/// A LoKr factor: one matrix (`lokr_w1`), or a low-rank product (`lokr_w1_a @ lokr_w1_b`).
#[derive(Debug, Clone)]
pub(super) enum Factor {
    Whole(String),
    LowRank(String, String),
}

/// One layer's module type, with the keys of its tensors.
#[derive(Debug, Clone)]
pub(super) enum LayerKind {
    /// `up @ down` (kohya, LoCon, PEFT); with `mid`, LoCon's CP decomposition.
    Lora {
        down: String,
        up: String,
        mid: Option<String>,
    },
    /// LoHa: the Hadamard product of two low-rank products (each in Tucker form with `t`).
    Hada {
        w1a: String,
        w1b: String,
        w2a: String,
        w2b: String,
        t1: Option<String>,
        t2: Option<String>,
    },
    /// LoKr: the Kronecker product `kron(w1, w2)`; `t2`: `w2` in Tucker form.
    Lokr {
        w1: Factor,
        w2: Factor,
        t2: Option<String>,
    },
    /// IA3: `weight` scales the layer's weight by output row (or, with `on_input`, by input
    /// column); its delta is made from the weight (`from_weight`).
    Ia3 { weight: String, on_input: String },
    /// GLoRA (`network_glora.py`): `b2 @ b1 + (W @ a2) @ a1`; made from the weight
    /// (`from_weight`).
    Glora {
        a1: String,
        a2: String,
        b1: String,
        b2: String,
    },
    /// OFT/BOFT: `blocks` (`oft_blocks`, or with `is_r` the old LyCORIS `oft_diag`) rotate
    /// the weight's output rows, `rescale` scales them (`oft`); the layer's alpha is the
    /// constraint of `oft_blocks`.
    Oft {
        blocks: String,
        is_r: bool,
        rescale: Option<String>,
    },
    /// A norm layer's diff: `w` (`w_norm`) added to its weight, `b` (`b_norm`) to its bias.
    Norm { w: String, b: String },
    /// The weight's difference itself, and with `diff_b` the bias's.
    Full {
        diff: String,
        diff_b: Option<String>,
    },
    /// A type (or part of one) this server does not apply: `type_name` as `GET /loras` lists it
    /// and `why` as a request naming the file is told.
    Refused {
        type_name: &'static str,
        why: String,
    },
}

impl LayerKind {
    /// The type as `GET /loras` lists it.
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            LayerKind::Lora { .. } => "lora",
            LayerKind::Hada { .. } => "loha",
            LayerKind::Lokr { .. } => "lokr",
            LayerKind::Ia3 { .. } => "ia3",
            LayerKind::Glora { .. } => "glora",
            LayerKind::Full { .. } => "full",
            LayerKind::Oft { .. } => "oft", // OFT, BOFT and the old oft_diag alike
            LayerKind::Norm { .. } => "norm",
            LayerKind::Refused { type_name, .. } => type_name,
        }
    }

    /// The kind of kohya module `prefix` from the part of its keys after the module name (A1111
    /// tries the types in this order; `networks.py`), `None` when no type takes these keys.
    pub(super) fn classify(prefix: &str, parts: &BTreeSet<&str>) -> Option<LayerKind> {
        let has = |k: &str| parts.contains(k);
        let key = |k: &str| format!("{prefix}.{k}");
        let refused = |type_name, what: &str| {
            Some(LayerKind::Refused {
                type_name,
                why: format!("is {what}, which this server does not apply"),
            })
        };
        let kind = if has("lora_up.weight") && has("lora_down.weight") {
            LayerKind::Lora {
                down: key("lora_down.weight"),
                up: key("lora_up.weight"),
                mid: has("lora_mid.weight").then(|| key("lora_mid.weight")),
            }
        } else if ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            .iter()
            .all(|k| has(k))
        {
            LayerKind::Hada {
                w1a: key("hada_w1_a"),
                w1b: key("hada_w1_b"),
                w2a: key("hada_w2_a"),
                w2b: key("hada_w2_b"),
                t1: has("hada_t1").then(|| key("hada_t1")),
                t2: has("hada_t2").then(|| key("hada_t2")),
            }
        } else if has("weight") && has("on_input") {
            LayerKind::Ia3 {
                weight: key("weight"),
                on_input: key("on_input"),
            }
        } else if has("weight") || has("on_input") {
            // A1111 reads both (network_ia3.py).
            return refused("ia3", "an IA3 module without both weight and on_input");
        } else if let (Some(w1), Some(w2)) = (factor(parts, prefix, 1), factor(parts, prefix, 2)) {
            LayerKind::Lokr {
                w1,
                w2,
                t2: has("lokr_t2").then(|| key("lokr_t2")),
            }
        } else if has("diff") {
            LayerKind::Full {
                diff: key("diff"),
                diff_b: has("diff_b").then(|| key("diff_b")),
            }
        } else if has("w_norm") && has("b_norm") {
            LayerKind::Norm {
                w: key("w_norm"),
                b: key("b_norm"),
            }
        } else if has("w_norm") || has("b_norm") {
            // A1111's norm module takes both (network_norm.py); no other type takes either.
            return refused("norm", "a norm module without both w_norm and b_norm");
        } else if ["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"]
            .iter()
            .all(|k| has(k))
        {
            LayerKind::Glora {
                a1: key("a1.weight"),
                a2: key("a2.weight"),
                b1: key("b1.weight"),
                b2: key("b2.weight"),
            }
        } else if ["a1.weight", "a2.weight", "b1.weight", "b2.weight"]
            .iter()
            .any(|k| has(k))
        {
            // A1111 takes GLoRA with all five (network_glora.py).
            return refused(
                "glora",
                "a GLoRA module without all of a1, a2, b1, b2 and alpha",
            );
        } else if has("oft_blocks") || has("oft_diag") {
            let is_r = !has("oft_blocks");
            LayerKind::Oft {
                blocks: key(if is_r { "oft_diag" } else { "oft_blocks" }),
                is_r,
                rescale: has("rescale").then(|| key("rescale")),
            }
        } else {
            return None;
        };
        // Parts of a type that change what it does, which this server does not apply: refused
        // rather than silently left out.
        // A1111 reads `diff_b` only for full diffs (network_full.py; other types ignore it) and
        // adds `bias`, a weight-shaped term, to the delta (finalize_updown).
        if has("diff_b") && !matches!(kind, LayerKind::Full { .. }) {
            return refused(
                "bias",
                &format!(
                    "a {} module with a bias diff (diff_b; applied with full diffs only)",
                    kind.type_name()
                ),
            );
        }
        if has("bias") {
            return refused(
                "bias",
                &format!(
                    "a {} module with a weight-shaped bias term",
                    kind.type_name()
                ),
            );
        }
        Some(kind)
    }

    /// The keys of the tensors the delta is made of.
    pub(super) fn keys(&self) -> Vec<&String> {
        match self {
            LayerKind::Lora { down, up, mid } => [Some(down), Some(up), mid.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LayerKind::Hada {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => [
                Some(w1a),
                Some(w1b),
                Some(w2a),
                Some(w2b),
                t1.as_ref(),
                t2.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            LayerKind::Lokr { w1, w2, t2 } => {
                let mut keys = w1.keys();
                keys.extend(w2.keys());
                keys.extend(t2);
                keys
            }
            LayerKind::Ia3 { weight, on_input } => vec![weight, on_input],
            LayerKind::Glora { a1, a2, b1, b2 } => vec![a1, a2, b1, b2],
            LayerKind::Full { diff, diff_b } => [Some(diff), diff_b.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LayerKind::Oft {
                blocks, rescale, ..
            } => [Some(blocks), rescale.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LayerKind::Norm { w, b } => vec![w, b],
            LayerKind::Refused { .. } => Vec::new(),
        }
    }

    /// The key of what the type adds to the layer's bias (A1111's `ex_bias`): a full diff's
    /// `diff_b`, a norm's `b_norm`.
    pub(super) fn bias_key(&self) -> Option<&String> {
        match self {
            LayerKind::Full { diff_b, .. } => diff_b.as_ref(),
            LayerKind::Norm { b, .. } => Some(b),
            _ => None,
        }
    }

    /// The unscaled delta `[rows, cols]` in f32, from the file's tensors (keys and shapes
    /// checked by [`LayerKind::delta_shape`]).
    pub(super) fn delta(
        &self,
        tensors: &HashMap<String, Tensor>,
        shape: &DeltaShape,
    ) -> candle_core::Result<Tensor> {
        let t = |k: &String| tensors[k].to_dtype(DType::F32);
        let matrix = |k: &String| -> candle_core::Result<Tensor> {
            let x = t(k)?;
            let rows = x.dim(0)?;
            x.reshape((rows, ()))
        };
        let delta = match self {
            LayerKind::Lora { down, up, mid } => match mid {
                None => matrix(up)?.matmul(&matrix(down)?)?,
                Some(mid) => cp_decomposition(&t(mid)?, &matrix(up)?, &matrix(down)?)?,
            },
            LayerKind::Hada {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => {
                let half = |a, b, t_: &Option<String>| -> candle_core::Result<Tensor> {
                    match t_ {
                        None => matrix(a)?.matmul(&matrix(b)?),
                        Some(tk) => make_weight_cp(&t(tk)?, &t(a)?, &t(b)?),
                    }
                };
                let one = half(w1a, w1b, t1)?.reshape((shape.rows, shape.cols))?;
                let two = half(w2a, w2b, t2)?.reshape((shape.rows, shape.cols))?;
                (one * two)?
            }
            LayerKind::Lokr { w1, w2, t2 } => {
                let w1 = match w1 {
                    Factor::Whole(w) => matrix(w)?,
                    Factor::LowRank(a, b) => matrix(a)?.matmul(&matrix(b)?)?,
                };
                let w2 = match (w2, t2) {
                    (Factor::Whole(w), _) => matrix(w)?,
                    (Factor::LowRank(a, b), None) => matrix(a)?.matmul(&matrix(b)?)?,
                    (Factor::LowRank(a, b), Some(tk)) => {
                        let w = make_weight_cp(&t(tk)?, &t(a)?, &t(b)?)?;
                        let rows = w.dim(0)?;
                        w.reshape((rows, ()))?
                    }
                };
                kron(&w1, &w2)?
            }
            LayerKind::Full { diff, .. } => t(diff)?,
            LayerKind::Norm { w, .. } => t(w)?,
            LayerKind::Ia3 { .. } | LayerKind::Glora { .. } | LayerKind::Oft { .. } => {
                candle_core::bail!("this type's delta is made from the weight")
            }
            LayerKind::Refused { .. } => candle_core::bail!("a refused layer has no delta"),
        };
        delta.reshape((shape.rows, shape.cols))
    }
}

impl Factor {
    fn keys(&self) -> Vec<&String> {
        match self {
            Factor::Whole(w) => vec![w],
            Factor::LowRank(a, b) => vec![a, b],
        }
    }
}

/// LoKr factor `n` (1 or 2) of a module's keys: `lokr_w{n}`, else `lokr_w{n}_a` and `_b`.
fn factor(parts: &BTreeSet<&str>, prefix: &str, n: u8) -> Option<Factor> {
    let whole = format!("lokr_w{n}");
    let (a, b) = (format!("lokr_w{n}_a"), format!("lokr_w{n}_b"));
    if parts.contains(whole.as_str()) {
        Some(Factor::Whole(format!("{prefix}.{whole}")))
    } else if parts.contains(a.as_str()) && parts.contains(b.as_str()) {
        Some(Factor::LowRank(
            format!("{prefix}.{a}"),
            format!("{prefix}.{b}"),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_told_apart_as_a1111_does() {
        let kind = |keys: &[&str]| LayerKind::classify("m", &keys.iter().copied().collect());
        let name = |keys: &[&str]| kind(keys).map(|k| k.type_name());
        assert_eq!(
            name(&["lora_down.weight", "lora_up.weight", "alpha"]),
            Some("lora")
        );
        assert_eq!(
            name(&["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]),
            Some("loha")
        );
        assert_eq!(name(&["lokr_w1", "lokr_w2_a", "lokr_w2_b"]), Some("lokr"));
        assert_eq!(name(&["lokr_w1_a", "lokr_w1_b", "lokr_w2"]), Some("lokr"));
        assert_eq!(name(&["lokr_w1"]), None);
        assert_eq!(name(&["diff"]), Some("full"));
        assert_eq!(name(&["diff", "diff_b"]), Some("full"));
        assert_eq!(
            name(&["lora_down.weight", "lora_up.weight", "diff_b"]),
            Some("bias")
        );
        assert_eq!(name(&["diff", "bias"]), Some("bias"));
        assert_eq!(name(&["weight", "on_input"]), Some("ia3"));
        let Some(LayerKind::Refused { why, .. }) = kind(&["weight"]) else {
            panic!("IA3 without on_input")
        };
        assert!(why.contains("IA3"), "{why}");
        assert_eq!(name(&["oft_blocks", "alpha"]), Some("oft"));
        assert_eq!(name(&["oft_blocks", "oft_diag", "rescale"]), Some("oft"));
        assert_eq!(name(&["oft_diag", "alpha"]), Some("oft"));
        assert_eq!(name(&["w_norm", "b_norm"]), Some("norm"));
        let Some(LayerKind::Refused { why, .. }) = kind(&["w_norm"]) else {
            panic!("a norm without b_norm")
        };
        assert!(why.contains("both w_norm and b_norm"), "{why}");
        // networks.py tries the norm type before GLoRA and OFT.
        assert_eq!(name(&["w_norm", "b_norm", "oft_blocks"]), Some("norm"));
        assert_eq!(
            name(&["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"]),
            Some("glora")
        );
        let Some(LayerKind::Refused { why, .. }) =
            kind(&["a1.weight", "a2.weight", "b1.weight", "b2.weight"])
        else {
            panic!("GLoRA without alpha")
        };
        assert!(why.contains("GLoRA"), "{why}");
        // DoRA's magnitude goes with the type (the layer keeps it: `from_weight`).
        assert_eq!(
            name(&[
                "hada_w1_a",
                "hada_w1_b",
                "hada_w2_a",
                "hada_w2_b",
                "dora_scale"
            ]),
            Some("loha")
        );
        assert_eq!(name(&["alpha"]), None);
    }
}
