//! LORA_DIR and EMBEDDINGS_DIR changing while the real binary serves the tiny model: files
//! written, replaced and removed in a temp folder are listed (native and A1111 shapes), usable
//! and refused at once, without a restart, and the response cache never answers with an image
//! of a file that is gone. Then the same through a Redis cluster (an API replica validating
//! against its worker's announced folders).

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{decode_png, Resp, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn fixture_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("adapters").join(rel)).unwrap()
}

/// A temp folder with `loras/` and `embeddings/`, removed at the end.
struct Folders(PathBuf);

impl Folders {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("sdserve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for sub in ["loras", "embeddings"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        Self(root)
    }
    fn loras(&self) -> PathBuf {
        self.0.join("loras")
    }
    fn embeddings(&self) -> PathBuf {
        self.0.join("embeddings")
    }
}

impl Drop for Folders {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The same safetensors file with `pairs` as its `__metadata__`.
fn with_metadata(file: &[u8], pairs: Value) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&file[8..8 + n]).unwrap();
    header.insert("__metadata__".into(), pairs);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&file[8 + n..]);
    out
}

/// Writes `bytes` (the same length as the file's) over `path` and puts its modification time
/// back: a change that names, sizes and times do not show, which only a forced read sees.
fn replace_unseen(path: &Path, bytes: &[u8]) {
    let old = std::fs::metadata(path).unwrap();
    assert_eq!(old.len(), bytes.len() as u64);
    std::fs::write(path, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(old.modified().unwrap()).unwrap();
}

/// ink_kohya with the alias `alias` (4 characters, so that every such file has one length).
fn ink_as(alias: &str) -> Vec<u8> {
    assert_eq!(alias.len(), 4);
    with_metadata(
        &fixture_bytes("loras/ink_kohya.safetensors"),
        json!({ "ss_output_name": alias }),
    )
}

fn env(model: &Path, f: &Folders) -> Vec<(String, String)> {
    [
        ("MODEL_ID", model.to_string_lossy().into_owned()),
        ("LORA_DIR", f.loras().to_string_lossy().into_owned()),
        (
            "EMBEDDINGS_DIR",
            f.embeddings().to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS", "120".into()),
        ("JOB_TIMEOUT_SECONDS", "120".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn request(prompt: &str) -> Value {
    json!({"prompt": prompt, "steps": 3, "width": 256, "height": 256, "seed": 5,
           "scheduler": "euler"})
}

/// The image's pixels and the `x-cache` header, after checking it is a 256x256 image.
fn image(r: &Resp) -> (Vec<u8>, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    let (w, h, px, _) = decode_png(r.json()["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    (px, r.header("x-cache").unwrap_or("").to_string())
}

fn post(s: &Server, path: &str, body: &Value) -> Resp {
    s.request(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

/// A styled job's record keeps the LoRAs the request listed (`as_written.loras`) apart from
/// those of its prompt's tags, which the prompt as written brings back; the record's `loras`
/// hold both, by file name (a tag naming an alias ran the file). Sent again as written, with
/// its styles, the job runs each LoRA once: the same image.
#[test]
fn a_styled_jobs_record_keeps_the_listed_loras_apart_from_the_tags() {
    let f = Folders::new("adapters-written");
    std::fs::write(f.loras().join("ink_kohya.safetensors"), ink_as("Ink1")).unwrap();
    std::fs::write(
        f.loras().join("soft_peft.safetensors"),
        fixture_bytes("loras/soft_peft.safetensors"),
    )
    .unwrap();
    let styles = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styles/styles.csv");
    let s = common::tiny_a_vae8_server(&[("LORA_DIR", &f.loras()), ("STYLES_FILE", &styles)]);
    let mut body = request("a red house <lora:Ink1:0.5>");
    body["loras"] = json!([{"name": "soft_peft", "weight": 0.75}]);
    body["styles"] = json!(["Appended"]);
    let job = common::job_to_end(&s, &body);
    assert_eq!(job["status"], "succeeded", "{job}");
    let record = &job["request"];
    let listed = json!([{"name": "soft_peft", "weight": 0.75}]);
    assert_eq!(
        record["loras"],
        json!([{"name": "soft_peft", "weight": 0.75}, {"name": "ink_kohya", "weight": 0.5}])
    );
    let written = &record["as_written"];
    assert_eq!(written["prompt"], "a red house <lora:Ink1:0.5>", "{record}");
    assert_eq!(written["loras"], listed, "{record}");
    let pixels = |job: &Value| decode_png(job["result"]["image_base64"].as_str().unwrap()).2;
    let mut again = request(written["prompt"].as_str().unwrap());
    again["loras"] = written["loras"].clone();
    again["styles"] = record["styles"].clone();
    let rerun = common::job_to_end(&s, &again);
    assert!(pixels(&rerun) == pixels(&job), "the same job again");
    // The record's `loras` with the prompt as written would run ink_kohya twice.
    again["loras"] = record["loras"].clone();
    let doubled = common::job_to_end(&s, &again);
    assert_eq!(doubled["request"]["loras"].as_array().unwrap().len(), 3);
    assert!(
        pixels(&doubled) != pixels(&job),
        "ink_kohya twice is another image"
    );
}

#[test]
fn loras_and_embeddings_follow_their_folders_without_a_restart() {
    let f = Folders::new("adapters-http");
    // The response cache stays on: a replaced file must not answer from it.
    let s = Server::start(&env(&fixtures().join("tiny-a-vae8"), &f));
    s.wait_ready(Duration::from_secs(300));
    let model = fixtures().join("tiny-a-vae8").canonicalize().unwrap();
    let model = model.file_name().unwrap().to_str().unwrap();
    assert_eq!(s.get("/loras").json(), json!({"model": model, "loras": []}));
    assert_eq!(s.get("/sdapi/v1/loras").json(), json!([]));
    assert_eq!(
        s.get("/sdapi/v1/embeddings").json(),
        json!({"loaded": {}, "skipped": {}})
    );
    let (base, _) = image(&s.post_json(&request("a red house")));

    // Added while the server runs, used at once (no wait, no refresh call).
    std::fs::write(
        f.loras().join("soft_peft.safetensors"),
        fixture_bytes("loras/soft_peft.safetensors"),
    )
    .unwrap();
    let (soft, _) = image(&s.post_json(&request("a red house <lora:soft_peft:1>")));
    assert!(soft != base, "the new LoRA changes the image");
    let ink_file = f.loras().join("ink_kohya.safetensors");
    let ink = with_metadata(
        &fixture_bytes("loras/ink_kohya.safetensors"),
        json!({"ss_output_name": "Ink Style", "ss_tag_frequency": "{\"img\": {\"ink\": 3}}",
               "ss_network_dim": "4"}),
    );
    std::fs::write(&ink_file, &ink).unwrap();
    let tagged = request("a red house <lora:ink_kohya:1>");
    let (inked, cache) = image(&s.post_json(&tagged));
    assert_eq!(cache, "miss");
    assert!(inked != base && inked != soft);
    // Asked again: the cache answers, with the same image.
    let (again, cache) = image(&s.post_json(&tagged));
    assert_eq!((again == inked, cache.as_str()), (true, "hit"));
    // By its alias, as A1111 tags may name it: the same LoRA.
    let (by_alias, _) = image(&s.post_json(&request("a red house <lora:Ink Style:1>")));
    assert!(by_alias == inked, "the alias names the same file");

    // Both dialects list them; A1111's shape is exactly {name, alias, path, metadata}.
    assert_eq!(
        names(&s.get("/loras").json()["loras"]),
        ["ink_kohya", "soft_peft"]
    );
    let a1111 = s.get("/sdapi/v1/loras").json();
    assert_eq!(names(&a1111), ["ink_kohya", "soft_peft"], "{a1111}");
    let entry = a1111[0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["alias", "metadata", "name", "path"]);
    assert_eq!(entry["alias"], "Ink Style");
    assert_eq!(entry["path"], ink_file.to_string_lossy().as_ref());
    // Metadata as A1111 reads it: strings, `{...}` values parsed.
    assert_eq!(
        entry["metadata"],
        json!({"ss_output_name": "Ink Style", "ss_tag_frequency": {"img": {"ink": 3}},
               "ss_network_dim": "4"})
    );
    assert_eq!(a1111[1]["alias"], "soft_peft");
    assert_eq!(a1111[1]["metadata"], json!({"format": "pt"}));

    // Replaced under the same name (the last run merged the old file): the new file's image,
    // not the merged old deltas, not the cached old answer.
    std::fs::write(&ink_file, fixture_bytes("loras/soft_peft.safetensors")).unwrap();
    let (replaced, cache) = image(&s.post_json(&tagged));
    assert_eq!(cache, "miss", "the folder changed: not the cached answer");
    assert!(
        replaced == soft,
        "ink_kohya now holds soft_peft's weights, so it gives soft_peft's image"
    );

    // Removed: refused at once, naming it.
    std::fs::remove_file(&ink_file).unwrap();
    let r = s.post_json(&tagged);
    assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
    let details = r.json()["details"].as_str().unwrap().to_owned();
    assert!(
        details.contains("\"ink_kohya\"") && details.contains("soft_peft"),
        "{details}"
    );
    assert_eq!(names(&s.get("/sdapi/v1/loras").json()), ["soft_peft"]);

    // A file still being copied in: listed with its error, refused naming why, and the server
    // goes on (a job through /jobs sees the same).
    let whole = fixture_bytes("loras/ink_kohya.safetensors");
    std::fs::write(
        f.loras().join("partial.safetensors"),
        &whole[..whole.len() / 2],
    )
    .unwrap();
    let r = post(&s, "/jobs", &request("a house <lora:partial:1>"));
    assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
    assert!(r.text().contains("truncated"), "{}", r.text());
    let listed = s.get("/loras").json();
    let partial = &listed["loras"][0];
    assert_eq!(partial["name"], "partial", "{listed}");
    assert!(
        partial["error"].as_str().unwrap().contains("truncated"),
        "{partial}"
    );
    assert_eq!(
        names(&s.get("/sdapi/v1/loras").json()),
        ["partial", "soft_peft"]
    );
    let (plain, _) = image(&s.post_json(&request("a red house")));
    assert!(plain == base, "the base weights are untouched");

    // Embeddings: one that fits, one that does not (A1111's `skipped`), one unreadable (left
    // out of A1111's answer, listed natively with its error); refresh-embeddings reads at once.
    std::fs::write(
        f.embeddings().join("tinystyle.pt"),
        fixture_bytes("embeddings/tinystyle.pt"),
    )
    .unwrap();
    // One vector of 48 values: tiny-b's width, not this text encoder's 32.
    let wide_header = br#"{"emb_params":{"dtype":"F32","shape":[1,48],"data_offsets":[0,192]}}"#;
    let mut wide = (wide_header.len() as u64).to_le_bytes().to_vec();
    wide.extend_from_slice(wide_header);
    wide.extend(std::iter::repeat_n(0u8, 192));
    std::fs::write(f.embeddings().join("wide.safetensors"), wide).unwrap();
    std::fs::write(f.embeddings().join("broken.pt"), b"not a pickle").unwrap();
    let r = post(&s, "/sdapi/v1/refresh-embeddings", &json!({}));
    assert_eq!((r.status, r.json()), (200, Value::Null), "{}", r.text());
    let a1111 = s.get("/sdapi/v1/embeddings").json();
    assert_eq!(
        a1111,
        json!({"loaded": {"tinystyle": {"step": 100, "sd_checkpoint": null,
                                          "sd_checkpoint_name": null, "shape": 32, "vectors": 2}},
               "skipped": {"wide": {"step": null, "sd_checkpoint": null,
                                     "sd_checkpoint_name": null, "shape": 48, "vectors": 1}}}),
        "{a1111}"
    );
    let native = s.get("/embeddings").json();
    assert_eq!(
        names(&native["embeddings"]),
        ["broken", "tinystyle", "wide"]
    );
    assert!(native["embeddings"][0]["error"].is_string(), "{native}");
    assert!(native["embeddings"][1]["error"].is_null(), "{native}");
    assert!(
        native["embeddings"][2]["error"]
            .as_str()
            .unwrap()
            .contains("48"),
        "{native}"
    );
    let (styled, _) = image(&s.post_json(&request("a red house, tinystyle")));
    let (unstyled, _) = image(&s.post_json(&request("a red house, tinyxstyle")));
    assert!(
        styled != unstyled,
        "the embedding's word stands for its vectors"
    );

    // The native refresh answers both lists; A1111's refresh-loras answers null.
    let r = post(&s, "/adapters/refresh", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(names(&r.json()["loras"]), ["partial", "soft_peft"]);
    assert_eq!(
        names(&r.json()["embeddings"]),
        ["broken", "tinystyle", "wide"]
    );
    let r = post(&s, "/sdapi/v1/refresh-loras", &json!({}));
    assert_eq!((r.status, r.json()), (200, Value::Null));

    // A change names, sizes and times do not show is seen by a forced read only.
    let same = f.loras().join("same.safetensors");
    std::fs::write(&same, ink_as("AAAA")).unwrap();
    // Listed at once: a listing after a change has the worker look first.
    assert!(names(&s.get("/sdapi/v1/loras").json()).contains(&"same".to_string()));
    let aliases = || {
        let list = s.get("/sdapi/v1/loras").json();
        list.as_array()
            .unwrap()
            .iter()
            .map(|l| l["alias"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "same.safetensors listed", || {
        aliases().contains(&"AAAA".to_string())
    });
    replace_unseen(&same, &ink_as("BBBB"));
    std::thread::sleep(Duration::from_millis(1500)); // the idle worker looked, and saw nothing
    assert!(aliases().contains(&"AAAA".to_string()));
    let r = post(&s, "/adapters/refresh", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(aliases().contains(&"BBBB".to_string()), "{:?}", aliases());
    assert_eq!(s.get("/health").status, 200);
}

/// Waits until `check` holds (polling), at most `within`.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < within, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_api_replica_follows_its_workers_folders() {
    let Some(redis) = common::cluster::Redis::start("an_api_replica_follows_its_workers_folders")
    else {
        return;
    };
    let f = Folders::new("adapters-cluster");
    let cluster = |role: &str| {
        let mut e = env(&fixtures().join("tiny-a-vae8"), &f);
        e.extend(
            [
                ("QUEUE_URL", redis.url()),
                ("ROLE", role.to_string()),
                ("JOB_LEASE_SECONDS", "2".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        e
    };
    let worker = Server::start(&cluster("worker"));
    let api = Server::start(&cluster("api"));
    api.wait_ready(Duration::from_secs(300));
    let (base, _) = image(&api.post_json(&request("a red house")));

    // Dropped in: the API replica accepts it at once (it waits for the worker's new read).
    std::fs::write(
        f.loras().join("ink_kohya.safetensors"),
        fixture_bytes("loras/ink_kohya.safetensors"),
    )
    .unwrap();
    let tagged = request("a red house <lora:ink_kohya:1>");
    let (inked, cache) = image(&api.post_json(&tagged));
    assert_eq!(cache, "miss");
    assert!(inked != base);
    assert_eq!(names(&api.get("/sdapi/v1/loras").json()), ["ink_kohya"]);

    // Replaced: the new file's image, not the shared cache's old answer.
    std::fs::write(
        f.loras().join("ink_kohya.safetensors"),
        fixture_bytes("loras/soft_peft.safetensors"),
    )
    .unwrap();
    let (replaced, cache) = image(&api.post_json(&tagged));
    assert_eq!(cache, "miss");
    assert!(replaced != inked && replaced != base);

    // Removed: refused by the API replica, naming it.
    std::fs::remove_file(f.loras().join("ink_kohya.safetensors")).unwrap();
    let r = api.post_json(&tagged);
    assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
    assert!(r.text().contains("ink_kohya"), "{}", r.text());
    eventually(Duration::from_secs(5), "the listing follows", || {
        names(&api.get("/loras").json()["loras"]).is_empty()
    });

    // A change only a forced read sees: A1111's refresh-loras on the API replica has the
    // worker read its folder (asked through Redis) and answers once it has.
    let same = f.loras().join("same.safetensors");
    std::fs::write(&same, ink_as("AAAA")).unwrap();
    let alias = || api.get("/sdapi/v1/loras").json()[0]["alias"].clone();
    eventually(Duration::from_secs(10), "same.safetensors listed", || {
        alias() == "AAAA"
    });
    replace_unseen(&same, &ink_as("BBBB"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alias(), "AAAA", "names, sizes and times are unchanged");
    let r = post(&api, "/sdapi/v1/refresh-loras", &json!({}));
    assert_eq!((r.status, r.json()), (200, Value::Null), "{}", r.text());
    assert_eq!(alias(), "BBBB");
    drop(worker);
}

#[test]
fn a_lora_dropped_in_during_a_run_is_waited_for_by_a_request_that_waits() {
    let f = Folders::new("adapters-busy");
    let s = Server::start(&env(&fixtures().join("tiny-a-vae8"), &f));
    s.wait_ready(Duration::from_secs(300));
    // A long job holds the worker (it reads the folders between jobs only).
    let mut long = request("a long run");
    long["steps"] = json!(40);
    let r = post(&s, "/jobs", &long);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "the long job runs", || {
        s.get(&format!("/jobs/{id}")).json()["progress"]["step"].as_u64() >= Some(1)
    });
    std::fs::write(
        f.loras().join("ink_kohya.safetensors"),
        fixture_bytes("loras/ink_kohya.safetensors"),
    )
    .unwrap();
    let job = s.get(&format!("/jobs/{id}")).json();
    let left =
        job["progress"]["total"].as_u64().unwrap() - job["progress"]["step"].as_u64().unwrap();
    assert!(left > 10, "the job has most of its steps to go: {job}");
    // /generate waits for its image anyway: it waits for the worker's read, and is served.
    let t = Instant::now();
    let (px, _) = image(&s.post_json(&request("a red house <lora:ink_kohya:1>")));
    assert_eq!(s.get(&format!("/jobs/{id}")).json()["status"], "succeeded");
    let (base, _) = image(&s.post_json(&request("a red house")));
    assert!(
        px != base,
        "the LoRA was used ({:?} after the drop)",
        t.elapsed()
    );
    // A name with no file is still refused without waiting for the run.
    let r = post(&s, "/jobs", &long);
    assert_eq!(r.status, 202);
    let t = Instant::now();
    let r = s.post_json(&request("a red house <lora:nothing_here:1>"));
    assert_eq!(r.broken_fields(), ["loras"], "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
