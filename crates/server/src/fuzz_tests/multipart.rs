//! OpenAI `images/edits` multipart bodies through the real router: random and mutated forms
//! (boundaries, missing, duplicate and unnamed parts, huge part headers, too many parts, wrong
//! content types, non-UTF-8 text, truncation). Properties: no panic and no 5xx; a rejection
//! is 400 (or 413) in OpenAI's error shape; an accepted edit reaches the generator with an init
//! image and obeys every native rule.

use proptest::prelude::*;

use super::cases;
use super::harness::{assert_native_rules, assert_openai_error, harness};

#[derive(Debug, Clone)]
struct Part {
    name: Option<String>,
    filename: Option<String>,
    content_type: Option<String>,
    extra_header: Option<String>,
    data: Vec<u8>,
}

fn png(w: u32, h: u32, alpha: bool) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let img = image::RgbaImage::from_fn(w, h, |x, y| {
        let a = if alpha && x < w / 2 { 0 } else { 255 };
        image::Rgba([(x * 4) as u8, (y * 4) as u8, 90, a])
    });
    let dynamic = if alpha {
        image::DynamicImage::ImageRgba8(img)
    } else {
        image::DynamicImage::ImageRgb8(image::DynamicImage::ImageRgba8(img).to_rgb8())
    };
    dynamic.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        64,
        64,
        image::Rgb([9, 99, 199]),
    ))
    .write_to(&mut out, image::ImageFormat::Jpeg)
    .unwrap();
    out.into_inner()
}

fn image_data() -> impl Strategy<Value = Vec<u8>> {
    let full = png(64, 64, false);
    let half = full[..full.len() / 2].to_vec();
    prop_oneof![
        4 => Just(full),
        2 => Just(png(64, 64, true)),
        1 => Just(png(48, 64, false)),
        1 => Just(jpeg()),
        1 => Just(half),
        1 => Just(Vec::new()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn text_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => "[a-z][a-z ]{0,15}".prop_map(String::into_bytes),
        1 => prop::sample::select(vec![
            "2", "1", "9", "0", "-1", "512x512", "256x320", "1024x1024", "auto", "b64_json", "url",
            "png", "null", "[1]", "{\"a\":1}", "99999999999999999999999", "", "true", "euler",
            "0.5", "7.5", "1e400", "\u{feff}a",
        ]).prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ]
}

const NAMES: &[&str] = &[
    "image",
    "image[]",
    "mask",
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "seed",
    "steps",
    "strength",
    "negative_prompt",
    "guidance_scale",
    "scheduler",
    "user",
    "quality",
    "init_image",
    "batch_size",
    "",
];

fn part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        8 => prop::sample::select(NAMES).prop_map(|s| Some(s.to_string())),
        1 => "[a-z\\[\\]\"; =]{0,10}".prop_map(Some),
        1 => Just(None),
    ];
    let filename = prop::option::weighted(
        0.4,
        prop::sample::select(vec![
            "image.png",
            "mask.png",
            "",
            "a\"b.png",
            "../../x",
            "ж.png",
        ]),
    );
    let content_type = prop::option::weighted(
        0.4,
        prop::sample::select(vec![
            "image/png",
            "image/jpeg",
            "text/plain",
            "application/octet-stream",
            "multipart/mixed; boundary=zz",
            "text/plain; charset=latin1",
        ]),
    );
    let extra = prop::option::weighted(
        0.1,
        prop_oneof![
            (1usize..200_000).prop_map(|n| format!("X-Big: {}", "a".repeat(n))),
            Just("Content-Transfer-Encoding: base64".to_string()),
            Just("Content-Disposition: form-data; name=\"prompt\"".to_string()),
            Just("no colon here".to_string()),
        ],
    );
    (
        name,
        filename,
        content_type,
        extra,
        any::<bool>(),
        image_data(),
        text_data(),
    )
        .prop_map(
            |(name, filename, content_type, extra_header, _, img, text)| {
                let is_image = matches!(name.as_deref(), Some("image" | "image[]" | "mask"));
                Part {
                    data: if is_image { img } else { text },
                    name,
                    filename: filename.map(str::to_string),
                    content_type: content_type.map(str::to_string),
                    extra_header,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Cut {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

#[derive(Debug, Clone)]
struct Form {
    boundary: String,
    parts: Vec<Part>,
    /// The prompt part again this many times (too many parts).
    repeat: usize,
    content_type: usize,
    cuts: Vec<Cut>,
}

fn form() -> impl Strategy<Value = Form> {
    let valid = (image_data(), "[a-z][a-z ]{0,15}").prop_map(|(img, prompt)| {
        vec![
            Part {
                name: Some("image".into()),
                filename: Some("image.png".into()),
                content_type: Some("image/png".into()),
                extra_header: None,
                data: img,
            },
            Part {
                name: Some("prompt".into()),
                filename: None,
                content_type: None,
                extra_header: None,
                data: prompt.into_bytes(),
            },
        ]
    });
    let cut = prop_oneof![
        any::<usize>().prop_map(Cut::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Cut::Flip(p, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                b"\r\n".to_vec(),
                b"--".to_vec(),
                b"\r\n--B0undary\r\n".to_vec(),
                b"\r\n\r\n".to_vec(),
                vec![0],
                b"Content-Disposition: form-data; name=\"image\"\r\n\r\n".to_vec(),
            ])
        )
            .prop_map(|(p, b)| Cut::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Cut::Remove(p, n)),
    ];
    (
        prop_oneof![
            3 => Just("B0undary".to_string()),
            1 => "[a-zA-Z0-9'()+_,./:=?-]{1,70}",
            1 => Just("a b".to_string()),
        ],
        valid,
        prop::collection::vec(part(), 0..8),
        prop_oneof![8 => Just(0usize), 1 => 1usize..3000],
        prop_oneof![6 => Just(0usize), 1 => 1usize..7],
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(cut, 1..4)],
    )
        .prop_map(|(boundary, mut parts, more, repeat, content_type, cuts)| {
            parts.extend(more);
            Form {
                boundary,
                parts,
                repeat,
                content_type,
                cuts,
            }
        })
}

fn encode(f: &Form) -> (Vec<u8>, Option<String>) {
    let mut body = Vec::new();
    let b = &f.boundary;
    let prompt = Part {
        name: Some("prompt".into()),
        filename: None,
        content_type: None,
        extra_header: None,
        data: b"again".to_vec(),
    };
    let repeated = std::iter::repeat_n(&prompt, f.repeat);
    for p in f.parts.iter().chain(repeated) {
        body.extend_from_slice(format!("--{b}\r\nContent-Disposition: form-data").as_bytes());
        if let Some(n) = &p.name {
            body.extend_from_slice(format!("; name=\"{n}\"").as_bytes());
        }
        if let Some(n) = &p.filename {
            body.extend_from_slice(format!("; filename=\"{n}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        for h in [
            p.content_type
                .as_ref()
                .map(|c| format!("Content-Type: {c}")),
            p.extra_header.clone(),
        ]
        .into_iter()
        .flatten()
        {
            body.extend_from_slice(h.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&p.data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    for c in &f.cuts {
        let n = body.len().max(1);
        match c {
            Cut::Truncate(p) => body.truncate(p % n),
            Cut::Flip(p, x) => {
                if !body.is_empty() {
                    body[p % n] ^= x
                }
            }
            Cut::Insert(p, bytes) => {
                let at = p % (body.len() + 1);
                body.splice(at..at, bytes.iter().copied());
            }
            Cut::Remove(p, len) => {
                let at = p % n;
                let end = (at + len).min(body.len());
                if at < end {
                    body.drain(at..end);
                }
            }
        }
    }
    let ct = match f.content_type {
        0 => Some(format!("multipart/form-data; boundary={b}")),
        1 => Some("multipart/form-data".to_string()),
        2 => Some("multipart/form-data; boundary=other".to_string()),
        3 => Some("application/json".to_string()),
        4 => None,
        5 => Some(format!("multipart/form-data; boundary=\"{b}\"")),
        _ => Some(format!("multipart/mixed; boundary={b}")),
    };
    (body, ct)
}

fn check_edit(body: Vec<u8>, content_type: Option<&str>) {
    let a = harness().send("POST", "/v1/images/edits", content_type, body);
    match a.status.as_u16() {
        200 => {
            let j = a.json();
            assert_eq!(a.generated.len(), 1, "{j}");
            let p = &a.generated[0];
            assert_native_rules(p);
            assert!(p.init_image.is_some());
            assert_eq!(
                j["data"].as_array().map(Vec::len),
                Some(p.batch_size),
                "{j}"
            );
        }
        400 | 413 => {
            assert!(a.generated.is_empty());
            assert_openai_error(&a);
        }
        s => panic!("{s}: {}", String::from_utf8_lossy(&a.body)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn edits_multipart_forms(f in form()) {
        let (body, ct) = encode(&f);
        check_edit(body, ct.as_deref());
    }

    #[test]
    fn edits_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), ct in 0..3usize) {
        let ct = ["multipart/form-data; boundary=B0undary", "multipart/form-data", "text/plain"][ct];
        check_edit(bytes, Some(ct));
    }
}

/// The forms above do get accepted (so the accepted path is checked, not only rejections).
#[test]
fn valid_forms_are_accepted_and_limits_hold() {
    let ok = Form {
        boundary: "B0undary".into(),
        parts: vec![
            Part {
                name: Some("image".into()),
                filename: Some("image.png".into()),
                content_type: Some("image/png".into()),
                extra_header: None,
                data: png(64, 64, true),
            },
            Part {
                name: Some("prompt".into()),
                filename: None,
                content_type: None,
                extra_header: None,
                data: b"a red barn".to_vec(),
            },
        ],
        repeat: 0,
        content_type: 0,
        cuts: vec![],
    };
    let (body, ct) = encode(&ok);
    let a = harness().send("POST", "/v1/images/edits", ct.as_deref(), body);
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // The transparent half is the mask.
    let init = a.generated[0].init_image.as_ref().unwrap();
    assert!(init.mask.is_some());
    // Too many parts: refused by count, naming the limit.
    let many = Form {
        repeat: crate::api::openai::MAX_PARTS,
        ..ok.clone()
    };
    let (body, ct) = encode(&many);
    let a = harness().send("POST", "/v1/images/edits", ct.as_deref(), body);
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(String::from_utf8_lossy(&a.body).contains("parts"));
    // A second mask is refused like a second image.
    let mut two = ok.clone();
    two.parts.push(Part {
        name: Some("mask".into()),
        ..two.parts[0].clone()
    });
    two.parts.push(Part {
        name: Some("mask".into()),
        ..two.parts[0].clone()
    });
    let (body, ct) = encode(&two);
    let a = harness().send("POST", "/v1/images/edits", ct.as_deref(), body);
    assert_eq!(a.status, 400);
    assert_eq!(assert_openai_error(&a).as_deref(), Some("mask"));
}
