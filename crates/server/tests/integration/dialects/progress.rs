//! A1111's `/sdapi/v1/progress`, `interrupt` and `skip` on its own requests: progress follows
//! the running job's steps and batches, skip stops the running batch and the next runs,
//! interrupt stops the rest and answers with what was finished, and neither touches a native
//! request.

use super::*;

#[test]
fn a1111_progress_interrupt_and_skip_act_on_its_requests() {
    let s = ready("step_ms=20", &[("GENERATION_TIMEOUT_SECONDS", "60")]);
    let idle = s.get("/sdapi/v1/progress").json();
    assert_eq!(
        (idle["progress"].as_f64(), &idle["state"]["job_count"]),
        (Some(0.0), &json!(0))
    );
    assert!(idle["current_image"].is_null());
    let addr = s.addr;
    let body = json!({"prompt": "x", "seed": 9, "steps": 40, "width": 256, "height": 256,
                      "n_iter": 3});
    let start = |body: Value| {
        std::thread::spawn(move || common::post_json_to(addr, "/sdapi/v1/txt2img", &body))
    };
    let wait_progress = |ok: &dyn Fn(&Value) -> bool| {
        let t = Instant::now();
        loop {
            let p = s.get("/sdapi/v1/progress").json();
            if ok(&p) {
                return p;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "not reached: {p}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // Skip: the running batch stops, the next one runs.
    let run = start(body.clone());
    let p = wait_progress(&|p| p["state"]["job_count"] == 3);
    assert_eq!(p["state"]["job_no"], 0);
    assert_eq!(
        s.request("POST", "/sdapi/v1/skip", &[], b"").json(),
        json!({})
    );
    let p = wait_progress(&|p| p["state"]["job_no"] == 1);
    let progress = p["progress"].as_f64().unwrap();
    assert!((1.0 / 3.0..2.0 / 3.0).contains(&progress), "{p}");
    // Interrupt: the rest stops; the answer holds what was finished.
    let t = Instant::now();
    assert_eq!(
        s.request("POST", "/sdapi/v1/interrupt", &[], b"").json(),
        json!({})
    );
    let r = run.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let info = info_of(&r);
    let seeds = info["all_seeds"].as_array().unwrap();
    assert!(seeds.len() <= 1, "{info}");
    assert!(!seeds.contains(&json!(9)), "batch 0 was skipped: {info}");
    assert_eq!(r.json()["images"].as_array().unwrap().len(), seeds.len());
    let idle = s.get("/sdapi/v1/progress").json();
    assert_eq!(idle["state"]["job_count"], 0);

    // A native request is not an A1111 one: interrupt leaves it alone.
    let native = std::thread::spawn(move || {
        common::post_json_to(
            addr,
            "/generate",
            &json!({"prompt": "x", "steps": 30, "width": 256, "height": 256}),
        )
    });
    std::thread::sleep(Duration::from_millis(100));
    s.request("POST", "/sdapi/v1/interrupt", &[], b"");
    assert_eq!(native.join().unwrap().status, 200);
}

#[test]
fn a1111_progress_follows_the_steps_of_its_job() {
    let s = ready(
        "step_ms=40",
        &[
            ("GENERATION_TIMEOUT_SECONDS", "60"),
            ("PREVIEW", "latent"),
            ("PREVIEW_EVERY", "2"),
        ],
    );
    let addr = s.addr;
    let body = json!({"prompt": "x", "seed": 5, "steps": 20, "width": 256, "height": 256,
                      "sampler_name": "Euler", "n_iter": 2});
    let run = std::thread::spawn(move || common::post_json_to(addr, "/sdapi/v1/txt2img", &body));
    // Poll through the first batch: the step rises, progress stays within its half.
    let mut seen = Vec::new();
    let mut image = None;
    let t = Instant::now();
    let p = loop {
        let p = s.get("/sdapi/v1/progress").json();
        let step = p["state"]["sampling_step"].as_u64().unwrap();
        let progress = p["progress"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&progress), "{p}");
        if p["state"]["job_no"] == 0 && step > 0 {
            assert_eq!(p["state"]["sampling_steps"], 20, "{p}");
            assert_eq!(progress, step as f64 / 20.0 / 2.0, "{p}");
            assert!(p["eta_relative"].as_f64().unwrap() > 0.0, "{p}");
            if let Some(png) = p["current_image"].as_str() {
                image = Some(png.to_string());
            }
            seen.push(step);
        }
        if p["state"]["job_no"] == 1 && step > 2 {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not reached: {p}");
        std::thread::sleep(Duration::from_millis(15));
    };
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.first() < seen.last() && seen.len() >= 3,
        "sampling_step rises: {seen:?}"
    );
    let (w, h, _, _) = decode_png(&image.expect("a preview while previews are on"));
    assert_eq!((w, h), (256 / 8, 256 / 8), "the latent preview");
    let progress = p["progress"].as_f64().unwrap();
    assert!((0.5..1.0).contains(&progress), "the second batch: {p}");

    // Interrupt cancels exactly that job, within one step, as DELETE /jobs/{id} does.
    let running = s.get("/jobs").json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["status"] == "running")
        .cloned()
        .expect("the second batch's job runs");
    s.request("POST", "/sdapi/v1/interrupt", &[], b"");
    let r = run.join().unwrap();
    assert_eq!(info_of(&r)["all_seeds"], json!([5]), "the first batch only");
    let id = running["id"].as_str().unwrap();
    let t = Instant::now();
    let job = loop {
        let job = s.get(&format!("/jobs/{id}")).json();
        if job["status"] != "running" {
            break job;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{job}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["cancel_requested"], true, "{job}");
    assert!(job["progress"]["step"].as_u64().unwrap() < 20, "{job}");
}
