use super::*;

#[test]
fn units_become_native_controlnets_and_unsupported_options_are_refused() {
    let body = |unit: Value| {
        json!({"alwayson_scripts": {"ControlNet": {"args": [unit, false]}}})
            .as_object()
            .unwrap()
            .clone()
    };
    let png = "iVBORw0KGgo";
    let u = native_units(
        &body(
            json!({"input_image": png, "model": "canny [0123abcd]", "weight": 0.5,
                     "guidance": 0.8, "resize_mode": "Just Resize", "enabled": true}),
        ),
        0,
        false,
        Some(512),
        Some(512),
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        u.native,
        json!([{"model": "canny", "image": png, "scale": 0.5, "guidance_end": 0.8}])
    );
    // The extension's modes by value or index: the native names.
    for (mode, native) in [
        (json!("Balanced"), None),
        (json!(0), None),
        (json!("My prompt is more important"), Some("prompt")),
        (json!(1), Some("prompt")),
        (json!("ControlNet is more important"), Some("controlnet")),
        (json!(2), Some("controlnet")),
    ] {
        let u = native_units(
            &body(json!({"image": png, "model": "c", "control_mode": mode,
                         "resize_mode": "Just Resize"})),
            0,
            false,
            None,
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            u.native[0].get("control_mode").and_then(Value::as_str),
            native
        );
    }
    let off = native_units(&body(json!({"enabled": false})), 0, false, None, None, None).unwrap();
    assert!(off.is_none());
    for (unit, needle) in [
        (
            json!({"image": png, "model": "c", "module": "dw_openpose_full"}),
            "[0].module",
        ),
        (
            json!({"image": png, "model": "c", "control_mode": 3}),
            "[0].control_mode",
        ),
        (
            json!({"image": png, "model": "c", "control_mode": "Prompt"}),
            "[0].control_mode",
        ),
        (json!({"image": png, "model": "None"}), "[0].model"),
        (json!({"model": "c", "image": ""}), "[0].image"),
        (
            json!({"image": png, "model": "c", "resize_mode": "Stretch"}),
            "[0].resize_mode",
        ),
    ] {
        let e = native_units(&body(unit), 0, false, Some(512), Some(512), None).unwrap_err();
        let e = format!("{:?}", e.body());
        assert!(e.contains(needle), "{needle}: {e}");
    }
}

/// `effective_region_mask` and `advanced_weighting` change what a unit does; sent with a value
/// they are a 422 naming them (on ControlNet and ip-adapter units alike), unset they pass.
#[test]
fn unit_options_not_followed_are_refused_when_set() {
    let body = |unit: Value| {
        json!({"alwayson_scripts": {"controlnet": {"args": [unit]}}})
            .as_object()
            .unwrap()
            .clone()
    };
    let run = |unit: Value| native_units(&body(unit), 0, false, Some(64), Some(64), None);
    let png = "iVBORw0KGgo";
    for module in ["none", "ip-adapter_clip_sd15"] {
        let unit = json!({"input_image": png, "model": "m", "module": module});
        for (k, v) in [
            ("effective_region_mask", json!(png)),
            ("advanced_weighting", json!([1.0, 0.5])),
        ] {
            let mut sent = unit.clone();
            sent[k] = v;
            let e = run(sent).unwrap_err();
            let text = format!("{:?}", e.body());
            assert!(text.contains(&format!("[0].{k}: ")), "{module} {k}: {text}");
        }
        for unset in [json!(null), json!(""), json!([])] {
            let mut sent = unit.clone();
            sent["effective_region_mask"] = unset.clone();
            sent["advanced_weighting"] = if unset == json!("") {
                json!(null)
            } else {
                unset
            };
            if let Err(e) = run(sent) {
                let text = format!("{:?}", e.body());
                assert!(!text.contains("effective_region_mask"), "{module}: {text}");
                assert!(!text.contains("advanced_weighting"), "{module}: {text}");
            }
        }
    }
}
