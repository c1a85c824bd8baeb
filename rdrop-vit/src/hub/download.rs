//! The HTTP side of a hub download, written with `ureq` rather than `hf-hub`.
//!
//! `hf-hub` 0.4.3 (the previous implementation) could not meet what rdrop needs: it keeps a
//! cut download as `blobs/<etag>.sync.part` and later appends to it without checking that the
//! server answered the range with 206 (a 200 appends the whole file again), never compares the
//! received length with the announced size nor the sha256 of LFS files with their etag,
//! ignores `HF_ENDPOINT` and `HF_TOKEN` unless built with `ApiBuilder::from_env`, which in turn
//! reads the token file next to the cache rather than `$HF_HOME/token`, and draws its own
//! progress bar even when stderr is not a terminal. The protocol is small, so it is here:
//!
//! 1. `GET <endpoint>/<repo>/resolve/<revision>/<file>` with `Range: bytes=0-0` and no
//!    automatic redirects. Relative redirects (renamed repos, `/api/resolve-cache/...`) are
//!    followed; an absolute one (an LFS file on a CDN) ends the walk. The answer gives the
//!    commit (`x-repo-commit`), the blob id (`x-linked-etag`, else `etag`) and the size
//!    (`x-linked-size`, else `Content-Range: bytes 0-0/SIZE`, else `Content-Length`).
//! 2. `GET` the final URL and stream the body into a temporary file next to the blob, checking
//!    its length and, when the etag is a sha256 (LFS files), its hash. Any failure removes the
//!    temporary file, so the cache never holds a partial blob.
//!
//! The token goes only to the endpoint's origin (scheme, host and port), never to a CDN.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{HubSettings, Progress};

/// Where a file of a repo revision is, as the hub describes it.
#[derive(Debug, Clone)]
pub(super) struct Remote {
    /// The commit the revision points to.
    pub commit: String,
    /// The blob id: the sha256 of LFS files, the git blob id otherwise.
    pub etag: String,
    /// Bytes in the file.
    pub size: u64,
    /// Where to GET the content.
    pub url: String,
}

/// Why a request failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The repo, revision or file does not exist (HTTP 404).
    NotFound(String),
    /// Anything else, explained.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::Other(m) => f.write_str(m),
        }
    }
}

/// Redirects followed while resolving a file (the hub uses one or two).
const MAX_REDIRECTS: usize = 10;

/// The two `ureq` agents of a download and what they need to know.
pub(super) struct Client {
    endpoint: String,
    token: Option<String>,
    /// For step 1: redirects are walked by hand.
    manual: ureq::Agent,
    /// For step 2: ordinary redirects, the token kept only on the same host.
    follow: ureq::Agent,
}

/// `scheme://host[:port]` of `url`.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find('/') {
        Some(i) => &url[..start + i],
        None => url,
    }
}

/// `location` (an HTTP `Location` header) relative to `base`.
fn join(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let path_end = base.find(['?', '#']).unwrap_or(base.len());
        let dir = base[..path_end]
            .rfind('/')
            .filter(|&i| i >= origin(base).len())
            .map_or(base, |i| &base[..i]);
        format!("{dir}/{location}")
    }
}

/// The etag without quotes and a weak-validator prefix (`huggingface_hub._normalize_etag`).
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// True for 64 lowercase hex digits: the etag of an LFS file is the sha256 of its content.
fn is_sha256(etag: &str) -> bool {
    etag.len() == 64
        && etag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Client {
    /// Agents for `settings` (its proxy, timeout and token).
    pub fn new(settings: &HubSettings) -> Result<Self, String> {
        let proxy = settings
            .proxy
            .as_deref()
            .map(|p| ureq::Proxy::new(p).map_err(|e| format!("invalid proxy `{p}`: {e}")))
            .transpose()?;
        let agent = |redirects: u32| {
            let mut b = ureq::AgentBuilder::new()
                .timeout_connect(settings.timeout)
                .timeout_read(settings.timeout)
                .user_agent(concat!("rdrop/", env!("CARGO_PKG_VERSION")))
                .redirects(redirects)
                .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost);
            if let Some(p) = &proxy {
                b = b.proxy(p.clone());
            }
            b.build()
        };
        Ok(Self {
            endpoint: settings.endpoint.clone(),
            token: settings.token.clone(),
            manual: agent(0),
            follow: agent(MAX_REDIRECTS as u32),
        })
    }

    /// A GET of `url`, with the token when `url` is on the endpoint's origin.
    fn get(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        // Sizes and hashes are of the raw bytes: no transparent compression.
        let req = agent.get(url).set("Accept-Encoding", "identity");
        match &self.token {
            Some(t) if origin(url) == origin(&self.endpoint) => {
                req.set("Authorization", &format!("Bearer {t}"))
            }
            _ => req,
        }
    }

    /// Sends `req`, turning error statuses and transport errors into explained failures.
    fn call(&self, req: ureq::Request, url: &str) -> Result<ureq::Response, Failure> {
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => Err(self.status_failure(code, &r, url)),
            Err(ureq::Error::Transport(t)) => Err(Failure::Other(format!(
                "cannot reach {url}: {t} (set HF_ENDPOINT for a mirror, HTTPS_PROXY for a proxy, or HF_HUB_OFFLINE=1 to use the cache only)"
            ))),
        }
    }

    fn status_failure(&self, code: u16, r: &ureq::Response, url: &str) -> Failure {
        let hub_says = r
            .header("x-error-message")
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        match code {
            401 | 403 if self.token.is_none() => Failure::Other(format!(
                "HTTP {code} from {url}{hub_says}: the repo is gated or private (or does not exist); \
                 accept its terms on the hub, then set HF_TOKEN or log in with `huggingface-cli login`"
            )),
            401 | 403 => Failure::Other(format!(
                "HTTP {code} from {url}{hub_says}: the token (HF_TOKEN or $HF_HOME/token) was refused \
                 or has no access to this repo"
            )),
            404 => Failure::NotFound(format!("HTTP 404 from {url}{hub_says}: not found")),
            _ => Failure::Other(format!("HTTP {code} from {url}{hub_says}")),
        }
    }

    /// Step 1: the commit, blob id, size and content URL of `url` (a `resolve` URL).
    pub fn metadata(&self, url: &str) -> Result<Remote, Failure> {
        let mut at = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let r = self.call(self.get(&self.manual, &at).set("Range", "bytes=0-0"), &at)?;
            let status = r.status();
            let location = r.header("location").map(str::to_string);
            if (300..400).contains(&status) {
                let loc = location.ok_or_else(|| {
                    Failure::Other(format!("HTTP {status} from {at} without a Location"))
                })?;
                let next = join(&at, &loc);
                if !loc.contains("://") && !loc.starts_with("//") {
                    at = next;
                    continue;
                }
                // An absolute redirect: the hub's headers are on this answer, the content there.
                return self.remote_from(&r, next);
            }
            return self.remote_from(&r, at);
        }
        Err(Failure::Other(format!(
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }

    fn remote_from(&self, r: &ureq::Response, content: String) -> Result<Remote, Failure> {
        let missing = |h: &str| {
            Failure::Other(format!(
                "{} answered without `{h}`: is HF_ENDPOINT ({}) a Hugging Face hub or mirror?",
                r.get_url(),
                self.endpoint
            ))
        };
        let commit = r
            .header("x-repo-commit")
            .ok_or_else(|| missing("x-repo-commit"))?
            .trim()
            .to_string();
        let etag = r
            .header("x-linked-etag")
            .or_else(|| r.header("etag"))
            .map(normalize_etag)
            .ok_or_else(|| missing("etag"))?;
        let content_range = || {
            r.header("content-range")
                .and_then(|c| c.rsplit('/').next())
                .and_then(|s| s.trim().parse().ok())
        };
        let size = r
            .header("x-linked-size")
            .and_then(|s| s.trim().parse().ok())
            .or_else(content_range)
            .or_else(|| {
                (r.status() == 200)
                    .then(|| r.header("content-length"))
                    .flatten()
                    .and_then(|s| s.trim().parse().ok())
            });
        let size = match size {
            Some(s) => s,
            None if (300..400).contains(&r.status()) => {
                // A CDN redirect without x-linked-size: ask the CDN.
                let c = self.call(
                    self.get(&self.follow, &content).set("Range", "bytes=0-0"),
                    &content,
                )?;
                c.header("content-range")
                    .and_then(|c| c.rsplit('/').next())
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| missing("Content-Range"))?
            }
            None => return Err(missing("Content-Range")),
        };
        Ok(Remote {
            commit,
            etag,
            size,
            url: content,
        })
    }

    /// Step 2: the content of `remote` into `dest` (created or truncated), checked against
    /// its size and, for LFS files, its sha256. On error `dest` may hold a prefix: the caller
    /// removes it.
    pub fn download(
        &self,
        remote: &Remote,
        dest: &Path,
        file: &str,
        progress: &mut dyn Progress,
    ) -> Result<(), Failure> {
        let r = self.call(self.get(&self.follow, &remote.url), &remote.url)?;
        if r.status() != 200 {
            return Err(Failure::Other(format!(
                "HTTP {} from {} where the whole file (200) was expected",
                r.status(),
                remote.url
            )));
        }
        let io = |e: std::io::Error| Failure::Other(format!("{}: {e}", dest.display()));
        let mut out = File::create(dest).map_err(io)?;
        let mut body = r.into_reader();
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        progress.start(file, remote.size);
        let cut = |done: u64, why: String| {
            Failure::Other(format!(
                "the download from {} stopped after {done} of {} bytes ({why}); nothing was kept, run again to restart it",
                remote.url, remote.size
            ))
        };
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(cut(done, e.to_string())),
            };
            done += n as u64;
            if done > remote.size {
                return Err(Failure::Other(format!(
                    "{} sent more than the {} bytes it announced",
                    remote.url, remote.size
                )));
            }
            out.write_all(&buf[..n]).map_err(io)?;
            sha.update(&buf[..n]);
            progress.advance(done);
        }
        if done != remote.size {
            return Err(cut(done, "the connection closed early".into()));
        }
        if is_sha256(&remote.etag) {
            let got = format!("{:x}", sha.finalize());
            if got != remote.etag {
                return Err(Failure::Other(format!(
                    "the file from {} is corrupt: its sha256 is {got}, the hub says {}; nothing was kept",
                    remote.url, remote.etag
                )));
            }
        }
        out.sync_all().map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(origin("http://127.0.0.1:8/a/b"), "http://127.0.0.1:8");
        assert_eq!(origin("https://hf.co"), "https://hf.co");
        let base = "https://hf.co/org/m/resolve/main/config.json";
        assert_eq!(join(base, "/api/x"), "https://hf.co/api/x");
        assert_eq!(
            join(base, "other.json"),
            "https://hf.co/org/m/resolve/main/other.json"
        );
        assert_eq!(join(base, "https://cdn.io/b"), "https://cdn.io/b");
        assert_eq!(join(base, "//cdn.io/b"), "https://cdn.io/b");
    }

    #[test]
    fn etags() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        let sha = "a".repeat(64);
        assert!(is_sha256(&sha));
        assert!(!is_sha256(&"a".repeat(40)));
        assert!(!is_sha256(&"g".repeat(64)));
    }
}
