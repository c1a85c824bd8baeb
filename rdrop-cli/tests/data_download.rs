//! `rdrop data download` against a tiny HTTP server on 127.0.0.1 serving a fixture:
//! right checksum → saved; wrong checksum or a cut connection → clear error, no file left.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use md5::{Digest, Md5};

fn fixture() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../rdrop-data/tests/fixtures/cifar100/cifar-100-python.tar.gz"),
    )
    .unwrap()
}

/// Serve one request: the whole body, or (cut) the headers for all of it and only half.
fn serve(body: Vec<u8>, cut: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let n = if cut { body.len() / 2 } else { body.len() };
            let _ = s.write_all(&body[..n]);
            let _ = s.flush();
        }
    });
    format!("http://{addr}/cifar-100-python.tar.gz")
}

fn download(url: &str, dir: &Path, md5: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rdrop"))
        .args(["data", "download", "--to"])
        .arg(dir)
        .args(["--url", url, "--md5", md5])
        .output()
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn right_checksum_is_saved() {
    let body = fixture();
    let md5 = hex::encode(Md5::digest(&body));
    let dir = tempfile::tempdir().unwrap();
    let out = download(&serve(body.clone(), false), dir.path(), &md5);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = std::fs::read(dir.path().join("cifar-100-python.tar.gz")).unwrap();
    assert_eq!(saved, body);
    assert_eq!(entries(dir.path()), vec!["cifar-100-python.tar.gz"]);
}

#[test]
fn wrong_checksum_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = download(
        &serve(fixture(), false),
        dir.path(),
        "eb9058c3a382ffc7106e4002c42a8d85",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MD5 checksum mismatch"), "{err}");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn cut_connection_leaves_nothing() {
    let body = fixture();
    let md5 = hex::encode(Md5::digest(&body));
    let dir = tempfile::tempdir().unwrap();
    let out = download(&serve(body, true), dir.path(), &md5);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was saved"), "{err}");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}
