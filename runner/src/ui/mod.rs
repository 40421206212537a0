//! `runner ui`: a live dashboard over a home's `runs.db`, served by axum while sweeps run in other
//! processes. The database is opened read-only (the runner stays its one writer); the page is plain
//! HTML/JS/CSS embedded in the binary ([`assets`]) with uPlot vendored, and it polls `/api/state` to
//! redraw within a second of new points. `runner report --html` writes the same page with the data
//! inlined ([`offline_page`]).
//!
//! Routes (GET only; anything else is 404 or 405):
//! `/` the page · `/assets/NAME` an embedded file · `/api/state` a change token · `/api/sweeps` ·
//! `/api/runs[?sweep=s1][&tag=T]` the rows of `report --format json` · `/api/runs/ID` one run's page ·
//! `/api/runs/ID/metrics?name=val_loss[&after=STEP]` · `/api/metrics?name=loss&runs=ID[:AFTER],…` ·
//! `/api/metric-names?runs=ID,…` · `/api/scaling?sweep=s1[&group_by=KEY]` the scaling fits of a study.

pub mod api;
pub mod assets;

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{Id, RunStore};

/// An API error: 404 for what does not exist, 400 for a malformed query, 500 otherwise; always JSON.
struct ApiError(StatusCode, String);

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let code = if e.downcast_ref::<crate::store::NotFound>().is_some() {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self(code, engine::error_line(&e))
    }
}

/// axum's `Query`, with a malformed query answered as every other API error: 400 with a JSON body.
struct Query<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for Query<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| Query(q))
            .map_err(|e| bad(format!("malformed query: {}", e.body_text())))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

type ApiResult = std::result::Result<Json<Value>, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

#[derive(Deserialize)]
struct RunsQuery {
    sweep: Option<String>,
    tag: Option<String>,
}

#[derive(Deserialize)]
struct MetricQuery {
    name: Option<String>,
    after: Option<i64>,
    runs: Option<String>,
}

async fn state(State(store): State<RunStore>) -> ApiResult {
    Ok(Json(json!({"token": store.change_token().await?})))
}

async fn sweeps(State(store): State<RunStore>) -> ApiResult {
    Ok(Json(api::sweeps(&store).await?))
}

#[derive(Deserialize)]
struct ScalingQuery {
    sweep: String,
    group_by: Option<String>,
}

/// The scaling fits of one sweep's completed runs (`runner scaling SWEEP --format json`), with the points.
async fn scaling(State(store): State<RunStore>, Query(q): Query<ScalingQuery>) -> ApiResult {
    let Ok(Id::Sweep(sweep)) = q.sweep.parse::<Id>() else {
        return Err(bad(format!("sweep={}: give a sweep id like s1", q.sweep)));
    };
    store.sweep(sweep).await?;
    Ok(Json(
        api::scaling(
            &store,
            sweep,
            q.group_by.as_deref().filter(|g| !g.is_empty()),
        )
        .await?,
    ))
}

async fn runs(State(store): State<RunStore>, Query(q): Query<RunsQuery>) -> ApiResult {
    let mut rows = api::runs(&store).await?;
    if let Some(s) = q.sweep.as_deref().filter(|s| !s.is_empty()) {
        let id = match s.parse::<Id>() {
            Ok(Id::Sweep(id)) => id,
            Ok(Id::Run(id)) => id,
            Err(e) => return Err(bad(format!("sweep={s}: {e:#}"))),
        };
        store.sweep(id).await?;
        let want = format!("s{id}");
        rows.retain(|r| r.sweep_id == want);
    }
    if let Some(t) = q.tag.as_deref().filter(|t| !t.is_empty()) {
        rows.retain(|r| r.tags.iter().any(|x| x == t));
    }
    Ok(Json(
        serde_json::to_value(rows).map_err(anyhow::Error::from)?,
    ))
}

/// A run id in a URL; anything else names no run (404).
fn url_run_id(id: &str) -> std::result::Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, format!("no run with id {id}")))
}

async fn run(State(store): State<RunStore>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let id = url_run_id(&id)?;
    Ok(Json(api::run_detail(&store, id).await?))
}

fn metric_name(q: &MetricQuery) -> std::result::Result<&str, ApiError> {
    match q.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(bad("name= is required, e.g. ?name=val_loss")),
    }
}

async fn run_metrics(
    State(store): State<RunStore>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<MetricQuery>,
) -> ApiResult {
    let id = url_run_id(&id)?;
    let name = metric_name(&q)?;
    let all = api::metrics(&store, &[(id, q.after.unwrap_or(0))], name).await?;
    Ok(Json(
        all.get(id.to_string()).cloned().unwrap_or(Value::Null),
    ))
}

/// `runs=3,4:120`: runs 3 (from the start) and 4 (after step 120).
fn parse_runs(s: &str) -> std::result::Result<Vec<(i64, i64)>, ApiError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, after) = p.split_once(':').unwrap_or((p, "0"));
            match (id.parse(), after.parse()) {
                (Ok(i), Ok(a)) => Ok((i, a)),
                _ => Err(bad(format!(
                    "runs={s}: expected run ids with an optional :after-step, e.g. runs=3,4:120"
                ))),
            }
        })
        .collect()
}

async fn metrics(State(store): State<RunStore>, Query(q): Query<MetricQuery>) -> ApiResult {
    let name = metric_name(&q)?;
    let wanted = parse_runs(q.runs.as_deref().unwrap_or(""))?;
    if wanted.len() > 2000 {
        return Err(bad("at most 2000 runs per request"));
    }
    Ok(Json(api::metrics(&store, &wanted, name).await?))
}

/// The metrics `runs=3,4` recorded (any extra metric an engine logs, not only the standard ones).
async fn metric_names(State(store): State<RunStore>, Query(q): Query<MetricQuery>) -> ApiResult {
    let runs: Vec<i64> = parse_runs(q.runs.as_deref().unwrap_or(""))?
        .into_iter()
        .map(|r| r.0)
        .take(2000)
        .collect();
    Ok(Json(json!(store.metric_names(&runs).await?)))
}

async fn index() -> Response {
    asset_response("index.html")
}

async fn asset(UrlPath(path): UrlPath<String>) -> Response {
    asset_response(&path)
}

/// An embedded file by its exact name, or 404: nothing outside the embedded set can be named.
fn asset_response(name: &str) -> Response {
    match assets::get(name) {
        Some(a) => ([(header::CONTENT_TYPE, a.mime)], a.body).into_response(),
        None => not_found().into_response(),
    }
}

fn not_found() -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "not found: the dashboard is at /, its data under /api/"})),
    )
}

/// Headers on every answer: no sniffing, no framing, scripts and styles only from here; and a Host check,
/// so a page on another site cannot reach a loopback server through DNS rebinding.
async fn guard(allowed: State<Vec<String>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(n, _)| n);
    if !allowed.is_empty() && !allowed.iter().any(|a| a == name) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": format!("host {host:?} is not this dashboard's address")})),
        )
            .into_response();
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'",
        ),
    );
    res
}

/// The dashboard's routes over `store`; `allowed_hosts` empty accepts any Host header.
pub fn router(store: RunStore, allowed_hosts: Vec<String>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
        .route("/api/state", get(state))
        .route("/api/sweeps", get(sweeps))
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}", get(run))
        .route("/api/runs/{id}/metrics", get(run_metrics))
        .route("/api/metrics", get(metrics))
        .route("/api/metric-names", get(metric_names))
        .route("/api/scaling", get(scaling))
        .fallback(|| async { not_found() })
        .with_state(store)
        .layer(middleware::from_fn_with_state(allowed_hosts, guard))
}

/// The address to listen on for `--host` (an IP address, or a name such as `localhost`, which is resolved
/// and its first address taken, IPv4 first).
async fn resolve_host(host: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(addr) = format!("{host}:{port}")
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
    {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map(|a| a.collect())
        .unwrap_or_default();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| {
            format!("--host {host}: not an IP address nor a name this machine resolves: give one such as 127.0.0.1 or localhost")
        })
}

/// Serve the dashboard over `home` on `host:port` until Ctrl-C, printing the address it bound.
pub async fn serve(home: &std::path::Path, host: &str, port: u16) -> Result<()> {
    let store = RunStore::open_read_only(home).await?;
    let addr = resolve_host(host, port).await?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("port {port} on {host} is in use: pick another with --port (or --port 0 for any free one)")
        }
        Err(e) => return Err(e).with_context(|| format!("listening on {addr}")),
    };
    let bound = listener.local_addr()?;
    let loopback = bound.ip().is_loopback();
    if !loopback {
        eprintln!(
            "warning: serving on {} — anyone who can reach this address can read every run's config and metrics; \
             the default --host 127.0.0.1 keeps it to this machine (use an SSH tunnel to watch from elsewhere)",
            bound.ip()
        );
    }
    // Behind loopback only names for this machine are accepted; on another address any Host (the user
    // chose to expose it, and may reach it by any name).
    let allowed = if loopback {
        vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "[::1]".into(),
            bound.ip().to_string(),
        ]
    } else {
        Vec::new()
    };
    let url_host = if bound.is_ipv6() {
        format!("[{}]", bound.ip())
    } else {
        bound.ip().to_string()
    };
    println!("listening on http://{url_host}:{}/", bound.port());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    axum::serve(listener, router(store, allowed))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the dashboard")?;
    Ok(())
}

/// The offline report: the dashboard's page with its stylesheet, scripts and `data` (from
/// [`api::snapshot`]) inlined, one self-contained file that opens without a server.
pub fn offline_page(data: &Value) -> String {
    let page = assets::text("index.html");
    let inline_css = |name: &str| format!("<style>\n{}\n</style>", assets::text(name));
    // `<` escaped in JSON and `</script` in scripts, so no text can end its element early.
    let inline_js = |name: &str| {
        format!(
            "<script>\n{}\n</script>",
            assets::text(name).replace("</script", "<\\/script")
        )
    };
    let data = serde_json::to_string(data)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c");
    let mut out = String::with_capacity(page.len() + data.len() + 300_000);
    for line in page.lines() {
        let t = line.trim();
        if let Some(name) = attr(t, "<link rel=\"stylesheet\" href=\"assets/") {
            out.push_str(&inline_css(name));
        } else if let Some(name) = attr(t, "<script src=\"assets/") {
            out.push_str(&inline_js(name));
        } else if t == "<!-- inline-data -->" {
            out.push_str(&format!(
                "<script id=\"inline-data\" type=\"application/json\">{data}</script>"
            ));
        } else {
            // The licence is not a file beside the report: link the vendored version's own.
            out.push_str(&line.replace(
                "href=\"assets/uPlot.LICENSE.txt\"",
                "href=\"https://github.com/leeoniya/uPlot/blob/1.6.32/LICENSE\"",
            ));
        }
        out.push('\n');
    }
    out
}

/// The asset name in `<tag prefix…NAME">`, for the lines of index.html that load one.
fn attr<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(prefix)?;
    Some(&rest[..rest.find('"')?])
}
