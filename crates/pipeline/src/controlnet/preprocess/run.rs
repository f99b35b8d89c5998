//! Running a preprocessor: the control map of an image, with the networks of the model-based
//! modules ([`Preprocessor::run_with`], [`Preprocessor::run_with_poses`]) or without
//! ([`Preprocessor::run`]).

use super::*;

impl Preprocessor {
    /// The control map of `image` (RGB; a one-channel result in all three channels, as the
    /// extension's `GRAY2RGB` and `HWC3`), the network of a model-based module taken from
    /// `networks`. Blocking (a network on the CPU takes seconds at 512).
    pub fn run_with(&self, image: &RgbImage, networks: &dyn AnnotatorNetworks) -> Result<RgbImage> {
        let padded = || resize_image_with_pad(image, self.resolution().unwrap_or(512));
        // HED's or PiDiNet's edge map of the padded image (`safe`: quantized).
        let edges = |safe: bool| -> Result<(Padded, Vec<u8>)> {
            let padded = padded();
            let edges = if self.model_file() == Some(PIDINET_FILE) {
                let net = network::<PidiNetwork>(networks, &PIDINET)?;
                pidinet_edges(&net, &padded.image, safe)?
            } else {
                let net = network::<HedNetwork>(networks, &HED)?;
                hed_edges(&net, &padded.image, safe)?
            };
            Ok((padded, edges))
        };
        Ok(match *self {
            Self::SoftedgeHed { .. }
            | Self::SoftedgeHedsafe { .. }
            | Self::SoftedgePidinet { .. }
            | Self::SoftedgePidisafe { .. } => {
                let safe = matches!(
                    self,
                    Self::SoftedgeHedsafe { .. } | Self::SoftedgePidisafe { .. }
                );
                let (padded, edges) = edges(safe)?;
                padded.crop_gray_to_rgb(&edges)
            }
            // scribble_pidinet thins and thickens the cropped map as scribble_hed does.
            Self::ScribbleHed { .. } | Self::ScribblePidinet { .. } => {
                let (padded, edges) = edges(false)?;
                let cropped = padded.crop_gray(&edges);
                let map = scribble_hed(&cropped, padded.width, padded.height);
                RgbImage {
                    width: padded.width as u32,
                    height: padded.height as u32,
                    pixels: map.iter().flat_map(|&v| [v, v, v]).collect(),
                }
            }
            Self::LineartRealistic { .. } | Self::LineartCoarse { .. } => {
                let file = self.annotator_file().expect("a lineart file");
                let net = network::<LineartNetwork>(networks, file)?;
                let padded = padded();
                let map = lineart_map(&net, &padded.image)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::LineartAnime { .. } => {
                let net = network::<LineartAnimeNetwork>(networks, &LINEART_ANIME)?;
                let padded = padded();
                let map = lineart_anime_map(&net, &padded.image)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::LineartAnimeDenoise { .. } => {
                let net = network::<MangaLineNetwork>(networks, &MANGA_LINE)?;
                let padded = padded();
                let map = manga_line_map(&net, &padded.image)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::SoftedgeTeed { safe_steps, .. } => {
                let net = network::<TeedNetwork>(networks, &TEED)?;
                let padded = padded();
                let steps = safe_steps.trunc().max(0.0) as u32;
                let map = teed_edges(&net, &padded.image, steps)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::SoftedgeAnyline {
                safe_steps,
                resolution,
            } => {
                let net = network::<TeedNetwork>(networks, &MTEED)?;
                let padded = padded();
                let steps = safe_steps.trunc().max(0.0) as u32;
                let map = anyline_map(&net, &padded.image, resolution, steps)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::Mlsd {
                value_threshold,
                distance_threshold,
                ..
            } => {
                let net = network::<MlsdNetwork>(networks, &MLSD)?;
                let padded = padded();
                let map = mlsd_map(&net, &padded.image, value_threshold, distance_threshold)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::DepthAnything { .. } | Self::DepthAnythingV2 { .. } => {
                let file = self.annotator_file().expect("a network module");
                let net = network::<DepthAnythingNetwork>(networks, file)?;
                let padded = padded();
                let map = depth_anything_map(&net, &padded.image)?;
                padded.crop_gray_to_rgb(&map)
            }
            Self::DepthMidas { .. } => {
                let net = network::<MidasNetwork>(networks, &MIDAS)?;
                midas_module(&net, &padded(), None)?
            }
            Self::NormalMidas {
                background_threshold,
                ..
            } => {
                let net = network::<MidasNetwork>(networks, &MIDAS)?;
                midas_module(&net, &padded(), Some(background_threshold))?
            }
            Self::NormalBae { .. } => {
                let net = network::<NormalBaeNetwork>(networks, &NORMAL_BAE)?;
                normal_bae_module(&net, &padded())?
            }
            Self::DepthLeres {
                remove_near,
                remove_background,
                ..
            } => {
                let net = network::<LeresNetwork>(networks, &LERES)?;
                leres_module(&net, &padded(), remove_near, remove_background)?
            }
            Self::Openpose { .. }
            | Self::OpenposeHand { .. }
            | Self::OpenposeFace { .. }
            | Self::OpenposeFaceonly { .. }
            | Self::OpenposeFull { .. } => self.run_with_poses(image, networks)?.0,
            Self::InpaintOnlyLama => {
                return Err(PipelineError::InvalidRequest(
                    "inpaint_only+lama needs the unit's mask: run_with_mask".into(),
                ))
            }
            _ => self.run(image)?,
        })
    }

    /// [`Self::run_with`] for a unit with a mask (`mask`: one value a pixel at `image`'s size,
    /// white repaints; the first channel of the extension's RGBA feed's alpha): `inpaint_only+lama`
    /// paints the masked area with LaMa; the other modules ignore it.
    pub fn run_with_mask(
        &self,
        image: &RgbImage,
        mask: &[u8],
        networks: &dyn AnnotatorNetworks,
    ) -> Result<RgbImage> {
        match self {
            Self::InpaintOnlyLama => {
                let net = network::<LamaNetwork>(networks, &LAMA)?;
                inpaint_only_lama(&net, image, mask)
            }
            _ => self.run_with(image, networks),
        }
    }

    /// [`Self::run_with`], and for the OpenPose modules the people found (the extension's
    /// `json_pose_callback`; `None` for the others).
    pub fn run_with_poses(
        &self,
        image: &RgbImage,
        networks: &dyn AnnotatorNetworks,
    ) -> Result<(RgbImage, Option<Poses>)> {
        if let (Some(include), Some(resolution)) = (self.openpose_include(), self.resolution()) {
            // Every file looked up first, so a refusal names each one missing.
            let body = network::<BodyNetwork>(networks, &BODY_POSE);
            let hand = include
                .hand
                .then(|| network::<HandNetwork>(networks, &HAND_POSE))
                .transpose();
            let face = include
                .face
                .then(|| network::<FaceNetwork>(networks, &FACENET))
                .transpose();
            let (body, hand, face) = match (body, hand, face) {
                (Ok(b), Ok(h), Ok(f)) => (b, h, f),
                (b, h, f) => {
                    let errors = [b.err(), h.err(), f.err()];
                    let errors: Vec<PipelineError> = errors.into_iter().flatten().collect();
                    if errors.len() == 1
                        || errors
                            .iter()
                            .any(|e| !matches!(e, PipelineError::InvalidRequest(_)))
                    {
                        return Err(errors.into_iter().next().expect("an error"));
                    }
                    let why: Vec<String> = errors
                        .iter()
                        .map(|e| match e {
                            PipelineError::InvalidRequest(m) => m.clone(),
                            e => e.to_string(),
                        })
                        .collect();
                    return Err(PipelineError::InvalidRequest(why.join("; ")));
                }
            };
            let nets = PoseNetworks {
                body: &body,
                hand: hand.as_ref().map(|h| &h.0),
                face: face.as_ref().map(|f| &f.0),
            };
            let (map, poses) = openpose_module(&nets, image, resolution, include)?;
            return Ok((map, Some(poses)));
        }
        Ok((self.run_with(image, networks)?, None))
    }

    /// The control map of `image` made by a model-free module ([`Self::run_with`] for any).
    /// A model-based module ([`Self::model_file`] is `Some`) has no network here: an
    /// `InvalidRequest` naming its file.
    pub fn run(&self, image: &RgbImage) -> Result<RgbImage> {
        let padded = || resize_image_with_pad(image, self.resolution().unwrap_or(512));
        Ok(match *self {
            Self::Canny {
                low_threshold,
                high_threshold,
                ..
            } => {
                let padded = padded();
                let int = |t: f64| t.trunc() as u32;
                let edges = canny(&padded.image, int(low_threshold), int(high_threshold));
                padded.crop_gray_to_rgb(&edges)
            }
            Self::Invert => invert(image),
            // `v > t` is `v > int(t)` for 8-bit v and t >= 0.
            Self::Threshold { threshold: t, .. } => threshold(&padded(), t.trunc() as u32),
            Self::LineartStandard { .. } => lineart_standard(&padded()),
            Self::ScribbleXdog { threshold, .. } => {
                scribble_xdog(&padded(), threshold.trunc() as u32)
            }
            Self::BlurGaussian { sigma, .. } => blur_gaussian(&padded(), sigma),
            Self::TileResample { down_sampling_rate } => tile_resample(image, down_sampling_rate),
            Self::Color { resolution } => color(image, resolution),
            Self::Shuffle { seed, .. } => shuffle(&padded(), seed),
            Self::RecolorLuminance { gamma } => recolor(image, RecolorChannel::Luminance, gamma),
            Self::RecolorIntensity { gamma } => recolor(image, RecolorChannel::Intensity, gamma),
            // The RGB of the extension's RGBA pass-through: the mask travels beside it.
            Self::Inpaint | Self::InpaintOnly => image.clone(),
            // The extension's `identity`: the reference units take the image as it is.
            Self::ReferenceOnly { .. }
            | Self::ReferenceAdain { .. }
            | Self::ReferenceAdainAttn { .. } => image.clone(),
            Self::SoftedgeHed { .. }
            | Self::SoftedgeHedsafe { .. }
            | Self::ScribbleHed { .. }
            | Self::LineartRealistic { .. }
            | Self::LineartCoarse { .. }
            | Self::LineartAnime { .. }
            | Self::LineartAnimeDenoise { .. }
            | Self::SoftedgePidinet { .. }
            | Self::SoftedgePidisafe { .. }
            | Self::ScribblePidinet { .. }
            | Self::SoftedgeTeed { .. }
            | Self::SoftedgeAnyline { .. }
            | Self::Mlsd { .. }
            | Self::DepthAnything { .. }
            | Self::DepthAnythingV2 { .. }
            | Self::DepthMidas { .. }
            | Self::NormalMidas { .. }
            | Self::NormalBae { .. }
            | Self::DepthLeres { .. }
            | Self::Openpose { .. }
            | Self::OpenposeHand { .. }
            | Self::OpenposeFace { .. }
            | Self::OpenposeFaceonly { .. }
            | Self::OpenposeFull { .. }
            | Self::InpaintOnlyLama => {
                return Err(PipelineError::InvalidRequest(format!(
                    "{} needs its network ({}): run_with",
                    self.module(),
                    self.model_file().unwrap_or("?")
                )))
            }
        })
    }
}
