//! A small blocking HTTP client for the hub (ureq, rustls): bearer auth, manual redirects (the
//! hub answers LFS files with a redirect whose own headers carry the file's sha256 and size),
//! and retries with exponential backoff on connection errors, 429 and 5xx.

use std::time::Duration;

use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

use super::HubError;

#[derive(Clone)]
pub struct Client {
    agent: Agent,
    endpoint: String,
    token: Option<String>,
    pub retries: u32,
    pub backoff: Duration,
}

/// A response whose body has not been read.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub url: String,
    pub body: Body,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why one attempt failed: worth another try, or final.
pub enum Attempt {
    Retry(String),
    Fatal(HubError),
}

impl Client {
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        timeout: Duration,
        retries: u32,
        backoff: Duration,
    ) -> Self {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            // A stalled body read (no byte for this long) fails the attempt; it is resumed.
            .timeout_per_read(Some(timeout))
            .user_agent(concat!("sdserve/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.into(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            retries,
            backoff,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one request (no retry). Redirects are returned, not followed. The token goes only
    /// to the hub's own host: presigned CDN URLs reject a second credential.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        extra: &[(&str, String)],
    ) -> Result<Reply, ureq::Error> {
        let mut req = match method {
            "HEAD" => self.agent.head(url),
            _ => self.agent.get(url),
        };
        req = req.header("Accept-Encoding", "identity");
        if let Some(t) = &self.token {
            if same_host(url, &self.endpoint) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        for (k, v) in extra {
            req = req.header(*k, v.as_str());
        }
        let resp: Response<Body> = req.call()?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        Ok(Reply {
            status,
            headers: parts.headers,
            url: url.to_string(),
            body,
        })
    }

    /// Like [`send`](Self::send), following redirects whose target is relative (a renamed
    /// repo), as huggingface_hub does, but stopping at absolute ones (the CDN).
    pub fn send_hub(
        &self,
        method: &str,
        url: &str,
        extra: &[(&str, String)],
    ) -> Result<Reply, ureq::Error> {
        let mut url = url.to_string();
        for _ in 0..5 {
            let r = self.send(method, &url, extra)?;
            match (r.status, r.header("location")) {
                (300..=399, Some(loc)) if loc.starts_with('/') => {
                    url = format!("{}{}", origin(&url), loc);
                }
                _ => return Ok(r),
            }
        }
        self.send(method, &url, extra)
    }

    /// Runs `attempt` until it succeeds, fails fatally, or the retries are spent; sleeps
    /// `backoff * 2^n` (capped at 30 s) between attempts.
    pub fn with_retries<T>(
        &self,
        what: &str,
        retries: u32,
        mut attempt: impl FnMut(u32) -> Result<T, Attempt>,
    ) -> Result<T, HubError> {
        let mut n = 0;
        loop {
            match attempt(n) {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) if n >= retries => {
                    return Err(HubError::Unreachable {
                        what: what.to_string(),
                        detail: format!("{why} (after {} attempts)", n + 1),
                    });
                }
                Err(Attempt::Retry(why)) => {
                    let wait = self
                        .backoff
                        .saturating_mul(1 << n.min(16))
                        .min(Duration::from_secs(30));
                    tracing::warn!(%what, attempt = n + 1, wait_ms = wait.as_millis() as u64, "{why}; retrying");
                    std::thread::sleep(wait);
                    n += 1;
                }
            }
        }
    }
}

/// Classifies a transport error or a status as retryable (connection trouble, 429, 5xx).
pub fn classify(r: Result<Reply, ureq::Error>, what: &str) -> Result<Reply, Attempt> {
    match r {
        Err(e) => Err(Attempt::Retry(format!("{what}: {e}"))),
        Ok(reply) if reply.status == 429 || reply.status >= 500 => {
            Err(Attempt::Retry(format!("{what}: HTTP {}", reply.status)))
        }
        Ok(reply) => Ok(reply),
    }
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

fn same_host(a: &str, b: &str) -> bool {
    origin(a).eq_ignore_ascii_case(origin(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            origin("https://huggingface.co/a/b/resolve/main/x"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:9/x"), "http://127.0.0.1:9");
        assert!(same_host(
            "https://huggingface.co/x",
            "https://huggingface.co"
        ));
        assert!(!same_host(
            "https://cdn-lfs.hf.co/x",
            "https://huggingface.co"
        ));
    }
}
