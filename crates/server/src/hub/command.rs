//! `sdserve download [MODEL]`: resolution with a progress bar on stderr.

use std::path::PathBuf;
use std::sync::Mutex;

use super::{resolve_model, HubError, HubOptions, Layout, Progress, ResolvedModel, Stage};

/// `sdserve download [MODEL]`: resolves (downloads / converts) with a progress bar on stderr
/// and prints the folder and version.
pub fn download_command(spec: &str, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    use std::io::IsTerminal;
    use std::io::Write;
    let tty = std::io::stderr().is_terminal();
    // Without a terminal (logs, CI): one line per stage or file, no redrawn bar.
    let last = Mutex::new(None::<(Stage, Option<String>)>);
    let bar = move |p: &Progress| {
        let mut err = std::io::stderr().lock();
        if !tty {
            let key = Some((p.stage, p.file.clone()));
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if *last != key {
                *last = key;
                let _ = writeln!(err, "{}", p.describe());
            }
            return;
        }
        let line = match (p.stage, p.bytes_total) {
            (Stage::Downloading, Some(total)) if total > 0 => {
                const W: usize = 30;
                let frac = (p.bytes_done as f64 / total as f64).clamp(0.0, 1.0);
                let fill = (frac * W as f64).round() as usize;
                format!(
                    "[{}{}] {}",
                    "#".repeat(fill),
                    "-".repeat(W - fill),
                    p.describe()
                )
            }
            _ => p.describe(),
        };
        let _ = write!(err, "\r\x1b[2K{line}");
        if p.stage == Stage::Done {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    };
    let m = resolve_model(spec, opts, &bar)?;
    println!("{}\t{}", m.model_version, m.dir.display());
    Ok(m)
}

/// Entry point of `sdserve download`: exit status 0 when the model is ready in the cache.
pub fn download_main(
    model: &str,
    cache_dir: Option<PathBuf>,
    fp16: bool,
    layout: Layout,
) -> std::process::ExitCode {
    let mut opts = HubOptions::from_env(cache_dir, fp16);
    opts.layout = layout;
    match download_command(model, &opts) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nerror: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
