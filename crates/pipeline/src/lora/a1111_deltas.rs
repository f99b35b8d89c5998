//! Each LyCORIS form's delta (LoHa plain and Tucker, LoKr with whole, low-rank and Tucker
//! factors, linear and 3x3 and flattened kernels, full diffs with an unused alpha and a
//! `scale`, LoCon's CP form, text-encoder layers, and full diffs' bias diffs as the `ex_bias`
//! of their `<module>.bias` targets; norm layers' `w_norm` and `b_norm`; IA3, GLoRA, OFT, BOFT,
//! `oft_diag`, and DoRA's decomposition with each type, made from
//! tiny-a's weights, alone and after another file on the same layers) against A1111's own `calc_updown`, value by value
//! (`tools/make_lycoris_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{compute_deltas, target_shapes_of_folder, Delta, LoraLibrary, Part};

#[test]
fn deltas_match_a1111_s_calc_updown() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let library = LoraLibrary::scan(&fixtures.join("adapters/lycoris")).unwrap();
    let targets = target_shapes_of_folder(&fixtures.join("tiny-a")).unwrap();
    let reference =
        candle_core::safetensors::load(fixtures.join("adapters/lycoris.safetensors"), &Device::Cpu)
            .unwrap();
    // The base weights, as the files store them (a DoRA delta is made from the weight).
    let load = |file: &str| {
        candle_core::safetensors::load(fixtures.join("tiny-a").join(file), &Device::Cpu).unwrap()
    };
    let unet = load("unet/diffusion_pytorch_model.safetensors");
    let text = load("text_encoder/model.safetensors");
    let mut compared = Vec::new();
    let mut from_weight = 0;
    // At weight 1 each delta is A1111's updown (its multiplier 1); a case of several files with
    // DoRA, the whole change of the DoRA layers' weights (each file merged in order).
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("adapters/lycoris.json")).unwrap(),
    )
    .unwrap();
    let files = [
        "loha",
        "lokr",
        "full",
        "mixed",
        "dora",
        "ia3",
        "glora",
        "oft",
        "boft",
        "oft_diag",
        "norm",
        "kohya_oft",
        "ignored_norms",
    ];
    let mut sets: Vec<(String, Vec<(String, f64)>)> = files
        .iter()
        .map(|n| (n.to_string(), vec![(n.to_string(), 1.0)]))
        .collect();
    for case in [
        "loha_dora",
        "dora_loha",
        "loha_ia3",
        "loha_glora",
        "loha_oft",
        "lokr_norm_boft",
    ] {
        let files = meta["cases"][case].as_array().unwrap().iter();
        let files = files.map(|f| (f[0].as_str().unwrap().into(), f[1].as_f64().unwrap()));
        sets.push((case.into(), files.collect()));
    }
    for (name, set) in &sets {
        let deltas = compute_deltas(&library, set, &targets, DType::F32).unwrap();
        for ((part, index), ours) in &deltas {
            let (path, dims) = &targets[part][*index];
            let key = format!("delta.{name}.{}.{path}", part.name());
            let Some(want) = reference.get(&key) else {
                continue;
            };
            let base = || {
                let weights = if *part == Part::Unet { &unet } else { &text };
                Ok(weights[&format!("{path}.weight")].reshape(dims.as_slice())?)
            };
            if matches!(ours, Delta::FromWeight(_)) {
                from_weight += 1;
            }
            let ours: Tensor = ours.for_weight(base).unwrap().into_owned();
            let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(ours.len(), want.len(), "{key}");
            let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = ours
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{key}: max abs diff {worst:.2e} of a peak of {peak:.2e}");
            assert!(
                peak > 0.0 && worst <= 1e-5 * peak,
                "{key}: {worst} of {peak}"
            );
            compared.push(key);
        }
    }
    let kept = reference.keys().filter(|k| k.starts_with("delta.")).count();
    assert_eq!(
        compared.len(),
        kept,
        "every reference delta compared: {compared:?}"
    );
    // The DoRA file's 9 layers alone and in two sets, the IA3 file's 6 and the GLoRA file's 5
    // alone and in one, the OFT file's 8 and the BOFT file's 5 alone and in one, the oft_diag
    // file's 3 alone, kohya's OFT file's 42.
    assert_eq!(
        from_weight, 120,
        "the DoRA, IA3, GLoRA and OFT layers are made from the weight"
    );
}

/// The layers each file is read into are those A1111's `load_network` matches in an SD 1.5 model
/// (tiny-a's module names as A1111 names them): all of them, but the UNet's `conv_norm_out` and
/// the text encoder's `final_layer_norm`, which A1111 leaves out and so do we; and kohya's OFT
/// file (`oft_unet_`), which A1111 leaves out whole and we apply (kohya's merge).
#[test]
fn layers_read_are_those_a1111_matches() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let library = LoraLibrary::scan(&fixtures.join("adapters/lycoris")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("adapters/lycoris.json")).unwrap(),
    )
    .unwrap();
    let unmatched = meta["a1111_unmatched"].as_object().unwrap();
    assert!(unmatched.len() >= 13, "{unmatched:?}");
    for (name, left_out) in unmatched {
        let info = library.get(name).unwrap();
        let shapes = super::library::header_shapes(&info.file).unwrap();
        let mut modules: Vec<&str> = shapes
            .keys()
            .map(|k| k.split_once('.').map_or(k.as_str(), |(m, _)| m))
            .collect();
        modules.sort();
        modules.dedup();
        let left_out: Vec<&str> = left_out
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let want: Vec<&str> = if name == "kohya_oft" {
            assert_eq!(left_out, modules, "A1111 matches none of kohya's OFT");
            modules
        } else {
            modules
                .into_iter()
                .filter(|m| !left_out.contains(m))
                .collect()
        };
        let mut ours: Vec<&str> = info.keys.iter().map(|k| k.module_key()).collect();
        ours.sort();
        assert_eq!(ours, want, "{name}");
    }
}
