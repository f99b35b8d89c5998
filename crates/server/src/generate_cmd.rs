//! `sdserve generate`: one image to a file, with a progress bar on stderr.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::Instant;

use sdserve_pipeline::pipeline::{GenerationParams, StepProgress};
use serde_json::{json, Map, Value};

use crate::cli::GenerateArgs;

/// The same rules as the API: the flags are checked by `validate::parse_generate`.
fn request_json(a: &GenerateArgs) -> Value {
    let mut m = Map::new();
    m.insert("prompt".into(), json!(a.prompt));
    let opt = [
        (
            "negative_prompt",
            a.negative_prompt.as_ref().map(|v| json!(v)),
        ),
        ("steps", a.steps.map(|v| json!(v))),
        ("width", a.width.map(|v| json!(v))),
        ("height", a.height.map(|v| json!(v))),
        ("seed", a.seed.map(|v| json!(v))),
        ("guidance_scale", a.guidance_scale.map(|v| json!(v))),
        ("scheduler", a.scheduler.as_ref().map(|v| json!(v))),
    ];
    for (k, v) in opt {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    Value::Object(m)
}

fn bar(p: StepProgress, started: Instant) -> String {
    const WIDTH: usize = 30;
    let filled = p.step * WIDTH / p.total.max(1);
    let secs = started.elapsed().as_secs_f64();
    let eta = secs / p.step.max(1) as f64 * (p.total - p.step) as f64;
    format!(
        "\r[{}{}] {}/{} steps, {secs:.1}s elapsed, ~{eta:.1}s left ",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        p.step,
        p.total
    )
}

pub fn run(a: GenerateArgs) -> ExitCode {
    match run_inner(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(a: &GenerateArgs) -> Result<(), String> {
    let body = serde_json::to_vec(&request_json(a)).map_err(|e| e.to_string())?;
    let req = crate::validate::parse_generate(&body)
        .map_err(|e| e.body().details.unwrap_or_else(|| e.to_string()))?;
    let rt = crate::config::select_runtime(&a.model.device, a.model.dtype)?;
    for w in &rt.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "loading {} on {} ({}) ...",
        a.model.model,
        rt.label,
        rt.dtype.as_str()
    );
    let t0 = Instant::now();
    let mut loaded = crate::model::load_real(&a.model, &rt, &crate::hub::LoadStatus::default())?;
    eprintln!(
        "loaded {} in {:.1}s",
        loaded.info.model_version,
        t0.elapsed().as_secs_f64()
    );
    let seed = req
        .seed
        .map(u64::from)
        .unwrap_or_else(|| u64::from(crate::api::random_seed()));
    let scheduler = req.scheduler.unwrap_or(loaded.info.default_scheduler);
    eprintln!("seed {seed}, scheduler {}", scheduler.name());
    let params = GenerationParams {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        steps: req.steps,
        width: req.width,
        height: req.height,
        seed,
        guidance_scale: req.guidance_scale,
        scheduler: Some(scheduler),
    };
    let started = Instant::now();
    let mut err = std::io::stderr();
    let img = loaded
        .generator
        .generate(&params, &mut |p| {
            let _ = write!(err, "{}", bar(p, started));
            let _ = err.flush();
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
    eprintln!();
    let png = crate::png::encode(
        &img,
        &crate::png::parameters_text(&params, &loaded.info.model_version),
    )?;
    std::fs::write(&a.output, png).map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!(
        "wrote {} ({}x{}) in {:.1}s, seed {seed}",
        a.output.display(),
        img.width,
        img.height,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_draws_progress() {
        let s = bar(StepProgress { step: 1, total: 2 }, Instant::now());
        assert!(
            s.contains(&format!("[{}{}]", "#".repeat(15), " ".repeat(15))),
            "{s}"
        );
        assert!(s.contains("1/2 steps"));
    }
}
