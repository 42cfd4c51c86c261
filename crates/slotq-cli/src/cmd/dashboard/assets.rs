//! The page, built into the binary: plain HTML, CSS and JavaScript with no library, so the
//! dashboard needs nothing from the network at run time.

/// The page.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// Its script: connects to `/api/events` and draws every picture it gets.
pub const APP_JS: &str = include_str!("assets/app.js");
/// Its style.
pub const STYLE_CSS: &str = include_str!("assets/style.css");
