//! Each LyCORIS form's delta (LoHa plain and Tucker, LoKr with whole, low-rank and Tucker
//! factors, linear and 3x3 and flattened kernels, full diffs with an unused alpha and a
//! `scale`, LoCon's CP form, text-encoder layers, and full diffs' bias diffs as the `ex_bias`
//! of their `<module>.bias` targets) against A1111's own `calc_updown`, value by value
//! (`tools/make_lycoris_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device};

use super::{compute_deltas, target_shapes_of_folder, LoraLibrary};

#[test]
fn deltas_match_a1111_s_calc_updown() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let library = LoraLibrary::scan(&fixtures.join("adapters/lycoris")).unwrap();
    let targets = target_shapes_of_folder(&fixtures.join("tiny-a")).unwrap();
    let reference =
        candle_core::safetensors::load(fixtures.join("adapters/lycoris.safetensors"), &Device::Cpu)
            .unwrap();
    let mut compared = Vec::new();
    for name in ["loha", "lokr", "full", "mixed"] {
        // At weight 1 each delta is A1111's updown (its multiplier 1).
        let deltas = compute_deltas(&library, &[(name.into(), 1.0)], &targets, DType::F32).unwrap();
        for ((part, index), ours) in &deltas {
            let path = &targets[part][*index].0;
            let key = format!("delta.{name}.{}.{path}", part.name());
            let Some(want) = reference.get(&key) else {
                continue;
            };
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
}
