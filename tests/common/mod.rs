//! The one helper every integration test uses: start the real service on port 0
//! with a fresh SQLite file and the tiny Moondream2 checkpoint, and talk HTTP to it.
#![allow(dead_code)]

pub mod pg;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use captiond::config::{DataSettings, ModelSettings, ServerSettings, WorkerSettings};
use captiond::queue::Durability;
use captiond::vision::DeviceChoice;
use captiond::vision::moondream2::precision::Precision;
use captiond::{App, Engine, Settings};
use serde_json::{Value, json};

/// The tiny checkpoint folder (config, weights, tokenizer).
pub fn tiny_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// The folder of the tiny checkpoints and their golden outputs.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tiny checkpoint (`tiny`, `tiny_gqa`) loaded on the CPU in `precision`.
pub fn load_tiny(name: &str, precision: Precision) -> captiond::vision::moondream2::Moondream2 {
    load_tiny_with(name, precision, Default::default())
}

/// [`load_tiny`] with the KV cache kept in `kv`.
#[allow(dead_code)]
pub fn load_tiny_with(
    name: &str,
    precision: Precision,
    kv: captiond::vision::moondream2::KvFormat,
) -> captiond::vision::moondream2::Moondream2 {
    use captiond::vision::moondream2::loader::{files_in_dir, load_model_with};
    let files = files_in_dir(&fixtures().join(name)).unwrap();
    let device = candle_core::Device::Cpu;
    let mut plan = precision.plan(&device).unwrap();
    plan.formats.kv = kv;
    load_model_with(&files, &device, &plan).unwrap().0
}

/// Settings for a test instance.
pub struct TestOptions {
    /// Bearer token to require.
    pub token: Option<String>,
    /// Body limit in MiB.
    pub body_limit_mib: usize,
    /// Concurrent jobs.
    pub workers: usize,
    /// Reuse this data dir (for restart tests).
    pub data_dir: Option<PathBuf>,
    /// Run the adaptive controller.
    pub adaptive: bool,
    /// Run the warm-up calibration (GPU probes only).
    pub calibrate: bool,
    /// How long skill and chat requests wait for their result.
    pub request_timeout_secs: u64,
    /// Queue database URL (default: SQLite in the data dir).
    pub database_url: Option<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            token: None,
            body_limit_mib: 32,
            workers: 1,
            data_dir: None,
            adaptive: false,
            calibrate: false,
            request_timeout_secs: 60,
            database_url: None,
        }
    }
}

/// Settings for the service under test.
pub fn settings(data_dir: &Path, library: &Path, opts: &TestOptions) -> Settings {
    Settings {
        data: DataSettings {
            data_dir: Some(data_dir.to_path_buf()),
            durability: Durability::Full,
            database_url: opts.database_url.clone(),
        },
        model: ModelSettings {
            model_dir: Some(tiny_model_dir()),
            model_repo: String::new(),
            model_revision: String::new(),
            tokenizer_repo: String::new(),
            offline: true,
            device: DeviceChoice::Cpu,
            dtype: Precision::Auto,
            kv_cache: Default::default(),
            max_tokens: 8,
            max_image_side: 16_384,
            max_image_pixels: 100_000_000,
        },
        workers: WorkerSettings {
            workers: opts.workers,
            lease_secs: 30,
            poll_secs: 1,
            max_attempts: 5,
            max_oom_retries: 10,
            shutdown_grace_secs: 5,
            adaptive: opts.adaptive,
            vram_high: 0.95,
            vram_elevated: 0.90,
            vram_calm: 0.80,
            vram_block_secs: 2,
            calibrate: opts.calibrate,
            vram_reserve_mib: 1024,
            gpu_index: 0,
        },
        server: ServerSettings {
            bind: "127.0.0.1:0".parse().unwrap(),
            api_token: opts.token.clone(),
            library_roots: vec![library.to_path_buf()],
            body_limit_mib: opts.body_limit_mib,
            request_timeout_secs: opts.request_timeout_secs,
            body_timeout_secs: 5,
            header_timeout_secs: 5,
            station: false,
            keep_uploads_days: "7".parse().unwrap(),
        },
    }
}

/// A running instance with its folders and an HTTP client.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The client.
    pub client: reqwest::Client,
    /// The data dir.
    pub data_dir: PathBuf,
    /// A library root that path inputs may use.
    pub library: PathBuf,
    /// Keeps temp folders alive.
    pub _tmp: Option<tempfile::TempDir>,
    /// The service.
    pub app: Option<App>,
    /// Token sent with requests, if any.
    pub token: Option<String>,
    /// The throwaway PostgreSQL cluster behind the queue, when the suite runs on it.
    pub pg: Option<pg::PgCluster>,
}

impl TestApp {
    /// Starts the real app on port 0 and waits until the model is loaded. With
    /// `CAPTIOND_TEST_BACKEND=postgres` the queue lives on a throwaway PostgreSQL
    /// cluster instead of SQLite (`scripts/test` runs the API suite both ways).
    pub async fn spawn(mut opts: TestOptions) -> TestApp {
        let (tmp, data_dir, library) = Self::folders(&opts);
        let mut cluster = None;
        if opts.database_url.is_none()
            && std::env::var("CAPTIOND_TEST_BACKEND").as_deref() == Ok("postgres")
        {
            let c =
                pg::PgCluster::start().expect("CAPTIOND_TEST_BACKEND=postgres needs PostgreSQL");
            opts.database_url = Some(c.fresh_database("captiond").await);
            cluster = Some(c);
        }
        let mut app = Self::spawn_in(tmp, data_dir, library, opts).await;
        app.pg = cluster;
        app
    }

    /// Fresh temp folders: (temp root, data dir, library root).
    pub fn folders(opts: &TestOptions) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("data"));
        let library = tmp.path().join("library");
        std::fs::create_dir_all(&library).unwrap();
        let library = library.canonicalize().unwrap();
        (tmp, data_dir, library)
    }

    /// Starts on given folders (restart tests reuse them).
    pub async fn spawn_in(
        tmp: tempfile::TempDir,
        data_dir: PathBuf,
        library: PathBuf,
        opts: TestOptions,
    ) -> TestApp {
        Self::spawn_custom(tmp, data_dir, library, opts, Engine::LoadModel, None).await
    }

    /// Starts with a given engine and memory probe.
    pub async fn spawn_custom(
        tmp: tempfile::TempDir,
        data_dir: PathBuf,
        library: PathBuf,
        opts: TestOptions,
        engine: Engine,
        probe: Option<Box<dyn captiond::workers::vram::VramProbe>>,
    ) -> TestApp {
        let s = settings(&data_dir, &library, &opts);
        let app = App::build_with_probe(&s, engine, probe)
            .await
            .expect("app starts");
        let base = format!("http://{}", app.address());
        let t = TestApp {
            base,
            client: reqwest::Client::new(),
            data_dir,
            library,
            _tmp: Some(tmp),
            app: Some(app),
            token: opts.token,
            pg: None,
        };
        t.wait_ready().await;
        t
    }

    async fn wait_ready(&self) {
        for _ in 0..2400 {
            if self.get("/ready").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("service not ready");
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// GET → (status, JSON body or Null).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .auth(self.client.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET → body text (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> String {
        let r = self
            .auth(self.client.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }

    /// POST JSON → (status, JSON body or Null).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .auth(self.client.post(format!("{}{path}", self.base)))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Enqueues a caption of `png` bytes with extra JSON fields.
    pub async fn enqueue(&self, png: &[u8], extra: Value) -> (u16, Value) {
        let mut body = json!({"task": "caption", "image": {"data": data_uri(png)}});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.post("/v1/jobs", &body).await
    }

    /// Long-polls a job until terminal (or 60 s).
    pub async fn wait_job(&self, id: &str) -> Value {
        for _ in 0..3 {
            let (status, job) = self.get(&format!("/v1/jobs/{id}?wait=20s")).await;
            assert_eq!(status, 200, "{job}");
            if ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
        }
        panic!("job {id} did not finish");
    }

    /// Stops the service gracefully and starts it again on the same folders and the
    /// same queue database (SQLite file or PostgreSQL cluster) with `opts`.
    pub async fn restart(mut self, mut opts: TestOptions) -> TestApp {
        let cluster = self.pg.take();
        if let Some(c) = &cluster {
            opts.database_url = Some(c.url("captiond"));
        }
        let (tmp, data, lib) = self.stop().await;
        let mut app = Self::spawn_in(tmp, data, lib, opts).await;
        app.pg = cluster;
        app
    }

    /// Stops the service gracefully, keeping the folders.
    pub async fn stop(&mut self) -> (tempfile::TempDir, PathBuf, PathBuf) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
        (
            self._tmp.take().unwrap(),
            self.data_dir.clone(),
            self.library.clone(),
        )
    }
}

/// A small PNG whose pixels depend on `seed`.
pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 5) as u8 ^ seed,
            (y * 7) as u8,
            seed.wrapping_mul(31).wrapping_add((x + y) as u8),
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `data:image/png;base64,...`.
pub fn data_uri(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// JPEG bytes of `img` with an EXIF APP1 segment carrying `orientation` (1..=8).
pub fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
    let mut plain = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 95)
        .encode_image(img)
        .unwrap();
    let plain = plain.into_inner();
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II\x2a\x00\x08\x00\x00\x00"); // little-endian TIFF, IFD at 8
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

/// `captiond ARGS` (a CLI run: `caption`, `status`, …) on `data_dir` with the tiny
/// model, logging warnings only, with no token, server or database inherited from the
/// environment and no stdin.
pub fn cli_command(data_dir: &Path, args: &[&str]) -> std::process::Command {
    cli_command_with_model(data_dir, &tiny_model_dir(), args)
}

/// [`cli_command`] with the model folder `model`.
pub fn cli_command_with_model(
    data_dir: &Path,
    model: &Path,
    args: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_captiond"));
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--model-dir")
        .arg(model)
        .env_remove("CAPTIOND_API_TOKEN")
        .env_remove("CAPTIOND_SERVER")
        .env_remove("CAPTIOND_DATABASE_URL")
        .env("CAPTIOND_LOG", "warn")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Runs [`cli_command`] to the end: (exit code, stdout, stderr).
pub fn cli_run(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    cli_output(cli_command(data_dir, args))
}

/// Runs `cmd` to the end: (exit code, stdout, stderr).
pub fn cli_output(mut cmd: std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("captiond runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `captiond serve ARGS` on `data_dir` with the tiny model, logging at info to a piped
/// stderr; the caller's `env` is applied after the settings a test must not inherit
/// (token, failpoint, address, Station mode) are cleared.
pub fn serve_command(
    data_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_captiond"));
    cmd.arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--model-dir")
        .arg(tiny_model_dir())
        .env("CAPTIOND_LOG", "info");
    for k in [
        "CAPTIOND_API_TOKEN",
        "CAPTIOND_FAILPOINT",
        "CAPTIOND_BIND",
        "CAPTIOND_STATION",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// The real `captiond serve` binary on port 0 with the tiny model.
pub struct Server {
    /// The process.
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Lines it logged (stderr), collected in the background.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `captiond serve` with `extra` flags and environment on `data_dir`;
    /// waits for its address (not for the model).
    pub fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        use std::io::{BufRead, BufReader};
        let mut args = vec!["--bind", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut child = serve_command(data_dir, &args, env)
            .spawn()
            .expect("captiond starts");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.split("addr=").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not log its address: {:?}", log.lock().unwrap());
            }
        };
        Server {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }

    /// Waits until `/ready` answers 200 (the model is loaded).
    pub async fn wait_ready(&self, client: &reqwest::Client) {
        for _ in 0..800 {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("not ready");
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory of the process (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    /// A failing test must not leave its server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read-only connection pool on a data dir's database.
pub async fn read_db(data_dir: &Path) -> sqlx::SqlitePool {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data_dir.join("captiond.db"))
        .read_only(true);
    sqlx::SqlitePool::connect_with(opts).await.unwrap()
}

/// Prints one row of the reliability table (collected by `scripts/reliability`).
pub fn report(scenario: &str, cases: usize, failures: usize, lost: usize, note: &str) {
    println!("RELIABILITY|{scenario}|{cases}|{failures}|{lost}|{note}");
}

/// A scale knob: `CAPTIOND_RELIABILITY_FULL=1` (set by `scripts/reliability`) picks
/// `full`, CI runs `quick`.
pub fn scale(quick: usize, full: usize) -> usize {
    if std::env::var("CAPTIOND_RELIABILITY_FULL").is_ok_and(|v| v == "1") {
        full
    } else {
        quick
    }
}

/// Reads one integer (a count) from the database of an instance's data dir, from sync code.
pub fn db_scalar(data_dir: &Path, sql: &'static str) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = read_db(data_dir).await;
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    })
}

/// A tiny xorshift generator for randomized tests; seeded from the clock and printed,
/// so a failing run can be replayed with `Rng::seeded`.
pub struct Rng(u64);

impl Rng {
    /// Seeds from the clock and prints the seed under `label`.
    pub fn from_clock(label: &str) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("{label} seed {seed}");
        Self::seeded(seed)
    }
    /// A generator with a fixed seed.
    pub fn seeded(seed: u64) -> Self {
        Self(seed | 1)
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that declares `w`×`h` pixels but holds almost nothing: a decompression bomb.
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
