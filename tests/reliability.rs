//! The reliability suite's scenarios with the real binary and real SQLite: a crash
//! loop, a crash right after every kind of write, start-up on a locked, corrupt or
//! unopenable database, a full disk, a load test, and authentication on every route.
//! CI runs them small; `scripts/reliability` sets `CAPTIOND_RELIABILITY_FULL=1` for
//! the full sizes and prints the table from the `RELIABILITY|` lines.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use captiond::queue::Job;
use captiond::workers::{HandlerOutput, JobControl, JobFailure, JobHandler};
use common::{Rng, Server, TestApp, TestOptions, data_uri, png, read_db, report, scale};
use serde_json::{Value, json};

/// A small deterministic generator (xorshift), seeded from the clock and printed.
async fn post(client: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(client: &reqwest::Client, url: String) -> (u16, Value) {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A request that may not be answered: the server can die of its failpoint first.
async fn post_may_die(client: &reqwest::Client, url: String) {
    let _ = client.post(url).json(&json!({})).send().await;
}

/// Pauses the queue and enqueues `body`: the id is known before any work starts.
async fn enqueue_paused(client: &reqwest::Client, s: &Server, body: &Value) -> String {
    post(client, format!("{}/v1/queue/pause", s.base), &json!({})).await;
    let (status, j) = post(client, format!("{}/v1/jobs", s.base), body).await;
    assert_eq!(status, 202, "{j}");
    j["id"].as_str().unwrap().to_string()
}

async fn scalar(pool: &sqlx::SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

const WORKER_FLAGS: &[&str] = &["--workers", "2", "--poll-secs", "1", "--lease-secs", "5"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_loses_nothing_and_runs_each_job_to_one_result() {
    let n = scale(120, 1000);
    let kills = scale(4, 20);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let mut rng = Rng::from_clock("crash loop");
    let server = Server::start(&data, WORKER_FLAGS, &[]);
    server.wait_ready(&client).await;
    let mut accepted = 0;
    for chunk in (0..n as u32).collect::<Vec<_>>().chunks(500) {
        let jobs: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"image": {"data": data_uri(&png(20 + i % 9, 16 + i % 5, (i % 251) as u8))}, "max_tokens": 2}))
            .collect();
        let (status, v) = post(
            &client,
            format!("{}/v1/batches", server.base),
            &json!({"jobs": jobs}),
        )
        .await;
        assert_eq!(status, 202, "{v}");
        accepted += v["count"].as_u64().unwrap() as usize;
    }
    assert_eq!(accepted, n);
    let mut server = server;
    for k in 0..kills {
        // A random moment: sometimes while the model still loads, mostly mid-run.
        let wait = rng.range(100, 1_500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill();
        println!("kill {} after {wait} ms", k + 1);
        server = Server::start(&data, WORKER_FLAGS, &[]);
    }
    server.wait_ready(&client).await;
    let started = Instant::now();
    loop {
        let (_, stats) = get(&client, format!("{}/v1/stats", server.base)).await;
        let jobs = &stats["jobs"];
        if jobs["succeeded"].as_u64().unwrap_or(0) + jobs["failed"].as_u64().unwrap_or(0)
            == n as u64
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "stuck: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill();
    let db = read_db(&data).await;
    let jobs = scalar(&db, "SELECT COUNT(*) FROM jobs").await as usize;
    let succeeded =
        scalar(&db, "SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'").await as usize;
    let results = scalar(&db, "SELECT COUNT(DISTINCT job_id) FROM results").await as usize;
    let rows = scalar(&db, "SELECT COUNT(*) FROM results").await as usize;
    let running = scalar(&db, "SELECT COUNT(*) FROM jobs WHERE state = 'running'").await;
    let max_attempt = scalar(&db, "SELECT MAX(attempt) FROM jobs").await as usize;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&db)
        .await
        .unwrap();
    let lost = n - jobs.min(n) + (n - results.min(n));
    report(
        "crash loop: SIGKILL at random moments",
        kills,
        usize::from(succeeded != n || rows != n || running != 0 || integrity != "ok"),
        lost,
        &format!("{n} jobs, max attempt {max_attempt}, integrity {integrity}"),
    );
    assert_eq!((jobs, succeeded, results, rows, running), (n, n, n, n, 0));
    assert!(
        max_attempt <= kills + 1,
        "attempts plausible: {max_attempt}"
    );
    assert_eq!(integrity, "ok");
}

/// Starts the server with a failpoint, runs `trigger`, and waits for the process to
/// die of its own SIGKILL right after the transition commits.
async fn die_at(data: &Path, point: &str, extra: &[&str], trigger: impl AsyncFnOnce(&Server)) {
    let client = reqwest::Client::new();
    let mut server = Server::start(data, extra, &[("CAPTIOND_FAILPOINT", point)]);
    server.wait_ready(&client).await;
    trigger(&server).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "failpoint {point} never fired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.signal(), Some(9), "{point}: killed by its failpoint");
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains(&format!("failpoint {point}")), "{log}");
}

async fn job_after_restart(data: &Path, extra: &[&str], id: &str, until_terminal: bool) -> Value {
    let client = reqwest::Client::new();
    let server = Server::start(data, extra, &[]);
    server.wait_ready(&client).await;
    let url = if until_terminal {
        format!("{}/v1/jobs/{id}?wait=60s", server.base)
    } else {
        format!("{}/v1/jobs/{id}", server.base)
    };
    let (_, job) = get(&client, url).await;
    server.kill();
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_every_kind_of_write_is_recovered() {
    let client = reqwest::Client::new();
    let small = || json!({"image": {"data": data_uri(&png(24, 16, 3))}, "max_tokens": 2});
    let long = || {
        let wide = std::fs::read(common::tiny_model_dir().join("image_wide_720x430.png")).unwrap();
        json!({"image": {"data": data_uri(&wide)}, "max_tokens": 2048})
    };
    let mut cases = 0;
    let mut lines = Vec::new();

    // claim: the job was running when the process died; the restart rescues it at
    // once (the crashed attempt counts) and finishes it.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut id = String::new();
    die_at(&data, "claim", WORKER_FLAGS, async |s: &Server| {
        id = enqueue_paused(&client, s, &small()).await;
        post_may_die(&client, format!("{}/v1/queue/resume", s.base)).await;
    })
    .await;
    let j = job_after_restart(&data, WORKER_FLAGS, &id, true).await;
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{j}"
    );
    cases += 1;
    lines.push("claim → rescued, succeeded on attempt 2");

    // heartbeat: a long job's lease was just renewed; the restart rescues and finishes it.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let flags = ["--workers", "1", "--lease-secs", "3", "--poll-secs", "1"];
    die_at(&data, "heartbeat", &flags, async |s: &Server| {
        id = enqueue_paused(&client, s, &long()).await;
        post_may_die(&client, format!("{}/v1/queue/resume", s.base)).await;
    })
    .await;
    let j = job_after_restart(&data, &flags, &id, true).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    cases += 1;
    lines.push("heartbeat → rescued, succeeded");

    // complete: the result was committed; the restart does not run the job again.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    die_at(&data, "complete", WORKER_FLAGS, async |s: &Server| {
        id = enqueue_paused(&client, s, &small()).await;
        post_may_die(&client, format!("{}/v1/queue/resume", s.base)).await;
    })
    .await;
    let j = job_after_restart(&data, WORKER_FLAGS, &id, false).await;
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{j}"
    );
    assert!(j["result"]["caption"].is_string());
    cases += 1;
    lines.push("complete → kept, not rerun");

    // fail: a permanent failure was committed with its reason; it stays failed.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let truncated = {
        let p = png(64, 64, 9);
        p[..p.len() - 40].to_vec()
    };
    die_at(&data, "fail", WORKER_FLAGS, async |s: &Server| {
        id = enqueue_paused(
            &client,
            s,
            &json!({"image": {"data": data_uri(&truncated)}}),
        )
        .await;
        post_may_die(&client, format!("{}/v1/queue/resume", s.base)).await;
    })
    .await;
    let j = job_after_restart(&data, WORKER_FLAGS, &id, false).await;
    assert_eq!(
        (j["state"].as_str(), j["error"]["code"].as_str()),
        (Some("failed"), Some("image_unreadable")),
        "{j}"
    );
    assert_eq!(j["attempt"], 1);
    cases += 1;
    lines.push("fail → stays failed with its reason");

    // retry: a transient error (the file became a folder) was scheduled for later;
    // the schedule survives and the retries run out into a failure.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    let file = lib.join("photo.png");
    std::fs::write(&file, png(20, 20, 1)).unwrap();
    let lib_s = lib.display().to_string();
    let mut flags: Vec<&str> = WORKER_FLAGS.to_vec();
    flags.extend(["--library-root", &lib_s]);
    die_at(&data, "retry", &flags, async |s: &Server| {
        post(&client, format!("{}/v1/queue/pause", s.base), &json!({})).await;
        let (status, j) = post(
            &client,
            format!("{}/v1/jobs", s.base),
            &json!({"image": {"path": file.display().to_string()}, "max_attempts": 2}),
        )
        .await;
        assert_eq!(status, 202, "{j}");
        id = j["id"].as_str().unwrap().to_string();
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        post_may_die(&client, format!("{}/v1/queue/resume", s.base)).await;
    })
    .await;
    let db = read_db(&data).await;
    let state: String = sqlx::query_scalar("SELECT state FROM jobs")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    assert_eq!(
        state, "scheduled",
        "the retry schedule was committed before the crash"
    );
    let j = job_after_restart(&data, &flags, &id, true).await;
    assert_eq!(
        (j["state"].as_str(), j["error"]["code"].as_str()),
        (Some("failed"), Some("io_error")),
        "{j}"
    );
    assert_eq!(j["attempt"], 2);
    cases += 1;
    lines.push("retry → schedule kept, retried, then failed");

    // cancel (waiting job): stays cancelled, never runs.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    die_at(&data, "cancel", WORKER_FLAGS, async |s: &Server| {
        post(&client, format!("{}/v1/queue/pause", s.base), &json!({})).await;
        let (_, j) = post(&client, format!("{}/v1/jobs", s.base), &small()).await;
        id = j["id"].as_str().unwrap().to_string();
        post_may_die(&client, format!("{}/v1/jobs/{id}/cancel", s.base)).await;
    })
    .await;
    let client2 = reqwest::Client::new();
    let server = Server::start(&data, WORKER_FLAGS, &[]);
    server.wait_ready(&client2).await;
    post(
        &client2,
        format!("{}/v1/queue/resume", server.base),
        &json!({}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, j) = get(&client2, format!("{}/v1/jobs/{id}", server.base)).await;
    server.kill();
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_i64()),
        (Some("cancelled"), Some(0)),
        "{j}"
    );
    cases += 1;
    lines.push("cancel (waiting) → stays cancelled");

    // cancel (running job): the request was committed but the worker had not stopped;
    // the restart must not run it again (regression: the rescue used to requeue it).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    die_at(&data, "cancel", WORKER_FLAGS, async |s: &Server| {
        let (_, j) = post(&client, format!("{}/v1/jobs", s.base), &long()).await;
        id = j["id"].as_str().unwrap().to_string();
        loop {
            let (_, j) = get(&client, format!("{}/v1/jobs/{id}", s.base)).await;
            if j["state"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        post_may_die(&client, format!("{}/v1/jobs/{id}/cancel", s.base)).await;
    })
    .await;
    let j = job_after_restart(&data, WORKER_FLAGS, &id, false).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    cases += 1;
    lines.push("cancel (running) → cancelled, not rerun");

    report(
        "crash right after each write (failpoints)",
        cases,
        0,
        0,
        &lines.join("; "),
    );
}

/// Runs `captiond serve` expecting a start-up failure; returns its stderr.
fn failed_start(data: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_captiond"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--model-dir")
        .arg(common::tiny_model_dir())
        .env("CAPTIOND_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "it must not start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_corrupt_or_unopenable_database_stops_start_up_with_a_clear_error() {
    // Corrupt: garbage where the database should be; it is left untouched.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(data.join("captiond.db"), &garbage).unwrap();
    let err = failed_start(&data);
    assert!(err.contains("unreadable or corrupt"), "{err}");
    assert!(err.contains("captiond.db"), "{err}");
    assert_eq!(
        std::fs::read(data.join("captiond.db")).unwrap(),
        garbage,
        "never re-created"
    );

    // Unopenable: the database path is a folder.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("captiond.db")).unwrap();
    let err = failed_start(&data);
    assert!(err.contains("captiond.db"), "{err}");
    assert!(err.contains("unreadable or corrupt"), "{err}");

    // Locked by another process (an exclusive transaction held by this test).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let s = Server::start(&data, &[], &[]);
    s.wait_ready(&client).await;
    s.kill();
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("captiond.db"));
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&opts)
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let err = failed_start(&data);
    assert!(err.contains("locked by another process"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();

    // Held by another captiond: the data dir lock says so at once.
    let s = Server::start(&data, &[], &[]);
    let err = failed_start(&data);
    assert!(
        err.contains("another captiond process is using this data dir"),
        "{err}"
    );
    s.kill();
    report(
        "start-up on a corrupt, unopenable or locked database",
        4,
        0,
        0,
        "clear error, file untouched",
    );
}

/// Mounts a small tmpfs (needs root); unmounts on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_loses_nothing_and_recovers_when_space_frees() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("small"), "4m") else {
        report(
            "full disk (tmpfs)",
            0,
            0,
            0,
            "skipped: mounting a tmpfs needs root",
        );
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = mount.0.join("data");
    let client = reqwest::Client::new();
    let server = Server::start(&data, WORKER_FLAGS, &[]);
    server.wait_ready(&client).await;
    let mut accepted = Vec::new();
    for i in 0..5u8 {
        let (status, j) = post(
            &client,
            format!("{}/v1/jobs", server.base),
            &json!({"image": {"data": data_uri(&png(20, 20, i))}, "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, 202, "{j}");
        accepted.push(j["id"].as_str().unwrap().to_string());
    }
    // Fill the filesystem.
    let filler = mount.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = 0;
    let mut statuses = Vec::new();
    for i in 0..20u8 {
        let (status, j) = post(
            &client,
            format!("{}/v1/jobs", server.base),
            &json!({"image": {"data": data_uri(&png(30, 30, 100 + i))}}),
        )
        .await;
        statuses.push(status);
        if status == 202 {
            accepted.push(j["id"].as_str().unwrap().to_string());
        } else {
            assert!(status == 507 || status == 503, "{status} {j}");
            assert!(
                j["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{j}"
            );
            refused += 1;
        }
    }
    assert!(refused > 0, "the full disk was noticed: {statuses:?}");
    let (status, _) = get(&client, format!("{}/health", server.base)).await;
    assert_eq!(status, 200, "still up");
    std::fs::remove_file(&filler).unwrap();
    let (status, j) = post(
        &client,
        format!("{}/v1/jobs", server.base),
        &json!({"image": {"data": data_uri(&png(22, 22, 200))}, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 202, "recovers once space frees: {j}");
    accepted.push(j["id"].as_str().unwrap().to_string());
    let mut lost = 0;
    for id in &accepted {
        let (_, j) = get(&client, format!("{}/v1/jobs/{id}?wait=60s", server.base)).await;
        if j["state"] != "succeeded" {
            println!("not succeeded: {j}");
            lost += 1;
        }
    }
    server.kill();
    report(
        "full disk (4 MB tmpfs)",
        statuses.len(),
        0,
        lost,
        &format!(
            "{refused} refused with 507/503, {} accepted, all succeeded after space freed",
            accepted.len()
        ),
    );
    assert_eq!(lost, 0);
}

struct Instant0;

impl JobHandler for Instant0 {
    fn handle(&self, _job: &Job, _ctl: &JobControl) -> Result<HandlerOutput, JobFailure> {
        Ok(HandlerOutput {
            model: "fast".into(),
            output: json!({"caption": "fast"}),
        })
    }
    fn blocks(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_64_clients_enqueue_and_poll_without_a_single_5xx() {
    let secs = scale(5, 60) as u64;
    let opts = TestOptions {
        workers: 16,
        ..TestOptions::default()
    };
    let (tmp, data_dir, library) = TestApp::folders(&opts);
    let app = TestApp::spawn_custom(
        tmp,
        data_dir,
        library,
        opts,
        captiond::Engine::Handler(Arc::new(Instant0)),
        None,
    )
    .await;
    let image = data_uri(&png(16, 16, 1));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..64 {
        let client = reqwest::Client::new();
        let base = app.base.clone();
        let image = image.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut bad = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/v1/jobs"))
                    .json(
                        &json!({"image": {"data": image}, "idempotency_key": format!("c{c}-{i}")}),
                    )
                    .send()
                    .await;
                lat.push(t.elapsed());
                let id = match r {
                    Ok(r) if r.status().as_u16() == 202 => r.json::<Value>().await.unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    Ok(r) => {
                        bad.push(r.status().as_u16());
                        continue;
                    }
                    Err(_) => {
                        bad.push(0);
                        continue;
                    }
                };
                let t = Instant::now();
                let r = client.get(format!("{base}/v1/jobs/{id}")).send().await;
                lat.push(t.elapsed());
                match r {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => bad.push(r.status().as_u16()),
                    Err(_) => bad.push(0),
                }
            }
            (lat, bad)
        }));
    }
    let mut lat = Vec::new();
    let mut bad = Vec::new();
    for t in tasks {
        let (l, b) = t.await.unwrap();
        lat.extend(l);
        bad.extend(b);
    }
    lat.sort();
    let n = lat.len();
    let p = |q: f64| lat[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e3;
    let fives = bad.iter().filter(|s| **s >= 500 || **s == 0).count();
    let note = format!(
        "{secs} s, {n} requests, {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms, non-2xx {}",
        n as f64 / secs as f64,
        p(0.5),
        p(0.99),
        bad.len()
    );
    println!("{note}");
    report("load: 64 clients enqueue + poll", n, fives, 0, &note);
    assert_eq!(fives, 0, "no 5xx or dropped connection: {bad:?}");
    assert!(bad.is_empty(), "{bad:?}");
}

#[tokio::test]
async fn with_a_token_every_route_but_health_refuses_requests_without_it() {
    let app = TestApp::spawn(TestOptions {
        token: Some("s3cret-token".into()),
        ..TestOptions::default()
    })
    .await;
    let client = reqwest::Client::new();
    let mut checked = 0;
    for (doc, _) in captiond::api::openapi::table() {
        let url = format!(
            "{}{}",
            app.base,
            doc.path.replace("{id}", &uuid::Uuid::now_v7().to_string())
        );
        for token in [
            None,
            Some("wrong"),
            Some("s3cret-tokeN"),
            Some("s3cret-token-longer"),
        ] {
            let rb = match doc.method {
                "get" => client.get(&url),
                _ => client.post(&url).json(&json!({})),
            };
            let rb = match token {
                Some(t) => rb.bearer_auth(t),
                None => rb,
            };
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            if doc.needs_token() {
                assert_eq!(status, 401, "{} {} with {token:?}", doc.method, doc.path);
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            } else {
                assert_eq!(status, 200, "{}", doc.path);
            }
            checked += 1;
        }
        // With the token, the route is reached (whatever it then answers).
        let rb = match doc.method {
            "get" => client.get(&url),
            _ => client.post(&url).json(&json!({})),
        };
        let r = rb.bearer_auth("s3cret-token").send().await.unwrap();
        assert_ne!(r.status().as_u16(), 401, "{}", doc.path);
    }
    // Unknown routes are refused too, before revealing that they do not exist.
    let r = client
        .get(format!("{}/v1/secret-admin", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    report(
        "auth: every route without/with a wrong token",
        checked,
        0,
        0,
        "401 everywhere but /health",
    );
}
