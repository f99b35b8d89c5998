//! The sd-webui-controlnet extension's "Reference" units (`reference_only`, `reference_adain`,
//! `reference_adain+attn`): no ControlNet model; the image's latents steer the UNet through
//! its own attention and normalisation (`crate::unet::reference`, the pipeline's
//! `control_reference`).

use super::handle::{in_window, HiresOption};
use super::modes::ControlMode;
use crate::pipeline::RgbImage;

/// Which of the UNet's hooks a reference unit writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceKind {
    /// `reference_only`: the self-attentions' banks.
    Only,
    /// `reference_adain`: the blocks' statistics (AdaIN).
    Adain,
    /// `reference_adain+attn`: both.
    AdainAttn,
}

impl ReferenceKind {
    pub const ALL: [Self; 3] = [Self::Only, Self::Adain, Self::AdainAttn];

    /// The extension's module name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Only => "reference_only",
            Self::Adain => "reference_adain",
            Self::AdainAttn => "reference_adain+attn",
        }
    }

    /// From [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether it banks the self-attentions' inputs.
    pub fn attention(self) -> bool {
        self != Self::Adain
    }

    /// Whether it banks the blocks' statistics.
    pub fn adain(self) -> bool {
        self != Self::Only
    }
}

/// One reference unit of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceUnit {
    pub kind: ReferenceKind,
    /// Any size: resized (Lanczos) to each pass's size, then VAE-encoded.
    pub image: RgbImage,
    /// The hires pass's image; `None`: `image`.
    pub hires_image: Option<RgbImage>,
    /// The unit's weight: the hooks whose threshold is below it write (0..=2 in the
    /// extension's slider).
    pub weight: f64,
    /// The extension's "Style Fidelity" (`threshold_a`, clamped to [0, 1]): how far the
    /// negative prompt's rows go back to the plain result in Balanced mode.
    pub style_fidelity: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    pub hr_option: HiresOption,
    /// Balanced keeps `style_fidelity`; "My prompt is more important" makes it 0,
    /// "ControlNet is more important" 1 (the extension's `soft_injection` / `cfg_injection`).
    pub control_mode: ControlMode,
    /// Its place in the request's list of units (ControlNets and reference units together),
    /// where the extension numbers it (infotext, metadata); `None`: after the ControlNets.
    pub request_index: Option<usize>,
    /// The caller's record of the unit ([`super::ControlNetUnit::infotext`]).
    pub infotext: Option<String>,
}

impl ReferenceUnit {
    /// Whether step `i` of `steps` is within its window (as a ControlNet unit's).
    pub fn steers(&self, i: usize, steps: usize) -> bool {
        in_window(i, steps, self.guidance_start, self.guidance_end)
    }

    /// The style fidelity a pass uses (`hires`: the hires fix's second, where the extension
    /// takes 0 unless the mode is cfg injection).
    pub fn fidelity(&self, hires: bool) -> f64 {
        if self.control_mode.cond_only() {
            1.0
        } else if self.control_mode.soft() || hires {
            0.0
        } else {
            self.style_fidelity.clamp(0.0, 1.0)
        }
    }
}

impl ReferenceUnit {
    /// A request's unit whose preprocessor is a reference module, as a reference unit (its
    /// `scale` the weight; its model is not read; no request index); `None` for the other
    /// units.
    pub fn of_unit(unit: &super::ControlNetUnit) -> Option<Self> {
        let (kind, style_fidelity) = unit.preprocessor?.reference()?;
        Some(Self {
            kind,
            image: unit.image.clone(),
            hires_image: unit.hires_image.clone(),
            weight: unit.scale,
            style_fidelity,
            guidance_start: unit.guidance_start,
            guidance_end: unit.guidance_end,
            hr_option: unit.hr_option,
            control_mode: unit.control_mode,
            request_index: None,
            infotext: unit.infotext.clone(),
        })
    }

    /// `units` split into the ControlNets and the reference units, each in order, every
    /// reference unit knowing its index in `units`.
    pub fn split(units: Vec<super::ControlNetUnit>) -> (Vec<super::ControlNetUnit>, Vec<Self>) {
        let mut references = Vec::new();
        let mut controlnets = Vec::with_capacity(units.len());
        for (i, u) in units.into_iter().enumerate() {
            match Self::of_unit(&u) {
                Some(r) => references.push(Self {
                    request_index: Some(i),
                    ..r
                }),
                None => controlnets.push(u),
            }
        }
        (controlnets, references)
    }
}

impl ReferenceUnit {
    /// As a request's unit (no model: an empty name; its preprocessor the reference module),
    /// for dialects and records that carry every unit in one list.
    pub fn as_unit(&self) -> super::ControlNetUnit {
        super::ControlNetUnit {
            model: std::sync::Arc::new(super::ControlNet::named("")),
            image: self.image.clone(),
            preprocessor: Some(super::preprocess::Preprocessor::of_reference(
                self.kind,
                self.style_fidelity,
            )),
            scale: self.weight,
            guidance_start: self.guidance_start,
            guidance_end: self.guidance_end,
            hires_image: self.hires_image.clone(),
            hr_option: self.hr_option,
            inpaint_crop: false,
            control_mode: self.control_mode,
            mask: None,
            hires_mask: None,
            infotext: self.infotext.clone(),
        }
    }
}

impl crate::pipeline::GenerationParams {
    /// Moves the `controlnets` whose preprocessor is a reference module to the end of
    /// `references`, in order.
    pub fn split_references(&mut self) {
        let (controlnets, references) = ReferenceUnit::split(std::mem::take(&mut self.controlnets));
        self.controlnets = controlnets;
        self.references.extend(references);
    }

    /// Every unit in one list, in the request's order: each reference unit
    /// ([`ReferenceUnit::as_unit`]) at its `request_index` among the ControlNets (those
    /// without one after them, in order); [`Self::split_references`] undoes it.
    pub fn units_with_references(&self) -> Vec<super::ControlNetUnit> {
        let mut references: Vec<&ReferenceUnit> = self.references.iter().collect();
        references.sort_by_key(|r| r.request_index.unwrap_or(usize::MAX));
        let mut references = references.into_iter().peekable();
        let mut controlnets = self.controlnets.iter();
        let mut units = Vec::with_capacity(self.controlnets.len() + self.references.len());
        loop {
            let at = units.len();
            let unit = match references.next_if(|r| r.request_index.is_some_and(|i| i <= at)) {
                Some(r) => r.as_unit(),
                None => match controlnets.next() {
                    Some(c) => c.clone(),
                    None => break,
                },
            };
            units.push(unit);
        }
        units.extend(references.map(ReferenceUnit::as_unit));
        units
    }
}
