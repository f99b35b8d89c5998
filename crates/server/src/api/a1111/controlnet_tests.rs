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
