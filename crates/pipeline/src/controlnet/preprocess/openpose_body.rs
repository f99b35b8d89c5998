//! `Body.__call__`'s post-processing (`annotator/openpose/body.py`), from the network's maps at
//! the image's size to the people found: each heatmap smoothed by scipy's `gaussian_filter`
//! (σ 3, radius `int(4σ + 0.5)`, 'reflect' edges, f64), its peaks (at least each of the four
//! neighbours, zero past the edge, and above 0.1); each limb's candidate pairs scored along
//! their PAF at 10 points (`np.linspace`, rounded half to even), kept where more than 8 of the
//! 10 exceed 0.05 and the mean plus `min(0.5 H / norm - 1, 0)` is positive, taken best first
//! with each end once; the pairs assembled into people (`subset`) limb by limb, joining,
//! merging or starting rows as body.py does; people with fewer than 4 parts or a mean score
//! under 0.4 dropped.

use super::openpose::Maps;

/// The 19 limbs (1-based keypoints) and their PAF channels (`mapIdx` minus 19).
pub(super) const LIMB_SEQ: [(usize, usize); 19] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
    (3, 17),
    (6, 18),
];
const MAP_IDX: [(usize, usize); 19] = [
    (31, 32),
    (39, 40),
    (33, 34),
    (35, 36),
    (41, 42),
    (43, 44),
    (19, 20),
    (21, 22),
    (23, 24),
    (25, 26),
    (27, 28),
    (29, 30),
    (47, 48),
    (49, 50),
    (53, 54),
    (51, 52),
    (55, 56),
    (37, 38),
    (45, 46),
];
const THRE1: f64 = 0.1;
const THRE2: f64 = 0.05;
const MID_NUM: usize = 10;
const SIGMA: f64 = 3.0;

/// A peak of a part's heatmap: pixel, unsmoothed score, running id over all parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub x: i64,
    pub y: i64,
    pub score: f64,
    pub id: usize,
}

/// A person: 18 keypoints in pixels (`None`: not found), `subset`'s score and part count.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyPose {
    pub keypoints: Vec<Option<Peak>>,
    pub total_score: f64,
    pub total_parts: f64,
}

/// numpy's pairwise sum of a short f64 array (`phi_x.sum()`): eight running sums for 8..=128
/// values, combined as a tree, the rest added after.
pub(super) fn numpy_sum(a: &[f64]) -> f64 {
    if a.len() < 8 {
        return a.iter().fold(0.0, |s, &v| s + v);
    }
    let mut r = [0f64; 8];
    r.copy_from_slice(&a[..8]);
    let whole = a.len() - a.len() % 8;
    for i in (8..whole).step_by(8) {
        for j in 0..8 {
            r[j] += a[i + j];
        }
    }
    let mut s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for &v in &a[whole..] {
        s += v;
    }
    s
}

/// `scipy.ndimage._gaussian_kernel1d(sigma, 0, radius)`.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let c = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (c * (x * x) as f64).exp())
        .collect();
    let sum = numpy_sum(&phi);
    phi.iter().map(|p| p / sum).collect()
}

/// 'reflect' (`d c b a | a b c d | d c b a`) index into `0..n`.
fn reflect(i: i64, n: i64) -> usize {
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// `gaussian_filter(map, sigma)` of an f64 map: rows' columns first (axis 0), then rows, each
/// the symmetric correlation scipy runs (centre times its weight, then the outer pairs first).
pub fn gaussian_filter(map: &[f64], w: usize, h: usize, sigma: f64) -> Vec<f64> {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let pass = |src: &[f64], len: usize, count: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut out = vec![0f64; src.len()];
        // The line with `r` reflected values on each side.
        let mut ext = vec![0f64; len + 2 * r as usize];
        for line in 0..count {
            for (e, v) in ext.iter_mut().enumerate() {
                *v = src[at(line, reflect(e as i64 - r, len as i64))];
            }
            for i in 0..len {
                let c = i + r as usize;
                let mut acc = ext[c] * k[r as usize];
                for j in (1..=r as usize).rev() {
                    acc += (ext[c - j] + ext[c + j]) * k[r as usize - j];
                }
                out[at(line, i)] = acc;
            }
        }
        out
    };
    let vertical = pass(map, h, w, &|x, y| y * w + x);
    pass(&vertical, w, h, &|y, x| y * w + x)
}

/// Each of the 18 parts' peaks, in row-major order, ids running on.
pub fn find_peaks(heat: &Maps) -> Vec<Vec<Peak>> {
    let (w, h) = (heat.width, heat.height);
    let mut id = 0;
    (0..18)
        .map(|part| {
            let ori: Vec<f64> = heat.channel(part).iter().map(|&v| f64::from(v)).collect();
            let m = gaussian_filter(&ori, w, h, SIGMA);
            let at = |x: i64, y: i64| {
                if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
                    0.0
                } else {
                    m[y as usize * w + x as usize]
                }
            };
            let mut peaks = Vec::new();
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let v = at(x, y);
                    if v > THRE1
                        && v >= at(x, y - 1)
                        && v >= at(x, y + 1)
                        && v >= at(x - 1, y)
                        && v >= at(x + 1, y)
                    {
                        peaks.push(Peak {
                            x,
                            y,
                            score: ori[y as usize * w + x as usize],
                            id,
                        });
                        id += 1;
                    }
                }
            }
            peaks
        })
        .collect()
}

/// `np.linspace(a, b, MID_NUM)`: `a + i * step`, the last exactly `b`.
fn linspace(a: f64, b: f64) -> [f64; MID_NUM] {
    let step = (b - a) / (MID_NUM - 1) as f64;
    let mut out = [0f64; MID_NUM];
    for (i, o) in out.iter_mut().enumerate() {
        *o = i as f64 * step + a;
    }
    out[MID_NUM - 1] = b;
    out
}

/// A limb's chosen pairs: (peak id A, peak id B, score, index in A's list, in B's).
type Connection = (usize, usize, f64, usize, usize);

/// Limb `k`'s pairs between `a`'s and `b`'s peaks, best first, each peak once.
fn connect(paf: &Maps, k: usize, a: &[Peak], b: &[Peak], image_h: usize) -> Vec<Connection> {
    let (cx, cy) = (MAP_IDX[k].0 - 19, MAP_IDX[k].1 - 19);
    let (px, py) = (paf.channel(cx), paf.channel(cy));
    let w = paf.width;
    let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
    for (i, pa) in a.iter().enumerate() {
        for (j, pb) in b.iter().enumerate() {
            let (vx, vy) = (pb.x - pa.x, pb.y - pa.y);
            let norm = ((vx * vx + vy * vy) as f64).sqrt().max(0.001);
            let (ux, uy) = (vx as f64 / norm, vy as f64 / norm);
            let xs = linspace(pa.x as f64, pb.x as f64);
            let ys = linspace(pa.y as f64, pb.y as f64);
            let scores: Vec<f64> = xs
                .iter()
                .zip(&ys)
                .map(|(&x, &y)| {
                    let i = y.round_ties_even() as usize * w + x.round_ties_even() as usize;
                    f64::from(px[i]) * ux + f64::from(py[i]) * uy
                })
                .collect();
            let mean = scores.iter().fold(0.0, |s, &v| s + v) / MID_NUM as f64;
            let prior = mean + (0.5 * image_h as f64 / norm - 1.0).min(0.0);
            let above = scores.iter().filter(|&&s| s > THRE2).count();
            if above as f64 > 0.8 * MID_NUM as f64 && prior > 0.0 {
                candidates.push((i, j, prior));
            }
        }
    }
    // Python's stable sort, reverse=True: equal scores keep their order.
    candidates.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
    let mut chosen: Vec<Connection> = Vec::new();
    for (i, j, s) in candidates {
        if chosen.iter().all(|c| c.3 != i && c.4 != j) {
            chosen.push((a[i].id, b[j].id, s, i, j));
            if chosen.len() >= a.len().min(b.len()) {
                break;
            }
        }
    }
    chosen
}

/// The people of the network's maps at the image's size (`image_h`: the image's height, in
/// the distance prior).
pub fn body_pose(paf: &Maps, heat: &Maps) -> Vec<BodyPose> {
    let peaks = find_peaks(heat);
    let candidate: Vec<Peak> = peaks.iter().flatten().copied().collect();
    let connections: Vec<Option<Vec<Connection>>> = (0..LIMB_SEQ.len())
        .map(|k| {
            let (a, b) = (&peaks[LIMB_SEQ[k].0 - 1], &peaks[LIMB_SEQ[k].1 - 1]);
            (!a.is_empty() && !b.is_empty()).then(|| connect(paf, k, a, b, heat.height))
        })
        .collect();
    // Rows of 18 peak ids (-1: none), the total score and the part count, as f64 as numpy's.
    let mut subset: Vec<[f64; 20]> = Vec::new();
    for (k, conns) in connections.iter().enumerate() {
        let Some(conns) = conns else { continue };
        let (ia, ib) = (LIMB_SEQ[k].0 - 1, LIMB_SEQ[k].1 - 1);
        for &(id_a, id_b, s, _, _) in conns {
            let (part_a, part_b) = (id_a as f64, id_b as f64);
            // body.py's `subset_idx` holds two: a third match would fail there (IndexError);
            // here the first two count.
            let found: Vec<usize> = (0..subset.len())
                .filter(|&j| subset[j][ia] == part_a || subset[j][ib] == part_b)
                .take(2)
                .collect();
            match found[..] {
                [j] if subset[j][ib] != part_b => {
                    subset[j][ib] = part_b;
                    subset[j][19] += 1.0;
                    subset[j][18] += candidate[id_b].score + s;
                }
                [_] => {}
                [j1, j2] => {
                    let both = (0..18).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                    if !both {
                        let row2 = subset[j2];
                        for p in 0..18 {
                            subset[j1][p] += row2[p] + 1.0;
                        }
                        subset[j1][18] += row2[18];
                        subset[j1][19] += row2[19];
                        subset[j1][18] += s;
                        subset.remove(j2);
                    } else {
                        subset[j1][ib] = part_b;
                        subset[j1][19] += 1.0;
                        subset[j1][18] += candidate[id_b].score + s;
                    }
                }
                _ if k < 17 => {
                    let mut row = [-1.0; 20];
                    row[ia] = part_a;
                    row[ib] = part_b;
                    row[19] = 2.0;
                    row[18] = (0.0 + candidate[id_a].score + candidate[id_b].score) + s;
                    subset.push(row);
                }
                _ => {}
            }
        }
    }
    subset
        .iter()
        .filter(|r| !(r[19] < 4.0 || r[18] / r[19] < 0.4))
        .map(|r| BodyPose {
            keypoints: r[..18]
                .iter()
                .map(|&i| (i as i64 != -1).then(|| candidate[i as i64 as usize]))
                .collect(),
            total_score: r[18],
            total_parts: r[19],
        })
        .collect()
}
