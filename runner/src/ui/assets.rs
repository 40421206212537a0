//! The dashboard's files, embedded in the binary at build time (no CDN, works offline): the page, its
//! script and stylesheet (runner/ui/), and uPlot (runner/ui/vendor/uplot/, MIT, with its licence).

/// One embedded file.
pub struct Asset {
    pub mime: &'static str,
    pub body: &'static str,
}

/// `(name, mime, path under runner/ui/)`, embedded at build time.
macro_rules! assets {
    ($(($name:literal, $mime:expr, $path:literal)),* $(,)?) => {
        &[$(($name, Asset { mime: $mime, body: include_str!(concat!("../../ui/", $path)) })),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const FILES: &[(&str, Asset)] = assets![
    ("index.html", "text/html; charset=utf-8", "index.html"),
    ("app.js", JS, "app.js"),
    ("style.css", CSS, "style.css"),
    ("uPlot.iife.min.js", JS, "vendor/uplot/uPlot.iife.min.js"),
    ("uPlot.min.css", CSS, "vendor/uplot/uPlot.min.css"),
    (
        "uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        "vendor/uplot/LICENSE"
    ),
];

/// The embedded file called exactly `name`, if any.
pub fn get(name: &str) -> Option<&'static Asset> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, a)| a)
}

/// The text of an embedded file (empty for an unknown name).
pub fn text(name: &str) -> &'static str {
    get(name).map_or("", |a| a.body)
}
