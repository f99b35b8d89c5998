//! Who may call, how often, from which browser origin, and how slowly: the layers that wrap the
//! whole router (README "Keys, limits and reliability"). They are applied by [`protect`] to the
//! finished router, so every route, present or added later, is covered; only [`is_open`]'s
//! explicit allow-list is reachable without a key.

pub mod keys;
pub mod proxies;
pub mod rate;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use http_body::{Frame, SizeHint};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::dialect_error;
use crate::error::ApiError;
use keys::{KeyId, KeyStore};
use rate::{Caller, RateLimits};

/// Paths reachable without a key, for GET and HEAD only: the readiness probe (load balancers
/// and orchestrators call it without credentials) and the web page's static files (they hold
/// no data, and the page must load before it can ask for a key). Everything else, unknown
/// routes included, needs a key when keys are on.
pub const OPEN_PATHS: &[&str] = &["/health", "/", "/index.html", "/favicon.ico"];
/// Prefixes of the web page's static files, open as [`OPEN_PATHS`].
pub const OPEN_PREFIXES: &[&str] = &["/static/"];

pub fn is_open(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (OPEN_PATHS.contains(&path) || OPEN_PREFIXES.iter().any(|p| path.starts_with(p)))
}

/// The settings behind [`protect`] (flags and environment, see `cli.rs`).
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    pub api_keys: Option<String>,
    pub api_keys_file: Option<PathBuf>,
    /// 0: no rate limit.
    pub rate_limit_per_minute: u32,
    /// Origins a browser may call from; `*` for any; empty: no CORS headers (same origin only).
    pub cors_allow_origins: Vec<String>,
    /// The whole request body must arrive within this (a slow sender holds no handler).
    pub body_timeout: Duration,
}

/// What the middleware needs at run time.
pub struct Security {
    pub keys: KeyStore,
    pub cors: Option<CorsLayer>,
    pub rate: Option<RateLimits>,
    pub body_timeout: Duration,
}

impl Security {
    pub fn from_config(cfg: &SecurityConfig) -> Result<Self, String> {
        let keys = KeyStore::load(cfg.api_keys.as_deref(), cfg.api_keys_file.as_deref())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            keys,
            cors: cors_layer(&cfg.cors_allow_origins)?,
            rate: RateLimits::new(cfg.rate_limit_per_minute),
            body_timeout: cfg.body_timeout,
        })
    }
}

/// The CORS layer for `CORS_ALLOW_ORIGINS`; `None` when it is empty. Keys travel in headers,
/// never cookies, so credentials are not allowed.
pub fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let mut list = Vec::new();
        for o in origins {
            let o = o.trim_end_matches('/');
            if !(o.starts_with("http://") || o.starts_with("https://"))
                || o.contains(char::is_whitespace)
            {
                return Err(format!(
                    "CORS_ALLOW_ORIGINS: {o:?} is not an origin like https://app.example.com"
                ));
            }
            list.push(
                HeaderValue::from_str(o).map_err(|e| format!("CORS_ALLOW_ORIGINS: {o:?}: {e}"))?,
            );
        }
        AllowOrigin::list(list)
    };
    let h = |s: &'static str| axum::http::HeaderName::from_static(s);
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::DELETE])
            .allow_headers([
                h("authorization"),
                h("content-type"),
                h("x-api-key"),
                h("x-request-id"),
                h("last-event-id"),
            ])
            .expose_headers([
                h("x-request-id"),
                h("retry-after"),
                h("location"),
                h("x-cache"),
                h("www-authenticate"),
            ])
            .max_age(Duration::from_secs(600)),
    ))
}

/// Wraps the finished router: CORS outside (so preflights need no key and 401/429 answers
/// carry CORS headers a browser can read), then keys, rate limits and the body deadline.
pub fn protect(router: Router, security: Arc<Security>) -> Router {
    let cors = security.cors.clone();
    let router = router.layer(middleware::from_fn_with_state(security, guard));
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// Adds the two ways to present a key to the OpenAPI document, a requirement of one of them on
/// every operation that is not on the allow-list, and the 401/429 answers those operations give.
pub struct OpenApiSecurity;

impl utoipa::Modify for OpenApiSecurity {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::response::{Response, ResponseBuilder};
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, Ref, RefOr};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key as a Bearer token (when API_KEYS or API_KEYS_FILE is set)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "The same API key in a header of its own",
            ))),
        );
        let error = |description: &str, schema: &str| -> RefOr<Response> {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(schema)))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                (Method::GET, &mut item.get),
                (Method::POST, &mut item.post),
                (Method::PUT, &mut item.put),
                (Method::DELETE, &mut item.delete),
                (Method::PATCH, &mut item.patch),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                if is_open(&method, path) {
                    continue;
                }
                op.security = Some(vec![
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                    SecurityRequirement::new("api_key", Vec::<String>::new()),
                ]);
                // `/v1` answers in OpenAI's error shape (see `api::dialect_error`).
                let schema = if path.starts_with("/v1/") {
                    "openai.ErrorBody"
                } else {
                    "ErrorBody"
                };
                let r = &mut op.responses.responses;
                r.entry("401".into()).or_insert_with(|| {
                    error("`unauthorized`: keys are on and the request has no valid one; `WWW-Authenticate` set", schema)
                });
                const LIMITED: &str = "`rate_limited`: RATE_LIMIT_PER_MINUTE is spent for this key or address; `Retry-After` set";
                match r.get_mut("429") {
                    Some(RefOr::T(resp)) => {
                        resp.description = format!("{}; or {LIMITED}", resp.description)
                    }
                    Some(RefOr::Ref(_)) => {}
                    None => {
                        r.insert("429".into(), error(LIMITED, schema));
                    }
                }
            }
        }
    }
}

/// The client's address: the listener's [`proxies::ClientAddr`] (TRUSTED_PROXIES applied),
/// else the TCP peer's.
pub fn client_addr<B>(req: &axum::http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<proxies::ClientAddr>()
        .map(|c| c.0)
        .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

/// Carried in response extensions for the request log: the key the caller used.
#[derive(Debug, Clone)]
pub struct CallerKey(pub KeyId);

async fn guard(State(sec): State<Arc<Security>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let open = is_open(req.method(), &path);
    let addr = client_addr(&req);
    let mut key_id = None;
    if !open && sec.keys.enabled() {
        let why = match keys::presented_key(req.headers()) {
            Ok(Some(k)) => match sec.keys.verify(k) {
                Some(id) => {
                    key_id = Some(id);
                    None
                }
                None => Some("the key is not valid"),
            },
            Ok(None) => Some("send `Authorization: Bearer <key>` or `X-Api-Key: <key>`"),
            Err(why) => Some(why),
        };
        if let Some(why) = why {
            // Callers without a valid key are counted by address, so guessing keys is limited too.
            if let Some(resp) = rate_check(&sec, &path, addr.map(Caller::Addr)) {
                return resp;
            }
            return dialect_error(&path, ApiError::Unauthorized(why.into()));
        }
    }
    if !open {
        let caller = key_id.clone().map(Caller::Key).or(addr.map(Caller::Addr));
        if let Some(resp) = rate_check(&sec, &path, caller) {
            return resp;
        }
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| {
        Body::new(DeadlineBody {
            inner: b,
            sleep: Box::pin(tokio::time::sleep(sec.body_timeout)),
            timed_out: timed_out.clone(),
        })
    });
    let mut resp = next.run(req).await;
    if timed_out.load(Ordering::Relaxed) {
        resp = dialect_error(&path, ApiError::BodyTimeout(sec.body_timeout.as_secs()));
        // The rest of the body is still on the wire: do not reuse the connection.
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    if let Some(id) = key_id {
        resp.extensions_mut().insert(CallerKey(id));
    }
    resp
}

fn rate_check(sec: &Security, path: &str, caller: Option<Caller>) -> Option<Response> {
    let (rate, caller) = (sec.rate.as_ref()?, caller?);
    let retry_after_secs = rate.check(&caller).err()?;
    Some(dialect_error(
        path,
        ApiError::RateLimited { retry_after_secs },
    ))
}

/// A request body that fails once its deadline passes, however slowly the bytes trickle in.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyDeadlinePassed;

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyDeadlinePassed))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Drops rate-limit state of callers gone quiet, every minute, for as long as the server runs.
pub fn spawn_forgetting(sec: &Arc<Security>) {
    if sec.rate.is_none() {
        return;
    }
    let sec = Arc::downgrade(sec);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(rate::FORGET_EVERY);
        loop {
            tick.tick().await;
            let Some(sec) = sec.upgrade() else { return };
            if let Some(r) = &sec.rate {
                r.forget_idle();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_is_exact() {
        for (m, p) in [
            (Method::GET, "/health"),
            (Method::HEAD, "/health"),
            (Method::GET, "/"),
            (Method::GET, "/static/app.js"),
        ] {
            assert!(is_open(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::POST, "/health"),
            (Method::GET, "/health/"),
            (Method::GET, "/healthz"),
            (Method::GET, "/%68ealth"),
            (Method::GET, "/metrics"),
            (Method::GET, "/openapi.json"),
            (Method::GET, "/docs"),
            (Method::POST, "/generate"),
            (Method::GET, "/jobs"),
            (Method::POST, "/"),
            (Method::GET, "/static"),
            (Method::GET, "//health"),
        ] {
            assert!(!is_open(&m, p), "{m} {p}");
        }
    }

    #[test]
    fn cors_origins_are_checked() {
        assert!(cors_layer(&[]).unwrap().is_none());
        assert!(cors_layer(&["*".into()]).unwrap().is_some());
        assert!(
            cors_layer(&["https://a.example".into(), "http://localhost:3000/".into()])
                .unwrap()
                .is_some()
        );
        assert!(cors_layer(&["a.example".into()]).is_err());
        assert!(cors_layer(&["https://a b".into()]).is_err());
    }
}
