//! The fused (flash-attention style) f32 kernel: packed key blocks, online softmax, the
//! register-tiled q·kᵀ and p·v products, one rayon task per (batch, head, query block).

use rayon::prelude::*;

use super::AttnShape;
#[cfg(target_arch = "x86_64")]
use crate::kernels::simd::{Avx2, Avx512};
use crate::kernels::simd::{F32s, Isa, Portable};

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
    /// Elements between q rows.
    q_rs: usize,
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
    s.assert_slices(q, k, v, out);
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    let rows = RowStrides {
        q: cq,
        k: cq,
        v: cv,
    };
    attention_fused_strided(q, k, v, s, rows, scale, out, isa)
}

/// Elements between one token's row and the next in q, k and v (`heads * dh` for separate
/// projections; `3 * heads * dh` when they are the thirds of one packed QKV row).
#[derive(Debug, Clone, Copy)]
pub(super) struct RowStrides {
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// [`attention_fused_f32`] reading token `j` of image `b` at `(b * n + j) * rows.q` in `q`
/// (`rows.k`, `rows.v` likewise, with `m` tokens), each head's values contiguous from
/// `h * dh` there; `out` as there.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fused_strided(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttnShape,
    rows: RowStrides,
    scale: f32,
    out: &mut [f32],
    isa: Isa,
) {
    let (cq, cv) = (s.heads * s.dh, s.heads * s.dv);
    // The last row only needs its own values (a packed row's later thirds are not read).
    let need = |tokens: usize, stride: usize, width: usize| match s.batch * tokens {
        0 => 0,
        t => (t - 1) * stride + width,
    };
    assert!(rows.q >= cq && rows.k >= cq && rows.v >= cv, "row strides");
    assert!(q.len() >= need(s.n, rows.q, cq), "q too short");
    assert!(k.len() >= need(s.m, rows.k, cq), "k too short");
    assert!(v.len() >= need(s.m, rows.v, cv), "v too short");
    assert_eq!(out.len(), s.batch * s.n * cv, "attention output size");
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
                let krow = &k[(b * s.m + j) * rows.k + h * s.dh..][..s.dh];
                for (d, &x) in krow.iter().enumerate() {
                    kt[(blk * s.dh + d) * kbs + jj] = x;
                }
                vp[j * dvp..j * dvp + s.dv]
                    .copy_from_slice(&v[(b * s.m + j) * rows.v + h * s.dv..][..s.dv]);
            }
        });
    let ctx = Fused {
        q: q.as_ptr(),
        kt: kt.as_ptr(),
        vp: vp.as_ptr(),
        out: out.as_mut_ptr(),
        q_rs: rows.q,
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
    let cv = s.heads * s.dv;
    let blocks = s.n.div_ceil(QUERY_BLOCK);
    let (blk, h, b) = (t % blocks, (t / blocks) % s.heads, t / (blocks * s.heads));
    let r0 = blk * QUERY_BLOCK;
    let nr = QUERY_BLOCK.min(s.n - r0);
    let (kbs, dh, dvp) = (c.kbs, s.dh, c.dvp);
    // Scaling q (nr*dh values) is cheaper than scaling the scores.
    let mut qs = vec![0f32; nr * dh];
    for (i, row) in qs.chunks_exact_mut(dh).enumerate() {
        let src = std::slice::from_raw_parts(c.q.add((b * s.n + r0 + i) * c.q_rs + h * dh), dh);
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
            let alpha = crate::kernels::math::exp(mx[r] - bm);
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
