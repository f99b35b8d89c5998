//! The accept loop: hyper's HTTP/1.1 server with the limits `axum::serve` does not expose.
//! A connection count cap, a deadline for each request's headers (a slowloris that trickles
//! header bytes, or a client that connects and sends nothing, is dropped), a cap on header
//! bytes and count (431), and a graceful drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::security::proxies::{ClientAddr, TrustedProxies};

#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections at once; the next one gets a 503 and is closed.
    pub max_connections: usize,
    /// A request's start line and headers must arrive within this, counted from when the
    /// connection starts waiting for them (so idle keep-alive connections close after it too).
    pub header_read_timeout: Duration,
    /// Start line plus headers, in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Header lines per request.
    pub max_headers: usize,
}

/// What a connection over the cap gets before it is closed: the contract's error body.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 114\r\n\r\n\
{\"error\":\"too many connections\",\"details\":\"the server's MAX_CONNECTIONS are open\",\"error_code\":\"connection_limit\"}";

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// open connections to finish (the caller bounds that wait). Each request carries its peer
/// (`ConnectInfo`) and its client (`ClientAddr`: the peer, or who `proxies` forwarded for).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    proxies: Arc<TrustedProxies>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.count_rejection("connection_limit");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxies = proxies.clone();
        let svc = app
            .clone()
            .map_request(move |mut req: axum::http::Request<Incoming>| {
                let client = proxies.client(peer.ip(), req.headers());
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(ClientAddr(client));
                req
            });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                note_connection_error(&metrics, &e, peer);
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn note_connection_error(metrics: &Metrics, e: &hyper::Error, peer: SocketAddr) {
    if e.is_timeout() {
        metrics.count_rejection("header_timeout");
        tracing::debug!(%peer, "connection closed: headers not received in time");
    } else if e.is_parse_too_large() {
        metrics.count_rejection("header_too_large");
        tracing::debug!(%peer, "connection closed: headers too large");
    } else {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(TOO_MANY_CONNECTIONS).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_well_formed_http_with_the_contract_body() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let j: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(j["error_code"], "connection_limit");
    }
}
