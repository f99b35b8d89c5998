//! LyCORIS files (LoHa, LoKr, IA3, GLoRA, full diffs with bias diffs, LoCon's CP form, several types
//! in one file, DoRA's decomposition with each; OFT, BOFT and the old `oft_diag`; norm layers'
//! diffs; DoRA, IA3, GLoRA, OFT and BOFT alone and before or after another file on the same
//! layers) on tiny-a against diffusers images with A1111's own deltas added to the weights (and
//! its `ex_bias` to the biases; `tools/make_lycoris_fixtures.py`); the parts A1111 loads and
//! this server does not apply (a LoHa's bias diff) and a norm module A1111 cannot load (no
//! b_norm) are listed and refused naming the LoRA and the type; kohya's OFT files (`oft_unet_`,
//! which A1111 leaves out of an SD 1.5 model) applied as kohya merges them, and norm diffs on
//! `conv_norm_out` and `final_layer_norm` left out as A1111 leaves them. (Each form's delta against A1111's, value by value:
//! `lora::a1111_deltas` in the crate.)

use crate::common;

use std::ops::ControlFlow;

use common::lora_reference::{assert_close, expected, generate, request, Reference};
use sdserve_pipeline::lora::LoraFormat;

/// tiny-a with the LyCORIS folder of `tools/make_lycoris_fixtures.py`.
fn reference() -> Reference {
    common::lora_reference::reference("lycoris", "lycoris")
}

fn cases(r: &Reference) -> Vec<(String, Vec<(String, f64)>)> {
    r.meta["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(case, files)| {
            let files = files
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f[0].as_str().unwrap().to_owned(), f[1].as_f64().unwrap()))
                .collect();
            (case.clone(), files)
        })
        .collect()
}

fn borrowed(files: &[(String, f64)]) -> Vec<(&str, f64)> {
    files.iter().map(|(n, w)| (n.as_str(), *w)).collect()
}

#[test]
fn the_library_lists_each_file_s_types_and_refuses_those_not_applied() {
    let r = reference();
    let lib = r.model.lora_library();
    let types = |name: &str| lib.get(name).unwrap().types.clone();
    assert_eq!(types("loha"), ["loha"]);
    assert_eq!(types("lokr"), ["lokr"]);
    assert_eq!(types("full"), ["full"]);
    assert_eq!(types("mixed"), ["full", "loha", "lokr", "lora"]);
    assert_eq!(types("dora"), ["dora", "full", "loha", "lokr", "lora"]);
    assert_eq!(types("ia3"), ["dora", "ia3"]);
    assert_eq!(types("glora"), ["dora", "glora"]);
    assert_eq!(types("oft"), ["dora", "oft"]);
    assert_eq!(types("boft"), ["oft"]);
    assert_eq!(types("oft_diag"), ["oft"]);
    assert_eq!(types("norm"), ["full", "norm"]);
    // kohya's OFT (`oft_unet_` keys), all of it; the norm diffs but those A1111 leaves out
    // (conv_norm_out, final_layer_norm).
    assert_eq!(types("kohya_oft"), ["oft"]);
    assert_eq!(lib.get("kohya_oft").unwrap().targets, ["unet"]);
    assert_eq!(
        lib.get("kohya_oft").unwrap().layers,
        r.meta["layers"]["kohya_oft"].as_u64().unwrap() as usize
    );
    assert_eq!(types("ignored_norms"), ["norm"]);
    assert_eq!(
        lib.get("ignored_norms").unwrap().layers,
        r.meta["layers"]["ignored_norms"].as_u64().unwrap() as usize - 2
    );
    let loha = lib.get("loha").unwrap();
    assert_eq!(loha.format, LoraFormat::Kohya);
    assert_eq!(loha.targets, ["text_encoder", "unet"]);
    assert_eq!(
        loha.layers,
        r.meta["layers"]["loha"].as_u64().unwrap() as usize
    );
    // Two flattened 3x3 kernels and two in Tucker form.
    assert_eq!(loha.conv_layers, 4, "{loha:?}");
    assert_eq!(loha.rank, 4);
    for name in [
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
    ] {
        r.model.check_lora(name).unwrap();
    }
    for (name, type_name) in r.meta["refused"].as_object().unwrap() {
        assert_eq!(types(name), [type_name.as_str().unwrap()]);
        let err = r.model.check_lora(name).unwrap_err().to_string();
        let said = match name.as_str() {
            "norm_half" => "without both w_norm and b_norm",
            _ => "bias diff",
        };
        assert!(
            err.contains(&format!("LoRA {name:?}")) && err.contains(said),
            "{err}"
        );
        // Refused at the run too, before anything is merged.
        let run = r
            .model
            .generate(&request(&r, &[(name, 1.0)]), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err()
            .to_string();
        assert!(run.contains(said), "{run}");
    }
}

#[test]
fn lycoris_images_match_a1111_s_merged_weights_and_the_base_comes_back() {
    let r = reference();
    let base = generate(&r, &request(&r, &[]));
    assert_close("base", &base, &expected(&r, "image.base"));
    for (case, files) in cases(&r) {
        let params = request(&r, &borrowed(&files));
        let got = generate(&r, &params);
        assert_close(&case, &got, &expected(&r, &format!("image.{case}")));
        assert_ne!(got, base, "{case} changes the image");
        assert_eq!(generate(&r, &params), got, "{case} again");
    }
    assert_eq!(
        generate(&r, &request(&r, &[])),
        base,
        "the base weights back"
    );
}

/// Offloaded, the deltas are computed from the files and the targets' shapes alone and merged
/// into each part as it is built (model offload) or into the host weights (sequential), a DoRA
/// layer's made then from the weight as built: the resident model's images, bit for bit, and
/// the base image after.
#[test]
fn lycoris_files_under_offload_give_the_resident_images() {
    use sdserve_pipeline::memory::Offload;
    let mut r = reference();
    let base = generate(&r, &request(&r, &[]));
    let set = request(
        &r,
        &[
            ("mixed", 0.9),
            ("loha", 0.5),
            ("dora", 0.8),
            ("ia3", 0.7),
            ("glora", 0.6),
            ("full", -0.4),
            ("oft", 0.7),
            ("norm", 0.9),
            ("kohya_oft", -0.6),
            ("ignored_norms", 0.5),
        ],
    );
    let with = generate(&r, &set);
    for offload in [Offload::Model, Offload::Sequential] {
        r.model.set_offload(offload).unwrap();
        assert_eq!(generate(&r, &set), with, "{offload:?}");
        assert_eq!(generate(&r, &set), with, "{offload:?}, again");
        assert_eq!(generate(&r, &request(&r, &[])), base, "{offload:?}, none");
    }
}
