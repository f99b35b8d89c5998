//! Command line: `sdserve serve`, `generate`, `download` and `bench`. Every `serve` flag has an environment twin.

mod generate;
mod model;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use generate::GenerateArgs;
pub use model::{DtypeArg, ModelArgs};
pub use serve::{LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "sdserve",
    version,
    about = "Stable Diffusion 1.5 text-to-image over HTTP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Generate one image to a PNG file, without the server.
    Generate(Box<GenerateArgs>),
    /// Download (or convert) a model into the cache with a progress bar; prints version and folder.
    Download(DownloadArgs),
    /// Time whole generations (per step, device memory) on a local folder; prints JSON.
    Bench(Box<crate::bench_cmd::BenchArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// A hub id, a single-file checkpoint or a diffusers folder.
    #[arg(
        env = "MODEL_ID",
        default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )]
    pub model: String,
    /// Where hub downloads are kept (default: the Hugging Face cache).
    #[arg(long, env = "MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,
    /// Fetch the fp16 weights (what a half-precision GPU run loads) instead of fp32.
    #[arg(long)]
    pub fp16: bool,
    /// The model is a TAESD preview decoder (`PREVIEW_TAESD`, e.g. madebyollin/taesd: one model
    /// at the repo's root), not a pipeline.
    #[arg(long)]
    pub taesd: bool,
    /// Fetch the weights of the model-based ControlNet preprocessors (the files of
    /// lllyasviel/Annotators they read, TEED's from bdsqlsz/qinglong_controlnet-lllite and
    /// Anyline's from TheMistoAI/MistoLine)
    /// instead of a model; `serve` and `generate` find them in
    /// this cache when ANNOTATOR_DIR lacks them.
    #[arg(long, conflicts_with_all = ["taesd", "fp16"])]
    pub annotators: bool,
}

/// The command line, with `generate`'s request flags described from the API's rules.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommand("generate", |mut c| {
        for (id, help) in generate::request_flag_help() {
            c = c.mut_arg(id, |a| a.help(help));
        }
        c
    })
}

/// Parses the process's arguments (exits with clap's message on a bad one).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use sdserve_pipeline::memory::LeverOverrides;

    #[test]
    fn cli_is_consistent_and_defaults_match_the_contract() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["sdserve", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.host.as_str(), a.port, a.generation_timeout_seconds),
            ("127.0.0.1", 8000, 60)
        );
        assert_eq!(a.model.vram_limit_mb, 5120);
        assert_eq!(a.model.device, "auto");
        assert_eq!(a.model.lever_overrides(), LeverOverrides::default());
    }
}
