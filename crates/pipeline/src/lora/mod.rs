//! LoRA adapters (README "Prompts, LoRA and embeddings"): kohya/A1111 and diffusers/PEFT files, on the
//! UNet (attention, feed-forward, projections, and LoCon's resnet and sampler convolutions) and
//! the text encoder; in kohya-named files also LyCORIS LoHa, LoKr, IA3, GLoRA, full diffs, OFT/BOFT
//! (kohya's `oft_unet_` files too, which A1111 leaves out of SD 1.5 models: `library`) and norm
//! layers' diffs (GroupNorm, LayerNorm), as A1111 applies them (`kinds`, `oft`), and
//! DoRA's weight decomposition with any of them but the norms (`from_weight`).
//!
//! `W += weight * (alpha / rank) * up @ down` (or the layer type's delta and scale), summed
//! over a request's LoRAs, merged into the resident modules' weight tensors in place. Each
//! changed tensor's original values are copied first and written back when a request asks for
//! other LoRAs (or none), so base weights come back bit for bit and the model is never
//! reloaded. Requests with the same LoRAs as the one
//! before reuse the merged weights. Offloaded parts: under sequential offload the UNet's weights
//! in host memory are the resident tensors; under model offload a part is merged each time it is
//! built for its stage, keeping no originals (it is dropped after the stage). Deltas are computed
//! from the files and the targets' shapes alone, so every part's are made, and checked, before a
//! run builds anything; the offloaded parts' are kept for their builds, and for the next runs
//! while these ask for the same set (bounded; see `pipeline::DEFAULT_LORA_DELTA_LIMIT`).
//!
//! Files: `library` (reading LoRA files' headers, the folder's library), `kinds` (the layers'
//! module types and their deltas; `shapes` what their tensors make, from the shapes alone;
//! `products` the tensor products they use), `deltas` (a set's deltas, from the files),
//! `from_weight` (IA3's, GLoRA's and DoRA's deltas, made from the weight when it is merged),
//! `merge` (matching layers to the model's weights, merging and restoring them), `folder`
//! (whether a file fits a model folder that is not loaded, from its headers); this one holds
//! the types they share and the prompt tags.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use crate::kernels::linear::Dense;
use crate::kernels::Conv2d;
use crate::Result;

#[cfg(test)]
mod a1111_deltas;
mod add_delta;
mod deltas;
mod folder;
mod from_weight;
mod kinds;
mod library;
mod merge;
mod oft;
mod products;
mod shapes;

pub(crate) use deltas::{compute_deltas, Deltas};
pub use folder::{fit_problem_in_model, fit_problem_in_single_file};
#[cfg(test)]
pub(crate) use folder::{target_shapes_of_folder, target_shapes_of_single_file};
pub(crate) use from_weight::Delta;
use kinds::LayerKind;
use library::header_shapes;
pub use library::LoraLibrary;
use merge::match_layers;
pub(crate) use merge::{merge_deltas, LoraState};

/// A weight a LoRA may change, borrowed from a built module (or, under sequential offload,
/// from the UNet's weights in host memory).
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A linear layer in our fused form (weight stored transposed on the CPU).
    Dense(&'a Dense),
    Linear(&'a candle_nn::Linear),
    Conv(&'a Conv2d),
    /// A weight as its file stores it, with the dims the built module would report for it
    /// (a 1x1 convolution built as a linear layer reports `[out, in]`).
    Host(&'a Tensor, &'a [usize]),
    /// A layer's bias `[out]` (listed as `<module path>.bias`, after its weight): what a full
    /// diff's `diff_b` changes.
    Bias(&'a Tensor),
    /// A GroupNorm's or LayerNorm's weight `[channels]` and bias (what `w_norm` and `b_norm`
    /// change).
    Norm(&'a Tensor, &'a Tensor),
}

impl<'a> Target<'a> {
    /// The tensor whose storage holds the weight (a deferred transpose is made now).
    fn storage(&self) -> Result<&Tensor> {
        Ok(match self {
            Target::Dense(d) => d.weight_storage()?,
            Target::Linear(l) => l.weight(),
            Target::Conv(c) => c.weight(),
            Target::Host(t, _) | Target::Bias(t) | Target::Norm(t, _) => t,
        })
    }

    /// The bias of a built layer (a host weight's is its own host tensor).
    fn bias(&self) -> Option<&'a Tensor> {
        match *self {
            Target::Dense(d) => d.bias(),
            Target::Linear(l) => l.bias(),
            Target::Conv(c) => c.bias(),
            Target::Norm(_, b) => Some(b),
            Target::Host(..) | Target::Bias(_) => None,
        }
    }

    /// `[out, in]` (linear) or `[out, in, k, k]` (conv), as the files write the weight.
    pub(crate) fn canonical_dims(&self) -> Vec<usize> {
        match self {
            Target::Dense(d) => {
                let (out, inp) = d.out_in_dims();
                vec![out, inp]
            }
            Target::Linear(l) => l.weight().dims().to_vec(),
            Target::Conv(c) => c.weight().dims().to_vec(),
            Target::Host(_, dims) => dims.to_vec(),
            Target::Bias(t) | Target::Norm(t, _) => t.dims().to_vec(),
        }
    }

    /// The weight in its canonical dims, in f32 on the CPU: what a delta made from the weight
    /// reads (`from_weight`).
    fn canonical_weight(&self) -> Result<Tensor> {
        let stored = self.storage()?;
        let weight = if self.stored_transposed() {
            stored.t()?
        } else {
            stored.clone()
        };
        Ok(weight
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .reshape(self.canonical_dims())?)
    }

    /// True for a linear weight stored `[in, out]`.
    fn stored_transposed(&self) -> bool {
        matches!(self, Target::Dense(d) if d.is_transposed())
    }

    /// `delta` `[out, in]` or `[out, in, k, k]` in the storage's layout.
    fn in_storage_layout(&self, delta: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Target::Dense(d) if d.is_transposed() => delta.t()?.contiguous()?,
            _ => delta.reshape(self.storage()?.dims())?,
        })
    }
}

/// The weights LoRAs may change, by part: module path and canonical dims (what checking a file
/// needs; the same whether the part is built now or offloaded).
pub(crate) type TargetShapes = HashMap<Part, Vec<(String, Vec<usize>)>>;

/// Module paths and canonical dims of `targets`.
pub(crate) fn shapes_of(targets: &[(String, Target<'_>)]) -> Vec<(String, Vec<usize>)> {
    targets
        .iter()
        .map(|(path, t)| (path.clone(), t.canonical_dims()))
        .collect()
}

/// The suffix of a bias target's path (module paths never end in it).
pub(crate) const BIAS: &str = ".bias";

/// `targets` with each layer's bias, if it has one, right after its weight (as
/// `<module path>.bias`): the targets of a part as every path lists them.
pub(crate) fn with_biases<'a>(targets: Vec<(String, Target<'a>)>) -> Vec<(String, Target<'a>)> {
    let mut out = Vec::with_capacity(targets.len() * 2);
    for (path, target) in targets {
        let bias = target.bias();
        out.push((path.clone(), target));
        if let Some(b) = bias {
            out.push((format!("{path}{BIAS}"), Target::Bias(b)));
        }
    }
    out
}

/// Modules that can list the weights a LoRA may change, by diffusers module path.
pub(crate) trait LoraTargets {
    fn lora_targets<'a>(&'a self, prefix: &str, out: &mut Vec<(String, Target<'a>)>);
}

pub(crate) fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A LoRA as a run asks for it, with the identity of its file (length and modification time):
/// a file replaced under the same name makes another set, whose deltas are computed again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoraKey {
    name: String,
    weight: f64,
    file: (u64, Option<std::time::SystemTime>),
}

impl LoraKey {
    /// The key of the library's LoRA `name` at `weight`, its file as it is now.
    pub(crate) fn of(library: &LoraLibrary, name: &str, weight: f64) -> Result<Self> {
        let info = library.get(name).ok_or_else(|| {
            crate::PipelineError::InvalidRequest(format!("unknown LoRA {name:?}"))
        })?;
        let meta =
            std::fs::metadata(&info.file).map_err(|e| crate::PipelineError::io(&info.file, e))?;
        Ok(Self {
            name: name.to_owned(),
            weight,
            file: (meta.len(), meta.modified().ok()),
        })
    }
}

/// Which of the model's parts a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Unet,
    TextEncoder,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text_encoder",
        }
    }
}

/// The two file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss / A1111: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight`.
    Peft,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
        }
    }
}

/// One adapted layer as the file names it.
#[derive(Debug, Clone)]
struct LayerKeys {
    part: Part,
    /// Module path: dotted for PEFT, underscored for kohya (matched against the model's paths
    /// with `.` written as `_`).
    module: String,
    /// What errors call the layer: its down key (LoRA), else its module's key prefix.
    name: String,
    kind: LayerKind,
    alpha: Option<String>,
    /// A1111's `scale` key: when the file has one, the layer's scale instead of alpha / rank.
    scale: Option<String>,
    /// DoRA's magnitude (`dora_scale`): the delta is made from the weight it goes into
    /// (`from_weight`).
    dora_scale: Option<String>,
}

impl LayerKeys {
    /// The key prefix of the layer's module, as the file writes it.
    fn module_key(&self) -> &str {
        [".lora_down.weight", ".lora_A.weight"]
            .iter()
            .find_map(|s| self.name.strip_suffix(s))
            .unwrap_or(&self.name)
    }
}

/// What a LoRA file holds, read from its header (no tensor data).
#[derive(Debug, Clone)]
pub struct LoraInfo {
    pub name: String,
    pub file: PathBuf,
    pub format: LoraFormat,
    /// The largest rank of its layers.
    pub rank: usize,
    /// Parts it adapts (`unet`, `text_encoder`).
    pub targets: Vec<String>,
    /// Number of adapted layers.
    pub layers: usize,
    /// Adapted convolutions with a kernel (LoCon: the resnets' and samplers' 3x3) among them.
    pub conv_layers: usize,
    /// The module types of its layers (A1111's): `lora` (LoRA, LoCon), `loha`, `lokr`, `ia3`,
    /// `glora`, `full`, `oft` (OFT, BOFT, `oft_diag`), `norm` are applied, and `dora` (DoRA's
    /// `dora_scale`, beside one of those) with them; `bias` (a bias diff on another type, a
    /// weight-shaped bias) and `unknown` are listed, and a request naming the file is refused.
    pub types: Vec<String>,
    /// The header's `__metadata__` (kohya writes its training notes there, `ss_output_name`
    /// among them).
    pub metadata: std::collections::BTreeMap<String, String>,
    keys: Vec<LayerKeys>,
}

/// Checks that every layer of `info` has a weight of the right shape among `targets`.
pub(crate) fn check_fits(info: &LoraInfo, targets: &TargetShapes) -> Result<()> {
    let shapes = header_shapes(&info.file)?;
    match_layers(info, &shapes, targets).map(|_| ())
}

/// A1111's `<lora:name:weight>` tags: the prompt without them, and the LoRAs they name (weight 1
/// when left out). A tag whose weight is not a number stays in the text.
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            text.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        let mut fields = inner.split(':');
        let name = fields.next().unwrap_or("").trim();
        let weight = match fields.next() {
            None => Some(1.0),
            Some(w) => w.trim().parse::<f64>().ok(),
        };
        match (name.is_empty(), weight) {
            (false, Some(w)) => loras.push((name.to_owned(), w)),
            _ => text.push_str(&rest[start..start + "<lora:".len() + end + 1]),
        }
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    (text, loras)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out() {
        let (text, loras) = extract_lora_tags("a cat <lora:ink_style:0.8>, <lora:x> (dog:1.2)");
        assert_eq!(text, "a cat ,  (dog:1.2)");
        assert_eq!(loras, vec![("ink_style".into(), 0.8), ("x".into(), 1.0)]);
        let (text, loras) = extract_lora_tags("<lora:bad:abc> <lora:open");
        assert_eq!(text, "<lora:bad:abc> <lora:open");
        assert!(loras.is_empty());
    }
}
