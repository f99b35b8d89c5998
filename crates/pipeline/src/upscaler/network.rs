//! One upscaling network of whichever architecture its file holds, detected from the names
//! of its tensors as spandrel (what A1111 1.8+ reads every upscaler file with) detects them,
//! in spandrel's order: Real-ESRGAN Compact first, ..., SwinIR, ..., ESRGAN (RRDBNet,
//! ESRGAN+); the architectures spandrel knows and this server does not run are refused by
//! name where spandrel would have taken them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::compact::Compact;
use super::net::Esrgan;
use super::swinir::SwinIr;
use crate::{PipelineError, Result};

/// What a file holding none of the supported architectures is told.
pub const SUPPORTED: &str = "ESRGAN (RRDBNet: ESRGAN, Real-ESRGAN, BSRGAN, ESRGAN+), \
                             Real-ESRGAN Compact (SRVGGNetCompact) and SwinIR";

/// One entry of spandrel's registry, in its order: an architecture run here, or one refused by
/// its name, known by tensors that spandrel's detection of it requires (and the others' do
/// not all have).
enum Candidate {
    Run(Kind),
    Refuse(&'static str, &'static [&'static str]),
}

/// The architectures run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compact,
    SwinIr,
    Esrgan,
}

/// spandrel 0.4.2's `MAIN_REGISTRY` order, for the architectures it tells apart from these.
const REGISTRY: [Candidate; 14] = [
    Candidate::Run(Kind::Compact),
    Candidate::Refuse(
        "SwiftSRGAN",
        &[
            "initial.cnn.depthwise.weight",
            "final_conv.pointwise.weight",
        ],
    ),
    Candidate::Refuse(
        "HAT",
        &[
            "conv_first.weight",
            "layers.0.residual_group.overlap_attn.qkv.weight",
        ],
    ),
    Candidate::Refuse(
        "Swin2SR",
        &[
            "patch_embed.proj.weight",
            "layers.0.residual_group.blocks.0.norm1.weight",
        ],
    ),
    Candidate::Run(Kind::SwinIr),
    Candidate::Refuse(
        "OmniSR",
        &[
            "residual_layer.0.residual_layer.0.layer.0.fn.0.weight",
            "input.weight",
        ],
    ),
    Candidate::Refuse("RGT", &["before_RG.1.weight", "layers.0.blocks.0.gamma"]),
    Candidate::Refuse(
        "DAT",
        &["before_RG.1.weight", "layers.0.blocks.0.ffn.sg.conv.weight"],
    ),
    Candidate::Refuse("SPAN", &["conv_1.sk.weight", "block_1.c1_r.sk.weight"]),
    Candidate::Refuse(
        "RealCUGAN",
        &["unet1.conv1.conv.0.weight", "unet2.conv1.conv.0.weight"],
    ),
    Candidate::Refuse(
        "ATD",
        &[
            "layers.0.residual_group.layers.0.wqkv.weight",
            "conv_first.weight",
        ],
    ),
    Candidate::Refuse(
        "DRCT",
        &["layers.0.swin1.norm1.weight", "layers.0.adjust1.weight"],
    ),
    Candidate::Run(Kind::Esrgan),
    Candidate::Refuse("PLKSR", &["feats.0.weight", "feats.1.refine.weight"]),
];

/// The first of [`REGISTRY`] that a state with these names is: `Ok` an architecture run
/// here, `Err(Some(name))` one refused, `Err(None)` none.
fn detect(has: &dyn Fn(&str) -> bool) -> std::result::Result<Kind, Option<&'static str>> {
    for candidate in &REGISTRY {
        match candidate {
            Candidate::Run(kind) => {
                let found = match kind {
                    Kind::Compact => Compact::detect(has),
                    Kind::SwinIr => SwinIr::detect(has),
                    Kind::Esrgan => Esrgan::detect(has),
                };
                if found {
                    return Ok(*kind);
                }
            }
            Candidate::Refuse(name, keys) if keys.iter().all(|k| has(k)) => {
                return Err(Some(name));
            }
            Candidate::Refuse(..) => {}
        }
    }
    Err(None)
}

enum Arch {
    Esrgan(Esrgan),
    Compact(Compact),
    /// Boxed: SwinIR holds twice the others' layers inline.
    SwinIr(Box<SwinIr>),
}

/// Which of A1111's tile loops runs a network: `upscale_with_model`'s Pillow grid (its ESRGAN
/// upscaler, [`super::tiles`]) or `upscale_2`'s averaged tensor tiles (its SwinIR upscaler,
/// [`super::tiles_averaged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    Grid,
    Averaged,
}

/// A loaded upscaling network.
pub struct Network {
    arch: Arch,
    path: PathBuf,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Network");
        d.field("path", &self.path);
        match &self.arch {
            Arch::Esrgan(n) => d.field("esrgan", n),
            Arch::Compact(n) => d.field("compact", n),
            Arch::SwinIr(n) => d.field("swinir", n),
        };
        d.finish()
    }
}

impl Network {
    /// Reads an upscaler file (`.pth`, `.pt`, `.safetensors`) onto `device` in `dtype`;
    /// anything else is an error naming the file and what is wrong.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let state = super::state::read_state(path)?;
        Self::from_state(path, &state, device, dtype)
    }

    fn from_state(
        path: &Path,
        state: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let arch = match detect(&|k| state.contains_key(k)) {
            Ok(Kind::Compact) => Arch::Compact(Compact::from_state(path, state, device, dtype)?),
            // spandrel's SwinIR does not support half precision (A1111's `prefer_half` leaves
            // it in float32).
            Ok(Kind::SwinIr) => {
                let dtype = if dtype == DType::F16 {
                    DType::F32
                } else {
                    dtype
                };
                Arch::SwinIr(Box::new(SwinIr::from_state(path, state, device, dtype)?))
            }
            Ok(Kind::Esrgan) => Arch::Esrgan(Esrgan::from_state(path, state, device, dtype)?),
            Err(other) => {
                let what = match other {
                    Some(name) => format!("a {name} network (by its layer names)"),
                    None => "the layer names are none of them".into(),
                };
                return Err(PipelineError::Weights {
                    path: path.to_path_buf(),
                    message: format!(
                        "not an upscaler network this server runs ({SUPPORTED}): {what}"
                    ),
                });
            }
        };
        Ok(Self {
            arch,
            path: path.to_path_buf(),
        })
    }

    /// The architecture an upscaler file holds, as [`Network::architecture`] names it, read
    /// from its tensor names alone (a safetensors header, a checkpoint's pickle; no tensor
    /// data); `None` for a file of no architecture run here.
    pub fn architecture_of(path: &Path) -> Result<Option<&'static str>> {
        let names: HashSet<String> = super::state::read_names(path)?.into_iter().collect();
        Ok(match detect(&|k| names.contains(k)) {
            Ok(Kind::Compact) => Some("RealESRGAN Compact"),
            Ok(Kind::SwinIr) => Some("SwinIR"),
            Ok(Kind::Esrgan) => Some("ESRGAN"),
            Err(_) => None,
        })
    }

    /// The architecture's name, as spandrel names it (`ESRGAN`, `ESRGAN+`, `RealESRGAN
    /// Compact`, `SwinIR`).
    pub fn architecture(&self) -> &'static str {
        match &self.arch {
            Arch::Esrgan(n) if n.plus() => "ESRGAN+",
            Arch::Esrgan(_) => "ESRGAN",
            Arch::Compact(_) => "RealESRGAN Compact",
            Arch::SwinIr(_) => "SwinIR",
        }
    }

    /// The tile loop A1111 runs this architecture with.
    pub fn tiling(&self) -> Tiling {
        match &self.arch {
            Arch::SwinIr(_) => Tiling::Averaged,
            Arch::Esrgan(_) | Arch::Compact(_) => Tiling::Grid,
        }
    }

    /// The smallest side spandrel's descriptor hands the network (it pads smaller inputs).
    pub fn min_side(&self) -> usize {
        match &self.arch {
            Arch::SwinIr(_) => super::swinir::MIN_SIDE,
            Arch::Esrgan(_) | Arch::Compact(_) => 1,
        }
    }

    /// The network's sizes in a few words (blocks and widths), for logs and benches.
    pub fn describe(&self) -> String {
        match &self.arch {
            Arch::Esrgan(n) => format!(
                "{} x{}: {} blocks, {} features, growth {}",
                self.architecture(),
                n.scale(),
                n.blocks(),
                n.features,
                n.growth
            ),
            Arch::Compact(n) => format!(
                "{} x{}: {} convs, {} features",
                self.architecture(),
                n.scale(),
                n.convs(),
                n.features
            ),
            Arch::SwinIr(n) => format!(
                "SwinIR x{} {}: {} groups of {:?} blocks, {} features, {:?} heads, window {}{}",
                n.scale(),
                n.upsampler.name(),
                n.depths.len(),
                n.depths,
                n.embed_dim,
                n.heads,
                n.window,
                if n.three_conv { ", 3conv" } else { "" }
            ),
        }
    }

    /// The RRDBNet, where the file holds one.
    pub fn esrgan(&self) -> Option<&Esrgan> {
        match &self.arch {
            Arch::Esrgan(n) => Some(n),
            _ => None,
        }
    }

    /// The SRVGGNetCompact, where the file holds one.
    pub fn compact(&self) -> Option<&Compact> {
        match &self.arch {
            Arch::Compact(n) => Some(n),
            _ => None,
        }
    }

    /// The SwinIR, where the file holds one.
    pub fn swinir(&self) -> Option<&SwinIr> {
        match &self.arch {
            Arch::SwinIr(n) => Some(n),
            _ => None,
        }
    }

    /// The factor this network grows an image's sides by.
    pub fn scale(&self) -> usize {
        match &self.arch {
            Arch::Esrgan(n) => n.scale(),
            Arch::Compact(n) => n.scale(),
            Arch::SwinIr(n) => n.scale(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device and dtype the weights are on.
    pub fn device(&self) -> &Device {
        match &self.arch {
            Arch::Esrgan(n) => n.device(),
            Arch::Compact(n) => n.device(),
            Arch::SwinIr(n) => n.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.arch {
            Arch::Esrgan(n) => n.dtype(),
            Arch::Compact(n) => n.dtype(),
            Arch::SwinIr(n) => n.dtype(),
        }
    }

    /// The network on `[B, 3, H, W]` (values 0..1, in the weights' device and dtype):
    /// `[B, 3, H * scale, W * scale]`, unclamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.arch {
            Arch::Esrgan(n) => n.forward(x),
            Arch::Compact(n) => n.forward(x),
            Arch::SwinIr(n) => n.forward(x),
        }
    }
}
