//! The HTTP contract and the engine's timing behaviour, over real HTTP against the real binary,
//! with the fake generator (selected by the hidden `SDSERVE_FAKE_GENERATOR`).

use crate::common;
#[path = "http_fake/contract.rs"]
mod contract;
#[path = "http_fake/engine_timing.rs"]
mod engine_timing;
#[path = "http_fake/lifecycle.rs"]
mod lifecycle;
#[path = "http_fake/openapi.rs"]
mod openapi;

use std::time::{Duration, Instant};

use common::{decode_png, exposition, fake, send_only, Server};
use serde_json::json;

fn with(mut env: Vec<(String, String)>, more: &[(&str, &str)]) -> Vec<(String, String)> {
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn ready(env: Vec<(String, String)>) -> Server {
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(10));
    s
}
