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
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{F32s, Isa, Portable};

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
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    assert_eq!(q.len(), s.batch * s.n * cq);
    assert_eq!(k.len(), s.batch * s.m * cq);
    assert_eq!(v.len(), s.batch * s.m * cv);
    assert_eq!(out.len(), s.batch * s.n * cv);
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

/// Keys per block of the fused kernel (fewer when M is smaller): one block of packed kᵀ and v
/// (`KEY_BLOCK * (dh + dv)` floats) stays in L1/L2 while every row group of a task uses it.
const KEY_BLOCK: usize = 128;
/// Query rows per task of the fused kernel.
const QUERY_BLOCK: usize = 64;

/// Shared, read-only state of one fused call (raw pointers so rayon tasks can share it).
struct Fused {
    q: *const f32,
    /// Per (b, h): `[blocks][dh][kbs]`, keys padded with zeros.
    kt: *const f32,
    /// Per (b, h): `[blocks * kbs][dvp]`, rows and columns padded with zeros.
    vp: *const f32,
    out: *mut f32,
    s: AttnShape,
    scale: f32,
    /// Keys per block, a multiple of two vectors.
    kbs: usize,
    /// Key blocks.
    nkb: usize,
    /// `dv` rounded up to whole vectors.
    dvp: usize,
}

// SAFETY: the pointers are read-only except `out`, where each task writes its own rows/columns.
unsafe impl Sync for Fused {}

/// Fused attention with the given ISA (see the module docs). Same contract as
/// [`attention_f32`].
pub fn attention_fused_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttnShape,
    scale: f32,
    out: &mut [f32],
    isa: Isa,
) {
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    assert_eq!(q.len(), s.batch * s.n * cq);
    assert_eq!(k.len(), s.batch * s.m * cq);
    assert_eq!(v.len(), s.batch * s.m * cv);
    assert_eq!(out.len(), s.batch * s.n * cv);
    if s.n == 0 || s.dv == 0 {
        return;
    }
    assert!(s.m > 0, "attention over no keys");
    let lanes = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Avx512::LANES,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Avx2::LANES,
        _ => Portable::LANES,
    };
    let kbs = KEY_BLOCK.min(s.m.next_multiple_of(2 * lanes));
    let nkb = s.m.div_ceil(kbs);
    let dvp = s.dv.next_multiple_of(lanes);
    let mp = nkb * kbs;
    let pairs = s.batch * s.heads;
    let (kt_len, vp_len) = (mp * s.dh, mp * dvp);
    let mut kt = vec![0f32; pairs * kt_len];
    let mut vp = vec![0f32; pairs * vp_len];
    kt.par_chunks_mut(kt_len)
        .zip(vp.par_chunks_mut(vp_len))
        .enumerate()
        .for_each(|(bh, (kt, vp))| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            for j in 0..s.m {
                let (blk, jj) = (j / kbs, j % kbs);
                let krow = &k[(b * s.m + j) * cq + h * s.dh..][..s.dh];
                for (d, &x) in krow.iter().enumerate() {
                    kt[(blk * s.dh + d) * kbs + jj] = x;
                }
                vp[j * dvp..j * dvp + s.dv]
                    .copy_from_slice(&v[(b * s.m + j) * cv + h * s.dv..][..s.dv]);
            }
        });
    let ctx = Fused {
        q: q.as_ptr(),
        kt: kt.as_ptr(),
        vp: vp.as_ptr(),
        out: out.as_mut_ptr(),
        s: *s,
        scale,
        kbs,
        nkb,
        dvp,
    };
    let task: unsafe fn(&Fused, usize) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => fused_task_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => fused_task_avx2,
        _ => fused_task::<Portable>,
    };
    let tasks = pairs * s.n.div_ceil(QUERY_BLOCK);
    // SAFETY: `isa` is one the CPU has (callers pass `Isa::detect()` or a tested subset); the
    // buffers outlive the loop and tasks write disjoint parts of `out`.
    (0..tasks)
        .into_par_iter()
        .for_each(|t| unsafe { task(&ctx, t) });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn fused_task_avx512(c: &Fused, t: usize) {
    fused_task::<Avx512>(c, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fused_task_avx2(c: &Fused, t: usize) {
    fused_task::<Avx2>(c, t)
}

/// One (batch, head, block of query rows).
#[inline(always)]
unsafe fn fused_task<S: F32s>(c: &Fused, t: usize) {
    let s = &c.s;
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    let blocks = s.n.div_ceil(QUERY_BLOCK);
    let (blk, h, b) = (t % blocks, (t / blocks) % s.heads, t / (blocks * s.heads));
    let r0 = blk * QUERY_BLOCK;
    let nr = QUERY_BLOCK.min(s.n - r0);
    let (kbs, dh, dvp) = (c.kbs, s.dh, c.dvp);
    // Scaling q (nr*dh values) is cheaper than scaling the scores.
    let mut qs = vec![0f32; nr * dh];
    for (i, row) in qs.chunks_exact_mut(dh).enumerate() {
        let src = std::slice::from_raw_parts(c.q.add((b * s.n + r0 + i) * cq + h * dh), dh);
        for (d, &x) in row.iter_mut().zip(src) {
            *d = x * c.scale;
        }
    }
    let mut o = vec![0f32; nr * dvp];
    let mut mx = vec![f32::NEG_INFINITY; nr];
    let mut l = vec![0f32; nr];
    let mut sc = vec![0f32; 8 * kbs];
    let bh = b * s.heads + h;
    let kt = c.kt.add(bh * c.nkb * kbs * dh);
    let vp = c.vp.add(bh * c.nkb * kbs * dvp);
    for kb in 0..c.nkb {
        let blk = KeyBlock {
            kt: kt.add(kb * dh * kbs),
            v: vp.add(kb * kbs * dvp),
            kbs,
            valid: (s.m - kb * kbs).min(kbs),
            dh,
            dvp,
        };
        let mut i = 0;
        while i < nr {
            let left = nr - i;
            let rows = if left >= 8 && S::WIDE_ROWS {
                8
            } else if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            let (q, o, m, l) = (
                qs.as_ptr().add(i * dh),
                o.as_mut_ptr().add(i * dvp),
                &mut mx[i..i + rows],
                &mut l[i..i + rows],
            );
            match rows {
                8 => row_group::<S, 8>(&blk, q, &mut sc, o, m, l),
                4 => row_group::<S, 4>(&blk, q, &mut sc, o, m, l),
                2 => row_group::<S, 2>(&blk, q, &mut sc, o, m, l),
                _ => row_group::<S, 1>(&blk, q, &mut sc, o, m, l),
            }
            i += rows;
        }
    }
    for (i, (orow, &li)) in o.chunks_exact(dvp).zip(&l).enumerate() {
        let inv = 1.0 / li;
        let dst = c.out.add((b * s.n + r0 + i) * cv + h * s.dv);
        for (j, &x) in orow[..s.dv].iter().enumerate() {
            *dst.add(j) = x * inv;
        }
    }
}

/// One block of packed keys and values.
struct KeyBlock {
    kt: *const f32,
    v: *const f32,
    kbs: usize,
    /// Real (unpadded) keys in the block.
    valid: usize,
    dh: usize,
    dvp: usize,
}

/// `R` query rows against one key block: scores, online softmax update, `o += p v`.
#[inline(always)]
unsafe fn row_group<S: F32s, const R: usize>(
    k: &KeyBlock,
    q: *const f32,
    sc: &mut [f32],
    o: *mut f32,
    mx: &mut [f32],
    l: &mut [f32],
) {
    let (kbs, dh, lanes) = (k.kbs, k.dh, S::LANES);
    let sp = sc.as_mut_ptr();
    // Scores: R rows x two vectors of keys per register tile.
    let mut j = 0;
    while j < kbs {
        let mut acc = [[S::splat(0.0); 2]; R];
        for d in 0..dh {
            let kp = k.kt.add(d * kbs + j);
            let (k0, k1) = (S::load(kp), S::load(kp.add(lanes)));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = S::splat(*q.add(r * dh + d));
                a[0] = qv.fma(k0, a[0]);
                a[1] = qv.fma(k1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            a[0].store(sp.add(r * kbs + j));
            a[1].store(sp.add(r * kbs + j + lanes));
        }
        j += 2 * lanes;
    }
    // Online softmax: scores become probabilities relative to the running max; the rows
    // accumulated so far are rescaled when the max grows.
    for r in 0..R {
        let row = sp.add(r * kbs);
        for jj in k.valid..kbs {
            *row.add(jj) = f32::NEG_INFINITY;
        }
        let mut mv = S::load(row);
        let mut jj = lanes;
        while jj < kbs {
            mv = mv.max(S::load(row.add(jj)));
            jj += lanes;
        }
        let bm = mv.reduce_max();
        if bm > mx[r] {
            let alpha = super::math::exp(mx[r] - bm);
            l[r] *= alpha;
            let av = S::splat(alpha);
            let orow = o.add(r * k.dvp);
            let mut c = 0;
            while c < k.dvp {
                S::load(orow.add(c)).mul(av).store(orow.add(c));
                c += lanes;
            }
            mx[r] = bm;
        }
        let mn = S::splat(mx[r]);
        let mut sum = S::splat(0.0);
        let mut jj = 0;
        while jj < kbs {
            let p = S::load(row.add(jj)).sub(mn).exp();
            p.store(row.add(jj));
            sum = sum.add(p);
            jj += lanes;
        }
        // Padded keys add e^-87 each: far below f32 resolution of the sum (>= 1).
        l[r] += sum.reduce_add();
    }
    // o += p v, a few vectors of columns at a time.
    let mut c0 = 0;
    while c0 < k.dvp {
        // Registers: R * cols accumulators plus cols values of v.
        let max_cols = if R > 4 { 3 } else { S::MAX_COLS };
        let cols = ((k.dvp - c0) / lanes).min(max_cols);
        match cols {
            1 => pv_tile::<S, R, 1>(k, sp, o, c0),
            2 => pv_tile::<S, R, 2>(k, sp, o, c0),
            3 => pv_tile::<S, R, 3>(k, sp, o, c0),
            4 => pv_tile::<S, R, 4>(k, sp, o, c0),
            _ => pv_tile::<S, R, 5>(k, sp, o, c0),
        }
        c0 += cols * lanes;
    }
}

/// `o[r, c0 .. c0 + C*lanes] += sum_j p[r, j] v[j, ..]` with the tile in registers.
#[inline(always)]
unsafe fn pv_tile<S: F32s, const R: usize, const C: usize>(
    k: &KeyBlock,
    p: *const f32,
    o: *mut f32,
    c0: usize,
) {
    let lanes = S::LANES;
    let mut acc = [[S::splat(0.0); C]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        for (ci, x) in a.iter_mut().enumerate() {
            *x = S::load(o.add(r * k.dvp + c0 + ci * lanes));
        }
    }
    for j in 0..k.valid {
        let vrow = k.v.add(j * k.dvp + c0);
        let mut vv = [S::splat(0.0); C];
        for (ci, x) in vv.iter_mut().enumerate() {
            *x = S::load(vrow.add(ci * lanes));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let pj = S::splat(*p.add(r * k.kbs + j));
            for (x, &vc) in a.iter_mut().zip(&vv) {
                *x = pj.fma(vc, *x);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (ci, x) in a.iter().enumerate() {
            x.store(o.add(r * k.dvp + c0 + ci * lanes));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference with candle ops: split heads, full score matrix, softmax, merge.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, c) = t.dims3().unwrap();
            t.reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (split(q), split(k), split(v));
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let o = p.matmul(&vh).unwrap();
        let (b, h, n, d) = o.dims4().unwrap();
        o.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, n, h * d))
            .unwrap()
    }

    #[test]
    fn matches_reference_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, n, m, heads, dh, dv): self-attention, cross-attention with 77 keys, blocks
        // that do not divide N, one head with a wide dim, dv != dh.
        for &(b, n, m, heads, dh, dv) in &[
            (2, 37, 37, 3, 8, 8),
            (2, 100, 77, 4, 16, 16),
            (1, 1000, 1000, 1, 24, 24),
            (1, 9, 13, 2, 5, 7),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * dh), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, m, heads * dh), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
            let scale = 1.0 / (dh as f64).sqrt();
            let got = attention(&q, &k, &v, heads, scale)?.expect("fast path");
            let want = reference(&q, &k, &v, heads, scale);
            let d = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "{b} {n} {m} {heads} {dh} {dv}: {d}");
        }
        Ok(())
    }

    fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
        // xorshift: deterministic values in [-2, 2).
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// Plain f64 reference over the `[B, N, heads*d]` layout.
    fn reference_f64(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, scale: f32) -> Vec<f32> {
        let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
        let mut out = vec![0f32; s.batch * s.n * cv];
        let mut p = vec![0f64; s.m];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.n {
                    let qi = &q[(b * s.n + i) * cq + h * s.dh..][..s.dh];
                    for (j, pj) in p.iter_mut().enumerate() {
                        let kj = &k[(b * s.m + j) * cq + h * s.dh..][..s.dh];
                        let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                        *pj = dot * scale as f64;
                    }
                    let mx = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = p.iter().map(|&x| (x - mx).exp()).sum();
                    for c in 0..s.dv {
                        let acc: f64 = (0..s.m)
                            .map(|j| {
                                (p[j] - mx).exp() * v[(b * s.m + j) * cv + h * s.dv + c] as f64
                            })
                            .sum();
                        out[(b * s.n + i) * cv + h * s.dv + c] = (acc / z) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_matches_f64_reference_on_every_isa() {
        // Blocks that do not divide N or M, several key blocks, M = 77 (cross-attention), dv
        // wider than one register tile, dv != dh, a single key, SD's head dims 40 and 80.
        for &(b, n, m, heads, dh, dv) in &[
            (2, 37, 37, 3, 8, 8),
            (2, 100, 77, 4, 16, 16),
            (1, 70, 300, 2, 40, 40),
            (1, 65, 129, 1, 80, 80),
            (1, 9, 13, 2, 5, 7),
            (1, 5, 1, 1, 3, 100),
            (1, 130, 260, 1, 24, 168),
        ] {
            let s = AttnShape {
                batch: b,
                n,
                m,
                heads,
                dh,
                dv,
            };
            let q = rand_vec(b * n * heads * dh, 1);
            let k = rand_vec(b * m * heads * dh, 2);
            let v = rand_vec(b * m * heads * dv, 3);
            let scale = 1.0 / (dh as f32).sqrt();
            let want = reference_f64(&q, &k, &v, &s, scale);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; want.len()];
                attention_fused_f32(&q, &k, &v, &s, scale, &mut got, isa);
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(
                        0f32,
                        |a, x| if x.is_nan() { f32::INFINITY } else { a.max(x) },
                    );
                assert!(d < 2e-5, "{isa:?} {s:?}: {d}");
            }
        }
    }

    /// Large scores (sharp softmax) where a running max that grows block after block matters.
    #[test]
    fn fused_is_stable_with_growing_scores() {
        let s = AttnShape {
            batch: 1,
            n: 3,
            m: 1000,
            heads: 1,
            dh: 1,
            dv: 2,
        };
        let q = vec![1.0f32, 50.0, -50.0];
        let k: Vec<f32> = (0..1000).map(|j| j as f32 * 0.1).collect();
        let v: Vec<f32> = (0..2000).map(|i| (i % 7) as f32).collect();
        let want = reference_f64(&q, &k, &v, &s, 1.0);
        for isa in Isa::available() {
            let mut got = vec![0f32; 6];
            attention_fused_f32(&q, &k, &v, &s, 1.0, &mut got, isa);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{isa:?} {got:?} {want:?}"
                );
            }
        }
    }

    /// Times the blocked and fused kernels on SD 1.5's shapes at 512x512 with CFG:
    /// `cargo test --release -p sdserve-pipeline --lib fused_vs_blocked -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn fused_vs_blocked_timing() {
        for &(n, m, heads, dh) in &[
            (4096, 4096, 8, 40),
            (4096, 77, 8, 40),
            (1024, 1024, 8, 80),
            (256, 256, 8, 160),
            (4096, 4096, 1, 512),
        ] {
            let s = AttnShape {
                batch: 2,
                n,
                m,
                heads,
                dh,
                dv: dh,
            };
            let q = rand_vec(2 * n * heads * dh, 1);
            let k = rand_vec(2 * m * heads * dh, 2);
            let v = rand_vec(2 * m * heads * dh, 3);
            let mut out = vec![0f32; q.len()];
            let scale = 1.0 / (dh as f32).sqrt();
            let mut time = |f: &mut dyn FnMut(&mut [f32])| {
                let mut ts: Vec<f64> = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f(&mut out);
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                ts.sort_by(f64::total_cmp);
                ts[2]
            };
            let blocked = time(&mut |o| attention_blocked_f32(&q, &k, &v, &s, scale, o));
            let mut line = format!("n={n} m={m} heads={heads} dh={dh}: blocked {blocked:.4}s");
            for isa in Isa::available() {
                let t = time(&mut |o| attention_fused_f32(&q, &k, &v, &s, scale, o, isa));
                line += &format!(", {isa:?} {t:.4}s ({:.2}x)", blocked / t);
            }
            eprintln!("{line}");
        }
    }

    #[test]
    fn declines_half_precision() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), DType::F16, &dev)?;
        assert!(attention(&q, &q, &q, 2, 0.5)?.is_none());
        Ok(())
    }
}
