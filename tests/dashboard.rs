//! The lab page in a real browser: a gateway with the fake NVML (two A100s) on a private
//! engine with the stub NVIDIA hook (as in `tests/gpu.rs`), four users logged in (two
//! holding the GPUs, one waiting for one, one without GPUs), and Debian's `chromium`
//! headless, driven through the DevTools protocol (one WebSocket, one page that is never
//! reloaded): the GPU table names the holders, the queue shows the waiter, a logout and a
//! `labgate stop` show up within seconds, the usage chart has one bar a user with usage.
//! Screenshots (light, dark, phone) are saved in `target/dashboard-screenshots/` for people
//! to look at. Over plain HTTP, the dashboard port refuses anything but GET and HEAD, serves
//! nothing but the page, and shows no key, fingerprint, address or path.
//!
//! Without root, `dockerd` or `chromium` (`scripts/prereqs.sh` installs it) the test is
//! skipped, saying why (a failure under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::dockerd::{DockerdOptions, PrivateDockerd};
use common::{Gateway, eventually, stderr_of};
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;

const GPU0: &str = "GPU-6b1e0d2c-0000-4000-8000-0000000000d0";
const GPU1: &str = "GPU-6b1e0d2c-0000-4000-8000-0000000000d1";

/// The fake as `DIR/libnvidia-ml.so.1` describing two A100s, one busy, one idle.
fn install_fake(dir: &Path) -> PathBuf {
    common::nvml::install_fake(
        dir,
        &format!(
            "{GPU0},NVIDIA A100-SXM4-80GB,81920,util=72,used=30720,mig=off,procs=4242:30720\n\
             {GPU1},NVIDIA A100-SXM4-80GB,81920,util=0,used=512,mig=off\n"
        ),
    )
}

/// `ssh USER@gw CMD` as user `i`, in the background, its output drained; killed on drop.
struct Background(Child);

impl Background {
    fn start(gw: &Gateway, i: usize, cmd: &str) -> Background {
        let child = gw
            .ssh(i)
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Background(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `curl` against the dashboard port: (status, headers, body).
fn curl(addr: std::net::SocketAddr, args: &[&str], path: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "-", "--max-time", "10"])
        .args(args)
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn api(addr: std::net::SocketAddr) -> Value {
    let (status, _, body) = curl(addr, &[], "/api/lab");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
    log: Arc<Mutex<String>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Chromium showing `url`, or `None` when there is no chromium.
    fn open(url: &str) -> Option<Browser> {
        let profile = tempfile::tempdir().unwrap();
        let mut child = match Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => return None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let into = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(ws) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(ws.to_owned());
                }
                into.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let browser_ws = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("chromium did not start: {}", log.lock().unwrap()));
        let host = browser_ws
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        // The page target: the one tab, showing `url`.
        let mut page_ws = None;
        for _ in 0..100 {
            let out = Command::new("curl")
                .args(["-s", &format!("http://{host}/json/list")])
                .output()
                .unwrap();
            let targets: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            page_ws = targets.as_array().and_then(|t| {
                t.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_owned)
            });
            if page_ws.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (ws, _) = tungstenite::connect(page_ws.expect("chromium has no page target")).unwrap();
        Some(Browser {
            child,
            ws,
            next: 0,
            log,
            _profile: profile,
        })
    }

    /// Calls `method` and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == id {
                assert!(
                    v.get("error").is_none(),
                    "{method}: {v}\n{}",
                    self.log.lock().unwrap()
                );
                return v["result"].clone();
            }
        }
    }

    /// The value of the JavaScript `expr` in the page.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the page; how long that took.
    fn wait_for(&mut self, expr: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        while self.eval(expr) != Value::Bool(true) {
            assert!(
                start.elapsed() < timeout,
                "page never showed `{expr}` within {timeout:?}; it shows:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        start.elapsed()
    }

    /// Saves the whole page as `name`.png, `width` wide, light or dark.
    fn screenshot(&mut self, name: &str, width: u32, mobile: bool, dark: bool) -> PathBuf {
        let scheme = if dark { "dark" } else { "light" };
        self.call(
            "Emulation.setEmulatedMedia",
            json!({ "features": [{ "name": "prefers-color-scheme", "value": scheme }] }),
        );
        let metrics = |height: u64| json!({ "width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile });
        self.call("Emulation.setDeviceMetricsOverride", metrics(800));
        std::thread::sleep(Duration::from_millis(300));
        let height = self
            .eval("document.documentElement.scrollHeight")
            .as_u64()
            .unwrap_or(800);
        self.call("Emulation.setDeviceMetricsOverride", metrics(height));
        std::thread::sleep(Duration::from_millis(300));
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JavaScript test: `sel`'s text contains `text`.
fn shows(sel: &str, text: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll({sel:?})).some(e => e.textContent.includes({text:?}))"
    )
}

#[test]
fn the_lab_page_shows_holders_the_queue_and_usage_and_follows_a_logout_live() {
    let engine = match PrivateDockerd::start(DockerdOptions { nvidia_hook: true }) {
        Ok(d) => d,
        Err(why) => {
            common::skip_unless(false, &format!("the lab page test: {why}"));
            return;
        }
    };
    if Command::new("chromium").arg("--version").output().is_err() {
        common::skip_unless(false, "the lab page test: no chromium (scripts/prereqs.sh)");
        return;
    }
    let nvml = tempfile::tempdir().unwrap();
    let lib = install_fake(nvml.path());
    let gw = Gateway::builder()
        .users(4)
        .docker(&engine.socket_line())
        .admin("dashboard_listen = \"127.0.0.1:0\"\n")
        .defaults("gpus = 1")
        .tail(&format!(
            "[users.{{u3}}]\ngpus = 0\ncpus = 1.5\nmemory = \"512M\"\n\n[gpu]\nnvml_library = \"{}\"\n",
            lib.display()
        ))
        .start();
    let dash = gw
        .dashboard_addr
        .expect("the gateway serves dashboard_listen");
    let u = gw.users.clone();

    // Two holders, a user without GPUs, then one who waits.
    let mut holders = vec![Background::start(&gw, 0, "sleep 600")];
    assert!(
        eventually(Duration::from_secs(30), || api(dash)["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["holders"][0]["user"] == u[0].as_str())),
        "{}\n{}",
        api(dash),
        gw.log()
    );
    holders.push(Background::start(&gw, 1, "sleep 600"));
    let _cpu_only = Background::start(&gw, 3, "sleep 600");
    assert!(eventually(Duration::from_secs(30), || {
        let lab = api(dash);
        lab["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| !g["holders"].as_array().unwrap().is_empty())
            && lab["containers"].as_array().unwrap().len() == 3
    }));
    let _waiter = Background::start(&gw, 2, "sleep 600");
    assert!(
        eventually(Duration::from_secs(30), || api(dash)["queue"][0]["user"]
            == u[2].as_str()),
        "{}",
        api(dash)
    );

    // The dashboard port only reads, and only the page.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/", "/api/lab", "/users/x/stop"] {
            let (status, head, _) = curl(dash, &["-X", method], path);
            assert_eq!(status, 405, "{method} {path}: {head}");
            assert!(
                head.to_ascii_lowercase().contains("allow: get, head"),
                "{head}"
            );
        }
    }
    let head = Command::new("curl")
        .args([
            "-s",
            "-I",
            "--max-time",
            "10",
            &format!("http://{dash}/api/lab"),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout);
    assert!(head.starts_with("HTTP/1.1 200"), "HEAD: {head}");
    for path in ["/metrics", "/status", "/gpus", "/healthz", "/assets/nope"] {
        assert_eq!(curl(dash, &[], path).0, 404, "{path}");
    }
    let (_, head, page) = curl(dash, &[], "/");
    assert!(head.contains("content-security-policy"), "{head}");
    let (_, _, json) = curl(dash, &[], "/api/lab");
    let keys: Vec<String> = gw
        .keys
        .iter()
        .map(|k| k.public.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    let dir = gw.dir.path().display().to_string();
    for text in [&page, &json] {
        for secret in keys.iter().map(String::as_str).chain([
            "SHA256:",
            "127.0.0.1",
            dir.as_str(),
            common::IMAGE,
            "labgate-t",
        ]) {
            assert!(
                !text.contains(secret),
                "{secret:?} on the dashboard:\n{text}"
            );
        }
    }

    // The browser: holders and the waiter.
    let Some(mut b) = Browser::open(&format!("http://{dash}/")) else {
        common::skip_unless(false, "the lab page test: chromium would not start");
        return;
    };
    b.wait_for(
        "document.readyState === 'complete'",
        Duration::from_secs(20),
    );
    b.wait_for(
        "document.querySelectorAll('#gpus tbody tr').length === 2",
        Duration::from_secs(10),
    );
    b.wait_for(&shows("#gpus td.holder", &u[0]), Duration::from_secs(5));
    b.wait_for(&shows("#gpus td.holder", &u[1]), Duration::from_secs(5));
    b.wait_for(&shows("#queue tbody th", &u[2]), Duration::from_secs(5));
    b.wait_for(
        &shows("#containers tbody th", &u[3]),
        Duration::from_secs(5),
    );
    b.eval("window.__sameDocument = 'yes'");
    b.screenshot("lab-light", 1280, false, false);
    b.screenshot("lab-dark", 1280, false, true);
    b.screenshot("lab-phone-light", 390, true, false);
    b.screenshot("lab-phone-dark", 390, true, true);
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    );

    // u3 logs out: their container's connection count drops on the page, without a reload.
    let row = |user: &str, cell: usize| {
        format!(
            "Array.from(document.querySelectorAll('#containers tbody tr')).some(r => \
             r.querySelector('th').textContent === {user:?} && \
             r.querySelectorAll('td')[{cell}].textContent === '0')"
        )
    };
    b.wait_for(&format!("!({})", row(&u[3], 6)), Duration::from_secs(5));
    drop(_cpu_only);
    let took = b.wait_for(&row(&u[3], 6), Duration::from_secs(8));
    eprintln!("the page showed the logout after {took:?}");
    assert_eq!(b.eval("window.__sameDocument"), "yes", "the page reloaded");

    // u0 logs out and is stopped: u2 is served, the queue empties, the page follows.
    holders[0].kill();
    let out = gw.labgate(&["stop", &u[0]]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let took = b.wait_for(
        &format!(
            "{} && document.getElementById('queue-empty') !== null",
            shows("#gpus td.holder", &u[2])
        ),
        Duration::from_secs(15),
    );
    eprintln!("the page showed the waiter served after {took:?}");

    // The 7-day chart: one bar a user with usage (u0, u1, u2), none for u3.
    let bars = "Array.from(document.querySelectorAll('#usage-week rect.bar')).map(r => r.dataset.user).sort().join(',')";
    let mut want = [u[0].clone(), u[1].clone(), u[2].clone()];
    want.sort();
    b.wait_for(
        &format!("{bars} === {:?}", want.join(",")),
        Duration::from_secs(15),
    );
    assert_eq!(b.eval("window.__sameDocument"), "yes", "the page reloaded");
    b.screenshot("lab-after-light", 1280, false, false);
    b.screenshot("lab-after-dark", 1280, false, true);
}
