//! What a layer's tensors make, from the file's shapes alone (checked before any tensor is
//! read): the delta's rows and columns, A1111's `dim`, and whether a kernel is in it.

use std::collections::HashMap;

use super::kinds::{Factor, LayerKind};

/// What a layer's tensors make, from their shapes alone.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DeltaShape {
    pub rows: usize,
    /// The input dims flattened (`in * kh * kw` for a convolution).
    pub cols: usize,
    /// A1111's `dim`: the rank `alpha` is divided by (`None`: alpha is not used).
    pub dim: Option<usize>,
    /// A convolution kernel larger than 1x1 is in the file's shapes.
    pub kernel: bool,
}

impl LayerKind {
    /// The delta's shape from the file's shapes, or what is wrong with them (checked before
    /// any tensor is indexed; again when the file is read for merging, in case it changed).
    pub(super) fn delta_shape(
        &self,
        shapes: &HashMap<String, Vec<usize>>,
    ) -> std::result::Result<DeltaShape, String> {
        let get = |k: &String| -> std::result::Result<&[usize], String> {
            let s = shapes
                .get(k)
                .ok_or_else(|| format!("{k} is missing (the file changed on disk?)"))?;
            if s.is_empty() || s.contains(&0) {
                return Err(format!("{k} has shape {s:?}"));
            }
            Ok(s.as_slice())
        };
        let cols = |s: &[usize]| s[1..].iter().product::<usize>();
        match self {
            LayerKind::Lora { down, up, mid } => {
                let (d, u) = (get(down)?, get(up)?);
                if d.len() < 2 || u.len() < 2 {
                    return Err(format!("down {d:?} and up {u:?} must be at least 2-D"));
                }
                match mid {
                    None => {
                        if cols(u) != d[0] {
                            return Err(format!("up {u:?} does not take down {d:?}'s rank"));
                        }
                        Ok(DeltaShape {
                            rows: u[0],
                            cols: cols(d),
                            dim: Some(d[0]),
                            kernel: d.len() == 4 && d[2..] != [1, 1],
                        })
                    }
                    Some(mid) => {
                        // rebuild_cp_decomposition: einsum('n m k l, i n, m j -> i j k l').
                        let m = get(mid)?;
                        if m.len() != 4 || cols(u) != m[0] || d[0] != m[1] {
                            return Err(format!(
                                "up {u:?}, mid {m:?} and down {d:?} do not chain (up's columns = mid[0], mid[1] = down[0], mid 4-D)"
                            ));
                        }
                        Ok(DeltaShape {
                            rows: u[0],
                            cols: cols(d) * m[2] * m[3],
                            dim: Some(d[0]),
                            kernel: m[2..] != [1, 1],
                        })
                    }
                }
            }
            LayerKind::Hada {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => {
                let halves = [(w1a, w1b, t1), (w2a, w2b, t2)];
                let mut made = Vec::new();
                for (a, b, t) in halves {
                    let (sa, sb) = (get(a)?, get(b)?);
                    made.push(match t {
                        None => {
                            if cols(sa) != sb[0] {
                                return Err(format!("{a} {sa:?} does not take {b} {sb:?}'s rank"));
                            }
                            (sa[0], cols(sb), sb.len() == 4 && sb[2..] != [1, 1])
                        }
                        Some(t) => {
                            let st = get(t)?;
                            cp_shape(st, sa, sb).map_err(|why| format!("{t}: {why}"))?
                        }
                    });
                }
                if t1.is_some() != t2.is_some() || made[0].0 != made[1].0 || made[0].1 != made[1].1
                {
                    return Err(format!(
                        "its two halves make different shapes ({} x {} and {} x {}; hada_t1 and hada_t2 come together)",
                        made[0].0, made[0].1, made[1].0, made[1].1
                    ));
                }
                Ok(DeltaShape {
                    rows: made[0].0,
                    cols: made[0].1,
                    dim: Some(get(w1b)?[0]),
                    kernel: made[0].2,
                })
            }
            LayerKind::Lokr { w1, w2, t2 } => {
                let (r1, c1, _) = factor_shape(w1, &get, None)?;
                let (r2, c2, kernel) = factor_shape(w2, &get, t2.as_ref())?;
                // A1111: the rank of w2's product, else of w1's; none when both are whole.
                let dim = match (w1, w2) {
                    (_, Factor::LowRank(_, b)) | (Factor::LowRank(_, b), _) => Some(get(b)?[0]),
                    _ => None,
                };
                let (Some(rows), Some(cols)) = (r1.checked_mul(r2), c1.checked_mul(c2)) else {
                    return Err("its factors are too large".into());
                };
                Ok(DeltaShape {
                    rows,
                    cols,
                    dim,
                    kernel,
                })
            }
            LayerKind::Full { diff, .. } => {
                let s = get(diff)?;
                Ok(DeltaShape {
                    rows: s[0],
                    cols: if s.len() == 1 { 1 } else { cols(s) },
                    dim: None,
                    kernel: s.len() == 4 && s[2..] != [1, 1],
                })
            }
            LayerKind::Ia3 { weight, on_input } => {
                // on_input is one value: a scalar `[]` as torch saves it.
                let w = get(weight)?;
                let flag = shapes
                    .get(on_input)
                    .ok_or_else(|| format!("{on_input} is missing"))?;
                let n: usize = w.iter().product();
                if w.iter().filter(|&&d| d != 1).count() > 1 || flag.iter().product::<usize>() != 1
                {
                    return Err(format!(
                        "IA3's weight {w:?} must be one vector and on_input {flag:?} one value"
                    ));
                }
                // The weight's other dim is not in the file: the merge makes the delta.
                Ok(DeltaShape {
                    rows: n,
                    cols: 0,
                    dim: None,
                    kernel: false,
                })
            }
            LayerKind::Glora { a1, a2, b1, b2 } => {
                let (sa1, sa2, sb1, sb2) = (get(a1)?, get(a2)?, get(b1)?, get(b2)?);
                // a1 [r, in], a2 [in, r], b1 [q, in], b2 [out, q].
                let chain = [sa1, sa2, sb1, sb2].iter().all(|s| s.len() == 2)
                    && sa2[0] == sa1[1]
                    && sa2[1] == sa1[0]
                    && sb1[1] == sa1[1]
                    && sb2[1] == sb1[0];
                if !chain {
                    return Err(format!(
                        "a1 {sa1:?}, a2 {sa2:?}, b1 {sb1:?} and b2 {sb2:?} do not chain (a1 [r, in], a2 [in, r], b1 [q, in], b2 [out, q])"
                    ));
                }
                Ok(DeltaShape {
                    rows: sb2[0],
                    cols: sb1[1],
                    dim: None, // A1111 gives GLoRA no dim: its alpha is not used
                    kernel: false,
                })
            }
            LayerKind::Oft { blocks, is_r, .. } => {
                // The columns are the weight's (the rotation is made from it).
                let rows = super::oft::rows_of(get(blocks)?, *is_r)?;
                Ok(DeltaShape {
                    rows,
                    cols: 0,
                    dim: None, // A1111's OFT sets its scale to 1: alpha is its constraint
                    kernel: false,
                })
            }
            LayerKind::Norm { w, b } => {
                let (sw, sb) = (get(w)?, get(b)?);
                if sw.len() != 1 || sb != sw {
                    return Err(format!(
                        "w_norm {sw:?} and b_norm {sb:?} must be one vector each, of one length"
                    ));
                }
                Ok(DeltaShape {
                    rows: sw[0],
                    cols: 1,
                    dim: None,
                    kernel: false,
                })
            }
            LayerKind::Refused { why, .. } => Err(why.clone()),
        }
    }
}

/// `(rows, cols, kernel)` of a LoKr factor: a whole matrix (`w2` may be 4-D), a low-rank
/// product of 2-D matrices, or with `t`, the Tucker form.
fn factor_shape<'a>(
    f: &Factor,
    get: &impl Fn(&String) -> std::result::Result<&'a [usize], String>,
    t: Option<&String>,
) -> std::result::Result<(usize, usize, bool), String> {
    match (f, t) {
        (Factor::Whole(w), _) => {
            let s = get(w)?;
            if s.len() < 2 {
                return Err(format!("{w} has shape {s:?}; it must be 2-D or 4-D"));
            }
            Ok((
                s[0],
                s[1..].iter().product(),
                s.len() == 4 && s[2..] != [1, 1],
            ))
        }
        (Factor::LowRank(a, b), None) => {
            let (sa, sb) = (get(a)?, get(b)?);
            if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
                return Err(format!(
                    "{a} {sa:?} and {b} {sb:?} must be 2-D and share a rank"
                ));
            }
            Ok((sa[0], sb[1], false))
        }
        (Factor::LowRank(a, b), Some(t)) => {
            let (sa, sb, st) = (get(a)?, get(b)?, get(t)?);
            cp_shape(st, sa, sb).map_err(|why| format!("{t}: {why}"))
        }
    }
}

/// `(rows, cols, kernel)` of A1111's `make_weight_cp(t, wa, wb)`: `t [r1, r2, kh, kw]`,
/// `wa [r1, out]`, `wb [r2, in]` make `[out, in, kh, kw]`.
fn cp_shape(
    t: &[usize],
    wa: &[usize],
    wb: &[usize],
) -> std::result::Result<(usize, usize, bool), String> {
    if t.len() != 4 || wa.len() != 2 || wb.len() != 2 || wa[0] != t[0] || wb[0] != t[1] {
        return Err(format!(
            "the Tucker core {t:?} does not take its factors {wa:?} and {wb:?} (core [r1, r2, kh, kw], factors [r1, out] and [r2, in])"
        ));
    }
    Ok((wa[1], wb[1] * t[2] * t[3], t[2..] != [1, 1]))
}
