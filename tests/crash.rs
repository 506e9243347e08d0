//! Graceful stops with the real `captiond` binary: SIGTERM releases running work
//! after the grace period and a restart finishes it. (SIGKILL at random moments and
//! at every write: tests/reliability.rs.)

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_running_job_after_the_grace_period_and_a_restart_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let flags = ["--workers", "2", "--poll-secs", "1", "--lease-secs", "10"];
    let mut grace = flags.to_vec();
    grace.extend(["--shutdown-grace-secs", "1"]);
    let mut server = Server::start(&data, &grace, &[]);
    server.wait_ready(&client).await;
    let wide = std::fs::read(common::tiny_model_dir().join("image_wide_720x430.png")).unwrap();
    let body = json!({"image": {"data": common::data_uri(&wide)}, "max_tokens": 2048});
    let job: Value = client
        .post(format!("{}/v1/jobs", server.base))
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
            .get(format!("{}/v1/jobs/{id}", server.base))
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
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a requested stop exits 0");

    let server = Server::start(&data, &flags, &[]);
    server.wait_ready(&client).await;
    let j: Value = client
        .get(format!("{}/v1/jobs/{id}?wait=60s", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server.kill();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "a released job does not use up an attempt");
}
