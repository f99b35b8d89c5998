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
//!
//! A component can also be built from tensors already in host memory ([`HostTensors`]: the
//! UNet's, once sequential offload read them) instead of its files: when a request's memory plan
//! switches the offload mode, the UNet is built from that copy (uploaded on a GPU), not read
//! from disk and converted again, and the copy is kept for the switches that follow. The text
//! encoder and the VAE keep no such copy: offloaded, they are built from their files at every
//! stage anyway, so a switch reads them as one run would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{PipelineError, Result};

type Builder<T> = Arc<dyn Fn(VarBuilder) -> Result<T> + Send + Sync>;

/// A component's weights in host memory, by their file names, in its dtype, checked when they
/// were read from the files.
pub type HostTensors = Arc<HashMap<String, Tensor>>;

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
    /// Where builds take the weights from instead of the files, when set.
    host: Option<HostTensors>,
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
        Self::with_host(name, files, None, dtype, build, resident_on)
    }

    /// As [`Component::new`], built from `host` (in `dtype`) when given, else from `files`.
    pub fn with_host(
        name: impl Into<String>,
        files: Vec<PathBuf>,
        host: Option<HostTensors>,
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
            host,
        };
        if let Some(device) = resident_on {
            let t0 = std::time::Instant::now();
            c.resident = Some(c.build_on(device, true)?);
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

    /// Counts `n` builds made before (by the component this one replaces).
    pub fn count_earlier_builds(&self, n: usize) {
        self.builds
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The host tensors builds take instead of the files, when set.
    pub fn host(&self) -> Option<&HostTensors> {
        self.host.as_ref()
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
            host: None,
        }
    }

    /// Builds the module on `device`. `kept`: it stays (resident); else it is built for one use,
    /// and on the CPU then copies what it takes from the host tensors, which it must not share:
    /// a module built for one use may change its weights in place (merged LoRAs) and keeps no
    /// originals.
    fn build_on(&self, device: &Device, kept: bool) -> Result<T> {
        let weights_error = |message: String| PipelineError::Weights {
            path: self.files.first().cloned().unwrap_or_default(),
            message,
        };
        if let Some(host) = &self.host {
            let copy = device.is_cpu() && !kept;
            let vb = crate::unet::host_var_builder(host.clone(), self.dtype, device, copy);
            return (self.build)(vb).map_err(|e| match e {
                PipelineError::Candle(e) => weights_error(e.to_string()),
                other => other,
            });
        }
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
            None => Ok(Held::Loaded(self.build_on(device, false)?)),
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
            self.resident = Some(self.build_on(d, true)?);
        }
        Ok(())
    }
}
