//! A job's life: every state change and the event stream's order, progress, previews and the
//! result; cancelling queued and running jobs.

use super::*;

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
