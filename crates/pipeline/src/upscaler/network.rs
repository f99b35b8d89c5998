//! One upscaling network of whichever architecture its file holds, detected from the names
//! of its tensors as spandrel (what A1111 1.8+ reads every `models/ESRGAN` file with) detects
//! them, in spandrel's order: Real-ESRGAN Compact first, then ESRGAN (RRDBNet, ESRGAN+).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::compact::Compact;
use super::net::Esrgan;
use crate::{PipelineError, Result};

/// What a file holding none of the supported architectures is told.
pub const SUPPORTED: &str = "ESRGAN (RRDBNet: ESRGAN, Real-ESRGAN, BSRGAN, ESRGAN+) and \
                             Real-ESRGAN Compact (SRVGGNetCompact)";

/// Architectures spandrel loads that this server does not run, each with float tensors that
/// spandrel's detection of it requires (and the others' do not all have), so that such a file
/// is refused by its name. In spandrel's order.
const OTHERS: [(&str, &[&str]); 12] = [
    (
        "SwiftSRGAN",
        &[
            "initial.cnn.depthwise.weight",
            "final_conv.pointwise.weight",
        ],
    ),
    (
        "HAT",
        &[
            "conv_first.weight",
            "layers.0.residual_group.overlap_attn.qkv.weight",
        ],
    ),
    (
        "Swin2SR",
        &[
            "patch_embed.proj.weight",
            "layers.0.residual_group.blocks.0.norm1.weight",
        ],
    ),
    (
        "SwinIR",
        &[
            "conv_first.weight",
            "layers.0.residual_group.blocks.0.mlp.fc1.bias",
        ],
    ),
    (
        "OmniSR",
        &[
            "residual_layer.0.residual_layer.0.layer.0.fn.0.weight",
            "input.weight",
        ],
    ),
    ("RGT", &["before_RG.1.weight", "layers.0.blocks.0.gamma"]),
    (
        "DAT",
        &["before_RG.1.weight", "layers.0.blocks.0.ffn.sg.conv.weight"],
    ),
    ("SPAN", &["conv_1.sk.weight", "block_1.c1_r.sk.weight"]),
    (
        "RealCUGAN",
        &["unet1.conv1.conv.0.weight", "unet2.conv1.conv.0.weight"],
    ),
    (
        "ATD",
        &[
            "layers.0.residual_group.layers.0.wqkv.weight",
            "conv_first.weight",
        ],
    ),
    (
        "DRCT",
        &["layers.0.swin1.norm1.weight", "layers.0.adjust1.weight"],
    ),
    ("PLKSR", &["feats.0.weight", "feats.1.refine.weight"]),
];

/// The name of the unsupported architecture `state` looks like, if any of [`OTHERS`].
fn other_architecture(state: &HashMap<String, Tensor>) -> Option<&'static str> {
    OTHERS
        .iter()
        .find(|(_, keys)| keys.iter().all(|k| state.contains_key(*k)))
        .map(|(name, _)| *name)
}

enum Arch {
    Esrgan(Esrgan),
    Compact(Compact),
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
        let arch = if Compact::detect(state) {
            Arch::Compact(Compact::from_state(path, state, device, dtype)?)
        } else if Esrgan::detect(state) {
            Arch::Esrgan(Esrgan::from_state(path, state, device, dtype)?)
        } else {
            let what = match other_architecture(state) {
                Some(name) => format!("a {name} network (by its layer names)"),
                None => "the layer names are none of them".into(),
            };
            return Err(PipelineError::Weights {
                path: path.to_path_buf(),
                message: format!("not an upscaler network this server runs ({SUPPORTED}): {what}"),
            });
        };
        Ok(Self {
            arch,
            path: path.to_path_buf(),
        })
    }

    /// The architecture's name, as spandrel names it (`ESRGAN`, `ESRGAN+`, `RealESRGAN
    /// Compact`).
    pub fn architecture(&self) -> &'static str {
        match &self.arch {
            Arch::Esrgan(n) if n.plus() => "ESRGAN+",
            Arch::Esrgan(_) => "ESRGAN",
            Arch::Compact(_) => "RealESRGAN Compact",
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
        }
    }

    /// The RRDBNet, where the file holds one.
    pub fn esrgan(&self) -> Option<&Esrgan> {
        match &self.arch {
            Arch::Esrgan(n) => Some(n),
            Arch::Compact(_) => None,
        }
    }

    /// The SRVGGNetCompact, where the file holds one.
    pub fn compact(&self) -> Option<&Compact> {
        match &self.arch {
            Arch::Compact(n) => Some(n),
            Arch::Esrgan(_) => None,
        }
    }

    /// The factor this network grows an image's sides by.
    pub fn scale(&self) -> usize {
        match &self.arch {
            Arch::Esrgan(n) => n.scale(),
            Arch::Compact(n) => n.scale(),
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
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.arch {
            Arch::Esrgan(n) => n.dtype(),
            Arch::Compact(n) => n.dtype(),
        }
    }

    /// The network on `[B, 3, H, W]` (values 0..1, in the weights' device and dtype):
    /// `[B, 3, H * scale, W * scale]`, unclamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.arch {
            Arch::Esrgan(n) => n.forward(x),
            Arch::Compact(n) => n.forward(x),
        }
    }
}
