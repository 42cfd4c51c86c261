//! The page, built into the binary: plain HTML, CSS and JavaScript with no library, so the
//! dashboard needs nothing from the network at run time.

/// The page.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// Its script: connects to `/api/events` and draws every picture it gets.
pub const APP_JS: &str = include_str!("assets/app.js");
/// Its style.
pub const STYLE_CSS: &str = include_str!("assets/style.css");

/// The asset served at `path`, with its content type.
pub fn by_path(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "/app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "/style.css" => Some(("text/css; charset=utf-8", STYLE_CSS)),
        _ => None,
    }
}
