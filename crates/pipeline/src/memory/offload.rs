//! Model offload: a component that lives in host memory and is put on the device only for its
//! stage.
//!
//! Candle modules own their weight tensors, so "moving a module" means building it again from
//! its weights on the other device. A [`Component`] keeps the memory-mapped safetensors files
//! (their pages stay in the OS page cache, i.e. host memory) and either holds the built module
//! permanently (resident) or builds it on the device when asked and drops it after the stage
//! (offloaded): the device memory is returned as soon as the [`Held`] guard is dropped.
//!
//! Sequential offload uses the same type: the UNet component is resident on the CPU (its
//! weights read into host memory once, in the compute dtype) and the module it holds streams
//! its parts to the device itself (`unet::UNet2DConditionModel::streamed`).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{PipelineError, Result};

type Builder<T> = Arc<dyn Fn(VarBuilder) -> Result<T> + Send + Sync>;

pub struct Component<T> {
    name: String,
    files: Vec<PathBuf>,
    dtype: DType,
    build: Builder<T>,
    resident: Option<T>,
    /// How long building the resident module took (reading its weights included).
    built_in: Option<std::time::Duration>,
    /// Times the module was built from the weight files.
    builds: std::sync::atomic::AtomicUsize,
}

/// A component ready on the device: borrowed when resident, owned (and dropped after the
/// stage) when offloaded.
pub enum Held<'a, T> {
    Resident(&'a T),
    Loaded(T),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Resident(t) => t,
            Held::Loaded(t) => t,
        }
    }
}

impl<T> Component<T> {
    /// `build` turns a VarBuilder over `files` into the module. `resident_on`: build it now and
    /// keep it there; `None`: offloaded, built for each use.
    pub fn new(
        name: impl Into<String>,
        files: Vec<PathBuf>,
        dtype: DType,
        build: impl Fn(VarBuilder) -> Result<T> + Send + Sync + 'static,
        resident_on: Option<&Device>,
    ) -> Result<Self> {
        let mut c = Self {
            name: name.into(),
            files,
            dtype,
            build: Arc::new(build),
            resident: None,
            built_in: None,
            builds: Default::default(),
        };
        if let Some(device) = resident_on {
            let t0 = std::time::Instant::now();
            c.resident = Some(c.build_on(device)?);
            c.built_in = Some(t0.elapsed());
        }
        Ok(c)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_resident(&self) -> bool {
        self.resident.is_some()
    }

    /// The weight files the component is built from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// How long building the resident module took when the component was made (weights read,
    /// checked, converted); `None` when it was not built then.
    pub fn built_in(&self) -> Option<std::time::Duration> {
        self.built_in
    }

    /// Times the module was built from its weight files (reading them) since this component
    /// was made: once when resident, once per use when offloaded.
    pub fn builds(&self) -> usize {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The resident module, without building anything; `None` when offloaded.
    pub fn resident(&self) -> Option<&T> {
        self.resident.as_ref()
    }

    /// The same weights in another dtype (e.g. the f32 VAE for the NaN retry), offloaded.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            name: format!("{} ({})", self.name, dtype.as_str()),
            files: self.files.clone(),
            dtype,
            build: self.build.clone(),
            resident: None,
            built_in: None,
            builds: Default::default(),
        }
    }

    fn build_on(&self, device: &Device) -> Result<T> {
        let weights_error = |message: String| PipelineError::Weights {
            path: self.files.first().cloned().unwrap_or_default(),
            message,
        };
        if self.files.is_empty() {
            return Err(weights_error(format!(
                "{}: no weight files to build from",
                self.name
            )));
        }
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Memory-mapped, with dtype and sampled NaN/Inf checks whose errors name file and tensor.
        let vb = crate::single_file::checked_var_builder(&self.files, self.dtype, device)?;
        (self.build)(vb).map_err(|e| match e {
            PipelineError::Candle(e) => weights_error(e.to_string()),
            other => other,
        })
    }

    /// The module on `device` for one stage.
    pub fn get(&self, device: &Device) -> Result<Held<'_, T>> {
        match &self.resident {
            Some(t) => Ok(Held::Resident(t)),
            None => Ok(Held::Loaded(self.build_on(device)?)),
        }
    }

    /// Mutable access to the resident module (to change its settings); `None` when offloaded.
    pub fn resident_mut(&mut self) -> Option<&mut T> {
        self.resident.as_mut()
    }

    /// Moves the component: `Some(device)` builds it there and keeps it; `None` drops the
    /// resident copy (offloaded from now on).
    pub fn set_residence(&mut self, device: Option<&Device>) -> Result<()> {
        self.resident = None; // free the old copy first
        if let Some(d) = device {
            self.resident = Some(self.build_on(d)?);
        }
        Ok(())
    }
}
