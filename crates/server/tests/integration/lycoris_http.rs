//! LyCORIS files in `LORA_DIR` over real HTTP against the real binary: `GET /loras` says each
//! file's module types, LoHa, LoKr, full diffs, a file mixing types, DoRA, IA3, GLoRA, OFT, BOFT
//! and norm diffs change the image by tag or field (the pipeline's tests compare them with
//! A1111's deltas), the base image comes back bit for bit, and a file the server does not apply
//! (a LoHa's bias diff, a norm module without b_norm) is listed with its error and refused with
//! a 422 naming the LoRA and the type.

use crate::common;

use std::path::PathBuf;

use common::{decode_png, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn pixels(s: &Server, body: &Value) -> Vec<u8> {
    let r = s.post_json(body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (w, h, px, _) = decode_png(r.json()["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    px
}

// tiny-a-vae8: tiny-a's UNet and text encoder (the files are made for them), 256x256 images.
#[test]
fn lycoris_files_are_listed_with_their_types_applied_or_refused_by_name() {
    let s = common::tiny_a_vae8_server(&[("LORA_DIR", &fixtures().join("adapters/lycoris"))]);

    let listed = s.get("/loras").json();
    let loras = listed["loras"].as_array().expect("a list");
    let by_name = |n: &str| loras.iter().find(|l| l["name"] == n).unwrap().clone();
    for (name, types) in [
        ("loha", json!(["loha"])),
        ("lokr", json!(["lokr"])),
        ("full", json!(["full"])),
        ("mixed", json!(["full", "loha", "lokr", "lora"])),
        ("dora", json!(["dora", "full", "loha", "lokr", "lora"])),
        ("ia3", json!(["dora", "ia3"])),
        ("glora", json!(["dora", "glora"])),
        ("oft", json!(["dora", "oft"])),
        ("boft", json!(["oft"])),
        ("oft_diag", json!(["oft"])),
        ("norm", json!(["full", "norm"])),
        // kohya's OFT (`oft_unet_`); norm diffs, but on conv_norm_out and final_layer_norm.
        ("kohya_oft", json!(["oft"])),
        ("ignored_norms", json!(["norm"])),
    ] {
        let l = by_name(name);
        assert_eq!(
            (&l["types"], &l["format"], l["error"].is_null()),
            (&types, &json!("kohya"), true),
            "{l}"
        );
    }
    assert_eq!(by_name("loha")["conv_layers"], 4);
    for (name, type_name, said) in [
        ("norm_half", "norm", "b_norm"),
        ("bias", "bias", "bias diff"),
    ] {
        let l = by_name(name);
        assert_eq!(l["types"], json!([type_name]), "{l}");
        let error = l["error"].as_str().unwrap_or_default();
        assert!(error.contains(said), "{l}");
    }

    let base = json!({"prompt": "a red house on a hill", "steps": 3, "width": 256,
                      "height": 256, "seed": 5, "scheduler": "euler"});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let plain = pixels(&s, &base);
    let mut seen = vec![plain.clone()];
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
    ] {
        let tagged = pixels(
            &s,
            &with(json!({"prompt": format!("a red house on a hill <lora:{name}:0.9>")})),
        );
        assert!(!seen.contains(&tagged), "{name} makes an image of its own");
        let field = pixels(&s, &with(json!({"loras": [{"name": name, "weight": 0.9}]})));
        assert!(
            field == tagged,
            "{name}: the tag and the field are one request"
        );
        seen.push(tagged);
    }
    for (name, said) in [("norm_half", "b_norm"), ("bias", "bias diff")] {
        let r = s.post_json(&with(json!({"prompt": format!("a house <lora:{name}:1>")})));
        assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
        let details = r.json()["details"].as_str().unwrap().to_owned();
        assert!(
            details.contains(&format!("\"{name}\"")) && details.contains(said),
            "{details}"
        );
    }
    assert!(pixels(&s, &base) == plain, "the base image, bit for bit");
}
