//! Where the model comes from and what runs it: the flags `serve`, `generate` and `bench` share.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use sdserve_pipeline::attention::AttentionSlicing;
use sdserve_pipeline::memory::plan::LEAN_SLICE_BYTES;
use sdserve_pipeline::memory::{LeverOverrides, Offload};

/// Number format of weights and arithmetic. On the CPU only f32 is fast (f16 is refused there);
/// on a GPU f16 halves the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// f16 on CUDA, f32 on the CPU.
    Auto,
    /// Full precision: what the CPU runs; on a GPU twice the memory of f16.
    F32,
    /// Half precision, for CUDA GPUs (refused on the CPU, which has no fast f16 kernels).
    F16,
    /// Half precision with f32's range, for CUDA GPUs of compute capability 8.0 or newer (f32 on the CPU).
    Bf16,
}

/// Attention slicing; `auto` leaves it to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlicingArg {
    Auto,
    /// The whole score matrix at once (fastest, most memory).
    Off,
    /// Pieces of at most 256 MiB of scores.
    On,
    /// Pieces of at most 64 MiB of scores.
    Lean,
}

/// A lever that is on, off, or left to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ToggleArg {
    Auto,
    On,
    Off,
}

/// Where the components live; `auto` leaves it to the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OffloadArg {
    Auto,
    /// Everything stays on the device.
    None,
    /// Text encoder, UNet and VAE on the device only for their stage.
    Model,
    /// As `model`, and the UNet's weights kept in host memory, its blocks put on the device one
    /// at a time during each step (the least device memory, the slowest).
    Sequential,
}

/// Where the model comes from and what runs it (shared by `serve` and `generate`).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local diffusers folder, a single-file checkpoint, or a hub id.
    #[arg(
        long = "model",
        env = "MODEL_ID",
        default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )]
    pub model: String,
    /// Where hub downloads are kept (default: the Hugging Face cache).
    #[arg(long, env = "MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "DEVICE", default_value = "auto")]
    pub device: String,
    /// Number format: auto is f16 on CUDA and f32 on the CPU (which refuses f16).
    #[arg(long, env = "DTYPE", value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// GPU memory budget the pipeline plans for (attention slicing, VAE tiling, offload).
    #[arg(long, env = "VRAM_LIMIT_MB", default_value_t = 5120)]
    pub vram_limit_mb: u64,
    /// Overrides the memory plan's attention slicing.
    #[arg(long, env = "ATTENTION_SLICING", value_enum, default_value = "auto")]
    pub attention_slicing: SlicingArg,
    /// Overrides the memory plan's tiled VAE (decode, and encode of init images; `on` still plans the tile size).
    #[arg(long, env = "VAE_TILING", value_enum, default_value = "auto")]
    pub vae_tiling: ToggleArg,
    /// Overrides the memory plan's offload.
    #[arg(long, env = "OFFLOAD", value_enum, default_value = "auto")]
    pub offload: OffloadArg,
    /// A folder of LoRA `.safetensors` files (kohya or PEFT; LyCORIS LoHa, LoKr, IA3, GLoRA,
    /// OFT/BOFT, norm and full diffs, DoRA, under kohya's names; kohya-ss's own OFT files)
    /// that requests name in `loras`
    /// or `<lora:name:weight>` tags; listed by GET /loras. Files added, replaced or removed are
    /// picked up without a restart (POST /adapters/refresh reads it at once).
    #[arg(long, env = "LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// A folder of textual-inversion embeddings (A1111 `.pt`, `.safetensors`): a file's name
    /// used as a word in a prompt stands for its vectors; listed by GET /embeddings. Picked up
    /// without a restart, as LORA_DIR.
    #[arg(long, env = "EMBEDDINGS_DIR")]
    pub embeddings_dir: Option<PathBuf>,
    /// A folder of external VAEs requests may decode with (`vae`; A1111's `sd_vae`): every
    /// `.safetensors`, `.ckpt` and `.pt` file (original LDM key names) and diffusers VAE folder
    /// in it, named by its file or folder name; listed by GET /vaes. Files added later are
    /// picked up.
    #[arg(long, env = "VAE_DIR")]
    pub vae_dir: Option<PathBuf>,
    /// A folder of upscaler models (A1111's `models/ESRGAN`: R-ESRGAN 4x+, 4x-UltraSharp, ...,
    /// and `models/SwinIR`: SwinIR 4x, ...; `.pth`, `.pt`, `.safetensors`), each named by its file stem in
    /// Extras' `upscaler_1` / `upscaler_2` and the hires fix's `hr_upscaler` /
    /// `hires.upscaler`; listed by GET /sdapi/v1/upscalers. Read on every look, so files added
    /// later are picked up; a model is read once (a replaced file again).
    #[arg(long, env = "UPSCALERS_DIR")]
    pub upscalers_dir: Option<PathBuf>,
    /// A folder of face restoration models, laid out as A1111's `models/Codeformer`:
    /// CodeFormer (`codeformer-v0.1.0.pth`: the first `.pth` in natural name order other than
    /// facexlib's two) beside facexlib's `detection_Resnet50_Final.pth` (RetinaFace) and
    /// `parsing_parsenet.pth` (ParseNet). With it, A1111's `restore_faces`, Extras'
    /// `codeformer_visibility` and the native `restore_faces` run; listed by GET
    /// /sdapi/v1/face-restorers. The networks are read once (replaced files again).
    #[arg(long, env = "FACE_RESTORE_DIR")]
    pub face_restore_dir: Option<PathBuf>,
    /// A folder of ControlNets (A1111's `models/ControlNet`: `control_v11p_sd15_canny.pth`,
    /// `.safetensors`, `.pt`, `.ckpt` files with the original key names, and diffusers
    /// ControlNet folders), each named by its file stem or folder name in `controlnets[i].model`;
    /// listed by GET /controlnets. Read on every look; a model is read once onto the
    /// pipeline's device (a replaced file again; at most two kept, on a GPU only the running
    /// request's).
    #[arg(long, env = "CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// A folder laid out as h94/IP-Adapter's `models/`: IP-Adapter files
    /// (`ip-adapter_sd15.safetensors`, `ip-adapter-plus_sd15.bin`, ...: `.safetensors` or
    /// `.bin`), each named by its file stem in `ip_adapters[i].model`, and
    /// the CLIP image encoder they need in `image_encoder/` (`config.json`, weights,
    /// `preprocessor_config.json` where present); listed by GET /ip-adapters. Read on every
    /// look; the adapter and the encoder are read for the request that uses them.
    #[arg(long, env = "IP_ADAPTER_DIR")]
    pub ip_adapter_dir: Option<PathBuf>,
    /// A folder of the model-based ControlNet preprocessors' weights under the
    /// sd-webui-controlnet extension's names, at its top or in the extension's subfolders (its
    /// `annotator/downloads` as it is), from lllyasviel/Annotators: `ControlNetHED.pth`
    /// (`hed/`) runs `softedge_hed`, `softedge_hedsafe` and `scribble_hed`; `sk_model.pth` and
    /// `sk_model2.pth` (`lineart/`) run `lineart_realistic` and `lineart_coarse`; `netG.pth`
    /// (`lineart_anime/`) runs `lineart_anime`; `erika.pth` (`manga_line/`) runs
    /// `lineart_anime_denoise`; `table5_pidinet.pth` (`pidinet/`) runs
    /// `softedge_pidinet`, `softedge_pidisafe` and `scribble_pidinet`; and TEED's `7_model.pth`
    /// (`TEED/`, from bdsqlsz/qinglong_controlnet-lllite) runs `softedge_teed`; `MTEED.pth`
    /// (`TEED/`, from TheMistoAI/MistoLine) runs `softedge_anyline`; `mlsd_large_512_fp32.pth` (`mlsd/`)
    /// runs `mlsd`; `depth_anything_v2_vitl.safetensors` (`depth_anything_v2/`, from
    /// MackinationsAi/Depth-Anything-V2_Safetensors) runs `depth_anything_v2`;
    /// `depth_anything_vitl14.pth` (`depth_anything/`, from the LiheYoung/Depth-Anything
    /// space's `checkpoints/`) runs `depth_anything`; `dpt_hybrid-midas-501f0c75.pt` (`midas/`,
    /// from lllyasviel/ControlNet's `annotator/ckpts/`) runs `depth_midas` and `normal_midas`;
    /// `scannet.pt` (`normal_bae/`) runs `normal_bae`;
    /// `res101.pth` (`leres/`) runs `depth_leres`;
    /// `ControlNetLama.pth` (`lama/`) runs `inpaint_only+lama`;
    /// `body_pose_model.pth` (`openpose/`) runs `openpose`, with `hand_pose_model.pth`
    /// (`openpose/`) `openpose_hand`, with `facenet.pth` (`openpose/`) `openpose_face` and
    /// `openpose_faceonly`, with both `openpose_full`. A file it lacks
    /// is taken
    /// from the model cache, where `sdserve download --annotators` puts them. Each read once, on
    /// the CPU (a replaced file again); without its file a module is a 422 naming the file.
    #[arg(long, env = "ANNOTATOR_DIR")]
    pub annotator_dir: Option<PathBuf>,
    /// MODELS_DIR for the worker's VAE lookups (its `*.vae.*` files are VAEs, as in A1111):
    /// set by `serve` from `--models-dir`, not a flag of its own.
    #[arg(skip)]
    pub vae_models_dir: Option<PathBuf>,
    /// For a single-file checkpoint not shaped like SD 1.5: a folder with the diffusers
    /// configs (`unet/config.json`, `vae/config.json`, `text_encoder/config.json`,
    /// `scheduler/scheduler_config.json`, optionally `tokenizer/`) to convert it with.
    #[arg(long, env = "MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,
}

impl ModelArgs {
    pub fn adapter_dirs(&self) -> crate::adapters::AdapterDirs {
        crate::adapters::AdapterDirs {
            lora_dir: self.lora_dir.clone(),
            embeddings_dir: self.embeddings_dir.clone(),
        }
    }

    /// The levers fixed by flags; the planner picks the rest from `VRAM_LIMIT_MB`.
    pub fn lever_overrides(&self) -> LeverOverrides {
        LeverOverrides {
            attention: match self.attention_slicing {
                SlicingArg::Auto => None,
                SlicingArg::Off => Some(AttentionSlicing::Off),
                SlicingArg::On => Some(AttentionSlicing::Auto),
                SlicingArg::Lean => Some(AttentionSlicing::MaxBytes(LEAN_SLICE_BYTES)),
            },
            vae_tiling: match self.vae_tiling {
                ToggleArg::Auto => None,
                ToggleArg::On => Some(true),
                ToggleArg::Off => Some(false),
            },
            offload: match self.offload {
                OffloadArg::Auto => None,
                OffloadArg::None => Some(Offload::None),
                OffloadArg::Model => Some(Offload::Model),
                OffloadArg::Sequential => Some(Offload::Sequential),
            },
            vae_dtype: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn lever_flags_fix_the_plan() {
        let cli = Cli::try_parse_from([
            "sdserve",
            "serve",
            "--attention-slicing",
            "lean",
            "--vae-tiling",
            "off",
            "--offload",
            "sequential",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        let o = a.model.lever_overrides();
        assert_eq!(
            o.attention,
            Some(AttentionSlicing::MaxBytes(LEAN_SLICE_BYTES))
        );
        assert_eq!(o.vae_tiling, Some(false));
        assert_eq!(o.offload, Some(Offload::Sequential));
        assert!(Cli::try_parse_from(["sdserve", "serve", "--offload", "disk"]).is_err());
    }
}
