//! The Brownian motion DPM++ SDE draws its noise from: torchsde 0.2.6's `BrownianInterval` as
//! diffusers' `BatchedBrownianTree` builds it (`tol=1e-6`, `pool_size=24`, `halfway_tree=True`,
//! no Lévy area), and diffusers' `BrownianTreeNoiseSampler` on top.
//!
//! The tree covers `[t0, t1]`. Its root increment is `randn(seed_W) * sqrt(t1 - t0)`. A node
//! `[s, e]` that is split at its (rounded) halfway point `m` gives its left child the Brownian
//! bridge sample `W_left = (m - s) * W / h + sqrt((m - s)(e - m) / h) * randn(seed)` with
//! `h = e - s`, and its right child `W - W_left`. Every seed comes from numpy's
//! `SeedSequence(entropy, spawn_key=(key, depth), pool_size=24)`, where the root's key is 0 and
//! a child's is `2 * parent + (0 left | 1 right)`, so a node's increment depends only on its
//! place in the tree, never on the order of the queries. Times are quantised with Python's
//! `round(x, 6)`. The tensor math is float32, as torch does it for a float32 sample: Python
//! floats are rounded to f32 before each multiplication.
//!
//! A query `W(ta, tb)` is the sum, left to right, of the nodes that tile `[ta, tb]` when each
//! node is split only at its halfway point (torchsde's binary search). The cache of node
//! increments only saves recomputation: values never depend on it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use rayon::prelude::*;

use super::seed_sequence::SeedSequence;
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

/// torchsde's `BrownianTree` defaults, as diffusers passes them.
const POOL_SIZE: usize = 24;
/// Node increments kept (torchsde's LRU `cache_size` default).
pub const DEFAULT_CACHE: usize = 45;
/// A run's noise keeps up to this many node increments per tree: a 20-step SD 1.5 run then
/// recomputes no node (0.49 -> 0.29 CPU-s of noise for a 512x512 image, measured)...
const RUN_CACHE: usize = 128;
/// ...within this many bytes for the whole batch.
const RUN_CACHE_BYTES: usize = 64 << 20;
/// Deeper trees would need spawn keys beyond 128 bits; `tol = 1e-6` stops far sooner (about
/// log2((t1 - t0) / 1e-6) levels).
const MAX_DEPTH: u32 = 120;

/// Python's `round(x, 6)`: the decimal with 6 places nearest to the exact binary value (ties to
/// even), read back as the nearest double. Rust's fixed-precision formatting rounds the same way.
pub fn round6(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.6}").parse().unwrap_or(x)
}

#[derive(Debug, Clone, Copy)]
struct Split {
    midway: f64,
    w_seed: u32,
    left: usize,
    right: usize,
}

#[derive(Debug, Clone)]
struct Node {
    start: f64,
    end: f64,
    /// `None` for the root.
    parent: Option<usize>,
    is_left: bool,
    spawn_key: u128,
    depth: u32,
    split: Option<Split>,
}

/// One `BrownianInterval(t0, t1, size, entropy, tol=1e-6, pool_size=24, halfway_tree=True)`.
#[derive(Debug, Clone)]
pub struct BrownianTree {
    entropy: u128,
    size: usize,
    nodes: Vec<Node>,
    root_w: Arc<[f32]>,
    cache: NodeCache,
}

const ROOT: usize = 0;

impl BrownianTree {
    /// The tree over `[t0, t1]` (`t0 <= t1`) of `size` independent motions seeded by `entropy`.
    pub fn new(t0: f64, t1: f64, size: usize, entropy: u128) -> Result<Self> {
        Self::with_cache(t0, t1, size, entropy, DEFAULT_CACHE)
    }

    /// [`Self::new`] keeping at most `cache` node increments (0: recompute every time).
    pub fn with_cache(t0: f64, t1: f64, size: usize, entropy: u128, cache: usize) -> Result<Self> {
        if !(t0.is_finite() && t1.is_finite() && t0 <= t1) {
            return Err(PipelineError::InvalidRequest(format!(
                "Brownian tree interval [{t0}, {t1}] is not an ordered pair of finite times"
            )));
        }
        // generate_state(3): the root's W, H and Lévy-area seeds; only W is used.
        let seeds = SeedSequence::new(entropy, &[], POOL_SIZE).generate_state(3);
        // The root's scale uses the unrounded times, as torchsde does.
        let scale = (t1 - t0).sqrt() as f32;
        let root_w: Arc<[f32]> = randn(seeds[0], size).iter().map(|v| v * scale).collect();
        let root = Node {
            start: round6(t0),
            end: round6(t1),
            parent: None,
            is_left: false,
            spawn_key: 0,
            depth: 0,
            split: None,
        };
        Ok(Self {
            entropy,
            size,
            nodes: vec![root],
            root_w,
            cache: NodeCache::new(cache),
        })
    }

    /// Elements of every increment.
    pub fn size(&self) -> usize {
        self.size
    }

    /// `W(ta, tb)`, torchsde's `BrownianInterval.__call__(ta, tb)`: times outside the tree are
    /// clamped to it (torchsde warns), `ta > tb` is an error, and `ta == tb` gives zeros.
    pub fn increment(&mut self, ta: f64, tb: f64) -> Result<Vec<f32>> {
        let (start, end) = (self.nodes[ROOT].start, self.nodes[ROOT].end);
        // The clamps compare the unrounded query with the rounded ends, as torchsde does.
        let ta = ta.max(start).min(end);
        let tb = tb.max(start).min(end);
        if ta.is_nan() || tb.is_nan() || ta > tb {
            return Err(PipelineError::InvalidRequest(format!(
                "Brownian increment over [{ta}, {tb}]: times must be ordered"
            )));
        }
        let (ta, tb) = (round6(ta), round6(tb));
        if ta == tb {
            // torchsde returns zeros for equal raw times; equal after rounding is the same
            // empty interval.
            return Ok(vec![0.0; self.size]);
        }
        let mut tiles = Vec::new();
        self.locate(ROOT, ta, tb, &mut tiles)?;
        let increments = self.node_increments(&tiles);
        let mut total = increments[0].to_vec();
        for w in &increments[1..] {
            for (acc, v) in total.iter_mut().zip(w.iter()) {
                *acc += v;
            }
        }
        Ok(total)
    }

    /// torchsde's `_loc_inner` from the root: the nodes tiling `[ta, tb]`, left to right,
    /// splitting unsplit nodes at their halfway points on the way down.
    fn locate(&mut self, node: usize, ta: f64, tb: f64, out: &mut Vec<usize>) -> Result<()> {
        let (start, end) = (self.nodes[node].start, self.nodes[node].end);
        if ta == start && tb == end {
            out.push(node);
            return Ok(());
        }
        if self.nodes[node].split.is_none() {
            let target = if ta == start { tb } else { ta };
            self.split_towards(node, target)?;
        }
        let split = self.nodes[node].split.expect("split above");
        if tb <= split.midway {
            self.locate(split.left, ta, tb, out)
        } else if ta >= split.midway {
            self.locate(split.right, ta, tb, out)
        } else {
            self.locate(split.left, ta, split.midway, out)?;
            self.locate(split.right, split.midway, tb, out)
        }
    }

    /// torchsde's `_split(midway)` with `halfway_tree`: split at the halfway point, then keep
    /// splitting the child that holds `target` until some node boundary is `target`.
    fn split_towards(&mut self, mut node: usize, target: f64) -> Result<()> {
        loop {
            let midway = self.split_halfway(node)?;
            if target > midway {
                node = self.nodes[node].split.expect("just split").right;
            } else if target < midway {
                node = self.nodes[node].split.expect("just split").left;
            } else {
                return Ok(());
            }
        }
    }

    /// torchsde's `_split_exact(0.5 * (end + start))`: the node's seeds and its two children.
    fn split_halfway(&mut self, node: usize) -> Result<f64> {
        let n = &self.nodes[node];
        let midway = round6(0.5 * (n.end + n.start));
        if n.depth >= MAX_DEPTH {
            return Err(PipelineError::InvalidRequest(format!(
                "Brownian tree deeper than {MAX_DEPTH} levels"
            )));
        }
        let seeds = SeedSequence::new(self.entropy, &[n.spawn_key, n.depth as u128], POOL_SIZE)
            .generate_state(4);
        let child = |start: f64, end: f64, is_left: bool| Node {
            start,
            end,
            parent: Some(node),
            is_left,
            spawn_key: 2 * n.spawn_key + u128::from(!is_left),
            depth: n.depth + 1,
            split: None,
        };
        let (left, right) = (child(n.start, midway, true), child(midway, n.end, false));
        let left_index = self.nodes.len();
        self.nodes.push(left);
        self.nodes.push(right);
        self.nodes[node].split = Some(Split {
            midway,
            w_seed: seeds[0],
            left: left_index,
            right: left_index + 1,
        });
        Ok(midway)
    }

    /// The increments of `wanted` (in order): cached ones as they are, the others computed from
    /// their parents' level by level down the tree, the nodes of a level on parallel threads.
    fn node_increments(&mut self, wanted: &[usize]) -> Vec<Arc<[f32]>> {
        let mut known: HashMap<usize, Arc<[f32]>> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        let mut seen: HashSet<usize> = HashSet::new();
        let mut stack = wanted.to_vec();
        while let Some(node) = stack.pop() {
            if !seen.insert(node) {
                continue;
            }
            match self.nodes[node].parent {
                None => {
                    known.insert(node, self.root_w.clone());
                }
                Some(parent) => match self.cache.get(node) {
                    Some(w) => {
                        known.insert(node, w);
                    }
                    None => {
                        missing.push(node);
                        stack.push(parent);
                    }
                },
            }
        }
        missing.sort_by_key(|&n| self.nodes[n].depth);
        let nodes = &self.nodes;
        for level in missing.chunk_by(|a, b| nodes[*a].depth == nodes[*b].depth) {
            let computed: Vec<Arc<[f32]>> = level
                .par_iter()
                .map(|&n| {
                    let parent = nodes[n].parent.expect("not the root");
                    self.bridge(n, &known[&parent])
                })
                .collect();
            for (&n, w) in level.iter().zip(computed) {
                self.cache.put(n, w.clone());
                known.insert(n, w);
            }
        }
        wanted.iter().map(|n| known[n].clone()).collect()
    }

    /// A (non-root) node's increment: the Brownian bridge sample from its parent's.
    fn bridge(&self, node: usize, parent_w: &[f32]) -> Arc<[f32]> {
        let parent = self.nodes[node].parent.expect("not the root");
        let p = &self.nodes[parent];
        let split = p.split.expect("a parent is split");
        let h_reciprocal = 1.0 / (p.end - p.start);
        let left_diff = split.midway - p.start;
        let right_diff = p.end - split.midway;
        let var = left_diff * right_diff * h_reciprocal;
        // mean = left_diff * W * h_reciprocal; left_W = mean + sqrt(var) * noise, each Python
        // float rounded to f32 and each product rounded, as torch computes it.
        let (a, b, c) = (left_diff as f32, h_reciprocal as f32, var.sqrt() as f32);
        let noise = randn(split.w_seed, self.size);
        let is_left = self.nodes[node].is_left;
        parent_w
            .iter()
            .zip(noise.iter())
            .map(|(&pw, &z)| {
                let left_w = pw * a * b + c * z;
                if is_left {
                    left_w
                } else {
                    pw - left_w
                }
            })
            .collect()
    }
}

/// torchsde's `_randn`: `torch.randn(size, generator=Generator().manual_seed(seed))`, float32.
fn randn(seed: u32, size: usize) -> Vec<f32> {
    TorchRng::new(u64::from(seed)).randn(size)
}

/// A least-recently-used store of node increments.
#[derive(Debug, Clone)]
struct NodeCache {
    capacity: usize,
    entries: VecDeque<(usize, Arc<[f32]>)>,
}

impl NodeCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::new(),
        }
    }

    fn get(&mut self, node: usize) -> Option<Arc<[f32]>> {
        let at = self.entries.iter().position(|(n, _)| *n == node)?;
        let entry = self.entries.remove(at)?;
        let w = entry.1.clone();
        self.entries.push_back(entry);
        Some(w)
    }

    fn put(&mut self, node: usize, w: Arc<[f32]>) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((node, w));
    }
}

/// A sampler's Brownian noise between two sigmas for a batch shaped as `like`: one tree per
/// image, seeded with its generator's seed, over the smallest positive and largest of `sigmas`
/// (the whole schedule, whichever step a run starts from: A1111's `create_noise_sampler`),
/// made at the first call and kept in `tree`.
pub fn batch_noise(
    tree: &mut Option<BrownianNoise>,
    sigmas: &[f32],
    like: &candle_core::Tensor,
    rngs: &[TorchRng],
    sigma: f32,
    sigma_next: f32,
) -> Result<candle_core::Tensor> {
    let batch = like.dim(0)?;
    if rngs.len() != batch {
        return Err(PipelineError::InvalidRequest(format!(
            "{} generators for a batch of {batch}",
            rngs.len()
        )));
    }
    if tree.is_none() {
        let positive = sigmas.iter().copied().filter(|&s| s > 0.0);
        let min = positive.fold(f32::INFINITY, f32::min);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let seeds: Vec<u64> = rngs.iter().map(TorchRng::initial_seed).collect();
        *tree = Some(BrownianNoise::new(
            min,
            max,
            &seeds,
            like.elem_count() / batch.max(1),
        )?);
    }
    let values = tree
        .as_mut()
        .expect("made above")
        .sample(sigma, sigma_next)?;
    Ok(candle_core::Tensor::from_vec(
        values,
        like.shape(),
        like.device(),
    )?)
}

/// diffusers' `BrownianTreeNoiseSampler` over a `BatchedBrownianTree`: one tree per image, each
/// seeded with its own seed, over `[sigma_min, sigma_max]`.
#[derive(Debug, Clone)]
pub struct BrownianNoise {
    trees: Vec<BrownianTree>,
    /// The tree's own orientation (`BatchedBrownianTree.sort` of its ends): -1 when built with
    /// `sigma_min == sigma_max`.
    sign: f32,
}

impl BrownianNoise {
    /// Trees over the schedule's smallest positive and largest sigma (float32 values), each
    /// `per_image` elements, one per seed.
    pub fn new(sigma_min: f32, sigma_max: f32, seeds: &[u64], per_image: usize) -> Result<Self> {
        let (lo, hi, sign) = sort(sigma_min, sigma_max);
        let per_tree_bytes = RUN_CACHE_BYTES / (seeds.len().max(1) * per_image.max(1) * 4);
        let cache = per_tree_bytes.clamp(DEFAULT_CACHE, RUN_CACHE);
        let trees = seeds
            .iter()
            .map(|&s| {
                BrownianTree::with_cache(lo as f64, hi as f64, per_image, u128::from(s), cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { trees, sign })
    }

    /// `noise_sampler(sigma, sigma_next)`: `W(sigma, sigma_next) / sqrt(|sigma_next - sigma|)`
    /// for every image, concatenated in batch order. Standard normal for each image.
    pub fn sample(&mut self, sigma: f32, sigma_next: f32) -> Result<Vec<f32>> {
        let (lo, hi, sign) = sort(sigma, sigma_next);
        let sign = self.sign * sign;
        let scale = (sigma_next - sigma).abs().sqrt();
        // The images' trees are independent: one thread each.
        let per_image = self
            .trees
            .par_iter_mut()
            .map(|tree| tree.increment(lo as f64, hi as f64))
            .collect::<Result<Vec<_>>>()?;
        Ok(per_image
            .into_iter()
            .flatten()
            .map(|v| (v * sign) / scale)
            .collect())
    }
}

/// `BatchedBrownianTree.sort`: `(a, b, 1)` if `a < b`, else `(b, a, -1)`.
fn sort(a: f32, b: f32) -> (f32, f32, f32) {
    if a < b {
        (a, b, 1.0)
    } else {
        (b, a, -1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round6_ties_go_to_even() {
        assert_eq!(round6(0.0078125), 0.007812);
        assert_eq!(round6(0.0234375), 0.023438);
        assert_eq!(round6(14.614646911621094), 14.614647);
    }

    /// Caches save work only: any query order and any cache size give the same bits.
    #[test]
    fn increments_do_not_depend_on_query_order_or_cache() {
        let queries = [
            (7.7, 14.6),
            (4.08, 14.6),
            (2.56, 4.08),
            (0.03, 0.69),
            (1.0, 1.6),
            (0.2, 9.9),
        ];
        let make = |cache| BrownianTree::with_cache(0.0291, 14.6146, 37, 99, cache).unwrap();
        let mut forward = make(DEFAULT_CACHE);
        let expected: Vec<Vec<f32>> = queries
            .iter()
            .map(|&(a, b)| forward.increment(a, b).unwrap())
            .collect();
        for cache in [0, 1, 3, 1000] {
            let mut backward = make(cache);
            for (i, &(a, b)) in queries.iter().enumerate().rev() {
                assert_eq!(
                    backward.increment(a, b).unwrap(),
                    expected[i],
                    "cache {cache}"
                );
            }
        }
        // Increments add up over adjacent intervals (up to rounding).
        let mut tree = make(DEFAULT_CACHE);
        let whole = tree.increment(1.0, 9.0).unwrap();
        let (a, b) = (
            tree.increment(1.0, 4.0).unwrap(),
            tree.increment(4.0, 9.0).unwrap(),
        );
        for i in 0..whole.len() {
            assert!((whole[i] - (a[i] + b[i])).abs() < 1e-5);
        }
    }

    #[test]
    fn queries_are_clamped_ordered_and_empty_when_equal() {
        let mut tree = BrownianTree::new(0.5, 2.0, 4, 1).unwrap();
        assert_eq!(tree.increment(1.0, 1.0).unwrap(), vec![0.0; 4]);
        assert!(tree.increment(1.5, 1.0).is_err());
        assert_eq!(
            tree.increment(0.1, 3.0).unwrap(),
            tree.increment(0.5, 2.0).unwrap()
        );
        assert!(BrownianTree::new(2.0, 1.0, 4, 1).is_err());
    }
}
