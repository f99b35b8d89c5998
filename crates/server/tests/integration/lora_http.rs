//! LoRA over real HTTP against the real binary on a tiny model with a `LORA_DIR`: the listing,
//! `<lora:name:w>` tags and `loras` giving the same image, the base weights coming back bit for
//! bit, and unknown LoRAs refused naming them. The response cache is off, so every image here is
//! a real generation.

use crate::common;

use std::path::PathBuf;

use common::{decode_png, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

/// The image's pixels, after checking the response is a real 256x256 generation.
fn pixels(s: &Server, body: &Value) -> (Vec<u8>, Value) {
    let r = s.post_json(body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.header("x-cache"), Some("hit"), "the cache is off");
    let j = r.json();
    let (w, h, px, _) = decode_png(j["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    (px, j["metadata"].clone())
}

/// How many bytes of two images differ (the images themselves are too long for a message).
fn differing(a: &[u8], b: &[u8]) -> String {
    let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
    format!("{n} of {} bytes differ", a.len())
}

// tiny-a-vae8 is tiny-a's UNet and text encoder (so the LoRA fixtures fit) with a factor-8 VAE:
// the API's smallest image, 256x256, is 32x32 latents, and seven generations take seconds.
#[test]
fn loras_by_tag_or_field_change_the_image_and_the_base_comes_back_bit_for_bit() {
    let s = common::tiny_a_vae8_server(&[("LORA_DIR", &fixtures().join("adapters/loras"))]);

    // GET /loras lists every file of the folder with what its header says.
    let listed = s.get("/loras").json();
    let loras = listed["loras"].as_array().expect("a list");
    let names: Vec<&str> = loras.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ink_kohya", "soft_peft", "te_kohya"], "{listed}");
    let ink = &loras[0];
    assert_eq!(
        (
            ink["format"].as_str(),
            ink["rank"].as_u64(),
            ink["targets"].clone(),
            ink["error"].is_null()
        ),
        (Some("kohya"), Some(4), json!(["unet"]), true),
        "{ink}"
    );
    assert!(ink["file"]
        .as_str()
        .unwrap()
        .ends_with("ink_kohya.safetensors"));
    assert!(ink["conv_layers"].as_u64().unwrap() > 0, "{ink}");
    assert_eq!(loras[1]["format"], "peft");
    assert_eq!(loras[1]["targets"], json!(["text_encoder", "unet"]));

    let base = json!({"prompt": "a red house on a hill", "steps": 3, "width": 256,
                      "height": 256, "seed": 5, "scheduler": "euler"});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (plain, m) = pixels(&s, &base);
    assert_eq!(m["loras"], json!([]), "{m}");
    let (tagged, m) = pixels(
        &s,
        &with(json!({"prompt": "a red house on a hill <lora:ink_kohya:1>"})),
    );
    assert!(tagged != plain, "the LoRA changes the image");
    assert_eq!(
        m["loras"],
        json!([{"name": "ink_kohya", "weight": 1.0}]),
        "{m}"
    );
    // Another LoRA in between, so the next request merges again from the restored weights.
    let (peft, _) = pixels(&s, &with(json!({"loras": [{"name": "soft_peft"}]})));
    assert!(peft != plain && peft != tagged, "soft_peft is neither");
    let (field, _) = pixels(
        &s,
        &with(json!({"loras": [{"name": "ink_kohya", "weight": 1}]})),
    );
    assert!(
        field == tagged,
        "the tag and the field are the same request: {}",
        differing(&field, &tagged)
    );
    // Without LoRA again: the base weights are back exactly.
    let (after, _) = pixels(&s, &base);
    assert!(
        after == plain,
        "the base image, bit for bit, after LoRA requests: {}",
        differing(&after, &plain)
    );
    // A weight is a weight: half the LoRA is neither the base nor the whole.
    let (half, _) = pixels(
        &s,
        &with(json!({"prompt": "a red house on a hill <lora:ink_kohya:0.5>"})),
    );
    assert!(half != plain && half != tagged);

    // Unknown LoRAs, by field and by tag: 422 on `loras`, naming the LoRA and what there is.
    for body in [
        with(json!({"loras": [{"name": "no_such_lora"}]})),
        with(json!({"prompt": "a house <lora:no_such_lora:0.8>"})),
    ] {
        let r = s.post_json(&body);
        assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
        let details = r.json()["details"].as_str().unwrap().to_owned();
        assert!(
            details.contains("\"no_such_lora\"") && details.contains("ink_kohya"),
            "{details}"
        );
    }
    // And the server is healthy and still gives the base image.
    let (last, _) = pixels(&s, &base);
    assert!(last == plain, "{}", differing(&last, &plain));
}
