//! A real headless Chromium, driven through chromedriver's W3C WebDriver HTTP API (a few
//! JSON requests over a TCP socket: no client crate needed). Debian's `chromium` and
//! `chromium-driver` are installed on first use when missing (as `.ci/run` does).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Installs Chromium and chromedriver from Debian's packages unless they are there.
fn ensure_installed() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
            return;
        }
        let ok = Command::new("sh")
            .arg("-c")
            .arg("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && Path::new(CHROMEDRIVER).exists(),
            "the browser tests need Debian's chromium and chromium-driver; installing them failed (run as root with apt, or install them)"
        );
    });
}

/// One browser session; the browser and its driver end with it.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One HTTP/1.1 request to chromedriver: its JSON answer.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then what it says follows.
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the answer's head".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let have = raw.len() - head_end;
        let done = match length {
            Some(n) => have >= n,
            None if chunked => raw.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&raw[head_end..]).to_string();
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n.min(tail.len())]);
            rest = tail.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        body
    };
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if let Some(err) = v["value"]["error"].as_str() {
        return Err(format!("{err}: {}", v["value"]["message"]));
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub fn start() -> Browser {
        ensure_installed();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let give_up = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/status", None).map(|v| v["ready"] != true).unwrap_or(true) {
            assert!(Instant::now() < give_up, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap().keep();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1600,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let session = http(port, "POST", "/session", Some(&caps)).expect("a Chromium session");
        let session = session["sessionId"].as_str().expect("a session id").to_string();
        Browser { driver, port, session }
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        http(self.port, method, path, body)
    }

    fn cmd(&self, method: &str, what: &str, body: Value) -> Value {
        let path = format!("/session/{}{what}", self.session);
        let body = (method == "POST").then_some(&body);
        self.request(method, &path, body).unwrap_or_else(|e| panic!("webdriver {what}: {e}"))
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    /// The element `css` matches (it must exist).
    pub fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", json!({"using": "css selector", "value": css}));
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    /// Clicks the element `css` matches. A live page redraws (the plugin table does, every
    /// second): an element replaced between finding and clicking is found again.
    pub fn click(&self, css: &str) {
        for _ in 0..50 {
            let id = self.find(css);
            let path = format!("/session/{}/element/{id}/click", self.session);
            match self.request("POST", &path, Some(&json!({}))) {
                Ok(_) => return,
                Err(e) if e.starts_with("stale element reference") => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("webdriver click {css}: {e}"),
            }
        }
        panic!("webdriver click {css}: the element kept being replaced");
    }

    /// Types `text` into the element `css` matches (a path, for a file input).
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/value"), json!({"text": text}));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    /// Waits (at most 60 s) until `script` returns true in the page; panics naming `what`.
    pub fn wait(&self, what: &str, script: &str) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if self.js(script) == Value::Bool(true) {
                return;
            }
            let detail = self.js("return (document.getElementById('error')||{}).textContent || ''");
            assert!(
                Instant::now() < give_up,
                "gave up waiting in the browser for: {what} (page error: {detail})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the page at `to`.
    pub fn screenshot(&self, to: &Path) {
        let png = self.cmd("GET", "/screenshot", json!({}));
        std::fs::write(to, from_base64(png.as_str().expect("a base64 screenshot"))).unwrap();
    }
}

/// Standard base64 (what WebDriver sends a screenshot as), padding ignored.
fn from_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> =
        text.bytes().filter(|c| !matches!(c, b'=' | b'\n' | b'\r')).map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
