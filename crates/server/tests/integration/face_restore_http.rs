//! Face restoration over real HTTP (FACE_RESTORE_DIR holding the pipeline's fixture networks
//! under A1111's file names): Extras' CodeFormer gives A1111's `html_info`
//! (`tools/make_face_restore_e2e_fixtures.py`) and the picture as the pipeline's
//! `FaceRestorer` restores it (held to A1111's in the pipeline's face_restore tests), blended
//! by the visibility; the native `restore_faces` and A1111's make
//! the real tiny model's image restored exactly as the pipeline's `FaceRestorer` restores the
//! unrestored one, with `Face restoration: CodeFormer` in the infotext and the weight in the
//! metadata; GET /sdapi/v1/face-restorers lists CodeFormer. Without the folder each route's
//! field is a 422 naming it.

use crate::common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use candle_core::Device;
use common::{decode_png, fake, ok, post_json_to, Server};
use sdserve_pipeline::face_restore::restorer::{FaceRestoreFiles, DETECTION_FILE, PARSING_FILE};
use sdserve_pipeline::face_restore::FaceRestorer;
use sdserve_pipeline::pipeline::RgbImage;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

/// A FACE_RESTORE_DIR as A1111's `models/Codeformer` holds its files.
fn face_restore_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdserve-face-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let f = fixtures();
    for (from, to) in [
        ("codeformer/codeformer.pth", "codeformer-v0.1.0.pth"),
        ("face_detect/retinaface.pth", DETECTION_FILE),
        ("face_paste/parsenet.pth", PARSING_FILE),
    ] {
        std::fs::copy(f.join(from), dir.join(to)).unwrap();
    }
    dir
}

fn b64(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn image_of(b64: &str) -> RgbImage {
    let (width, height, pixels, _) = decode_png(b64);
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[test]
fn restore_faces_runs_codeformer_in_every_route() {
    let dir = face_restore_dir();
    let s = common::tiny_server(
        "face-restore",
        &[
            ("RESPONSE_CACHE_MB", "0"),
            ("FACE_RESTORE_DIR", dir.to_str().unwrap()),
        ],
    );
    let listed = ok(&s.get("/sdapi/v1/face-restorers"));
    assert_eq!(listed, json!([{"name": "CodeFormer", "cmd_dir": null}]));

    // Extras: A1111's info; the picture restored at the weight, blended by the visibility
    // (Pillow's `Image.blend`), as the pipeline does it here.
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("face_restore/face_restore.json")).unwrap(),
    )
    .unwrap();
    let case = &meta["cases"]["extras"];
    let mut body = case["fields"].clone();
    let picture_path = fixtures().join("face_detect/small.png");
    body["image"] = json!(b64(&picture_path));
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/extra-single-image", &body));
    assert_eq!(r["html_info"], case["html_info"]);
    let picture = image_of(&b64(&picture_path));
    let files = FaceRestoreFiles::in_folder(&dir).unwrap();
    let restorer = FaceRestorer::load(&files, &Device::Cpu).unwrap();
    let restored = restorer.restore(&picture, 0.25).unwrap();
    assert_ne!(restored, picture);
    let want = sdserve_pipeline::upscale::blend(&picture, &restored, 0.6);
    assert_eq!(image_of(r["image"].as_str().unwrap()), want);

    // Generation: the plain image, restored by the pipeline here, is what the routes answer.
    let request =
        json!({"prompt": "a portrait", "width": 256, "height": 256, "steps": 2, "seed": 11});
    let plain = ok(&s.post_json(&request));
    let plain = image_of(plain["image_base64"].as_str().unwrap());
    for weight in [0.5, 0.25] {
        let want = restorer.restore(&plain, weight).unwrap();
        // The tiny model's picture has faces for the fixture detector: the check is not of
        // the image to itself.
        assert_ne!(want, plain, "weight {weight}");
        let mut native = request.clone();
        native["restore_faces"] = json!({"weight": weight});
        let body = ok(&s.post_json(&native));
        assert_eq!(body["metadata"]["restore_faces"], json!({"weight": weight}));
        let (_, _, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
        assert!(pixels == want.pixels, "native, weight {weight}");
        let text = text.unwrap();
        assert!(
            text.contains(", Seed: 11, Face restoration: CodeFormer, Size: 256x256"),
            "{text}"
        );
    }
    // A1111: `restore_faces` at the `code_former_weight` option (default 0.5).
    let a1111 = json!({"prompt": "a portrait", "width": 256, "height": 256, "steps": 2, "seed": 11,
        "sampler_name": "PLMS", "cfg_scale": 7.5, "restore_faces": true});
    // A1111's own sampler and guidance rule make another plain image than the native one.
    let mut plain_a1111 = a1111.clone();
    plain_a1111["restore_faces"] = json!(false);
    let a_plain = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &plain_a1111));
    let a_plain = image_of(a_plain["images"][0].as_str().unwrap());
    let a = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111));
    let info: Value = serde_json::from_str(a["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["restore_faces"], true);
    assert_eq!(info["face_restoration_model"], "CodeFormer");
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Face restoration: CodeFormer"));
    let got = image_of(a["images"][0].as_str().unwrap());
    assert_eq!(got, restorer.restore(&a_plain, 0.5).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_folder_each_route_names_its_field() {
    let s = Server::start(&fake("step_ms=0"));
    s.wait_ready(std::time::Duration::from_secs(30));
    assert_eq!(ok(&s.get("/sdapi/v1/face-restorers")), json!([]));
    let r = s.post_json(&json!({"prompt": "p", "restore_faces": {}}));
    let e = r.error(422, "validation_error");
    assert!(
        e["details"].as_str().unwrap().contains("restore_faces"),
        "{e}"
    );
    let r = s.post_json(&json!({"prompt": "p", "restore_faces": {"weight": 2}}));
    assert_eq!(r.broken_fields(), ["restore_faces.weight"]);
    let r = s.post_json(&json!({"prompt": "p", "restore_faces": {"strength": 1}}));
    assert_eq!(r.broken_fields(), ["restore_faces"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "p", "restore_faces": true}),
    );
    assert_eq!(r.broken_fields(), ["restore_faces"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/extra-single-image",
        &json!({"image": b64(&fixtures().join("face_detect/small.png")), "codeformer_visibility": 1}),
    );
    assert_eq!(r.broken_fields(), ["codeformer_visibility"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/extra-single-image",
        &json!({"image": b64(&fixtures().join("face_detect/small.png")), "gfpgan_visibility": 1}),
    );
    assert_eq!(r.broken_fields(), ["gfpgan_visibility"]);

    // A1111's options: the defaults, checked when posted; `face_restoration` on makes every
    // A1111 request ask for it.
    let options = ok(&s.get("/sdapi/v1/options"));
    assert_eq!(options["face_restoration"], false);
    assert_eq!(options["face_restoration_model"], "CodeFormer");
    assert_eq!(options["code_former_weight"], 0.5);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/options",
        &json!({"code_former_weight": 2}),
    );
    assert_eq!(r.broken_fields(), ["code_former_weight"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/options",
        &json!({"face_restoration_model": "GFPGAN"}),
    );
    assert_eq!(r.broken_fields(), ["face_restoration_model"]);
    ok(&post_json_to(
        s.addr,
        "/sdapi/v1/options",
        &json!({"face_restoration": true, "code_former_weight": 0.3}),
    ));
    assert_eq!(ok(&s.get("/sdapi/v1/options"))["code_former_weight"], 0.3);
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &json!({"prompt": "p"}));
    assert_eq!(r.broken_fields(), ["restore_faces"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "p", "restore_faces": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
