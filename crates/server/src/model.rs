//! Getting the model (through `hub`: local folder, single file or hub id) and loading the real
//! pipeline.

use candle_core::DType;
use sdserve_pipeline::pipeline::StableDiffusion;

use crate::cli::ModelArgs;
use crate::config::Runtime;
use crate::generator::{Loaded, Loader, ModelInfo};
use crate::hub;

/// Loads the real pipeline on the worker thread; download/conversion progress goes to `status`
/// (shown by /health while loading).
pub fn real_loader(args: ModelArgs, rt: Runtime, status: hub::LoadStatus) -> Loader {
    Box::new(move || load_real(&args, &rt, &status))
}

pub fn load_real(
    args: &ModelArgs,
    rt: &Runtime,
    status: &hub::LoadStatus,
) -> Result<Loaded, String> {
    let dtype = rt.dtype;
    let opts = hub::HubOptions::from_env(args.model_cache_dir.clone(), dtype == DType::F16);
    let s = status.clone();
    let resolved =
        hub::resolve_model(&args.model, &opts, &move |p| s.update(p)).map_err(|e| e.to_string())?;
    tracing::info!(dir = %resolved.dir.display(), model_version = %resolved.model_version, "model files ready");
    let sd = StableDiffusion::load(&resolved.dir, &rt.device, dtype).map_err(|e| e.to_string())?;
    let info = ModelInfo {
        model_version: resolved.model_version,
        default_scheduler: sd.default_scheduler(),
    };
    Ok(Loaded {
        generator: Box::new(sd),
        info,
    })
}
