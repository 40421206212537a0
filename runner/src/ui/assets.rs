//! The dashboard's files, embedded in the binary at build time (no CDN, works offline): the page, its
//! script and stylesheet (runner/ui/), and uPlot (runner/ui/vendor/uplot/, MIT, with its licence).

/// One embedded file.
pub struct Asset {
    pub mime: &'static str,
    pub body: &'static str,
}

const FILES: &[(&str, Asset)] = &[
    (
        "index.html",
        Asset {
            mime: "text/html; charset=utf-8",
            body: include_str!("../../ui/index.html"),
        },
    ),
    (
        "app.js",
        Asset {
            mime: "text/javascript; charset=utf-8",
            body: include_str!("../../ui/app.js"),
        },
    ),
    (
        "style.css",
        Asset {
            mime: "text/css; charset=utf-8",
            body: include_str!("../../ui/style.css"),
        },
    ),
    (
        "uPlot.iife.min.js",
        Asset {
            mime: "text/javascript; charset=utf-8",
            body: include_str!("../../ui/vendor/uplot/uPlot.iife.min.js"),
        },
    ),
    (
        "uPlot.min.css",
        Asset {
            mime: "text/css; charset=utf-8",
            body: include_str!("../../ui/vendor/uplot/uPlot.min.css"),
        },
    ),
    (
        "uPlot.LICENSE.txt",
        Asset {
            mime: "text/plain; charset=utf-8",
            body: include_str!("../../ui/vendor/uplot/LICENSE"),
        },
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
