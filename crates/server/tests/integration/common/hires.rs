//! One text-to-image request with a hires pass, in the native and A1111 dialects (the hires
//! tests compare the two).

use serde_json::{json, Value};

/// The native request; `hires` is its `hires` object. On A1111's step rule, as the A1111
/// dialect runs.
pub fn native(hires: Value) -> Value {
    json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 11, "steps": 2,
           "width": 256, "height": 256, "guidance_scale": 6.0, "scheduler": "euler",
           "hires": hires, "step_rule": "a1111"})
}

/// The same request in A1111's terms; `hires` holds A1111's hires fields.
pub fn a1111(hires: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 11,
                          "steps": 2, "width": 256, "height": 256, "cfg_scale": 6.0,
                          "sampler_name": "Euler", "enable_hr": true});
    for (k, v) in hires.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}
