//! Request images are decoded off the runtime's threads: while one is being decoded, the server
//! (here with one runtime thread, as a loaded server may have all of its busy) still answers
//! other connections. The decode is held at a gate until /health has answered, so nothing
//! depends on how long decoding takes; were it on the runtime thread, /health could not answer
//! and the test would fail after its read timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;

use crate::fuzz_tests::harness::app_state;
use crate::images::test_gate::{Gate, GATE};
use crate::listen::{serve, ConnLimits};

/// One HTTP/1.1 request on its own connection; the answer's status line and body.
fn http(addr: SocketAddr, head: &str, body: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A PNG no other test sends (its own gate text).
fn unique_png() -> String {
    let (w, h) = (320u32, 288u32);
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        let mut writer = enc.write_header().unwrap();
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        writer.write_image_data(&pixels).unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[test]
fn health_answers_while_a_request_image_is_decoded() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let state = app_state(&rt, Default::default());
    let metrics = state.metrics.clone();
    let app = rt.block_on(async { super::router(state) });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = ConnLimits {
        max_connections: 16,
        max_per_client: 0,
        header_read_timeout: Duration::from_secs(30),
        max_header_bytes: 16 << 10,
        max_headers: 64,
    };
    rt.spawn(serve(
        listener,
        app,
        limits,
        Default::default(),
        metrics,
        std::future::pending(),
    ));

    let image = unique_png();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *GATE.lock().unwrap() = Some(Gate {
        text: image.clone(),
        entered: entered_tx,
        release: release_rx,
    });
    let body = serde_json::json!({"prompt": "held", "steps": 5, "init_image": image}).to_string();
    let upload = std::thread::spawn(move || {
        let head = format!(
            "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        http(addr, &head, body.as_bytes())
    });
    entered
        .recv_timeout(Duration::from_secs(60))
        .expect("the upload's image reached the decoder");
    // The decode is held now: the runtime's one thread must still be free.
    let health = http(
        addr,
        "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"",
    );
    release.send(()).unwrap();
    let health = health.expect("/health answered while an image was being decoded");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let generated = upload.join().unwrap().unwrap();
    assert!(generated.starts_with("HTTP/1.1 200"), "{generated}");
}
