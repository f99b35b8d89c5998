//! The accept loop: hyper's HTTP/1.1 server with the limits `axum::serve` does not expose.
//! A connection count cap, in all and per client address, a deadline for each request's headers (a slowloris that trickles
//! header bytes, or a client that connects and sends nothing, is dropped), a cap on header
//! bytes and count (431), and a graceful drain on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
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
    /// Open connections one client address (its TCP peer; IPv6 by /64) may hold at once;
    /// the next one gets a 429 and is closed. 0: no cap. Trusted proxies are not capped.
    pub max_per_client: usize,
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

/// What a client address over MAX_CONNECTIONS_PER_CLIENT gets before its connection is
/// closed: written at once, before reading anything (it costs no parsing; a client that
/// already sent a request reads it, as the connection lingers for its bytes before closing).
const TOO_MANY_FROM_CLIENT: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 161\r\n\r\n\
{\"error\":\"too many connections from this client\",\"details\":\"MAX_CONNECTIONS_PER_CLIENT connections are open from this address already\",\"error_code\":\"overloaded\"}";

/// Open connections by client address, for MAX_CONNECTIONS_PER_CLIENT.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection's place in `PerClient`, given back when dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    /// A slot for a connection from `peer`, or `None` when its address holds `max` already.
    /// IPv6 peers count by their /64 (one host usually has the whole /64 to pick from).
    fn take(table: &Arc<Self>, peer: IpAddr) -> Option<ClientSlot> {
        let key = match peer.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & !((1u128 << 64) - 1))),
            v4 => v4,
        };
        let mut open = table.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= table.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: table.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

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
    let draining = Arc::new(Semaphore::new(DRAINING_MAX));
    let per_client = Arc::new(PerClient {
        max: limits.max_per_client,
        open: Mutex::new(HashMap::new()),
    });
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
        // Per client first: a refused client takes none of everyone's slots.
        let client_slot = if per_client.max == 0 || proxies.trusts(peer.ip()) {
            None
        } else {
            let Some(slot) = PerClient::take(&per_client, peer.ip()) else {
                metrics.count_rejection("connection_limit_per_client");
                tracing::debug!(%peer, "connection refused: MAX_CONNECTIONS_PER_CLIENT open from this address");
                tokio::spawn(refuse(stream, TOO_MANY_FROM_CLIENT, draining.clone()));
                continue;
            };
            Some(slot)
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.count_rejection("connection_limit");
            tokio::spawn(refuse(stream, TOO_MANY_CONNECTIONS, draining.clone()));
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
            drop((permit, client_slot));
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

/// Refused connections drained at once (see `refuse`); past it a refusal closes at once.
const DRAINING_MAX: usize = 256;

/// Writes `answer`, then reads (and drops) what the client sent until it closes, 2 s at most
/// in all: closing with unread bytes would send a reset, which can discard the answer before
/// the client reads it. At most `DRAINING_MAX` refusals linger so (a flood of connections must
/// not hold file descriptors for it); past that, the answer is written and the socket closed.
async fn refuse(mut stream: TcpStream, answer: &'static [u8], draining: Arc<Semaphore>) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(answer).await;
        let _ = stream.shutdown().await;
        let Ok(_permit) = draining.try_acquire() else {
            return;
        };
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_well_formed_http_with_the_contract_body() {
        for (answer, code) in [
            (TOO_MANY_CONNECTIONS, "connection_limit"),
            (TOO_MANY_FROM_CLIENT, "overloaded"),
        ] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len(), "{text}");
            let j: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(j["error_code"], code);
            assert!(head.contains("retry-after: 1"), "{head}");
        }
    }

    /// A refused client that never closes holds its socket at most 2 s, and only while fewer
    /// than `DRAINING_MAX` refusals drain: past it the socket closes at once.
    #[tokio::test]
    async fn refusals_linger_only_within_the_drain_cap() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for (permits, closes_within) in [(1, 1.9), (0, 0.5)] {
            let draining = Arc::new(Semaphore::new(permits));
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let t = std::time::Instant::now();
            let refusal = tokio::spawn(refuse(server, TOO_MANY_FROM_CLIENT, draining));
            // The client reads the answer, then holds its side open.
            let mut got = vec![0u8; TOO_MANY_FROM_CLIENT.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, TOO_MANY_FROM_CLIENT);
            refusal.await.unwrap();
            let took = t.elapsed().as_secs_f64();
            if permits == 1 {
                assert!(took >= closes_within, "drained for {took} s");
            } else {
                assert!(took < closes_within, "held {took} s without a permit");
            }
        }
    }

    #[test]
    fn per_client_slots_count_by_address_and_ipv6_slash_64_and_come_back() {
        let table = Arc::new(PerClient {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a1 = PerClient::take(&table, ip("10.0.0.1")).unwrap();
        let _a2 = PerClient::take(&table, ip("::ffff:10.0.0.1")).unwrap();
        assert!(PerClient::take(&table, ip("10.0.0.1")).is_none());
        let _b = PerClient::take(&table, ip("10.0.0.2")).unwrap();
        drop(a1);
        let _a3 = PerClient::take(&table, ip("10.0.0.1")).unwrap();
        let _v6a = PerClient::take(&table, ip("2001:db8:1:2::1")).unwrap();
        let _v6b = PerClient::take(&table, ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(PerClient::take(&table, ip("2001:db8:1:2::77")).is_none());
        assert!(PerClient::take(&table, ip("2001:db8:1:3::1")).is_some());
        drop((_a2, _a3, _b, _v6a, _v6b));
        assert!(table.open.lock().unwrap().is_empty());
    }
}
