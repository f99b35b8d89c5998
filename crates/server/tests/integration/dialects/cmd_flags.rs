//! `GET /sdapi/v1/cmd-flags`: A1111's flag names, with the values this server runs with.

use super::*;

#[test]
fn cmd_flags_name_a1111_flags_with_this_servers_values() {
    let dir = std::env::temp_dir().join(format!("sdserve-cmd-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lora_dir = dir.to_string_lossy().to_string();
    let s = ready("step_ms=0", &[("LORA_DIR", &lora_dir)]);
    let r = s.get("/sdapi/v1/cmd-flags");
    assert_eq!(r.status, 200, "{}", r.text());
    let f = r.json();
    assert_eq!(f["api"], true);
    assert_eq!(f["nowebui"], false);
    assert_eq!(f["listen"], false, "bound to 127.0.0.1");
    assert_eq!(f["port"], s.addr.port());
    assert_eq!(f["lora_dir"], lora_dir.as_str());
    assert_eq!(f["embeddings_dir"], Value::Null, "EMBEDDINGS_DIR unset");
    assert_eq!(f["use_cpu"], json!(["all"]));
    assert_eq!(
        (&f["medvram"], &f["lowvram"]),
        (&json!(false), &json!(false))
    );
    // A1111's defaults for what has no equivalent here; no key is ever shown.
    assert_eq!(f["max_batch_count"], 16);
    assert_eq!(f["xformers"], false);
    assert_eq!(f["api_auth"], Value::Null);
    assert!(f["hypernetwork_dir"]
        .as_str()
        .unwrap()
        .ends_with("models/hypernetworks"));
    assert!(f.as_object().unwrap().len() > 100);
    let _ = std::fs::remove_dir_all(&dir);
}
