//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `Command` for the built `fhirlift` binary.
pub fn fhirlift() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_fhirlift"))
}

/// Kills a child process when the test ends, however it ends.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A standalone `fhirlift sandbox` process on 127.0.0.1 with its store in a file, so that it
/// outlives the runs the tests kill.
pub struct StandaloneSandbox {
    _child: Reap,
    pub base_url: String,
    pub db: std::path::PathBuf,
}

impl StandaloneSandbox {
    pub fn start(dir: &Path, extra: &[&str]) -> StandaloneSandbox {
        let db = dir.join("sandbox.sqlite");
        let mut child = fhirlift()
            .args(["sandbox", "--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        let child = Reap(child);
        let mut lines = BufReader::new(stdout).lines();
        let base_url = loop {
            let line = lines
                .next()
                .expect("the sandbox prints its base URL")
                .expect("read the sandbox's output");
            if let Some(url) = line.trim().strip_prefix("base URL:") {
                break url.trim().to_string();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        StandaloneSandbox {
            _child: child,
            base_url,
            db,
        }
    }

    /// `GET /_sandbox/stats`, over a plain HTTP/1.0 request (no client library needed).
    pub fn stats(&self) -> serde_json::Value {
        use std::io::{Read, Write};
        let addr = self
            .base_url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the sandbox");
        write!(s, "GET /_sandbox/stats HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read stats");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        serde_json::from_str(body).expect("stats JSON")
    }

    /// Every stored resource of a type, from the store's dump.
    pub fn dump(&self, dir: &Path, resource_type: &str) -> Vec<serde_json::Value> {
        let out = dir.join(format!("dump-{}", rand::random::<u32>()));
        let o = fhirlift()
            .args(["sandbox", "--db"])
            .arg(&self.db)
            .arg("--dump")
            .arg(&out)
            .output()
            .expect("dump the sandbox");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join(format!("{resource_type}.ndjson")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("NDJSON line"))
            .collect()
    }
}
