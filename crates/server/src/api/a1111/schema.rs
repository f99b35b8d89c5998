//! The OpenAPI description of `/sdapi/v1` (documentation only: the handlers read JSON objects
//! and translate them, accepting every other A1111 field and ignoring it, as A1111 does).

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

/// Body of `POST /sdapi/v1/txt2img` and `img2img`. Absent or null fields take A1111's defaults;
/// other A1111 fields (`hr_checkpoint_name`, other `alwayson_scripts`, ...) are accepted and
/// ignored. Rules are the native ones (`/generate`), reported under these names.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::GenerateRequest)]
pub struct A1111Request {
    /// At most 500 characters counted after cleaning (the native rule); empty or absent is
    /// allowed, as in A1111 (default ""). `<lora:name:weight>` tags work as natively.
    #[schema(default = "", nullable = true)]
    pub prompt: Option<String>,
    /// At most 500 characters counted after cleaning (the native rule).
    #[schema(nullable = true)]
    pub negative_prompt: Option<String>,
    #[schema(default = 50, minimum = 1, maximum = 50, nullable = true)]
    pub steps: Option<u32>,
    #[schema(default = 7.0, minimum = 0.0, maximum = 30.0, nullable = true)]
    pub cfg_scale: Option<f64>,
    #[schema(
        default = 512,
        minimum = 256,
        maximum = 768,
        multiple_of = 64,
        nullable = true
    )]
    pub width: Option<u32>,
    #[schema(
        default = 512,
        minimum = 256,
        maximum = 768,
        multiple_of = 64,
        nullable = true
    )]
    pub height: Option<u32>,
    /// -1: random (drawn once; batch *k* image *i* uses seed + k * batch_size + i).
    #[schema(default = -1, minimum = -1, maximum = 4294967295_i64, nullable = true)]
    pub seed: Option<i64>,
    /// `Euler a`, `Euler`, `DPM++ 2M`, `DPM++ 2M SDE`, `DPM++ 2M SDE Heun`, `DPM++ SDE`, `DDIM`,
    /// `DDIM CFG++`, `PLMS`, `LMS`, `UniPC`, `Heun`, `DPM2`, `DPM2 a`, `Restart`, `LCM`,
    /// `DPM++ 2S a`, `DPM++ 3M SDE`, `DPM fast`, `DPM adaptive`; all but `DDIM`, `DDIM CFG++`,
    /// `PLMS`, `UniPC` and `LCM` also as `<name> Karras`
    /// (A1111's older one-word form). `DDIM`, `DDIM CFG++`, `PLMS` and `UniPC` are
    /// A1111's own (`ddim_a1111`, `ddim_cfgpp`, `plms_a1111`, `unipc_a1111`).
    #[schema(default = "Euler")]
    pub sampler_name: Option<String>,
    /// The older name of `sampler_name` (used when `sampler_name` is absent).
    pub sampler_index: Option<String>,
    /// `Automatic` (the sampler's own: Karras for `DPM++ 2M`, `DPM++ SDE` and `DPM++ 2S a`,
    /// Exponential for `DPM++ 2M SDE`, its Heun and `DPM++ 3M SDE`, else Uniform), `Uniform`, `Karras` (every sampler but `DDIM`,
    /// `DDIM CFG++`, `PLMS` and `LCM`), `Exponential` or `Beta` (where the sampler has them).
    #[schema(default = "automatic")]
    pub scheduler: Option<String>,
    /// Images generated together (native `batch_size`).
    #[schema(default = 1, minimum = 1, maximum = 8, nullable = true)]
    pub batch_size: Option<u32>,
    /// Batches run one after another.
    #[schema(default = 1, minimum = 1, maximum = 8, nullable = true)]
    pub n_iter: Option<u32>,
    /// img2img: exactly one base64 image (a `data:` prefix is allowed); txt2img ignores it, as
    /// A1111 does (this schema serves both routes, so the count is not in it).
    #[schema(nullable = true)]
    pub init_images: Option<Vec<String>>,
    /// img2img: the native `strength`; txt2img with `enable_hr`: the second pass's.
    #[schema(default = 0.75, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub denoising_strength: Option<f64>,
    /// txt2img: A1111's hires fix, a second pass (img2img of the upscaled first image, same
    /// seeds) at `hr_scale` times the size or `hr_resize_x` x `hr_resize_y` as A1111 sizes it:
    /// whole latent cells of 8 (cropped after the upscale when both sides are given in
    /// another aspect), within 256..=768 a side.
    #[schema(default = false, nullable = true)]
    pub enable_hr: Option<bool>,
    #[schema(default = 2.0, nullable = true)]
    pub hr_scale: Option<f64>,
    /// 0: from `hr_scale`; one side alone keeps the aspect; both in another aspect: upscaled
    /// to cover, then centre-cropped in latent cells (A1111's `truncate_x/y`).
    #[schema(default = 0, minimum = 0, nullable = true)]
    pub hr_resize_x: Option<u32>,
    #[schema(default = 0, minimum = 0, nullable = true)]
    pub hr_resize_y: Option<u32>,
    /// `Latent`, `Latent (antialiased)`, `Latent (bicubic)`, `Latent (bicubic antialiased)`,
    /// `Latent (nearest)`, `Latent (nearest-exact)` (the latents interpolated), `None`,
    /// `Lanczos`, `Nearest` (the image resized, encoded again), or an UPSCALERS_DIR ESRGAN
    /// model by its name (`GET /sdapi/v1/upscalers`); others are a 422 listing the names.
    #[schema(default = "Latent", nullable = true)]
    pub hr_upscaler: Option<String>,
    /// 0: `steps`. The second pass runs `int(steps * denoising_strength)` of them.
    #[schema(default = 0, minimum = 0, maximum = 50, nullable = true)]
    pub hr_second_pass_steps: Option<u32>,
    /// The second pass's sampler and schedule (absent or `Use same sampler`: the first's).
    pub hr_sampler_name: Option<String>,
    pub hr_scheduler: Option<String>,
    /// The second pass's prompts ("" : the first's; at most 500 characters counted after
    /// cleaning); `<lora:...>` tags must be the prompt's.
    #[schema(nullable = true)]
    pub hr_prompt: Option<String>,
    #[schema(nullable = true)]
    pub hr_negative_prompt: Option<String>,
    /// img2img: inpainting mask, white = repaint; inpainting as A1111 does it (the native
    /// `inpaint` object, with A1111's API defaults for the fields below). A mask with
    /// transparency (PNG RGBA, a palette with graded alpha, WebP with alpha; not all opaque)
    /// is its alpha, repainting where it is above 128 (`mask_round` false: its levels), as
    /// A1111's `create_binary_mask`.
    pub mask: Option<String>,
    /// Gaussian blur of the mask (OpenCV, sigma in pixels) in both directions; sets
    /// `mask_blur_x` and `mask_blur_y`, as A1111's setter does.
    #[schema(minimum = 0, maximum = 64, nullable = true)]
    pub mask_blur: Option<u32>,
    #[schema(default = 4, minimum = 0, maximum = 64, nullable = true)]
    pub mask_blur_x: Option<u32>,
    #[schema(default = 4, minimum = 0, maximum = 64, nullable = true)]
    pub mask_blur_y: Option<u32>,
    /// Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
    #[schema(default = 0, minimum = 0, maximum = 3, nullable = true)]
    pub inpainting_fill: Option<u8>,
    /// "Only masked": the mask's region (plus the padding) repainted at width x height and
    /// pasted back; the image comes back at the init image's size.
    #[schema(default = true, nullable = true)]
    pub inpaint_full_res: Option<bool>,
    /// "Only masked" padding in pixels.
    #[schema(default = 0, minimum = 0, maximum = 256, nullable = true)]
    pub inpaint_full_res_padding: Option<u32>,
    /// img2img: how the init image is fitted to width x height (A1111's `images.resize_image`):
    /// 0 Just resize (stretched), 1 Crop and resize (scaled to cover, centre cropped), 2 Resize
    /// and fill (scaled to fit, borders filled with its stretched edges). With "only masked" it
    /// changes nothing (the mask's region is cut at the upload's size); with a mask over the
    /// whole picture only 0 runs, and 3 (the latent upscale) is refused: a 422 naming it.
    /// ControlNet units without an image fit the init image by the same mode.
    #[schema(default = 0, minimum = 0, maximum = 3, nullable = true)]
    pub resize_mode: Option<u8>,
    /// 1: repaint what the mask leaves black ("Inpaint not masked").
    #[schema(default = 0, minimum = 0, maximum = 1, nullable = true)]
    pub inpainting_mask_invert: Option<u8>,
    /// false: the mask's grey levels (its blur, its alpha's levels) are kept where A1111
    /// rounds them: the latent mask, an inpainting model's conditioning mask, and a mask
    /// with transparency (then its alpha as it is, not cut at 128).
    #[schema(default = true, nullable = true)]
    pub mask_round: Option<bool>,
    /// Seamless textures: the native `tiling` (circular padding in every convolution of the
    /// UNet and the VAE, as A1111's); the infotext says `Tiling: True`.
    #[schema(default = false, nullable = true)]
    pub tiling: Option<bool>,
    /// The native `restore_faces` (CodeFormer through FACE_RESTORE_DIR; a 422 without it):
    /// null takes the `face_restoration` option (false). CodeFormer's weight is the
    /// `code_former_weight` option (0.5); the infotext says `Face restoration: CodeFormer`.
    #[schema(default = false, nullable = true)]
    pub restore_faces: Option<bool>,
    /// Extension scripts by name. `controlnet` (the sd-webui-controlnet extension's, any case:
    /// `{"args": [unit, ...]}`) runs its enabled units as the native `controlnets`: `model` (a
    /// CONTROLNET_DIR name, with or without its ` [hash]`), `image` / `input_image` (on img2img
    /// optional: the init image; with a `mask` and `inpaint_full_res` cut to the region A1111
    /// repaints, as the extension, unless `inpaint_crop_input_image` is false), `mask` (the
    /// extension's canvas scribble), `weight`,
    /// `guidance_start`, `guidance_end`, `resize_mode` (`Crop and Resize` by default, `Resize
    /// and Fill`, `Just Resize`), `hr_option` with `enable_hr` (`Both`, `Low res only`, `High
    /// res only`); `module` `none` or a preprocessor of `GET /controlnet/module_list`,
    /// `control_mode` (`Balanced`, `My prompt is more important`, `ControlNet is more
    /// important`, or 0, 1, 2: the native `control_mode`). Other scripts
    /// are accepted and ignored.
    #[schema(nullable = true, value_type = Option<Object>)]
    pub alwayson_scripts: Option<serde_json::Value>,
    /// The native `variation_seed`; -1: random (drawn once). Used only with a non-zero
    /// `subseed_strength`; every image keeps `seed` and image i uses subseed + i, as A1111.
    #[schema(default = -1, minimum = -1, maximum = 4294967295_i64, nullable = true)]
    pub subseed: Option<i64>,
    /// The native `variation_strength`.
    #[schema(default = 0.0, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub subseed_strength: Option<f64>,
    /// The native `seed_resize_from_width` (then 64..=2048) when this and `seed_resize_from_h`
    /// are both above 0: the images keep, centred, their seed's noise drawn at that size;
    /// 0 or below on either side: off, as A1111.
    #[schema(default = -1, nullable = true)]
    pub seed_resize_from_w: Option<i64>,
    /// The native `seed_resize_from_height`, with `seed_resize_from_w`.
    #[schema(default = -1, nullable = true)]
    pub seed_resize_from_h: Option<i64>,
    /// `CLIP_stop_at_last_layers` is the native `clip_skip` in A1111's range, 1..=12 (its slider;
    /// still at most the model's text encoder layers + 1); `img2img_fix_steps` (true or false)
    /// runs img2img's `steps` exactly, of a stretched schedule (the native `step_rule`
    /// `a1111_fix_steps`; else `a1111`); `skip_early_cond` (0..=1) is the native
    /// `negative_guidance_skip_early` (A1111's "Skip Early CFG"); `sd_model_checkpoint` naming
    /// another model falls back to the loaded one (as A1111 does).
    #[schema(value_type = Object, nullable = true, required = false)]
    pub override_settings: Option<serde_json::Value>,
}

/// The answer of `txt2img` and `img2img`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::GenerateResponse)]
pub struct A1111Response {
    /// Raw base64 PNGs (no `data:` prefix), each with its `parameters` text chunk. An
    /// interrupted request holds the images finished before the interrupt.
    pub images: Vec<String>,
    /// The request, with A1111's defaults filled in.
    #[schema(value_type = Object)]
    pub parameters: serde_json::Value,
    /// A JSON object *serialised to a string*: `seed`, `all_seeds`, `infotexts`, `sampler_name`,
    /// `cfg_scale`, `steps`, `width`, `height`, ... (A1111's `Processed.js()`).
    pub info: String,
}

/// `GET /sdapi/v1/progress`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::Progress)]
pub struct A1111Progress {
    /// 0..1 over the oldest A1111 request in flight (batches and steps); 0 when idle.
    pub progress: f64,
    /// Seconds left (estimated).
    pub eta_relative: f64,
    /// `job_count` (batches; 0 when idle), `job_no`, `sampling_step`, `sampling_steps`,
    /// `interrupted`, `skipped`, `job`, `job_timestamp`.
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
    /// The latest preview (base64 PNG) when previews are on, else null.
    pub current_image: Option<String>,
    pub textinfo: Option<String>,
}

/// The fields of A1111's Extras (its `ExtrasBaseRequest`); absent or null: A1111's default.
/// Other fields are ignored, as A1111 ignores them.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ExtrasOptions)]
pub struct ExtrasOptions {
    /// 0: upscale by `upscaling_resize`; 1: to `upscaling_resize_w` x `upscaling_resize_h`.
    #[schema(default = 0, minimum = 0, maximum = 1, nullable = true)]
    pub resize_mode: Option<u8>,
    /// Accepted and ignored (A1111 answers the images either way).
    #[schema(default = true, nullable = true)]
    pub show_extras_results: Option<bool>,
    /// Face restoration: there is none here; above 0 is a 422.
    #[schema(default = 0.0, minimum = 0.0, maximum = 0.0, nullable = true)]
    pub gfpgan_visibility: Option<f64>,
    #[schema(default = 0.0, minimum = 0.0, maximum = 0.0, nullable = true)]
    pub codeformer_visibility: Option<f64>,
    #[schema(default = 0.0, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub codeformer_weight: Option<f64>,
    /// The factor (above 0). Each upscaled side is floored to a multiple of 8 (A1111's
    /// `Upscaler.upscale`); the result may have at most 4096 px a side and 16 MP.
    #[schema(default = 2.0, exclusive_minimum = 0.0, nullable = true)]
    pub upscaling_resize: Option<f64>,
    /// resize_mode 1: the image is scaled to cover this size (aspect kept), then with
    /// `upscaling_crop` pasted centred on a black canvas of exactly this size.
    #[schema(default = 512, minimum = 1, maximum = 4096, nullable = true)]
    pub upscaling_resize_w: Option<u32>,
    #[schema(default = 512, minimum = 1, maximum = 4096, nullable = true)]
    pub upscaling_resize_h: Option<u32>,
    #[schema(default = true, nullable = true)]
    pub upscaling_crop: Option<bool>,
    /// `None` (the image as it is), `Lanczos` or `Nearest` (A1111's built-in upscalers:
    /// Pillow's filters); another name is a 422 listing these.
    #[schema(default = "None", nullable = true)]
    pub upscaler_1: Option<String>,
    /// Blended over the first by `extras_upscaler_2_visibility` (`Image.blend`).
    #[schema(default = "None", nullable = true)]
    pub upscaler_2: Option<String>,
    #[schema(default = 0.0, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub extras_upscaler_2_visibility: Option<f64>,
    /// Accepted and ignored (it orders upscaling and face restoration).
    #[schema(default = false, nullable = true)]
    pub upscale_first: Option<bool>,
}

/// Body of `POST /sdapi/v1/extra-single-image`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ExtrasSingleImageRequest)]
pub struct ExtrasSingleImageRequest {
    #[serde(flatten)]
    pub options: ExtrasOptions,
    /// Base64 PNG, JPEG or WebP (a `data:image/...;base64,` prefix is allowed), at most 4096
    /// px a side and 16 MP.
    #[schema(min_length = 1)]
    pub image: String,
}

/// Body of `POST /sdapi/v1/extra-batch-images`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ExtrasBatchImagesRequest)]
pub struct ExtrasBatchImagesRequest {
    #[serde(flatten)]
    pub options: ExtrasOptions,
    /// At most 64 images, whose results hold at most 64 MP together.
    #[serde(rename = "imageList")]
    #[schema(max_items = 64)]
    pub image_list: Vec<FileData>,
}

/// One image of `extra-batch-images`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::FileData)]
pub struct FileData {
    /// Base64 PNG, JPEG or WebP, as `image` of `extra-single-image`.
    #[schema(min_length = 1)]
    pub data: String,
    pub name: String,
}

/// The answer of `extra-single-image`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ExtrasSingleImageResponse)]
pub struct ExtrasSingleImageResponse {
    /// The upscale's infotext as A1111's `plaintext_to_html` writes it (`<p>Postprocess
    /// upscale by: 2.0, Postprocess upscaler: Lanczos</p>`).
    pub html_info: String,
    /// Raw base64 PNG; its `postprocessing` text chunk holds the infotext, and the sent PNG's
    /// `parameters` text is kept.
    pub image: String,
}

/// The answer of `extra-batch-images`.
#[derive(Serialize, ToSchema)]
#[schema(as = a1111::ExtrasBatchImagesResponse)]
pub struct ExtrasBatchImagesResponse {
    /// The last image's, as A1111's.
    pub html_info: String,
    pub images: Vec<String>,
}

#[derive(OpenApi)]
#[openapi(
    paths(
        super::txt2img, super::img2img, super::progress::progress, super::progress::interrupt, super::progress::skip,
        super::samplers, super::schedulers, super::sd_models, super::get_options,
        super::set_options, super::png_info, super::cmd_flags::cmd_flags,
        super::extras::extra_single_image, super::extras::extra_batch_images, super::listings::loras,
        super::listings::refresh_loras, super::listings::embeddings,
        super::listings::refresh_embeddings, super::listings::memory,
        super::listings::hypernetworks, super::listings::face_restorers,
        super::listings::realesrgan_models, super::listings::scripts, super::listings::upscalers,
        super::listings::sd_vae, super::listings::latent_upscale_modes,
        super::listings::prompt_styles, super::listings::refresh_checkpoints,
        super::listings::refresh_vae, super::listings::script_info, super::listings::extensions,
        super::checkpoints::unload, super::checkpoints::reload, super::controlnet::version,
        super::controlnet::model_list, super::controlnet_modules::module_list,
        super::controlnet_detect::detect
    ),
    components(schemas(A1111Request, A1111Response, A1111Progress, ExtrasOptions,
        ExtrasSingleImageRequest, ExtrasBatchImagesRequest, FileData, ExtrasSingleImageResponse,
        ExtrasBatchImagesResponse, super::controlnet_detect::ControlNetDetectRequest,
        super::controlnet_detect::ControlNetDetectResponse)),
    tags((name = "a1111", description = "AUTOMATIC1111's /sdapi/v1, translated into the native request"))
)]
pub struct ApiDoc;
