//! The web page at `/` (README "The web page"): three files embedded in the binary at
//! build time, served with a Content-Security-Policy under which the page can reach nothing but
//! this server (it must work offline, and a stray external resource fails loudly in the browser).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// Scripts and styles from this origin only (no inline code), images also as `data:` URLs (results
/// and previews arrive as base64), requests to this origin only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/static/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Small, and must follow the binary's version: revalidate each time.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_no_other_origin() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("app.css", APP_CSS),
        ] {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(scheme), "{name} mentions {scheme}");
            }
        }
    }

    #[test]
    fn the_page_loads_exactly_the_files_served_and_they_need_no_key() {
        use axum::http::Method;
        for path in ["/static/app.js", "/static/app.css"] {
            assert!(
                INDEX_HTML.contains(&format!("\"{path}\"")),
                "index.html misses {path}"
            );
        }
        // The page must load before it can ask for a key.
        for path in ["/", "/static/app.js", "/static/app.css"] {
            assert!(
                crate::security::is_open(&Method::GET, path),
                "{path} needs a key"
            );
        }
        // No inline script or style: the CSP forbids them, so they would silently not run.
        assert!(
            !INDEX_HTML.contains("<script>")
                && !INDEX_HTML.contains("<style")
                && !INDEX_HTML.contains(" onclick=")
        );
    }
}
