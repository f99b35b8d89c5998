//! sdserve: Stable Diffusion 1.5 text-to-image over HTTP, and a one-shot `generate` command.

mod adapters;
mod api;
mod bench_cmd;
mod cache;
mod cli;
mod config;
mod engine;
mod error;
#[cfg(test)]
mod fuzz_tests;
mod generate_cmd;
mod generator;
mod gpu;
mod hub;
mod images;
mod listen;
mod metrics;
mod model;
mod png;
#[cfg(test)]
mod readme;
mod security;
mod serve;
mod speed;
mod validate;

fn main() -> std::process::ExitCode {
    match cli::parse().command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Generate(args) => generate_cmd::run(*args),
        cli::Command::Bench(args) => bench_cmd::run(*args),
        cli::Command::Download(args) => {
            let layout = if args.taesd {
                hub::Layout::Component
            } else {
                hub::Layout::Pipeline
            };
            hub::download_main(&args.model, args.model_cache_dir, args.fp16, layout)
        }
    }
}
