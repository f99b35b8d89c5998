//! `sdserve generate`'s tests (`generate_cmd`), in a file of their own.
use super::*;

/// The native request `sdserve generate --prompt wall <extra>` sends.
fn request_of(extra: &[&str]) -> serde_json::Value {
    use clap::FromArgMatches;
    let args = ["sdserve", "generate", "--prompt", "wall"]
        .iter()
        .chain(extra);
    let cli = crate::cli::Cli::from_arg_matches(
        &crate::cli::command().try_get_matches_from(args).unwrap(),
    )
    .unwrap();
    let crate::cli::Command::Generate(a) = cli.command else {
        panic!("generate")
    };
    request_json(&a).unwrap()
}

#[test]
fn tiling_flag_is_the_native_tiling_field() {
    let parse = |extra: &[&str]| {
        let body = request_of(extra);
        crate::validate::parse_generate(body.to_string().as_bytes()).unwrap()
    };
    assert!(parse(&["--tiling"]).tiling);
    assert!(!parse(&[]).tiling);
}

#[test]
fn controlnet_flags_take_a_model_an_image_and_an_optional_scale() {
    let dir = std::env::temp_dir().join(format!("sdserve-cnflag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("edge:map.png");
    std::fs::write(&img, b"png").unwrap();
    let p = img.to_str().unwrap();
    let u = controlnet_use(&format!("canny:{p}:0.5")).unwrap();
    assert_eq!(
        (u["model"].clone(), u["scale"].clone()),
        (json!("canny"), json!(0.5))
    );
    // No number after the last `:`: all of it is the file.
    let u = controlnet_use(&format!("canny:{p}")).unwrap();
    assert!(u.get("scale").is_none() && u["image"].is_string(), "{u}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(controlnet_use("canny").unwrap_err().contains("MODEL:IMAGE"));
    assert!(controlnet_use("canny:/no/such.png")
        .unwrap_err()
        .contains("--controlnet"));
}

#[test]
fn controlnet_preprocessor_flags_are_the_units_preprocessors_in_order() {
    assert_eq!(
        preprocessor_flag("canny").unwrap(),
        json!({"type": "canny"})
    );
    assert_eq!(
        preprocessor_flag("canny:50:150:768").unwrap(),
        json!({"type": "canny", "low_threshold": 50, "high_threshold": 150, "resolution": 768})
    );
    assert_eq!(preprocessor_flag("none").unwrap(), json!({"type": "none"}));
    for bad in ["canny:50", "canny:a:b", "canny:1:2:3:4"] {
        assert!(
            preprocessor_flag(bad)
                .unwrap_err()
                .contains("canny[:LOW:HIGH"),
            "{bad}"
        );
    }
    let dir = std::env::temp_dir().join(format!("sdserve-cnpre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("photo.png");
    std::fs::write(&img, b"png").unwrap();
    let unit = format!("cn:{}", img.to_str().unwrap());
    let body = request_of(&[
        "--controlnet",
        &unit,
        "--controlnet",
        &unit,
        "--controlnet-preprocessor",
        "canny:1:2",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        body["controlnets"][0]["preprocessor"],
        json!({"type": "canny", "low_threshold": 1, "high_threshold": 2})
    );
    assert!(body["controlnets"][1].get("preprocessor").is_none());
}

#[test]
fn inpaint_flags_are_the_native_inpaint_object() {
    let body = request_of;
    assert_eq!(body(&[]).get("inpaint"), None);
    assert_eq!(body(&["--inpaint"])["inpaint"], json!({}));
    assert_eq!(
        body(&[
            "--inpaint-mask-blur-x",
            "2",
            "--inpaint-mask-invert",
            "--inpaint-masked-content",
            "fill",
            "--inpaint-area",
            "only_masked",
            "--inpaint-padding",
            "16"
        ])["inpaint"],
        json!({"mask_blur_x": 2, "mask_invert": true, "masked_content": "fill",
               "area": "only_masked", "padding": 16})
    );
    assert_eq!(flag_of("inpaint.mask_blur"), "--inpaint-mask-blur");
}

#[test]
fn lora_flags_take_an_optional_weight() {
    assert_eq!(lora_use("ink"), json!({"name": "ink"}));
    assert_eq!(lora_use("ink:0.5"), json!({"name": "ink", "weight": 0.5}));
    assert_eq!(lora_use("a:b"), json!({"name": "a:b"}));
}

#[test]
fn refusals_name_the_flag() {
    let e = ApiError::Validation(vec![
        crate::error::FieldError {
            field: "seed_resize_from_height".into(),
            rule: "is required".into(),
        },
        crate::error::FieldError {
            field: "hires.width".into(),
            rule: "odd".into(),
        },
    ]);
    assert_eq!(
        flag_error(e),
        "--seed-resize-from-height: is required; --hires-width: odd"
    );
}

#[test]
fn batch_images_go_to_numbered_files() {
    let out = Path::new("dir/out.png");
    assert_eq!(batch_path(out, 0), Path::new("dir/out.png"));
    assert_eq!(batch_path(out, 2), Path::new("dir/out-2.png"));
    assert_eq!(batch_path(Path::new("x"), 1), Path::new("x-1"));
}

/// A terminal that records what indicatif draws.
#[derive(Debug, Clone, Default)]
struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

impl indicatif::TermLike for Screen {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.write_str("<clear>")
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn at(step: usize, total: usize) -> StepProgress<'static> {
    StepProgress {
        step,
        total,
        latents: None,
        between_steps: false,
    }
}

#[test]
fn a_terminal_gets_a_bar_with_steps_rate_and_eta() {
    let screen = Screen::default();
    let mut p = Progress::with_target(
        ProgressDrawTarget::term_like(Box::new(screen.clone())),
        true,
    );
    for step in 1..=2 {
        assert_eq!(p.step(at(step, 2)), None, "the bar draws itself");
    }
    p.finish();
    let drawn = screen.0.lock().unwrap().clone();
    assert!(
        drawn.contains(&format!("[{}] 2/2 steps, ", "#".repeat(30))),
        "{drawn}"
    );
    assert!(
        drawn.contains("steps/s") || drawn.contains("s/step"),
        "{drawn}"
    );
    assert!(drawn.contains("ETA"), "{drawn}");
}

#[test]
fn rates_read_as_seconds_per_step_when_slow() {
    assert_eq!(rate_text(0.25), "4.0 s/step");
    assert_eq!(rate_text(7.5), "7.5 steps/s");
    assert_eq!(rate_text(0.0), "? s/step");
}

#[test]
fn no_redraws_into_a_file() {
    let mut p = Progress::new(false);
    let lines: Vec<String> = (1..=20).filter_map(|step| p.step(at(step, 20))).collect();
    // Fast steps: the first and the last only, each a whole line.
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("1/20 steps") && lines[1].starts_with("20/20 steps"));
    assert!(lines[1].contains("~0.0s left"), "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains('\r') && l.ends_with('\n')));
}

#[test]
fn unwritable_outputs_are_found_before_loading() {
    let dir = std::env::temp_dir().join(format!("sdserve-out-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = dir.join("new.png");
    check_writable(&fresh).unwrap();
    assert!(!fresh.exists(), "the check leaves no file behind");
    let e = check_writable(&dir.join("missing/x.png")).unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    let e = check_writable(&dir).unwrap_err();
    assert!(e.contains("is a folder"), "{e}");
    std::fs::write(&fresh, b"old").unwrap();
    check_writable(&fresh).unwrap();
    assert_eq!(
        std::fs::read(&fresh).unwrap(),
        b"old",
        "an existing file is not truncated"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
