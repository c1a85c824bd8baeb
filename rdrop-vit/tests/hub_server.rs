//! Hub downloads against a local server on 127.0.0.1 that answers as huggingface.co does,
//! serving the real fixture `tests/fixtures/hf` (`model.safetensors` + `config.json`).
//!
//! Settings come from [`HubSettings::from_vars`] with per-test variables (`HF_ENDPOINT` at the
//! server, `HF_HUB_CACHE` in a temporary folder, ...), never from the process environment, so
//! the tests run in parallel. The server counts requests: "served from the cache" is checked
//! as "no request".

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdrop_vit::hub::{self, HubSettings, Progress};
use rdrop_vit::{load_model, LoadOptions};
use sha2::{Digest, Sha256};

const REPO: &str = "org/tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_secret";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name),
    )
    .unwrap()
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

/// How the fake hub behaves; changed by the test between runs.
#[derive(Debug, Default)]
struct Behaviour {
    /// A token the repo requires (a gated repo), else public.
    token: Option<String>,
    /// `resolve` answers 307 with a relative Location first.
    relative_redirect: bool,
    /// LFS files answer 302 to an absolute `/cdn/<sha256>` URL, as the hub does.
    cdn_redirect: bool,
    /// The next this-many full downloads close the connection halfway.
    cut: usize,
    /// The next this-many full downloads flip a byte.
    corrupt: usize,
}

struct FakeHub {
    addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A served file: content and etag (`x-linked-etag` = sha256 for LFS files).
struct Served {
    bytes: Vec<u8>,
    etag: String,
    lfs: bool,
}

fn files() -> HashMap<String, Served> {
    let model = fixture("model.safetensors");
    let sha = format!("{:x}", Sha256::digest(&model));
    let config = fixture("config.json");
    // A git blob id stands in for the config's etag (not a sha256, so not hash-checked).
    let git = format!("{:x}", Sha256::digest(&config))[..40].to_string();
    HashMap::from([
        (
            "model.safetensors".to_string(),
            Served {
                bytes: model,
                etag: sha,
                lfs: true,
            },
        ),
        (
            "config.json".to_string(),
            Served {
                bytes: config,
                etag: git,
                lfs: false,
            },
        ),
    ])
}

impl FakeHub {
    /// At most 200 requests and 60 s, so the thread always ends.
    fn start(b: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let behaviour = Arc::new(Mutex::new(b));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b2, s2, st2) = (behaviour.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let files = files();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut served = 0;
            while !st2.load(Ordering::SeqCst) && Instant::now() < deadline && served < 200 {
                match listener.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        let _ = serve(stream, addr, &files, &b2, &s2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            behaviour,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Answers one request (one connection: `Connection: close`), as the hub would.
fn serve(
    mut s: TcpStream,
    addr: SocketAddr,
    files: &HashMap<String, Served>,
    behaviour: &Mutex<Behaviour>,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Seen {
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    seen.lock().unwrap().push(req.clone());
    let mut b = behaviour.lock().unwrap();
    let not_found = |s: &mut TcpStream, code: &str| {
        respond(
            s,
            "404 Not Found",
            &[("X-Error-Code", code.to_string())],
            b"not found",
        )
    };

    // /cdn/<sha256>: the content of an LFS file, no hub headers, no auth needed.
    let (file, commit_path) = if let Some(sha) = path.strip_prefix("/cdn/") {
        match files.iter().find(|(_, f)| f.etag == sha) {
            Some((name, _)) => (name.clone(), false),
            None => return not_found(&mut s, "EntryNotFound"),
        }
    } else if let Some(rest) = path.strip_prefix("/api/resolve-cache/models/org/tiny/") {
        // The target of the relative redirect: /api/resolve-cache/models/<repo>/<commit>/<file>.
        match rest.split_once('/') {
            Some((c, f)) if c == COMMIT => (f.to_string(), true),
            _ => return not_found(&mut s, "RevisionNotFound"),
        }
    } else if let Some(rest) = path.strip_prefix("/org/tiny/resolve/") {
        let Some((rev, f)) = rest.split_once('/') else {
            return not_found(&mut s, "EntryNotFound");
        };
        if !matches!(rev, "main" | "v1.0" | COMMIT) {
            return not_found(&mut s, "RevisionNotFound");
        }
        if let Some(t) = &b.token {
            if req.authorization.as_deref() != Some(&format!("Bearer {t}")) {
                return respond(
                    &mut s,
                    "401 Unauthorized",
                    &[
                        ("X-Error-Code", "GatedRepo".into()),
                        (
                            "X-Error-Message",
                            "Access to model org/tiny is restricted.".into(),
                        ),
                    ],
                    b"",
                );
            }
        }
        if !files.contains_key(f) {
            return not_found(&mut s, "EntryNotFound");
        }
        if b.relative_redirect {
            return respond(
                &mut s,
                "307 Temporary Redirect",
                &[(
                    "Location",
                    format!("/api/resolve-cache/models/org/tiny/{COMMIT}/{f}"),
                )],
                b"",
            );
        }
        (f.to_string(), true)
    } else {
        return not_found(&mut s, "RepoNotFound");
    };
    let Some(served) = files.get(&file) else {
        return not_found(&mut s, "EntryNotFound");
    };
    let size = served.bytes.len();
    let mut hub_headers = vec![("Accept-Ranges", "bytes".to_string())];
    if commit_path {
        hub_headers.push(("x-repo-commit", COMMIT.to_string()));
        if served.lfs {
            hub_headers.push(("x-linked-etag", format!("\"{}\"", served.etag)));
            hub_headers.push(("x-linked-size", size.to_string()));
            hub_headers.push(("ETag", "\"not-the-sha\"".into()));
        } else {
            hub_headers.push(("ETag", format!("W/\"{}\"", served.etag)));
        }
        if served.lfs && b.cdn_redirect {
            hub_headers.push(("Location", format!("http://{addr}/cdn/{}", served.etag)));
            return respond(&mut s, "302 Found", &hub_headers, b"");
        }
    }
    match req.range.as_deref() {
        Some("bytes=0-0") => {
            hub_headers.push(("Content-Range", format!("bytes 0-0/{size}")));
            respond(
                &mut s,
                "206 Partial Content",
                &hub_headers,
                &served.bytes[..1],
            )
        }
        Some(other) => respond(
            &mut s,
            "416 Range Not Satisfiable",
            &[("X-Unexpected-Range", other.to_string())],
            b"",
        ),
        None if b.cut > 0 => {
            b.cut -= 1;
            hub_headers.push(("Content-Length", size.to_string()));
            respond(&mut s, "200 OK", &hub_headers, &served.bytes[..size / 2])?;
            s.shutdown(std::net::Shutdown::Both)
        }
        None if b.corrupt > 0 => {
            b.corrupt -= 1;
            let mut bytes = served.bytes.clone();
            bytes[size / 2] ^= 0xff;
            respond(&mut s, "200 OK", &hub_headers, &bytes)
        }
        None => respond(&mut s, "200 OK", &hub_headers, &served.bytes),
    }
}

fn settings(vars: &[(&str, &str)]) -> HubSettings {
    let m: HashMap<String, OsString> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    HubSettings::from_vars(|k| m.get(k).cloned())
}

/// Every file under `dir`, relative (symlinks listed, not followed).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[derive(Default)]
struct Recorder {
    events: Vec<(String, u64, u64)>,
    finished: usize,
}

impl Progress for Recorder {
    fn start(&mut self, file: &str, total: u64) {
        self.events.push((file.to_string(), total, 0));
    }
    fn advance(&mut self, done: u64) {
        if let Some(e) = self.events.last_mut() {
            e.2 = done;
        }
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
}

fn fetch(s: &HubSettings, spec: &str, file: &str) -> rdrop_vit::Result<Option<PathBuf>> {
    hub::fetch(s, spec, file, false, &mut ())
}

#[test]
fn first_download_then_the_cache_without_a_request() {
    let server = FakeHub::start(Behaviour {
        relative_redirect: true,
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let cache_s = cache.path().to_str().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache_s),
    ]);

    let mut rec = Recorder::default();
    let model = hub::fetch(&s, REPO, "model.safetensors", false, &mut rec)
        .unwrap()
        .unwrap();
    let config = fetch(&s, REPO, "config.json").unwrap().unwrap();
    assert_eq!(std::fs::read(&model).unwrap(), fixture("model.safetensors"));
    assert_eq!(std::fs::read(&config).unwrap(), fixture("config.json"));
    let size = fixture("model.safetensors").len() as u64;
    assert_eq!(
        rec.events,
        vec![("model.safetensors".to_string(), size, size)]
    );
    assert_eq!(rec.finished, 1);

    // The relative redirect was followed, with a Range probe before each full GET.
    let seen = server.seen();
    assert!(seen[0]
        .path
        .starts_with("/org/tiny/resolve/main/model.safetensors"));
    assert_eq!(seen[0].range.as_deref(), Some("bytes=0-0"));
    assert!(seen
        .iter()
        .any(|r| r.path.starts_with("/api/resolve-cache/models/org/tiny/") && r.range.is_none()));
    assert!(seen.iter().all(|r| r.authorization.is_none()));

    // huggingface_hub's layout: blobs by etag, snapshot symlinks, refs/main = commit.
    let sha = format!("{:x}", Sha256::digest(fixture("model.safetensors")));
    let folder = cache.path().join("models--org--tiny");
    let config_etag = format!("{:x}", Sha256::digest(fixture("config.json")))[..40].to_string();
    let mut expected = vec![
        format!("blobs/{sha}"),
        format!("blobs/{config_etag}"),
        "refs/main".to_string(),
        format!("snapshots/{COMMIT}/config.json"),
        format!("snapshots/{COMMIT}/model.safetensors"),
    ];
    expected.sort();
    assert_eq!(tree(&folder), expected);
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/main")).unwrap(),
        COMMIT
    );
    #[cfg(unix)]
    assert_eq!(
        std::fs::read_link(&model).unwrap(),
        Path::new("../../blobs").join(&sha)
    );

    // Second run: from the cache, no request; also through load_model and by commit.
    let before = server.requests();
    let again = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache_s),
    ]);
    assert_eq!(
        fetch(&again, REPO, "model.safetensors").unwrap().unwrap(),
        model
    );
    assert_eq!(fetch(&again, REPO, "config.json").unwrap().unwrap(), config);
    let pinned = format!("{REPO}@{COMMIT}");
    assert_eq!(
        fetch(&again, &pinned, "config.json").unwrap().unwrap(),
        config
    );
    let loaded = load_model(
        REPO,
        &LoadOptions {
            hub_cache: Some(cache.path().to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loaded.report.path, model);
    assert_eq!(server.requests(), before, "{:?}", server.seen());
}

#[test]
fn lfs_behind_a_cdn_redirect_and_a_pinned_tag() {
    let server = FakeHub::start(Behaviour {
        cdn_redirect: true,
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
    ]);
    let model = fetch(&s, "org/tiny@v1.0", "model.safetensors")
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(&model).unwrap(), fixture("model.safetensors"));
    let seen = server.seen();
    assert!(seen[0].path.starts_with("/org/tiny/resolve/v1.0/"));
    assert!(seen
        .iter()
        .any(|r| r.path.starts_with("/cdn/") && r.range.is_none()));
    let folder = cache.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/v1.0")).unwrap(),
        COMMIT
    );
    assert!(!folder.join("refs/main").exists());
    // The tag and the commit now resolve without a request; `main` was never fetched.
    let n = server.requests();
    assert_eq!(
        fetch(&s, &format!("{REPO}@{COMMIT}"), "model.safetensors")
            .unwrap()
            .unwrap(),
        model
    );
    assert!(fetch(&s, "org/tiny@v1.0", "model.safetensors").is_ok());
    assert_eq!(server.requests(), n);
}

#[test]
fn a_gated_repo_needs_a_token() {
    let server = FakeHub::start(Behaviour {
        token: Some(TOKEN.into()),
        ..Default::default()
    });
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let ep = server.endpoint();

    // No token: 401, explained, nothing cached.
    let s = settings(&[("HF_ENDPOINT", &ep), ("HF_HOME", home_s)]);
    assert_eq!(s.cache, home.path().join("hub"));
    let e = fetch(&s, REPO, "model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    assert!(
        e.contains("model.safetensors") && e.contains("restricted"),
        "{e}"
    );
    assert!(tree(&s.cache).is_empty(), "{:?}", tree(&s.cache));

    // A wrong token: refused, said so.
    let s = settings(&[
        ("HF_ENDPOINT", &ep),
        ("HF_HOME", home_s),
        ("HF_TOKEN", "hf_wrong"),
    ]);
    let e = fetch(&s, REPO, "config.json").unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("refused"), "{e}");

    // HF_TOKEN: 200, sent as a Bearer token.
    let s = settings(&[
        ("HF_ENDPOINT", &ep),
        ("HF_HOME", home_s),
        ("HF_TOKEN", TOKEN),
    ]);
    let p = fetch(&s, REPO, "config.json").unwrap().unwrap();
    assert_eq!(std::fs::read(p).unwrap(), fixture("config.json"));
    let last = server.seen().last().unwrap().clone();
    assert_eq!(last.authorization, Some(format!("Bearer {TOKEN}")));

    // The token file under HF_HOME (what `huggingface-cli login` writes).
    std::fs::write(home.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let s = settings(&[("HF_ENDPOINT", &ep), ("HF_HOME", home_s)]);
    let p = fetch(&s, REPO, "model.safetensors").unwrap().unwrap();
    assert_eq!(std::fs::read(p).unwrap(), fixture("model.safetensors"));
}

#[test]
fn a_missing_file_is_a_clear_404() {
    let server = FakeHub::start(Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
    ]);
    let e = fetch(&s, REPO, "pytorch_model.bin")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pytorch_model.bin") && e.contains("404"), "{e}");
    assert!(e.contains("org/tiny"), "{e}");
    // Optional files that do not exist are `None`.
    assert!(
        hub::fetch(&s, REPO, "preprocessor_config.json", true, &mut ())
            .unwrap()
            .is_none()
    );
    // An unknown revision too is a 404.
    let e = fetch(&s, "org/tiny@nope", "config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("404"), "{e}");
    assert!(tree(cache.path()).is_empty(), "{:?}", tree(cache.path()));
}

#[test]
fn a_cut_or_corrupt_download_leaves_nothing_and_the_next_run_succeeds() {
    let server = FakeHub::start(Behaviour {
        cut: 1,
        ..Default::default()
    });
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
    ]);
    let mut rec = Recorder::default();
    let e = hub::fetch(&s, REPO, "model.safetensors", false, &mut rec)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("stopped after"),
        "{e}"
    );
    assert_eq!(rec.finished, 1, "the progress display is closed on failure");
    let folder = cache.path().join("models--org--tiny");
    assert!(tree(&folder).is_empty(), "{:?}", tree(&folder));

    // A full-length body with a flipped byte fails the sha256 check.
    server.set(|b| b.corrupt = 1);
    let e = fetch(&s, REPO, "model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt") && e.contains("sha256"), "{e}");
    assert!(tree(&folder).is_empty(), "{:?}", tree(&folder));

    // Then a clean download.
    let p = fetch(&s, REPO, "model.safetensors").unwrap().unwrap();
    assert_eq!(std::fs::read(p).unwrap(), fixture("model.safetensors"));
    assert!(tree(&folder).iter().all(|f| !f.contains("incomplete")));
}

#[test]
fn offline_with_an_empty_cache_names_the_file_and_sends_nothing() {
    let server = FakeHub::start(Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ]);
    let e = fetch(&s, REPO, "model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    assert!(e.contains("models--org--tiny"), "{e}");
    assert!(hub::fetch(&s, REPO, "config.json", true, &mut ())
        .unwrap()
        .is_none());
    assert_eq!(server.requests(), 0);
}

#[test]
fn unusable_specs_are_refused_before_any_request() {
    let server = FakeHub::start(Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&[
        ("HF_ENDPOINT", &server.endpoint()),
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
    ]);
    for (spec, file) in [
        ("org/tiny@../../x", "config.json"),
        ("org/tiny", "../config.json"),
        ("org/tiny@", "config.json"),
        ("tiny", "config.json"),
    ] {
        assert!(fetch(&s, spec, file).is_err(), "{spec} {file}");
    }
    assert_eq!(server.requests(), 0);
}
