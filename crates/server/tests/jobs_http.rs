//! Jobs over real HTTP against the real binary with the fake generator: every state change, the
//! event stream's order, cancellation (queued and running), deadlines, TTL, 404 and 429.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{decode_png, fake, send_only, Server};
use serde_json::{json, Value};

fn ready(spec: &str, more: &[(&str, &str)]) -> Server {
    let mut env = fake(spec);
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(10));
    s
}

fn submit(s: &Server, body: &Value) -> Value {
    let r = s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let j = r.json();
    let id = j["id"].as_str().unwrap();
    assert_eq!(r.header("location"), Some(format!("/jobs/{id}").as_str()));
    assert_eq!(j["links"]["self"], format!("/jobs/{id}"));
    assert_eq!(j["links"]["events"], format!("/jobs/{id}/events"));
    j
}

fn job(s: &Server, id: &str) -> Value {
    let r = s.get(&format!("/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn wait_status(s: &Server, id: &str, want: &[&str], within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let j = job(s, id);
        if want.iter().any(|w| j["status"] == *w) {
            return j;
        }
        assert!(
            t.elapsed() < within,
            "still {} after {within:?}",
            j["status"]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A live `GET /jobs/{id}/events` reader: dechunks as bytes arrive and yields (event, data).
struct Events {
    reader: BufReader<TcpStream>,
    pending: String,
    ended: bool,
}

impl Events {
    fn open(addr: SocketAddr, id: &str) -> Events {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /jobs/{id}/events HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        Events {
            reader,
            pending: String::new(),
            ended: false,
        }
    }

    /// The next event, or `None` once the server ended the stream.
    fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                match name {
                    Some(n) => return Some((n, serde_json::from_str(&data).unwrap())),
                    None => continue, // a keep-alive comment
                }
            }
            if self.ended {
                assert!(self.pending.trim().is_empty(), "{:?}", self.pending);
                return None;
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                self.ended = true;
                continue;
            }
            let mut chunk = vec![0; n + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            self.pending
                .push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        }
    }

    fn all(mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some(e) = self.next() {
            out.push(e);
        }
        out
    }
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Exactly one terminal event, and it is the last.
fn assert_one_terminal_last(events: &[(String, Value)], want: &str) {
    let n = names(events);
    let terminals: Vec<&&str> = n.iter().filter(|e| FINAL.contains(e)).collect();
    assert_eq!(terminals, [&want], "{n:?}");
    assert_eq!(n.last(), Some(&want), "{n:?}");
    assert_eq!(n.first(), Some(&"state"), "{n:?}");
}

#[test]
fn a_job_runs_with_ordered_events_progress_previews_and_its_result() {
    let s = ready(
        "step_ms=30",
        &[("PREVIEW", "latent"), ("PREVIEW_EVERY", "2")],
    );
    let req = json!({"prompt": "a lighthouse", "steps": 6, "width": 320, "height": 256, "seed": 7});
    let created = submit(&s, &req);
    let id = created["id"].as_str().unwrap().to_string();
    assert!(["queued", "running"].contains(&created["status"].as_str().unwrap()));
    let events = Events::open(s.addr, &id).all();
    assert_one_terminal_last(&events, "succeeded");
    let n = names(&events);
    // The state first; a stream opened while queued sees `started` before any progress.
    let state = &events[0].1;
    assert_eq!(state["id"], id.as_str());
    if state["status"] == "queued" {
        let started = n.iter().position(|e| *e == "started").expect("started");
        let first_progress = n.iter().position(|e| *e == "progress").unwrap();
        assert!(started < first_progress, "{n:?}");
    }
    // Progress rises by one to the total, with an ETA that ends at 0.
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "progress")
        .map(|(_, d)| d)
        .collect();
    let steps: Vec<u64> = progress
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    let first = steps[0];
    assert_eq!(steps, (first..=6).collect::<Vec<_>>(), "{n:?}");
    assert!(progress.iter().all(|p| p["total"] == 6));
    assert_eq!(progress.last().unwrap()["eta_seconds"], 0.0);
    assert!(progress
        .iter()
        .all(|p| p["eta_seconds"].as_f64().is_some_and(|e| e >= 0.0)));
    // Previews every 2 steps, each a PNG at 1/8 of the image size.
    let previews: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| d)
        .collect();
    let preview_steps: Vec<u64> = previews
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        preview_steps,
        [2, 4, 6]
            .into_iter()
            .filter(|s| *s >= first)
            .collect::<Vec<_>>()
    );
    for p in &previews {
        let (w, h, px, _) = decode_png(p["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (40, 32));
        assert_eq!(px.len(), 40 * 32 * 3);
    }
    // The terminal event carries the /generate body, the record the same.
    let result = &events.last().unwrap().1["result"];
    let j = job(&s, &id);
    assert_eq!(j["status"], "succeeded");
    assert_eq!(&j["result"], result);
    assert!(j["error"].is_null() && j["position"].is_null());
    assert_eq!(j["progress"]["step"], 6);
    assert_eq!(j["request"]["seed"], 7);
    assert_eq!(j["request"]["steps"], 6);
    assert_eq!(j["request"]["scheduler"], "pndm");
    for k in ["created_at", "started_at", "finished_at"] {
        assert!(j[k].as_str().is_some_and(|t| t.ends_with('Z')), "{k}: {j}");
    }
    assert!(j["created_at"].as_str() <= j["started_at"].as_str());
    assert!(j["started_at"].as_str() <= j["finished_at"].as_str());
    let (w, h, _, text) = decode_png(result["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (320, 256));
    assert!(text.unwrap().contains("Seed: 7"));
    // /generate goes through the same queue and worker: the same image for the same request.
    let g = s.post_json(&req);
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["image_base64"], result["image_base64"]);
    // A stream opened after the end: the state, then its terminal event, then the close.
    let late = Events::open(s.addr, &id).all();
    assert_eq!(names(&late), ["state", "succeeded"]);
    assert_eq!(late[0].1["status"], "succeeded");
    // GET /jobs lists both (the /generate one is a job too), newest first once finished.
    let list = s.get("/jobs").json();
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert_eq!(ids[1], id);
}

fn taesd_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures/taesd/taesd-a")
}

/// A decoded PNG: width, height, RGB pixels, parameters text.
type Png = (u32, u32, Vec<u8>, Option<String>);

/// The `preview` events of a finished 6-step 320x256 job (a preview every 2 steps).
fn previews_of_a_job(s: &Server) -> Vec<(u64, Png)> {
    let req = json!({"prompt": "a lighthouse", "steps": 6, "width": 320, "height": 256, "seed": 7});
    let id = submit(s, &req)["id"].as_str().unwrap().to_string();
    let events = Events::open(s.addr, &id).all();
    assert_one_terminal_last(&events, "succeeded");
    events
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| {
            let png = decode_png(d["image_base64"].as_str().unwrap());
            (d["step"].as_u64().unwrap(), png)
        })
        .collect()
}

/// PREVIEW=taesd: each preview is the TAESD's decode of the step's latents, at 8x the latent
/// size (the full image size), sent as a real PNG over the event stream.
#[test]
fn taesd_previews_are_full_size_decodes_of_the_latents() {
    let dir = taesd_fixture();
    // Local folders get a content digest, cached there (not in the working tree).
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-ok-{}", std::process::id()));
    let s = ready(
        "step_ms=20",
        &[
            ("PREVIEW", "taesd"),
            ("PREVIEW_EVERY", "2"),
            ("PREVIEW_TAESD", dir.to_str().unwrap()),
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
        ],
    );
    s.wait_log(&["TAESD previews ready"], Duration::from_secs(10));
    let previews = previews_of_a_job(&s);
    assert!(!previews.is_empty());
    let taesd = sdserve_pipeline::taesd::Taesd::load(
        &dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    for (step, (w, h, pixels, _)) in &previews {
        // 320x256 has 40x32 latents; taesd-a upscales 8x.
        assert_eq!((*w, *h), (320, 256), "step {step}");
        // The fake generator's latents at step k of 6 are all k / 6 (generator.rs).
        let latents = candle_core::Tensor::full(
            *step as f32 / 6.0,
            (1, 4, 32, 40),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want = taesd.decode_preview(&latents).unwrap().remove(0);
        assert!(pixels == &want.pixels, "step {step}: not the TAESD decode");
    }
    // Different latents, different previews (the decode is not a constant).
    assert_ne!(
        previews.first().unwrap().1 .2,
        previews.last().unwrap().1 .2
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A TAESD that cannot be had (no such folder; the default hub id offline with an empty cache)
/// is a warning at start-up, and previews fall back to the latent map (1/8 of the image).
#[test]
fn a_missing_taesd_falls_back_to_latent_previews() {
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    for (spec, offline) in [("/nonexistent/taesd", "0"), ("madebyollin/taesd", "1")] {
        let s = ready(
            "step_ms=5",
            &[
                ("PREVIEW", "taesd"),
                ("PREVIEW_EVERY", "2"),
                ("PREVIEW_TAESD", spec),
                ("HF_HUB_OFFLINE", offline),
                ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ],
        );
        let line = s.wait_log(
            &["previews fall back to the latent map"],
            Duration::from_secs(10),
        );
        assert!(line.contains(spec), "{line}");
        let previews = previews_of_a_job(&s);
        assert!(!previews.is_empty());
        for (_, (w, h, _, _)) in &previews {
            assert_eq!((*w, *h), (40, 32), "{spec}");
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// The real pipeline (tiny-b) with PREVIEW=taesd: each preview is the TAESD decode of the
/// latents the pipeline has after that step (the same request run here in-process).
#[test]
fn real_pipeline_taesd_previews_decode_the_steps_latents() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures");
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-real-{}", std::process::id()));
    let env: Vec<(String, String)> = [
        ("MODEL_ID", fixtures.join("tiny-b").to_str().unwrap()),
        ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
        ("PREVIEW", "taesd"),
        ("PREVIEW_EVERY", "3"),
        ("PREVIEW_TAESD", taesd_fixture().to_str().unwrap()),
        ("JOB_TIMEOUT_SECONDS", "600"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));
    // A job ahead of it keeps the worker busy, so the stream opens while ours waits.
    submit(
        &s,
        &json!({"prompt": "ahead", "steps": 3, "width": 256, "height": 256, "seed": 1}),
    );
    let (prompt, steps, seed, guidance) = ("a lighthouse at dawn", 6, 11, 5.0);
    let req = json!({
        "prompt": prompt, "steps": steps, "width": 256, "height": 256, "seed": seed,
        "guidance_scale": guidance, "prompt_syntax": "plain",
    });
    let id = submit(&s, &req)["id"].as_str().unwrap().to_string();
    let events = Events::open(s.addr, &id).all();
    assert_one_terminal_last(&events, "succeeded");
    let previews: Vec<(u64, Png)> = events
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| {
            let png = decode_png(d["image_base64"].as_str().unwrap());
            (d["step"].as_u64().unwrap(), png)
        })
        .collect();
    // tiny-b's own scheduler (DDIM) runs `steps` UNet evaluations.
    let preview_steps: Vec<u64> = previews.iter().map(|(k, _)| *k).collect();
    assert_eq!(preview_steps, [3, 6], "{:?}", names(&events));

    // The same request in-process, keeping the latents of the preview steps.
    let device = candle_core::Device::Cpu;
    let sd = sdserve_pipeline::pipeline::StableDiffusion::load(
        &fixtures.join("tiny-b"),
        &device,
        candle_core::DType::F32,
    )
    .unwrap();
    let params = sdserve_pipeline::pipeline::GenerationParams {
        prompt: prompt.into(),
        steps,
        width: 256,
        height: 256,
        seed,
        guidance_scale: guidance,
        ..Default::default()
    };
    let mut latents = Vec::new();
    sd.generate(&params, &mut |p| {
        if preview_steps.contains(&(p.step as u64)) {
            latents.push(p.latents.unwrap().clone());
        }
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let taesd =
        sdserve_pipeline::taesd::Taesd::load(&taesd_fixture(), &device, candle_core::DType::F32)
            .unwrap();
    assert_eq!(latents.len(), previews.len());
    for ((step, (w, h, pixels, _)), z) in previews.iter().zip(&latents) {
        // 256x256 has 64x64 latents (tiny-b's VAE factor 4); taesd-a upscales them 8x.
        assert_eq!((*w, *h), (512, 512), "step {step}");
        let want = taesd.decode_preview(z).unwrap().remove(0);
        let worst = pixels
            .iter()
            .zip(&want.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("step {step}: preview vs TAESD(latents): largest difference {worst}/255");
        assert_eq!(worst, 0, "step {step}");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn cancel_queued_never_starts_cancel_running_stops_within_a_step() {
    let s = ready("step_ms=100", &[]);
    let a = submit(
        &s,
        &json!({"prompt": "long", "steps": 50, "width": 256, "height": 256}),
    );
    let a_id = a["id"].as_str().unwrap();
    wait_status(&s, a_id, &["running"], Duration::from_secs(5));
    let b = submit(
        &s,
        &json!({"prompt": "queued", "steps": 2, "width": 256, "height": 256}),
    );
    let b_id = b["id"].as_str().unwrap();
    assert_eq!(b["status"], "queued");
    assert_eq!(b["position"], 1);
    let mut b_events = Events::open(s.addr, b_id);
    let (first, state) = b_events.next().unwrap();
    assert_eq!(
        (first.as_str(), &state["status"]),
        ("state", &json!("queued"))
    );
    assert_eq!(state["position"], 1);

    // Queued: cancelled at once, never started.
    let r = s.request("DELETE", &format!("/jobs/{b_id}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let bj = r.json();
    assert_eq!(bj["status"], "cancelled");
    assert_eq!(bj["cancel_requested"], true);
    let rest = b_events.all();
    assert_eq!(names(&rest), ["cancelled"]);
    let bj = job(&s, b_id);
    assert!(bj["started_at"].is_null() && bj["result"].is_null());
    assert_eq!(bj["progress"]["step"], 0);

    // Running: DELETE answers at once with the job still running, which stops at its next step.
    let mut a_events = Events::open(s.addr, a_id);
    assert_eq!(a_events.next().unwrap().0, "state");
    let before = job(&s, a_id)["progress"]["step"].as_u64().unwrap();
    let r = s.request("DELETE", &format!("/jobs/{a_id}"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["cancel_requested"], true);
    let rest = a_events.all();
    assert_eq!(
        names(&rest).last(),
        Some(&"cancelled"),
        "{:?}",
        names(&rest)
    );
    assert_eq!(names(&rest).iter().filter(|e| FINAL.contains(e)).count(), 1);
    let aj = job(&s, a_id);
    assert_eq!(aj["status"], "cancelled");
    assert!(aj["result"].is_null() && aj["error"].is_null());
    let after = aj["progress"]["step"].as_u64().unwrap();
    // Steps are 100 ms; a DELETE reply plus one step may see two more at most.
    assert!(after <= before + 2, "ran on from step {before} to {after}");
    assert!(after < 50);
    // The worker is free: the next job starts at once and succeeds.
    let c = submit(
        &s,
        &json!({"prompt": "next", "steps": 2, "width": 256, "height": 256}),
    );
    let cj = wait_status(
        &s,
        c["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(5),
    );
    assert!(cj["started_at"].as_str() >= aj["finished_at"].as_str());
    // Cancelling an ended job changes nothing but the flag.
    let again = s
        .request("DELETE", &format!("/jobs/{a_id}"), &[], b"")
        .json();
    assert_eq!(again["status"], "cancelled");
}

#[test]
fn queue_limit_counts_every_route_unknown_ids_are_404_and_finished_jobs_expire() {
    let s = ready(
        "step_ms=100",
        &[("MAX_QUEUED_JOBS", "2"), ("JOB_TTL_SECONDS", "1")],
    );
    for (method, path) in [
        ("GET", "/jobs/nope"),
        ("DELETE", "/jobs/nope"),
        ("GET", "/jobs/nope/events"),
    ] {
        s.request(method, path, &[], b"")
            .error(404, "job_not_found");
    }
    let a = submit(
        &s,
        &json!({"prompt": "a", "steps": 40, "width": 256, "height": 256}),
    );
    let a_id = a["id"].as_str().unwrap().to_string();
    wait_status(&s, &a_id, &["running"], Duration::from_secs(5));
    // One waiting /generate client and one queued job fill the queue of two.
    let _waiting = send_only(
        s.addr,
        &json!({"prompt": "g", "steps": 2, "width": 256, "height": 256}),
    );
    let t = Instant::now();
    while s.get("/health").json()["queue"]["waiting"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = submit(
        &s,
        &json!({"prompt": "b", "steps": 2, "width": 256, "height": 256}),
    );
    assert_eq!(b["position"], 2);
    let r = s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        json!({"prompt": "c"}).to_string().as_bytes(),
    );
    r.error(429, "overloaded");
    assert!(r.header("retry-after").is_some());
    // GET /jobs: the running one, then the queue in order.
    let list = s.get("/jobs").json();
    let statuses: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["running", "queued", "queued"], "{list}");
    assert_eq!(list["jobs"][0]["id"], a_id.as_str());
    assert_eq!(list["jobs"][2]["id"], b["id"]);
    // Cancel the running one; the rest run; then every finished job expires after the TTL.
    s.request("DELETE", &format!("/jobs/{a_id}"), &[], b"");
    let bj = wait_status(
        &s,
        b["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(5),
    );
    assert_eq!(bj["status"], "succeeded");
    let t = Instant::now();
    while s.get(&format!("/jobs/{a_id}")).status == 200 {
        assert!(t.elapsed() < Duration::from_secs(5), "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.get(&format!("/jobs/{a_id}")).error(404, "job_not_found");
    let t = Instant::now();
    while !s.get("/jobs").json()["jobs"].as_array().unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn finished_jobs_past_job_results_mb_are_dropped_oldest_first_and_answer_404() {
    let s = ready("step_ms=0", &[("JOB_RESULTS_MB", "1")]);
    let body = json!({"prompt": "kept", "steps": 1, "width": 768, "height": 768, "seed": 5});
    let run = || {
        let id = submit(&s, &body)["id"].as_str().unwrap().to_string();
        let j = wait_status(&s, &id, &["succeeded"], Duration::from_secs(30));
        let b64 = j["result"]["image_base64"].as_str().unwrap().len();
        (id, b64)
    };
    let (first, b64) = run();
    // The same request each time: a record counts its image once (image_base64 and images[0]
    // share it) plus, roughly, the rest it holds (request, metadata, the record and its event
    // buffer: tens of KB; the engine's unit test checks the count itself).
    let most = (1 << 20) / b64;
    let least = (1 << 20) / (b64 + (64 << 10));
    let mut ids = vec![first.clone()];
    while s.get(&format!("/jobs/{first}")).status == 200 {
        assert!(
            ids.len() <= most + 1,
            "{} jobs of {b64} bytes kept",
            ids.len()
        );
        ids.push(run().0);
    }
    // As many as fit in the budget (or one less): dropped before the TTL, oldest first.
    assert!(
        ids.len() >= least,
        "dropped after {} jobs, at least {least} fit",
        ids.len()
    );
    s.get(&format!("/jobs/{first}")).error(404, "job_not_found");
    assert_eq!(job(&s, &ids[1])["status"], "succeeded");
    let listed = s.get("/jobs").json()["jobs"].as_array().unwrap().len();
    assert_eq!(listed, ids.len() - 1);
    assert_eq!(s.metric("sdserve_jobs_evicted_total"), 1.0);
    s.wait_log(&["JOB_RESULTS_MB", &first], Duration::from_secs(5));
}

#[test]
fn a_job_past_its_deadline_fails_with_timeout() {
    let s = ready("step_ms=50", &[("JOB_TIMEOUT_SECONDS", "1")]);
    let a = submit(
        &s,
        &json!({"prompt": "slow", "steps": 50, "width": 256, "height": 256}),
    );
    let id = a["id"].as_str().unwrap();
    let events = Events::open(s.addr, id).all();
    assert_one_terminal_last(&events, "failed");
    assert_eq!(events.last().unwrap().1["error"]["error_code"], "timeout");
    let j = job(&s, id);
    assert_eq!(j["status"], "failed");
    assert_eq!(j["error"]["error_code"], "timeout");
    assert!(j["progress"]["step"].as_u64().unwrap() < 50);
}

#[test]
fn a_queued_job_past_its_deadline_fails_without_starting() {
    let s = ready(
        "step_ms=50",
        &[
            ("JOB_TIMEOUT_SECONDS", "1"),
            ("GENERATION_TIMEOUT_SECONDS", "10"),
        ],
    );
    // A 2.5 s /generate run holds the worker past the 1 s deadline of the job queued behind it.
    let _long = send_only(
        s.addr,
        &json!({"prompt": "x", "steps": 50, "width": 256, "height": 256}),
    );
    let t = Instant::now();
    while s.get("/health").json()["queue"]["running"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let late = submit(
        &s,
        &json!({"prompt": "y", "steps": 2, "width": 256, "height": 256}),
    );
    let id = late["id"].as_str().unwrap();
    let events = Events::open(s.addr, id).all();
    assert_eq!(names(&events), ["state", "failed"]);
    let lj = job(&s, id);
    assert_eq!(lj["status"], "failed");
    assert_eq!(lj["error"]["error_code"], "timeout");
    assert!(lj["started_at"].is_null());
    assert_eq!(s.get("/health").json()["queue"]["running"], 1);
}

/// The CPU speed probe is off the readiness path: /health is 200 before it has run, a job sent
/// at once runs at once, a job sent while it runs waits one of its steps at most, and it runs
/// again once the worker is idle; then a 408 for a request that never started says how long
/// the request needs at the measured speed.
#[test]
fn the_speed_probe_waits_for_an_idle_worker_and_gives_way_to_jobs() {
    const STEP: Duration = Duration::from_secs(3);
    let s = ready(
        "step_ms=3000,speed_probe=1",
        &[("GENERATION_TIMEOUT_SECONDS", "2")],
    );
    // Ready, though the probe (after 3 s of idleness, 2 steps of 3 s) cannot have finished.
    assert_eq!(s.get("/health").json()["status"], "ok");
    assert!(!s.logs().iter().any(|l| l.contains("CPU speed")));
    let queue_wait = |j: &Value| {
        let at = |k: &str| humantime::parse_rfc3339(j[k].as_str().unwrap()).unwrap();
        at("started_at").duration_since(at("created_at")).unwrap()
    };
    let one_step = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256});
    let first = submit(&s, &one_step);
    let first = wait_status(
        &s,
        first["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(30),
    );
    // It waited for no probe step (the probe had not started): less than one such step.
    assert!(queue_wait(&first) < STEP, "{first}");

    // Idle: the probe starts; a job sent now waits for the probe's current step, no more.
    s.wait_log(&["CPU speed probe: running"], Duration::from_secs(30));
    let second = submit(&s, &one_step);
    let second = wait_status(
        &s,
        second["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(30),
    );
    assert!(
        queue_wait(&second) < STEP + Duration::from_secs(1),
        "{second}"
    );
    s.wait_log(&["the probe stopped and gave way"], Duration::ZERO);

    // Idle again: the probe runs to its end and logs what fits the deadlines.
    let line = s.wait_log(
        &["CPU speed: a step at 256x256 takes", "step_seconds"],
        Duration::from_secs(60),
    );
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert!(logged["step_seconds"].as_f64().unwrap() >= 3.0, "{line}");
    assert!(
        line.contains("GENERATION_TIMEOUT_SECONDS=2 a lone request may be 256x256: none"),
        "{line}"
    );

    // A /generate that times out in the queue behind a job: its 408 uses the measured speed
    // (about one 3 s step plus the decode for one step at 256x256).
    let _busy = submit(
        &s,
        &json!({"prompt": "busy", "steps": 2, "width": 256, "height": 256}),
    );
    let e = s.post_json(&one_step).error(408, "timeout");
    let details = e["details"].as_str().unwrap();
    assert!(
        details.contains("before its first step ended")
            && details.contains("At the speed measured on this machine it needs about"),
        "{e}"
    );
}
