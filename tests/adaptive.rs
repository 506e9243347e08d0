//! The adaptive concurrency controller on the real service: a scripted memory probe
//! (no NVIDIA GPU here), the tiny Moondream2 model, and injected out-of-memory errors.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use captiond::Engine;
use captiond::vision::image::DecodeLimits;
use captiond::vision::moondream2::loader::ModelSource;
use captiond::vision::moondream2::precision::Precision;
use captiond::vision::{
    Captioner, DeviceChoice, ModelOptions, Moondream, RunControl, Skill, SkillError, SkillResult,
    SkillSettings,
};
use captiond::workers::WorkerPool;
use captiond::workers::concurrency::Reading;
use captiond::workers::vram::{ScriptedProbe, VramProbe};
use common::{TestApp, TestOptions, png};
use serde_json::{Value, json};

/// The real tiny model, watched: counts concurrent runs against the pool's target and
/// fails the first attempt of chosen images with an out-of-memory error.
struct Watched {
    inner: Moondream,
    pool: Arc<OnceLock<Arc<OnceLock<WorkerPool>>>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    over_target: AtomicUsize,
    oom_once: Mutex<HashSet<Vec<u8>>>,
    oom_always: Mutex<Option<(Vec<u8>, usize)>>,
    calls: AtomicUsize,
}

impl Captioner for Watched {
    fn run(
        &self,
        image: &[u8],
        skill: &Skill,
        settings: &SkillSettings,
        ctl: &RunControl,
    ) -> Result<SkillResult, SkillError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        if let Some(target) = self
            .pool
            .get()
            .and_then(|p| p.get())
            .map(|p| p.stats().target)
            && now > target
        {
            self.over_target.fetch_add(1, Ordering::SeqCst);
        }
        let mut inject = self.oom_once.lock().unwrap().remove(image);
        if let Some((img, left)) = self.oom_always.lock().unwrap().as_mut()
            && img.as_slice() == image
            && *left > 0
        {
            *left -= 1;
            inject = true;
        }
        let out = if inject {
            Err(SkillError::OutOfMemory(
                "CUDA_ERROR_OUT_OF_MEMORY (injected)".into(),
            ))
        } else {
            self.inner.run(image, skill, settings, ctl)
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn model_id(&self) -> String {
        self.inner.model_id()
    }

    fn decode_stats(&self) -> Option<captiond::vision::engine::EngineStats> {
        self.inner.decode_stats()
    }
}

fn watched(oom_images: Vec<Vec<u8>>) -> Arc<Watched> {
    let opts = ModelOptions {
        source: ModelSource::Dir(common::tiny_model_dir()),
        offline: true,
        device: DeviceChoice::Cpu,
        precision: Precision::Auto,
        kv_cache: Default::default(),
        limits: DecodeLimits::default(),
    };
    Arc::new(Watched {
        inner: Moondream::load(&opts).unwrap().0,
        pool: Arc::new(OnceLock::new()),
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        over_target: AtomicUsize::new(0),
        oom_once: Mutex::new(oom_images.into_iter().collect()),
        oom_always: Mutex::new(None),
        calls: AtomicUsize::new(0),
    })
}

fn gib(share: f64) -> Reading {
    let total = 24u64 << 30;
    let used = (total as f64 * share) as u64;
    Reading {
        total,
        used,
        free: total - used,
        own: None,
    }
}

async fn start(workers: usize, model: Arc<Watched>, trace: Vec<Reading>) -> TestApp {
    let probe = Box::new(ScriptedProbe::new(trace, true));
    start_with(
        TestOptions {
            workers,
            adaptive: true,
            ..TestOptions::default()
        },
        model,
        probe,
    )
    .await
}

async fn start_with(opts: TestOptions, model: Arc<Watched>, probe: Box<dyn VramProbe>) -> TestApp {
    let (tmp, data, lib) = TestApp::folders(&opts);
    let app = TestApp::spawn_custom(
        tmp,
        data,
        lib,
        opts,
        Engine::Captioner(model.clone()),
        Some(probe),
    )
    .await;
    let _ = model
        .pool
        .set(app.app.as_ref().unwrap().state().pool.clone());
    app
}

async fn run_all(app: &TestApp, images: &[Vec<u8>]) -> Vec<Value> {
    let mut ids = Vec::new();
    for img in images {
        ids.push(
            app.enqueue(img, json!({"max_tokens": 6})).await.1["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut done = Vec::new();
    for id in ids {
        done.push(app.wait_job(&id).await);
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_memory_pressure_the_pool_stays_at_one_generation_and_reports_vram() {
    let model = watched(vec![]);
    let app = start(4, model.clone(), vec![gib(0.97)]).await;
    let images: Vec<Vec<u8>> = (0..6).map(|i| png(40, 30, i)).collect();
    let done = run_all(&app, &images).await;
    assert!(done.iter().all(|j| j["state"] == "succeeded"));
    assert_eq!(
        model.peak.load(Ordering::SeqCst),
        1,
        "never more than one generation at 97% used"
    );
    let r = app
        .client
        .get(format!("{}/v1/stats", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-vram-total"],
        (24u64 * 1024).to_string().as_str()
    );
    assert_eq!(
        r.headers()["x-vram-used"],
        ((24u64 << 30) as f64 * 0.97 / 1048576.0)
            .floor()
            .to_string()
            .as_str()
    );
    assert_eq!(r.headers()["x-captiond-concurrency"], "1");
    // Both compatible families carry the headers too (OpenAI models, Station skills).
    let models = app
        .client
        .get(format!("{}/v1/models", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        models.headers()["x-vram-total"],
        r.headers()["x-vram-total"]
    );
    let chat = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "no image"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 400);
    assert!(chat.headers().contains_key("x-vram-used"));
    let stats: Value = r.json().await.unwrap();
    assert_eq!(stats["concurrency"]["probe"], "scripted");
    assert_eq!(stats["concurrency"]["target"], 1);
    assert!(
        !stats["concurrency"]["series"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let metrics = app.get_text("/metrics").await;
    assert!(metrics.contains("captiond_workers_target 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("captiond_memory_total_bytes {}", 24u64 << 30)),
        "{metrics}"
    );
    assert!(
        metrics.contains("captiond_concurrency_ceiling"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calm_device_with_a_backlog_grows_and_never_runs_above_the_target() {
    let model = watched(vec![]);
    let app = start(3, model.clone(), vec![gib(0.40)]).await;
    let images: Vec<Vec<u8>> = (0..40).map(|i| png(40, 30, i)).collect();
    let done = run_all(&app, &images).await;
    assert!(done.iter().all(|j| j["state"] == "succeeded"));
    assert_eq!(
        model.over_target.load(Ordering::SeqCst),
        0,
        "a generation started above the target"
    );
    let stats = app.get("/v1/stats").await.1;
    let decisions = stats["concurrency"]["decisions"].as_array().unwrap();
    assert!(
        !decisions.is_empty(),
        "the calm backlog should have grown the target: {stats}"
    );
    assert!(
        decisions
            .iter()
            .all(|d| d["to"].as_u64() == d["from"].as_u64().map(|f| f + 1)),
        "one step at a time"
    );
    assert!(model.peak.load(Ordering::SeqCst) >= 2, "growth was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_hit_by_out_of_memory_complete_later_with_their_attempt_unchanged() {
    let images: Vec<Vec<u8>> = (0..4).map(|i| png(40, 30, 100 + i)).collect();
    let model = watched(images[..2].to_vec());
    let app = start(2, model.clone(), vec![gib(0.5)]).await;
    let done = run_all(&app, &images).await;
    for j in &done {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(
            j["attempt"], 1,
            "an OOM requeue does not consume an attempt: {j}"
        );
    }
    let oom: Vec<i64> = done
        .iter()
        .map(|j| j["oom_count"].as_i64().unwrap())
        .collect();
    assert_eq!(oom, vec![1, 1, 0, 0]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stats = app.get("/v1/stats").await.1;
    assert_eq!(stats["workers"]["out_of_memory"], 2);
    let reasons: Vec<&str> = stats["concurrency"]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["reason"].as_str())
        .collect();
    assert!(
        stats["concurrency"]["phase"] == "frozen"
            || reasons.iter().any(|r| r.contains("out of memory")),
        "{stats}"
    );
}

/// A service with two workers at a fixed concurrency (no controller), half its memory
/// in use.
async fn two_fixed_workers(model: &Arc<Watched>) -> TestApp {
    start_with(
        TestOptions {
            workers: 2,
            adaptive: false,
            ..TestOptions::default()
        },
        model.clone(),
        Box::new(ScriptedProbe::new(vec![gib(0.5)], true)),
    )
    .await
}

/// Waits for every job in `ids`: each succeeded after one out-of-memory requeue that
/// used no attempt, and the workers counted one OOM per job. Returns `/v1/stats`.
async fn requeued_once_each(app: &TestApp, ids: &[String]) -> Value {
    for id in ids {
        let j = app.wait_job(id).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(
            j["oom_count"], 1,
            "requeued once after the failed pass: {j}"
        );
        assert_eq!(j["attempt"], 1, "without consuming an attempt: {j}");
    }
    let stats = app.get("/v1/stats").await.1;
    assert_eq!(stats["workers"]["out_of_memory"], ids.len(), "{stats}");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_error_in_a_batched_step_requeues_every_job_of_that_batch() {
    let model = watched(vec![]);
    let app = two_fixed_workers(&model).await;
    let images: Vec<Vec<u8>> = (0..2).map(|i| png(40, 30, 120 + i)).collect();
    let mut ids = Vec::new();
    for img in &images {
        let (_, job) = app.enqueue(img, json!({"max_tokens": 1500})).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    // Once both captions decode in one batch, the next batched step fails as a GPU
    // out of memory would.
    let engine = model.inner.engine();
    let mut batched = false;
    for _ in 0..2000 {
        if engine.stats().largest_batch >= 2 {
            engine.fail_next_step(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected)",
            );
            batched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        batched,
        "two running captions never shared a batch: {:?}",
        engine.stats()
    );
    let stats = requeued_once_each(&app, &ids).await;
    assert!(
        stats["decode"]["largest_batch"].as_u64() >= Some(2),
        "/v1/stats shows the batching: {stats}"
    );
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("captiond_decode_batch_largest"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_error_in_a_batched_encode_requeues_every_job_of_that_pass() {
    let model = watched(vec![]);
    let engine = model.inner.engine();
    // Held, so that both jobs' images wait and go in one encode pass.
    let hold = engine.hold_encodes();
    let app = two_fixed_workers(&model).await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let (_, job) = app
            .enqueue(&png(40, 30, 90 + i), json!({"max_tokens": 8}))
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let mut waiting = false;
    for _ in 0..2000 {
        if engine.stats().encodes_waiting == 2 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(waiting, "both images never waited: {:?}", engine.stats());
    engine.fail_next_encode("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected)");
    drop(hold);
    let stats = requeued_once_each(&app, &ids).await;
    assert_eq!(stats["decode"]["largest_encode"], 2, "{stats}");
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("captiond_encode_batch_largest 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_out_of_memory_at_one_blocks_claiming_then_resumes_by_itself() {
    let image = png(40, 30, 200);
    let model = watched(vec![]);
    *model.oom_always.lock().unwrap() = Some((image.clone(), 3));
    let app = start(1, model.clone(), vec![gib(0.5)]).await;
    let (_, job) = app.enqueue(&image, json!({"max_tokens": 4})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut saw_blocked = false;
    for _ in 0..300 {
        let stats = app.get("/v1/stats").await.1;
        if stats["workers"]["vram_blocked"] == true {
            assert_eq!(stats["concurrency"]["phase"], "vram_blocked", "{stats}");
            saw_blocked = true;
        }
        if app.get(&format!("/v1/jobs/{id}")).await.1["state"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_blocked, "two OOMs at concurrency 1 must block claiming");
    let done = app.wait_job(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["oom_count"], 3);
    let stats = app.get("/v1/stats").await.1;
    assert_eq!(
        stats["workers"]["vram_blocked"], false,
        "resumed once memory was free"
    );
}

/// A simulated GPU whose memory use follows the generations running on the model:
/// 16 GiB of 24 used by others, 3 GiB per generation.
struct LoadAware(Arc<Watched>);

impl VramProbe for LoadAware {
    fn read(&self) -> Option<Reading> {
        let (total, used) = (
            24u64 << 30,
            (16u64 << 30) + self.0.running.load(Ordering::SeqCst) as u64 * (3 << 30),
        );
        Some(Reading {
            total,
            used,
            free: total - used,
            own: None,
        })
    }

    fn name(&self) -> &'static str {
        "simulated"
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn device_id(&self) -> String {
        "simulated-gpu-0".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_calibration_caps_concurrency_and_is_stored_per_device_and_model() {
    let opts = || TestOptions {
        workers: 8,
        adaptive: true,
        calibrate: true,
        ..TestOptions::default()
    };
    let model = watched(vec![]);
    let mut app = start_with(opts(), model.clone(), Box::new(LoadAware(model.clone()))).await;
    // 1 then 2 generations: 3 GiB each, 24 − 16 − 1 (reserve) = 7 GiB free → 2 fit.
    assert_eq!(model.calls.load(Ordering::SeqCst), 3);
    let stats = app.get("/v1/stats").await.1;
    let c = &stats["concurrency"];
    assert_eq!(c["calibration"]["max_concurrency"], 2, "{stats}");
    assert_eq!(c["calibration"]["device"], "simulated-gpu-0");
    assert_eq!(c["calibration"]["per_generation_bytes"], 3u64 << 30);
    assert_eq!(c["ceiling"], 2);
    let (tmp, data, lib) = app.stop().await;

    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        data.join("captiond.db").display()
    ))
    .await
    .unwrap();
    let (device, max): (String, i64) =
        sqlx::query_as("SELECT device, max_concurrency FROM calibrations")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((device.as_str(), max), ("simulated-gpu-0", 2));
    pool.close().await;

    // A restart on the same device and model reuses it instead of measuring again.
    let again = watched(vec![]);
    let app = TestApp::spawn_custom(
        tmp,
        data,
        lib,
        opts(),
        Engine::Captioner(again.clone()),
        Some(Box::new(LoadAware(again.clone()))),
    )
    .await;
    assert_eq!(
        again.calls.load(Ordering::SeqCst),
        0,
        "no warm-up generations on restart"
    );
    assert_eq!(app.get("/v1/stats").await.1["concurrency"]["ceiling"], 2);
}

/// Fails every run with an unrecoverable device error.
struct Faulty;

impl Captioner for Faulty {
    fn run(
        &self,
        _: &[u8],
        _: &Skill,
        _: &SkillSettings,
        _: &RunControl,
    ) -> Result<SkillResult, SkillError> {
        Err(SkillError::DeviceFault(
            "CUDA_ERROR_ILLEGAL_ADDRESS (injected)".into(),
        ))
    }

    fn model_id(&self) -> String {
        "faulty".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fault_releases_the_job_and_stops_with_the_restart_exit_code() {
    let opts = TestOptions::default();
    let (_tmp, data, lib) = TestApp::folders(&opts);
    let settings = common::settings(&data, &lib, &opts);
    let app = captiond::App::build(&settings, Engine::Captioner(Arc::new(Faulty)))
        .await
        .unwrap();
    let base = format!("http://{}", app.address());
    let body = json!({"image": {"data": common::data_uri(&png(30, 30, 1))}});
    let job: Value = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reason = tokio::time::timeout(
        Duration::from_secs(30),
        app.run_until_stopped(std::future::pending()),
    )
    .await
    .unwrap();
    assert!(
        matches!(reason, captiond::StopReason::DeviceFault(_)),
        "{reason:?}"
    );
    assert_eq!(reason.exit_code(), 75);
    let store = captiond::queue::Store::open(&data.join("captiond.db"), &Default::default())
        .await
        .unwrap();
    let id = uuid::Uuid::parse_str(job["id"].as_str().unwrap()).unwrap();
    let j = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt),
        (captiond::queue::JobState::Queued, 0),
        "released for the restarted process"
    );
}
