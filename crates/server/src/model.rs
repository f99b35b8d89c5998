//! Finding the model folder, naming its version, and loading the real pipeline.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cli::ModelArgs;
use crate::config::DeviceChoice;
use sdserve_pipeline::pipeline::StableDiffusion;

use crate::generator::{Loaded, Loader, ModelInfo};

/// Resolves `--model` to a local diffusers folder.
pub fn resolve_model(args: &ModelArgs) -> Result<PathBuf, String> {
    let p = Path::new(&args.model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(format!(
            "{}: single-file checkpoints are not supported yet; use a diffusers folder",
            p.display()
        ));
    }
    Err(format!(
        "{:?} is not a local folder, and hub downloads are not wired into the server yet \
         (download it first and pass the folder)",
        args.model
    ))
}

/// How many bytes of each weight file the digest reads from its start and from its end.
const SAMPLE: u64 = 1 << 20;

/// `<folder name>@<12 hex of a content digest>`. The digest covers every JSON/text config and,
/// for each weight file, its size plus its first and last MiB (the safetensors header names
/// every tensor, shape and offset), so it changes when the model does without reading GBs.
pub fn model_version(dir: &Path) -> Result<String, String> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    files.sort();
    let mut h = Sha256::new();
    for rel in &files {
        let path = dir.join(rel);
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        match ext {
            "json" | "txt" => {
                h.update(std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            "safetensors" | "bin" | "ckpt" | "pt" => {
                h.update(sample(&path).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            _ => continue,
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(format!("{name}@{hex}"))
}

fn sample(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut out = len.to_le_bytes().to_vec();
    let mut head = Vec::new();
    (&mut f).take(SAMPLE).read_to_end(&mut head)?;
    out.extend(head);
    if len > SAMPLE {
        f.seek(SeekFrom::Start(len.saturating_sub(SAMPLE).max(SAMPLE)))?;
        f.read_to_end(&mut out)?;
    }
    Ok(out)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_path_buf());
        }
    }
    Ok(())
}

/// Loads the real pipeline on the worker thread.
pub fn real_loader(args: ModelArgs, device: DeviceChoice) -> Loader {
    Box::new(move || load_real(&args, device))
}

pub fn load_real(args: &ModelArgs, device: DeviceChoice) -> Result<Loaded, String> {
    let dir = resolve_model(args)?;
    let model_version = model_version(&dir)?;
    let dev = device.create()?;
    let dtype = device.dtype(args.dtype);
    let sd = StableDiffusion::load(&dir, &dev, dtype).map_err(|e| e.to_string())?;
    let info = ModelInfo {
        model_version,
        default_scheduler: sd.default_scheduler(),
    };
    Ok(Loaded {
        generator: Box::new(sd),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_changes_with_content() {
        let dir = std::env::temp_dir().join(format!("sdserve-version-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        std::fs::write(dir.join("model_index.json"), "{}").unwrap();
        std::fs::write(
            dir.join("unet/diffusion_pytorch_model.safetensors"),
            vec![1u8; 100],
        )
        .unwrap();
        let a = model_version(&dir).unwrap();
        assert_eq!(a, model_version(&dir).unwrap());
        assert!(a.starts_with(&format!("{}@", dir.file_name().unwrap().to_string_lossy())));
        std::fs::write(
            dir.join("unet/diffusion_pytorch_model.safetensors"),
            vec![2u8; 100],
        )
        .unwrap();
        let b = model_version(&dir).unwrap();
        assert_ne!(a, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
