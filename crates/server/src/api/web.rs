//! The web page at `/` (README "The web page"): its files embedded in the binary at build time
//! (the page, its stylesheet, and its script as JavaScript modules that `app.js` imports), served with a Content-Security-Policy under which the page can reach nothing but
//! this server (it must work offline, and a stray external resource fails loudly in the browser).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_CSS: &str = include_str!("web/app.css");

/// The page's script, one module per part of the page (`app.js` starts it and imports the
/// others; they import each other by relative paths, so all sit under `/static/`).
const SCRIPTS: [(&str, &str); 14] = [
    ("app.js", include_str!("web/app.js")),
    ("dom.js", include_str!("web/dom.js")),
    ("http.js", include_str!("web/http.js")),
    ("status.js", include_str!("web/status.js")),
    ("form.js", include_str!("web/form.js")),
    ("run.js", include_str!("web/run.js")),
    ("images_in.js", include_str!("web/images_in.js")),
    ("loras.js", include_str!("web/loras.js")),
    ("hires.js", include_str!("web/hires.js")),
    ("history.js", include_str!("web/history.js")),
    ("jobs.js", include_str!("web/jobs.js")),
    ("choices.js", include_str!("web/choices.js")),
    ("styles.js", include_str!("web/styles.js")),
    ("variation.js", include_str!("web/variation.js")),
];

/// Scripts and styles from this origin only (no inline code), images also as `data:` URLs (results
/// and previews arrive as base64), requests to this origin only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        );
    for (name, text) in SCRIPTS {
        router = router.route(
            &format!("/static/{name}"),
            get(move || async move { asset("text/javascript; charset=utf-8", text) }),
        );
    }
    router
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
        for (name, text) in [("index.html", INDEX_HTML), ("app.css", APP_CSS)]
            .into_iter()
            .chain(SCRIPTS)
        {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(scheme), "{name} mentions {scheme}");
            }
        }
    }

    /// The `'./x.js'` modules a script imports.
    fn imports(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("import "))
            .filter_map(|l| l.split("from './").nth(1)?.split('\'').next())
            .collect()
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
        // As a module: the others are imported from it.
        assert!(INDEX_HTML.contains("<script type=\"module\" src=\"/static/app.js\">"));
        // Every module is served, and every one served is imported from app.js (directly or not).
        let served: Vec<&str> = SCRIPTS.iter().map(|(n, _)| *n).collect();
        let mut reached = vec!["app.js"];
        let mut i = 0;
        while i < reached.len() {
            let text = SCRIPTS.iter().find(|(n, _)| *n == reached[i]).unwrap().1;
            for m in imports(text) {
                assert!(
                    served.contains(&m),
                    "{} imports {m}, not served",
                    reached[i]
                );
                if !reached.contains(&m) {
                    reached.push(m);
                }
            }
            i += 1;
        }
        reached.sort_unstable();
        let mut all = served.clone();
        all.sort_unstable();
        assert_eq!(reached, all, "modules served but never imported");
        // The page must load before it can ask for a key.
        let paths = served.iter().map(|n| format!("/static/{n}"));
        for path in ["/".to_string(), "/static/app.css".to_string()]
            .into_iter()
            .chain(paths)
        {
            assert!(
                crate::security::is_open(&Method::GET, &path),
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
