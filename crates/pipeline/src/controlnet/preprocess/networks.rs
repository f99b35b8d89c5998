//! The networks of the model-based modules, by weights file: each network type names its
//! file ([`AnnotatorFile`]: the extension's file name, its download subfolder, how to read
//! it), and an [`AnnotatorNetworks`] hands out the network of a file. So a new network needs
//! no change to whoever keeps them (the server's folder store keeps any file the same way).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use crate::{PipelineError, Result};

/// A network as its keeper holds it; [`network`] gives it back typed.
pub type AnyNetwork = Arc<dyn Any + Send + Sync>;

/// Where the extension downloads a file from: a hub repo and the file's path in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubFile {
    pub repo: &'static str,
    pub path: &'static str,
}

/// A file at the top of `lllyasviel/Annotators`, where the extension fetches most of them.
pub const fn lllyasviel(path: &'static str) -> HubFile {
    HubFile {
        repo: "lllyasviel/Annotators",
        path,
    }
}

/// A weights file of the extension's annotators.
#[derive(Debug)]
pub struct AnnotatorFile {
    /// The extension's file name (`ControlNetHED.pth`).
    pub name: &'static str,
    /// The subfolder of `annotator/downloads` the extension keeps it in (`hed`).
    pub subfolder: &'static str,
    /// Where the extension downloads it from (`sdserve download --annotators` too).
    pub hub: HubFile,
    /// Reads the network onto the CPU (preprocessors run there, at validation).
    pub load: fn(&Path) -> Result<AnyNetwork>,
}

/// Every network's file, for whoever fetches them ahead (`sdserve download --annotators`).
pub static ANNOTATOR_FILES: &[&AnnotatorFile] = &[
    &super::HED,
    &super::LINEART,
    &super::LINEART_COARSE,
    &super::LINEART_ANIME,
    &super::MANGA_LINE,
    &super::PIDINET,
    &super::TEED,
    &super::MTEED,
    &super::MLSD,
    &super::DEPTH_ANYTHING,
    &super::DEPTH_ANYTHING_V2,
    &super::MIDAS,
    &super::NORMAL_BAE,
    &super::LERES,
    &super::LAMA,
    &super::BODY_POSE,
    &super::HAND_POSE,
    &super::FACENET,
];

/// Where the model-based modules get their networks (the server: its annotator folder,
/// read once and kept).
pub trait AnnotatorNetworks {
    /// The network of `file`; the error says why there is none to run.
    fn network(&self, file: &'static AnnotatorFile) -> Result<AnyNetwork>;
}

/// The network of `file` as its type `N` (the type `file.load` makes).
pub fn network<N: Any + Send + Sync>(
    networks: &dyn AnnotatorNetworks,
    file: &'static AnnotatorFile,
) -> Result<Arc<N>> {
    networks.network(file)?.downcast::<N>().map_err(|_| {
        // A keeper handing out another file's network: a bug, not the request's fault.
        PipelineError::InvalidRequest(format!(
            "the network kept for {} is not a {}",
            file.name,
            std::any::type_name::<N>()
        ))
    })
}

/// Networks already read, by file (tests and tools; the server keeps its own).
#[derive(Default, Clone)]
pub struct LoadedNetworks(Vec<(&'static str, AnyNetwork)>);

impl LoadedNetworks {
    /// These networks and `file`'s, read from `path`.
    pub fn read(mut self, file: &'static AnnotatorFile, path: &Path) -> Result<Self> {
        self.0.push((file.name, (file.load)(path)?));
        Ok(self)
    }
}

impl AnnotatorNetworks for LoadedNetworks {
    fn network(&self, file: &'static AnnotatorFile) -> Result<AnyNetwork> {
        self.0
            .iter()
            .find(|(name, _)| *name == file.name)
            .map(|(_, net)| net.clone())
            .ok_or_else(|| PipelineError::InvalidRequest(format!("needs {}", file.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NUMBER: AnnotatorFile = AnnotatorFile {
        name: "number.pth",
        subfolder: "n",
        hub: lllyasviel("number.pth"),
        load: |_| Ok(Arc::new(7u32)),
    };
    static TEXT: AnnotatorFile = AnnotatorFile {
        name: "text.pth",
        subfolder: "t",
        hub: lllyasviel("text.pth"),
        load: |_| Ok(Arc::new("seven")),
    };

    #[test]
    fn a_network_comes_back_typed_by_its_file_and_a_missing_one_is_named() {
        let nets = LoadedNetworks::default()
            .read(&NUMBER, Path::new("x"))
            .unwrap();
        assert_eq!(*network::<u32>(&nets, &NUMBER).unwrap(), 7);
        let e = network::<u32>(&nets, &TEXT).unwrap_err().to_string();
        assert!(e.contains("text.pth"), "{e}");
        let e = network::<&str>(&nets, &NUMBER).unwrap_err().to_string();
        assert!(e.contains("number.pth"), "{e}");
    }
}
