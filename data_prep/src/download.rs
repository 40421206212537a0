//! Downloading TinyStories from the Hugging Face hub, resumably, and building from it.
//!
//! Files go to `DIR/raw/NAME.part` first; an interrupted download resumes from the `.part`
//! file's length with an HTTP `Range` request, and the file is renamed to `DIR/raw/NAME` when
//! complete. Network failures fail fast (5 s to resolve and connect, no retry loop) with a
//! message pointing at `data_prep build --input FILE`.
//!
//! The hub names each large file's SHA-256 (`X-Linked-Etag` on the redirect a `HEAD` request gets;
//! `X-Linked-Size` its length). When it does, the finished download must have that hash and size or it
//! is deleted and refused, and a `.part` file begun for another version of the file (its hash is kept
//! beside it in `NAME.part.sha256`) is started over rather than spliced onto the new one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::meta::Meta;
use crate::pipeline::{build, BuildOptions};
use crate::progress::Progress;

/// Base URL of the TinyStories files on the Hugging Face hub.
pub const DEFAULT_HF_BASE: &str =
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main";
/// Environment variable overriding [`DEFAULT_HF_BASE`] (mirrors, tests).
pub const HF_BASE_ENV: &str = "DATA_PREP_HF_BASE";
/// Time allowed to resolve the host name and to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of a response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Which TinyStories release to download.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// `TinyStoriesV2-GPT4-{train,valid}.txt` (GPT-4 generated only; cleaner).
    #[default]
    V2,
    /// `TinyStories-{train,valid}.txt` (the original release).
    V1,
}

impl Variant {
    /// File names of the (train, validation) text files.
    pub fn files(self) -> (&'static str, &'static str) {
        match self {
            Variant::V2 => (
                "TinyStoriesV2-GPT4-train.txt",
                "TinyStoriesV2-GPT4-valid.txt",
            ),
            Variant::V1 => ("TinyStories-train.txt", "TinyStories-valid.txt"),
        }
    }
}

/// Options of `data_prep tinystories`.
#[derive(Clone, Debug)]
pub struct TinyStoriesOptions {
    /// Build folder; raw files go to `out/raw/`.
    pub out: PathBuf,
    /// Release to download.
    pub variant: Variant,
    /// Base URL; `None` means `$DATA_PREP_HF_BASE` or [`DEFAULT_HF_BASE`].
    pub base_url: Option<String>,
    /// Build settings (inputs, val inputs and out are filled in).
    pub build: BuildOptions,
}

impl TinyStoriesOptions {
    /// Defaults: V2, the hub, default build settings.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        let out = out.into();
        TinyStoriesOptions {
            build: BuildOptions::new(Vec::new(), out.clone()),
            out,
            variant: Variant::V2,
            base_url: None,
        }
    }

    fn base(&self) -> String {
        self.base_url
            .clone()
            .or_else(|| std::env::var(HF_BASE_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_HF_BASE.to_owned())
    }
}

/// Downloads the train and validation files of a TinyStories release into `out/raw/` and
/// builds `out` from them, the official validation file being the val split.
pub fn tinystories(opts: &TinyStoriesOptions) -> Result<Meta> {
    let raw = opts.out.join("raw");
    std::fs::create_dir_all(&raw).ctx(|| format!("cannot create folder {}", raw.display()))?;
    let base = opts.base();
    let base = base.trim_end_matches('/');
    let (train_name, valid_name) = opts.variant.files();
    let agent = agent_with_proxy(!is_loopback(base));
    // One download at a time into this folder (its own lock file: `build` below takes `.build.lock`).
    let download_lock = crate::fsutil::lock_dir(&raw, ".download.lock")?;
    // The small validation file first: an unreachable hub is noticed at once.
    let valid = download(
        &agent,
        &format!("{base}/{valid_name}"),
        &raw.join(valid_name),
        opts.build.progress,
    )?;
    let train = download(
        &agent,
        &format!("{base}/{train_name}"),
        &raw.join(train_name),
        opts.build.progress,
    )?;
    drop(download_lock);
    let build_opts = BuildOptions {
        inputs: vec![train],
        val_inputs: vec![valid],
        out: opts.out.clone(),
        ..opts.build.clone()
    };
    build(&build_opts)
}

/// Resolves host names on a helper thread so that a stuck DNS lookup cannot outlast
/// [`CONNECT_TIMEOUT`].
struct TimeoutResolver;

impl ureq::Resolver for TimeoutResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let (tx, rx) = mpsc::channel();
        let host = netloc.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(host.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        });
        rx.recv_timeout(CONNECT_TIMEOUT).unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "name lookup of {netloc} timed out after {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            ))
        })
    }
}

/// An HTTP agent with the fail-fast timeouts described in the module docs.
pub fn agent() -> ureq::Agent {
    agent_with_proxy(true)
}

/// [`agent`], optionally ignoring `HTTP(S)_PROXY` / `ALL_PROXY` from the environment (ureq 2
/// does not read `NO_PROXY`, so loopback URLs use an agent without proxy).
fn agent_with_proxy(proxy_from_env: bool) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .resolver(TimeoutResolver)
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .timeout_write(READ_TIMEOUT)
        .try_proxy_from_env(proxy_from_env)
        .user_agent(concat!("data_prep/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Whether a URL points at this machine (never sent through a proxy).
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    ["localhost", "127.", "[::1]"]
        .iter()
        .any(|p| rest.starts_with(p))
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// What the server says of a file before it is fetched (each `None` when it does not say).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Remote {
    /// SHA-256 of the content, lowercase hex.
    sha256: Option<String>,
    /// Length in bytes.
    size: Option<u64>,
}

/// Asks for `url`'s hash and size with a `HEAD` request that does not follow the hub's redirect to its
/// storage (the redirect carries them). Best effort: any failure means "not said", and the download
/// itself reports network errors.
fn probe(url: &str) -> Remote {
    let agent = ureq::AgentBuilder::new()
        .resolver(TimeoutResolver)
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout(READ_TIMEOUT)
        .try_proxy_from_env(!is_loopback(url))
        .redirects(0)
        .user_agent(concat!("data_prep/", env!("CARGO_PKG_VERSION")))
        .build();
    let resp = match agent.head(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(_)) => return Remote::default(),
    };
    let sha256 = resp
        .header("X-Linked-Etag")
        .map(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_ascii_lowercase()
        })
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
    let size = resp
        .header("X-Linked-Size")
        .and_then(|v| v.trim().parse().ok());
    Remote { sha256, size }
}

fn sha_path(part: &Path) -> PathBuf {
    let mut name = part.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    part.with_file_name(name)
}

/// Checks a finished `.part` file against what the server said; a mismatch deletes it.
fn check_complete(part: &Path, remote: &Remote, fail: impl Fn(String) -> Error) -> Result<()> {
    let bytes = std::fs::metadata(part)
        .ctx(|| format!("cannot read {}", part.display()))?
        .len();
    let mismatch = if remote.size.is_some_and(|want| want != bytes) {
        Some(format!(
            "got {bytes} bytes, the server announced {}",
            remote.size.unwrap_or_default()
        ))
    } else if let Some(want) = &remote.sha256 {
        tracing::info!("checking the sha256 of {}", part.display());
        let got = crate::fsutil::sha256_file(part)?;
        (got != *want).then(|| format!("its sha256 is {got}, the server announced {want}"))
    } else {
        None
    };
    if let Some(reason) = mismatch {
        let _ = std::fs::remove_file(part);
        let _ = std::fs::remove_file(sha_path(part));
        return Err(fail(format!(
            "the download is corrupt ({reason}); it was deleted: rerun the same command to fetch it again"
        )));
    }
    Ok(())
}

/// Downloads `url` to `dest` unless `dest` already exists, resuming from `dest.part`; checks the result
/// against the hash and size the server announces (see the module docs). Returns `dest`.
pub fn download(agent: &ureq::Agent, url: &str, dest: &Path, progress: bool) -> Result<PathBuf> {
    if dest.exists() {
        tracing::info!("{} already downloaded", dest.display());
        return Ok(dest.to_path_buf());
    }
    let fail = |reason: String| Error::Download {
        url: url.to_owned(),
        reason,
    };
    let part = part_path(dest);
    let mut remote = probe(url);
    let sha_file = sha_path(&part);
    if part.exists() {
        // A .part begun for another version of the file must not be continued with this one's bytes.
        let began_for = std::fs::read_to_string(&sha_file)
            .ok()
            .map(|s| s.trim().to_owned());
        if remote.sha256.is_none() {
            // The server said nothing this time: the finished file must still be the version begun.
            remote.sha256 = began_for.clone();
        }
        if let (Some(old), Some(new)) = (&began_for, &remote.sha256) {
            if old != new {
                tracing::info!(
                    "{} is part of another version of the file; starting over",
                    part.display()
                );
                std::fs::remove_file(&part).ctx(|| format!("cannot remove {}", part.display()))?;
            }
        }
    }
    if let Some(sha) = &remote.sha256 {
        std::fs::write(&sha_file, sha).ctx(|| format!("cannot write {}", sha_file.display()))?;
    }
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url).set("Accept-Encoding", "identity");
    if have > 0 {
        tracing::info!("resuming {} from byte {have}", dest.display());
        req = req.set("Range", &format!("bytes={have}-"));
    } else {
        tracing::info!("downloading {url}");
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            // Nothing left to fetch: the .part file should be whole.
            check_complete(&part, &remote, fail)?;
            crate::fsutil::rename_into_place(&part, dest)?;
            let _ = std::fs::remove_file(&sha_file);
            return Ok(dest.to_path_buf());
        }
        Err(ureq::Error::Status(code, r)) => {
            return Err(fail(format!("HTTP {code} {}", r.status_text())))
        }
        Err(ureq::Error::Transport(t)) => return Err(fail(transport_reason(&t))),
    };
    let resumed = resp.status() == 206;
    let start = if resumed { have } else { 0 };
    let remaining: Option<u64> = resp
        .header("Content-Length")
        .and_then(|v| v.trim().parse().ok());
    let total = remaining.map(|r| r + start);
    let mut file = if resumed {
        OpenOptions::new().append(true).open(&part)
    } else {
        File::create(&part)
    }
    .ctx(|| format!("cannot write {}", part.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar = Progress::new(progress, &name, total.unwrap_or(0));
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(fail(format!(
                    "connection lost after {done} bytes ({e}); rerun the same command to resume"
                )))
            }
        };
        file.write_all(&buf[..n])
            .ctx(|| format!("cannot write {}", part.display()))?;
        done += n as u64;
        bar.set(done);
    }
    bar.finish();
    if let Some(total) = total {
        if done != total {
            return Err(fail(format!(
                "got {done} of {total} bytes; rerun the same command to resume"
            )));
        }
    }
    file.sync_all()
        .ctx(|| format!("cannot fsync {}", part.display()))?;
    drop(file);
    check_complete(&part, &remote, fail)?;
    crate::fsutil::rename_into_place(&part, dest)?;
    let _ = std::fs::remove_file(&sha_file);
    Ok(dest.to_path_buf())
}

fn transport_reason(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s.push_str(": ");
        s.push_str(m);
    }
    if let Some(src) = std::error::Error::source(t) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_host_fails_fast_with_hint() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let err = download(
            &agent_with_proxy(false),
            "http://127.0.0.1:9/x.txt",
            &dir.path().join("x.txt"),
            false,
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        let msg = err.to_string();
        assert!(msg.contains("data_prep build --input"), "{msg}");
        assert!(!dir.path().join("x.txt").exists());
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:9"));
        assert!(is_loopback("http://localhost:8080/x"));
        assert!(!is_loopback(DEFAULT_HF_BASE));
    }

    #[test]
    fn variant_file_names() {
        assert_eq!(Variant::V2.files().1, "TinyStoriesV2-GPT4-valid.txt");
        assert_eq!(Variant::V1.files().0, "TinyStories-train.txt");
    }
}
