//! Crash recovery with the real `captiond` binary: SIGKILL mid-run, restart, and
//! every job ends up succeeded exactly once.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Starts `captiond serve` on port 0 and returns it with its address (read from the log).
fn start_server(data_dir: &Path) -> (Child, String) {
    start_server_with(data_dir, &[])
}

/// Same, with extra flags.
fn start_server_with(data_dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_captiond"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--poll-secs",
            "1",
            "--lease-secs",
            "10",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--model-dir")
        .arg(common::tiny_model_dir())
        .env("CAPTIOND_LOG", "info")
        .env_remove("CAPTIOND_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("captiond starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
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
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server logs its address");
    (child, format!("http://{addr}"))
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not ready");
}

async fn batch_view(client: &reqwest::Client, base: &str, batch: &str) -> Value {
    client
        .get(format!("{base}/v1/batches/{batch}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_run_loses_no_job_and_runs_each_once_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let (mut server, base) = start_server(&data);
    wait_ready(&client, &base).await;

    let jobs: Vec<Value> = (0..200u32)
        .map(|i| json!({"image": {"data": common::data_uri(&common::png(24 + i % 7, 20, (i % 251) as u8))}, "max_tokens": 2}))
        .collect();
    let r = client
        .post(format!("{base}/v1/batches"))
        .json(&json!({"jobs": jobs}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let batch = r.json::<Value>().await.unwrap()["batch_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Kill it with SIGKILL once some, but not all, jobs are done.
    let started = Instant::now();
    loop {
        let v = batch_view(&client, &base, &batch).await;
        let done = v["counts"]["succeeded"].as_i64().unwrap();
        assert!(done < 200, "finished before it could be killed");
        if done >= 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();

    let (mut server, base) = start_server(&data);
    wait_ready(&client, &base).await;
    let started = Instant::now();
    let view = loop {
        let v = batch_view(&client, &base, &batch).await;
        if v["done"] == true {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "did not finish after restart: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(view["counts"]["succeeded"], 200, "{view}");

    // Check the database itself: one result row per job, nothing left running.
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        data.join("captiond.db").display()
    ))
    .await
    .unwrap();
    let (jobs, results, distinct, running, retried): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM jobs), (SELECT COUNT(*) FROM results), (SELECT COUNT(DISTINCT job_id) FROM results), \
         (SELECT COUNT(*) FROM jobs WHERE state = 'running'), (SELECT COUNT(*) FROM jobs WHERE attempt > 1)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((jobs, results, distinct, running), (200, 200, 200, 0));
    assert!(
        retried <= 2,
        "only the jobs running at the kill run twice, got {retried}"
    );
    let ok: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ok, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_running_job_after_the_grace_period_and_a_restart_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let (mut server, base) = start_server_with(&data, &["--shutdown-grace-secs", "1"]);
    wait_ready(&client, &base).await;
    let wide = std::fs::read(common::tiny_model_dir().join("image_wide_720x430.png")).unwrap();
    let body = json!({"image": {"data": common::data_uri(&wide)}, "max_tokens": 2048});
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    loop {
        let j: Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a requested stop exits 0");

    let (mut server, base) = start_server(&data);
    wait_ready(&client, &base).await;
    let j: Value = client
        .get(format!("{base}/v1/jobs/{id}?wait=60s"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "a released job does not use up an attempt");
}
