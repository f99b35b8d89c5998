//! Prompt styles (STYLES_FILE) over real HTTP on the real tiny model: a native or A1111 request
//! (and OpenAI's, with the native extras) naming styles makes the image of the same request with the styled prompts written out
//! (the styled texts are what A1111's own styles.py makes of the same file:
//! tests/fixtures/styles/styles.json, tools/make_styles_fixtures.py), says so in its metadata
//! and infotexts; the listings show the file; unknown names and over-long styled prompts are
//! 422s naming the field.

use crate::common;

use std::path::{Path, PathBuf};

use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

fn styles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styles")
}

fn server() -> Server {
    let file = styles_dir().join("styles.csv");
    common::tiny_server(
        "styles",
        &[
            ("STYLES_FILE", file.to_str().unwrap()),
            // Every request here must run, not be another's cached answer.
            ("RESPONSE_CACHE_MB", "0"),
        ],
    )
}

/// The reference case for these styles (A1111's prompts for it).
fn case(prompt: &str, negative: &str, styles: &[&str]) -> (String, String) {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(styles_dir().join("styles.json")).unwrap()).unwrap();
    let c = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["file"] == "styles.csv"
                && c["prompt"] == prompt
                && c["negative_prompt"] == negative
                && c["styles"] == json!(styles)
        })
        .expect("a reference case");
    (
        c["want_prompt"].as_str().unwrap().to_string(),
        c["want_negative_prompt"].as_str().unwrap().to_string(),
    )
}

fn native(prompt: &str, negative: &str) -> Value {
    json!({"prompt": prompt, "negative_prompt": negative, "seed": 3, "steps": 2,
           "width": 256, "height": 256, "guidance_scale": 6.0, "scheduler": "euler"})
}

fn pixels(answer: &Value) -> Vec<u8> {
    decode_png(answer["image_base64"].as_str().unwrap()).2
}

#[test]
fn styles_give_the_image_of_the_styled_prompts_in_every_dialect() {
    let s = server();
    let (want_prompt, want_negative) = case("a cat", "blurry", &["Appended", "Cinematic"]);
    let written_out = ok(&s.post_json(&native(&want_prompt, &want_negative)));

    let mut styled = native("a cat", "blurry");
    styled["styles"] = json!(["Appended", "Cinematic"]);
    let answer = ok(&s.post_json(&styled));
    assert!(
        pixels(&answer) == pixels(&written_out),
        "styled image differs"
    );
    assert_eq!(answer["metadata"]["prompt"], want_prompt);
    assert_eq!(answer["metadata"]["negative_prompt"], want_negative);
    // Without the styles it is another image: the test can fail.
    let plain = ok(&s.post_json(&native("a cat", "blurry")));
    assert!(pixels(&plain) != pixels(&written_out));

    // A job runs the styled prompts and says so in its request.
    let job = common::job_to_end(&s, &styled);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["request"]["prompt"], want_prompt);
    assert!(pixels(&job["result"]) == pixels(&written_out));
    // It keeps the names and the prompts as written: sent again, they are styled once.
    assert_eq!(job["request"]["styles"], json!(["Appended", "Cinematic"]));
    let written = &job["request"]["as_written"];
    assert_eq!(
        written,
        &json!({"prompt": "a cat", "negative_prompt": "blurry", "loras": []})
    );
    let mut reused = native(
        written["prompt"].as_str().unwrap(),
        written["negative_prompt"].as_str().unwrap(),
    );
    reused["styles"] = job["request"]["styles"].clone();
    let again = ok(&s.post_json(&reused));
    assert_eq!(again["metadata"]["prompt"], want_prompt);
    assert!(pixels(&again) == pixels(&written_out));
    // A hires pass's own prompts are styled too, and kept as written beside the others.
    let mut hires = native("a cat", "blurry");
    hires["hires"] = json!({"scale": 1.25, "steps": 2, "prompt": "a lion", "negative_prompt": ""});
    hires["styles"] = json!(["Appended", "Cinematic"]);
    let created = post_json_to(s.addr, "/jobs", &hires);
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_string();
    let j = s.get(&format!("/jobs/{id}")).json();
    let ran = j["request"]["hires"]["prompt"].as_str().unwrap();
    assert!(ran.contains("a lion") && ran != "a lion", "{ran}");
    assert_eq!(
        j["request"]["as_written"],
        json!({"prompt": "a cat", "negative_prompt": "blurry", "loras": [],
               "hires": {"prompt": "a lion", "negative_prompt": ""}})
    );
    assert_eq!(j["request"]["hires"]["scale"], 1.25, "{j}");
    // Without styles the record says so.
    let plain_job = post_json_to(s.addr, "/jobs", &native("a cat", "blurry")).json();
    let id = plain_job["id"].as_str().unwrap();
    let j = s.get(&format!("/jobs/{id}")).json();
    assert_eq!(
        (&j["request"]["styles"], &j["request"]["as_written"]),
        (&json!([]), &Value::Null)
    );

    // OpenAI's images/generations passes `styles` as it passes the other native extras.
    let openai = json!({"prompt": "a cat", "negative_prompt": "blurry", "seed": 3, "steps": 2,
                        "size": "256x256", "guidance_scale": 6.0, "scheduler": "euler",
                        "response_format": "b64_json", "styles": ["Appended", "Cinematic"]});
    let r = ok(&post_json_to(s.addr, "/v1/images/generations", &openai));
    let image = decode_png(r["data"][0]["b64_json"].as_str().unwrap()).2;
    assert!(image == pixels(&written_out), "OpenAI styled image differs");
    assert_eq!(r["data"][0]["revised_prompt"], want_prompt);

    // A1111: `styles` as A1111 applies them; info names them, the infotext holds the result.
    let (want_prompt, want_negative) = case("a cat", "", &["Cinematic"]);
    let written_out = ok(&s.post_json(&native(&want_prompt, &want_negative)));
    let a1111 = json!({"prompt": "a cat", "seed": 3, "steps": 2, "width": 256, "height": 256,
                       "cfg_scale": 6.0, "sampler_name": "Euler", "styles": ["Cinematic"]});
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111));
    let image = decode_png(r["images"][0].as_str().unwrap()).2;
    assert!(image == pixels(&written_out), "A1111 styled image differs");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["styles"], json!(["Cinematic"]));
    // The A1111 request's job keeps them too (`/jobs` lists it).
    let listed = s.get("/jobs").json();
    let a1111_job = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["request"]["styles"] == json!(["Cinematic"]))
        .expect("the A1111 job, with its styles");
    assert_eq!(a1111_job["request"]["as_written"]["prompt"], "a cat");
    assert_eq!(info["prompt"], want_prompt);
    assert_eq!(info["negative_prompt"], want_negative);
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.starts_with(&format!(
            "{want_prompt}\nNegative prompt: {want_negative}\n"
        )),
        "{infotext}"
    );
}

#[test]
fn listings_show_the_file_and_bad_styles_are_422s() {
    let s = server();
    let reference: Value =
        serde_json::from_slice(&std::fs::read(styles_dir().join("styles.json")).unwrap()).unwrap();
    let want: Vec<&str> = reference["files"]["styles.csv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let native_list = ok(&s.get("/styles"));
    let names: Vec<&str> = native_list["styles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, want);
    assert!(native_list["error"].is_null());
    let a1111 = ok(&s.get("/sdapi/v1/prompt-styles"));
    assert_eq!(a1111, native_list["styles"]);
    assert_eq!(
        a1111[0]["prompt"],
        reference["files"]["styles.csv"][0]["prompt"]
    );

    let mut unknown = native("a cat", "");
    unknown["styles"] = json!(["Cinematic", "Nope"]);
    let e = s.post_json(&unknown).error(422, "validation_error");
    assert_eq!(e["fields"][0]["field"], "styles", "{e}");
    assert!(
        e["fields"][0]["rule"]
            .as_str()
            .unwrap()
            .contains("\"Nope\""),
        "{e}"
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat", "steps": 2, "styles": ["Nope"]}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("styles"), "{}", r.text());
    // The prompt rules hold for the styled text: 450 characters and a style are over 500.
    let mut long = native(&"a".repeat(450), "");
    long["styles"] = json!(["Cinematic"]);
    let e = s.post_json(&long).error(422, "validation_error");
    assert_eq!(e["fields"][0]["field"], "prompt", "{e}");
}
