//! Multi-head scaled dot-product attention for f32 tensors on the CPU.
//!
//! The fused kernel ([`attention_fused_f32`]) is flash-attention style: each rayon task takes one
//! (batch, head, block of [`QUERY_BLOCK`] query rows) and walks the keys in blocks of
//! [`KEY_BLOCK`]: a register-tiled q·kᵀ tile, an online softmax (running max and sum, vector exp)
//! and the product with v accumulated in registers, so scores never leave L1. K is packed
//! transposed and V padded to whole vectors once per (batch, head). The heads are read and
//! written in place in `[B, N, heads*dh]` layout (no split/merge copies).

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::math::softmax_inplace;
use super::simd::Isa;

mod fused;

pub use fused::attention_fused_f32;
use fused::{attention_fused_strided, RowStrides};

/// Target size of one block of scores (bytes).
const BLOCK_BYTES: usize = 512 << 10;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Dimensions of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    /// Query tokens.
    pub n: usize,
    /// Key/value tokens.
    pub m: usize,
    pub heads: usize,
    /// Per-head width of q and k.
    pub dh: usize,
    /// Per-head width of v (and the output).
    pub dv: usize,
}

impl AttnShape {
    /// Panics unless the slices are q `[batch, n, heads * dh]`, k `[batch, m, heads * dh]`,
    /// v `[batch, m, heads * dv]` and out `[batch, n, heads * dv]`.
    pub(super) fn assert_slices(&self, q: &[f32], k: &[f32], v: &[f32], out: &[f32]) {
        let (cq, cv) = (self.heads * self.dh, self.heads * self.dv);
        assert_eq!(q.len(), self.batch * self.n * cq);
        assert_eq!(k.len(), self.batch * self.m * cq);
        assert_eq!(v.len(), self.batch * self.m * cv);
        assert_eq!(out.len(), self.batch * self.n * cv);
    }
}

/// `out[b, i, h*dv..] = softmax(scale * q_h k_h^T) v_h` with `q` `[B, N, heads*dh]`, `k`
/// `[B, M, heads*dh]`, `v` `[B, M, heads*dv]` and `out` `[B, N, heads*dv]`, all contiguous.
///
/// Runs the fused kernel ([`attention_fused_f32`]); `SDSERVE_ATTN=blocked` selects the older
/// gemm + softmax + gemm blocks ([`attention_blocked_f32`]) for A/B measurements.
pub fn attention_f32(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32, out: &mut [f32]) {
    use std::sync::OnceLock;
    static BLOCKED: OnceLock<bool> = OnceLock::new();
    if *BLOCKED.get_or_init(|| std::env::var("SDSERVE_ATTN").as_deref() == Ok("blocked")) {
        attention_blocked_f32(q, k, v, s, scale, out)
    } else {
        attention_fused_f32(q, k, v, s, scale, out, Isa::detect())
    }
}

/// The blocked kernel: per (batch, head, block of query rows) a gemm into a cache-sized score
/// block, a softmax in place and a gemm with v.
pub fn attention_blocked_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    s.assert_slices(q, k, v, out);
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    let threads = rayon::current_num_threads().max(1);
    let mut rows = (BLOCK_BYTES / (4 * s.m.max(1))).clamp(8, 512).min(s.n);
    // Enough tasks for every thread even when batch*heads is small.
    while s.batch * s.heads * s.n.div_ceil(rows) < 2 * threads && rows > 8 {
        rows = rows.div_ceil(2);
    }
    let blocks = s.n.div_ceil(rows);
    let out_ptr = out.as_mut_ptr() as usize;
    (0..s.batch * s.heads * blocks)
        .into_par_iter()
        .for_each(|task| {
            let blk = task % blocks;
            let h = (task / blocks) % s.heads;
            let b = task / (blocks * s.heads);
            let r0 = blk * rows;
            let nr = rows.min(s.n - r0);
            SCORES.with(|buf| {
                let mut sc = buf.borrow_mut();
                if sc.len() < nr * s.m {
                    sc.resize(nr * s.m, 0.0);
                }
                let sc = &mut sc[..nr * s.m];
                // SAFETY: the pointers stay inside q/k/v (checked sizes above); each task writes
                // rows r0..r0+nr, columns h*dv..(h+1)*dv of image b only.
                unsafe {
                    let qp = q.as_ptr().add((b * s.n + r0) * cq + h * s.dh);
                    let kp = k.as_ptr().add(b * s.m * cq + h * s.dh);
                    let vp = v.as_ptr().add(b * s.m * cv + h * s.dv);
                    let op = (out_ptr as *mut f32).add((b * s.n + r0) * cv + h * s.dv);
                    // scores[nr, m] = scale * q[nr, dh] k^T[dh, m]
                    super::math::sgemm(
                        (nr, s.m, s.dh),
                        sc.as_mut_ptr(),
                        (s.m as isize, 1),
                        qp,
                        (cq as isize, 1),
                        kp,
                        (1, cq as isize),
                        false,
                        scale,
                        Parallelism::None,
                    );
                    for row in sc.chunks_exact_mut(s.m) {
                        softmax_inplace(row);
                    }
                    // out[nr, dv] = probs[nr, m] v[m, dv]
                    super::math::sgemm(
                        (nr, s.dv, s.m),
                        op,
                        (cv as isize, 1),
                        sc.as_ptr(),
                        (s.m as isize, 1),
                        vp,
                        (cv as isize, 1),
                        false,
                        1.0f32,
                        Parallelism::None,
                    );
                }
            });
        });
}

fn cpu_f32_slice<'a>(
    guard: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    len: usize,
) -> Option<&'a [f32]> {
    match guard {
        candle_core::Storage::Cpu(c) => c
            .as_slice::<f32>()
            .ok()
            .map(|s| &s[layout.start_offset()..][..len]),
        _ => None,
    }
}

/// Tensor front end of [`attention_f32`] over `[B, N, heads*dh]` projections. `None` when the
/// fast path does not apply (not f32 on the CPU); the caller then uses its generic attention.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) || heads == 0 {
        return Ok(None);
    }
    let (b, n, cq) = q.dims3()?;
    let (bk, m, ck) = k.dims3()?;
    let (bv, mv, cv) = v.dims3()?;
    if bk != b
        || bv != b
        || ck != cq
        || mv != m
        || !cq.is_multiple_of(heads)
        || !cv.is_multiple_of(heads)
        || m == 0
    {
        return Ok(None);
    }
    let s = AttnShape {
        batch: b,
        n,
        m,
        heads,
        dh: cq / heads,
        dv: cv / heads,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut out = vec![0f32; b * n * cv];
    {
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (Some(qs), Some(ks), Some(vs)) = (
            cpu_f32_slice(&qg, ql, q.elem_count()),
            cpu_f32_slice(&kg, kl, k.elem_count()),
            cpu_f32_slice(&vg, vl, v.elem_count()),
        ) else {
            return Ok(None);
        };
        attention_f32(qs, ks, vs, &s, scale as f32, &mut out);
    }
    Tensor::from_vec(out, (b, n, cv), &Device::Cpu).map(Some)
}

/// Self-attention straight from one packed projection: `qkv` `[B, N, 3 * heads * dh]`, each row
/// q, then k, then v (a ViT's fused `qkv` linear, split as `reshape(B, N, 3, heads, dh)`), into
/// `[B, N, heads * dh]`, with no copies splitting it. `None` when the fast path does not apply
/// (not f32 on the CPU).
pub fn attention_packed_qkv(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if qkv.dtype() != DType::F32 || !matches!(qkv.device(), Device::Cpu) || heads == 0 {
        return Ok(None);
    }
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    if c3 % 3 != 0 || !c.is_multiple_of(heads) || n == 0 {
        return Ok(None);
    }
    let dh = c / heads;
    let s = AttnShape {
        batch: b,
        n,
        m: n,
        heads,
        dh,
        dv: dh,
    };
    let qkv = qkv.contiguous()?;
    let mut out = vec![0f32; b * n * c];
    {
        let (g, l) = qkv.storage_and_layout();
        let Some(all) = cpu_f32_slice(&g, l, qkv.elem_count()) else {
            return Ok(None);
        };
        let rows = RowStrides {
            q: c3,
            k: c3,
            v: c3,
        };
        let (q, k, v) = (all, &all[c..], &all[2 * c..]);
        attention_fused_strided(q, k, v, &s, rows, scale as f32, &mut out, Isa::detect());
    }
    Tensor::from_vec(out, (b, n, c), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests;
