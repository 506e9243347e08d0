//! A small Chrome DevTools Protocol driver for the dashboard's browser tests: starts a
//! real headless Chromium (Debian's `chromium`), opens one page, evaluates scripts in
//! it, sets file inputs, sends keys and saves screenshots under `target/`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// The Chromium binary: `CAPTIOND_CHROMIUM`, or the first of the usual names on `PATH`.
pub fn chromium_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CAPTIOND_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    // Debian's /usr/bin/chromium is a shell wrapper; start the binary itself.
    let debian = PathBuf::from("/usr/lib/chromium/chromium");
    if debian.is_file() {
        return Some(debian);
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Where the browser tests save their screenshots: `target/dashboard-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One headless Chromium with one page attached.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next: AtomicU64,
    session: String,
    /// Console messages and uncaught exceptions of the page, for failure reports.
    pub console: Arc<std::sync::Mutex<Vec<String>>>,
    _reader: tokio::task::JoinHandle<()>,
    lock: Mutex<()>,
}

impl Browser {
    /// Starts Chromium, or returns `None` (with a loud message) when none is installed.
    pub async fn launch() -> Option<Browser> {
        let Some(bin) = chromium_binary() else {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !! SKIPPED: no Chromium found (install Debian's `chromium`, or set     !!\n\
                 !! CAPTIOND_CHROMIUM); scripts/test installs it when run as root.     !!\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(&bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // Chromium writes its port and browser endpoint here once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to Chromium's DevTools endpoint");
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let console: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (p2, c2) = (pending.clone(), console.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = p2.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else if v["method"] == "Runtime.consoleAPICalled" {
                    let args: Vec<String> = v["params"]["args"]
                        .as_array()
                        .map(|a| a.iter().map(|x| x["value"].to_string()).collect())
                        .unwrap_or_default();
                    c2.lock().unwrap().push(format!(
                        "console.{}: {}",
                        v["params"]["type"].as_str().unwrap_or("log"),
                        args.join(" ")
                    ));
                } else if v["method"] == "Runtime.exceptionThrown" {
                    c2.lock()
                        .unwrap()
                        .push(format!("exception: {}", v["params"]["exceptionDetails"]));
                }
            }
        });
        let mut b = Browser {
            child,
            _profile: profile,
            out,
            pending,
            next: AtomicU64::new(1),
            session: String::new(),
            console,
            _reader: reader,
            lock: Mutex::new(()),
        };
        let target = b
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = b
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        for m in ["Page.enable", "Runtime.enable", "DOM.enable"] {
            b.call(m, json!({})).await;
        }
        Some(b)
    }

    async fn send(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::Text(msg.to_string().into()))
            .expect("DevTools connection open");
        let reply = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer from Chromium in 60 s"))
            .expect("DevTools connection open");
        if let Some(e) = reply.get("error") {
            panic!("{method} failed: {e}");
        }
        reply["result"].clone()
    }

    /// Calls a DevTools method on the page.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let _g = self.lock.lock().await;
        self.send(Some(&self.session.clone()), method, params).await
    }

    /// Opens `url` and waits until the document has loaded.
    pub async fn goto(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page to load")
            .await;
    }

    /// Evaluates `js` in the page (promises awaited) and returns its value.
    pub async fn eval(&self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("script failed: {js}\n{ex}\n{}", self.log());
        }
        r["result"]["value"].clone()
    }

    /// Polls `js` until it is truthy (30 s), returning its value; on timeout saves a
    /// screenshot and fails with the page's console.
    pub async fn wait_for(&self, js: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(js).await;
            let truthy = !(v.is_null() || v == json!(false) || v == json!(0) || v == json!(""));
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let shot = self.screenshot("timeout").await;
                panic!(
                    "timed out waiting for {what} ({js}); screenshot {}\n{}",
                    shot.display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's console and exceptions so far.
    pub fn log(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }

    /// Sets the files of the `<input type=file>` matching `selector` (fires `change`).
    pub async fn set_files(&self, selector: &str, files: &[PathBuf]) {
        let doc = self.call("DOM.getDocument", json!({"depth": 0})).await;
        let root = doc["root"]["nodeId"].as_i64().unwrap();
        let node = self
            .call(
                "DOM.querySelector",
                json!({"nodeId": root, "selector": selector}),
            )
            .await;
        let node_id = node["nodeId"].as_i64().unwrap();
        assert!(node_id != 0, "no element matches {selector}");
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        self.call(
            "DOM.setFileInputFiles",
            json!({"nodeId": node_id, "files": files}),
        )
        .await;
    }

    /// Drags `files` from outside the page and drops them on the element matching
    /// `selector`, as a file manager does (dragEnter, dragOver, drop at its centre).
    pub async fn drop_files(&self, selector: &str, files: &[PathBuf]) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView(); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let data = json!({"items": [], "files": files, "dragOperationsMask": 1});
        for kind in ["dragEnter", "dragOver", "drop"] {
            self.call(
                "Input.dispatchDragEvent",
                json!({"type": kind, "x": x, "y": y, "data": data}),
            )
            .await;
        }
    }

    /// Clicks the element matching `selector` (through the DOM, as a user's click does).
    pub async fn click(&self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await;
        assert_eq!(found, json!(true), "no element matches {selector}");
    }

    /// Presses a key (`Tab`, `Enter`, `Escape`, `ArrowRight`) as the keyboard does.
    pub async fn press(&self, key: &str) {
        let (code, vk, text) = match key {
            "Tab" => ("Tab", 9, ""),
            "Enter" => ("Enter", 13, "\r"),
            "Escape" => ("Escape", 27, ""),
            "ArrowRight" => ("ArrowRight", 39, ""),
            "ArrowLeft" => ("ArrowLeft", 37, ""),
            " " => ("Space", 32, " "),
            other => panic!("key {other} not mapped"),
        };
        for t in ["keyDown", "keyUp"] {
            let mut p = json!({"type": t, "key": key, "code": code, "windowsVirtualKeyCode": vk});
            if t == "keyDown" && !text.is_empty() {
                p["text"] = json!(text);
            }
            self.call("Input.dispatchKeyEvent", p).await;
        }
    }

    /// Types text into the focused element.
    pub async fn type_text(&self, text: &str) {
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Sets the viewport (CSS pixels); `mobile` emulates a phone.
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// Saves a PNG of the viewport as `target/dashboard-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .unwrap();
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and its renderer and GPU processes.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
