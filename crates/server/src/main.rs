//! sdserve: Stable Diffusion 1.5 text-to-image over HTTP, and a one-shot `generate` command.

mod adapters;
mod annotators;
mod api;
mod bench_cmd;
mod cache;
mod cli;
mod config;
mod controlnets;
mod engine;
mod error;
mod face_restorers;
#[cfg(test)]
mod fuzz_tests;
mod generate_cmd;
mod generator;
mod gpu;
mod hub;
mod images;
mod ip_adapters;
mod listen;
mod metrics;
mod model;
mod model_folder;
mod models;
mod png;
#[cfg(test)]
mod readme;
mod security;
mod serve;
mod single_files;
mod speed;
mod styles;
mod upscalers;
mod vaes;
mod validate;

/// Weights kept as stored (f32 on the CPU) live in their mapped files instead of copies
/// (`sdserve_pipeline::weights::mapped`). The test build's counting allocator
/// (`fuzz_tests::images`) wraps this one.
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

fn main() -> std::process::ExitCode {
    match cli::parse().command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Generate(args) => generate_cmd::run(*args),
        cli::Command::Bench(args) => bench_cmd::run(*args),
        // Each repo's files in turn (TEED's is not in lllyasviel/Annotators); a failure fails
        // the command after the others are fetched.
        cli::Command::Download(args) if args.annotators => annotators::hub_repos()
            .iter()
            .map(|(repo, paths)| {
                hub::command::download_main(
                    repo,
                    args.model_cache_dir.clone(),
                    false,
                    hub::Layout::Files(paths),
                )
            })
            .fold(std::process::ExitCode::SUCCESS, |code, c| {
                if c == std::process::ExitCode::SUCCESS {
                    code
                } else {
                    c
                }
            }),
        cli::Command::Download(args) => {
            let layout = if args.taesd {
                hub::Layout::Component
            } else {
                hub::Layout::Pipeline
            };
            hub::command::download_main(&args.model, args.model_cache_dir, args.fp16, layout)
        }
    }
}
