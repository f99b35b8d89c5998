//! The extension's Anyline module (`softedge_anyline`: `PreprocessorAnyline` in
//! `scripts/preprocessor/teed.py`), on the image padded at the resolution:
//! - the TED network with MistoLine's `MTEED.pth` weights ([`MTEED`]), `safe_steps` as
//!   softedge_teed's ([`teed_edges`]);
//! - the legacy `lineart_standard` run on the padded image at the same resolution (a second
//!   `resize_image_with_pad`: the identity only when the padded image's shorter side is the
//!   resolution, a multiple of 64; otherwise the two maps' shapes differ and the extension's
//!   numpy raises, so we refuse);
//! - `get_intensity_mask(0, 1)`: the lineart values 0 and 1 kept, every other value 0;
//! - skimage's `remove_small_objects(mask.astype(bool), min_size=36, connectivity=1)` on the
//!   HxWx3 mask: a 3-d array, so a pixel's three channels are neighbours (6-connectivity) and a
//!   4-connected component of `n` pixels is `3n` voxels, dropped when `3n < 36`;
//! - `combine_layers(teed, kept lineart)` in numpy's uint8 (wrapping) arithmetic;
//! - the pad removed.

use super::lines::lineart_standard;
use super::networks::{AnnotatorFile, HubFile};
use super::resize::{resize_image_with_pad, Padded};
use super::teed::{teed_edges, TeedNetwork};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};
use candle_core::Device;
use std::sync::Arc;

/// The file `TEEDDetector(mteed=True)` loads (`annotator/downloads/TEED/`).
pub const MTEED_FILE: &str = "MTEED.pth";

/// The TED network's MistoLine weights, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static MTEED: AnnotatorFile = AnnotatorFile {
    name: MTEED_FILE,
    subfolder: "TEED",
    // `load_mteed_model`'s remote_url (not in lllyasviel/Annotators).
    hub: HubFile {
        repo: "TheMistoAI/MistoLine",
        path: "Anyline/MTEED.pth",
    },
    load: |path| Ok(Arc::new(TeedNetwork::load(path, &Device::Cpu)?)),
};

/// `remove_small_objects`' `min_size`, in voxels of the HxWx3 mask.
const MIN_SIZE: usize = 36;
/// The mask's channels: each pixel is that many voxels, all connected.
const CHANNELS: usize = 3;

/// skimage's `remove_small_objects(mask, min_size, connectivity=1)` of a `width` x `height`
/// mask repeated over `depth` channels: true where a pixel's 4-connected component, counted
/// `depth` times, has at least `min_size` voxels (skimage drops `size < min_size`).
pub fn remove_small_objects(
    mask: &[bool],
    width: usize,
    height: usize,
    depth: usize,
    min_size: usize,
) -> Vec<bool> {
    assert_eq!(mask.len(), width * height);
    let mut kept = vec![false; mask.len()];
    let mut seen = vec![false; mask.len()];
    let mut component = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        // Flood fill over the four axis neighbours.
        component.clear();
        component.push(start);
        seen[start] = true;
        let mut next = 0;
        while next < component.len() {
            let i = component[next];
            next += 1;
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then(|| i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then(|| i + width),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    component.push(j);
                }
            }
        }
        if component.len() * depth >= min_size {
            for &i in &component {
                kept[i] = true;
            }
        }
    }
    kept
}

/// `combine_layers(base, top)` of one uint8 value each, as numpy computes it (Python's `1`
/// stays uint8, so every step wraps): `top`'s nonzero values screen `base`, the rest is
/// `base`.
pub fn combine_layers(base: u8, top: u8) -> u8 {
    let mask = u8::from(top != 0);
    let temp = 1u8.wrapping_sub(1u8.wrapping_sub(top).wrapping_mul(1u8.wrapping_sub(base)));
    base.wrapping_mul(1 - mask)
        .wrapping_add(temp.wrapping_mul(mask))
}

/// The lineart layer of the padded image: `lineart_standard` at `resolution`, its values
/// above 1 dropped, then the small components. One channel, the padded image's size.
pub fn anyline_lineart(padded: &RgbImage, resolution: u32) -> Result<Vec<u8>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let again: Padded = resize_image_with_pad(padded, resolution);
    if (again.width, again.height) != (w, h) {
        // The extension's combine_layers then broadcasts a w x h map with another size.
        return Err(PipelineError::InvalidRequest(format!(
            "softedge_anyline needs a resolution that is a multiple of 64 ({resolution} is \
             not): it runs lineart_standard on the {w}x{h} padded image at the resolution, \
             which makes a {}x{} map the TEED map cannot combine with",
            again.width, again.height
        )));
    }
    let lineart = lineart_standard(&again);
    let mask: Vec<u8> = lineart
        .pixels
        .chunks_exact(3)
        .map(|p| if p[0] <= 1 { p[0] } else { 0 })
        .collect();
    let nonzero: Vec<bool> = mask.iter().map(|&v| v != 0).collect();
    let kept = remove_small_objects(&nonzero, w, h, CHANNELS, MIN_SIZE);
    Ok(mask
        .iter()
        .zip(&kept)
        .map(|(&v, &k)| if k { v } else { 0 })
        .collect())
}

/// `PreprocessorAnyline` on the padded image: the one-channel map of its size.
pub fn anyline_map(
    net: &TeedNetwork,
    padded: &RgbImage,
    resolution: u32,
    safe_steps: u32,
) -> Result<Vec<u8>> {
    let lineart = anyline_lineart(padded, resolution)?;
    let edges = teed_edges(net, padded, safe_steps)?;
    Ok(edges
        .iter()
        .zip(&lineart)
        .map(|(&base, &top)| combine_layers(base, top))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_four_connected_and_counted_per_voxel() {
        // A 2x6 block (12 pixels, 36 voxels: kept), a 11-pixel row (33: dropped), a diagonal
        // of 12 pixels touching only at corners (12 singletons: dropped).
        let (w, h) = (26, 18);
        let mut mask = vec![false; w * h];
        for y in 0..2 {
            for x in 0..6 {
                mask[y * w + x] = true;
            }
        }
        for x in 0..11 {
            mask[4 * w + x] = true;
        }
        for i in 0..12 {
            mask[(i + 5) * w + 12 + i] = true;
        }
        let kept = remove_small_objects(&mask, w, h, 3, 36);
        assert!(kept[0] && kept[w + 5]);
        assert!(!kept[4 * w] && !kept[4 * w + 10]);
        assert!((0..12).all(|i| !kept[(i + 5) * w + 12 + i]));
        assert_eq!(kept.iter().filter(|&&k| k).count(), 12);
    }

    #[test]
    fn combine_layers_wraps_as_numpy_uint8() {
        // top 0 leaves base; top 1 gives 1 - 0 = 1 whatever base is.
        assert_eq!(combine_layers(200, 0), 200);
        assert_eq!(combine_layers(0, 0), 0);
        assert_eq!(combine_layers(200, 1), 1);
        assert_eq!(combine_layers(0, 1), 1);
        // top 2 (not an Anyline value): 1 - (255 * (1 - b)).
        assert_eq!(
            combine_layers(3, 2),
            1u8.wrapping_sub(255u8.wrapping_mul(254))
        );
    }
}
