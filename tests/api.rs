//! The job API through real HTTP on a random port, a real SQLite file in a temp dir
//! and the tiny Moondream2 checkpoint.

mod common;

use std::time::Duration;

use common::{TestApp, TestOptions, png};
use serde_json::{Value, json};

#[tokio::test]
async fn an_enqueued_image_is_captioned_and_the_result_can_be_polled() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let (status, job) = app
        .enqueue(&png(50, 40, 1), json!({"length": "short"}))
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["state"], "queued");
    let id = job["id"].as_str().unwrap();
    let done = app.wait_job(id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let caption = done["result"]["caption"].as_str().unwrap();
    assert!(!caption.is_empty());
    assert_eq!(done["result"]["usage"]["completion_tokens"], 8);
    assert_eq!(done["attempt"], 1);
    assert!(done["model"].as_str().unwrap().ends_with("tiny"));
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_existing_job() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let img = png(50, 40, 2);
    let (s1, a) = app
        .enqueue(&img, json!({"idempotency_key": "photo-1"}))
        .await;
    let (s2, b) = app
        .enqueue(&img, json!({"idempotency_key": "photo-1"}))
        .await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(a["id"], b["id"]);
    let r = app
        .client
        .post(format!("{}/v1/jobs", app.base))
        .header("Idempotency-Key", "photo-1")
        .json(&json!({"image": {"data": common::data_uri(&img)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], a["id"]);
}

#[tokio::test]
async fn a_batch_is_enqueued_in_one_request_and_reports_progress() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let jobs: Vec<Value> = (0..4)
        .map(|i| json!({"image": {"data": common::data_uri(&png(40, 30, i))}, "max_tokens": 3}))
        .collect();
    let (status, body) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    assert_eq!(status, 202, "{body}");
    let batch = body["batch_id"].as_str().unwrap().to_string();
    assert_eq!(body["job_ids"].as_array().unwrap().len(), 4);
    let mut view = Value::Null;
    for _ in 0..120 {
        view = app.get(&format!("/v1/batches/{batch}")).await.1;
        if view["done"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(view["done"], true, "{view}");
    assert_eq!(view["counts"]["succeeded"], 4);
    assert_eq!(view["total"], 4);
    assert!(view["images_per_second"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn a_batch_with_one_invalid_job_is_refused_whole() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let jobs =
        json!([{"image": {"data": common::data_uri(&png(40, 30, 1))}}, {"image": {"data": "%%%"}}]);
    let (status, body) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("jobs[1]"),
        "{body}"
    );
    assert_eq!(app.get("/v1/stats").await.1["jobs"]["queued"], 0);
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_can_be_retried() {
    let app = TestApp::spawn(TestOptions::default()).await;
    assert_eq!(app.post("/v1/queue/pause", &json!({})).await.0, 200);
    let (_, job) = app.enqueue(&png(50, 40, 3), json!({})).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["job"]["state"], "cancelled");
    let (status, body) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "queued");
    assert_eq!(app.post("/v1/queue/resume", &json!({})).await.0, 200);
    assert_eq!(app.wait_job(id).await["state"], "succeeded");
    let (status, body) = app.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, 409, "a succeeded job is not retried: {body}");
}

#[tokio::test]
async fn a_running_job_stops_at_its_next_token_when_cancelled() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let wide = std::fs::read(common::tiny_model_dir().join("image_wide_720x430.png")).unwrap();
    let (_, job) = app.enqueue(&wide, json!({"max_tokens": 2048})).await;
    let id = job["id"].as_str().unwrap();
    for _ in 0..200 {
        if app.get(&format!("/v1/jobs/{id}")).await.1["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["job"]["state"], "running", "{body}");
    let done = app.wait_job(id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["result"].is_null());
}

#[tokio::test]
async fn pause_survives_a_restart_and_resume_runs_the_waiting_jobs() {
    let app = TestApp::spawn(TestOptions::default()).await;
    app.post("/v1/queue/pause", &json!({})).await;
    let (_, job) = app.enqueue(&png(50, 40, 4), json!({})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let app = app.restart(TestOptions::default()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        job["state"], "queued",
        "paused queue must not run jobs after a restart"
    );
    assert_eq!(app.get("/v1/stats").await.1["paused"], true);
    app.post("/v1/queue/resume", &json!({})).await;
    assert_eq!(app.wait_job(&id).await["state"], "succeeded");
}

#[tokio::test]
async fn jobs_are_listed_with_keyset_pagination() {
    let app = TestApp::spawn(TestOptions::default()).await;
    app.post("/v1/queue/pause", &json!({})).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            app.enqueue(&png(20, 20, i), json!({})).await.1["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let q = if after.is_empty() {
            "/v1/jobs?limit=3&state=queued".to_string()
        } else {
            format!("/v1/jobs?limit=3&state=queued&after={after}")
        };
        let (status, page) = app.get(&q).await;
        assert_eq!(status, 200);
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_string());
        }
        match page["next_after"].as_str() {
            Some(a) => after = a.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every job once, in creation order");
    assert_eq!(app.get("/v1/jobs?state=bogus").await.0, 400);
}

#[tokio::test]
async fn with_a_token_every_route_but_health_requires_it() {
    let app = TestApp::spawn(TestOptions {
        token: Some("s3cret".into()),
        ..TestOptions::default()
    })
    .await;
    let raw = reqwest::Client::new();
    let health = raw
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    for path in ["/v1/stats", "/v1/jobs", "/metrics", "/ready"] {
        let r = raw.get(format!("{}{path}", app.base)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        let r = raw
            .get(format!("{}{path}", app.base))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }
    assert_eq!(app.get("/v1/stats").await.0, 200);
}

#[tokio::test]
async fn paths_must_resolve_inside_a_library_root() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let inside = app.library.join("a.png");
    std::fs::write(&inside, png(30, 30, 9)).unwrap();
    let outside_dir = tempfile::tempdir().unwrap();
    let outside = outside_dir.path().join("secret.png");
    std::fs::write(&outside, png(30, 30, 8)).unwrap();
    std::os::unix::fs::symlink(&outside, app.library.join("link.png")).unwrap();
    let cases = [
        (outside.display().to_string(), 403),
        (format!("{}/../../etc/passwd", app.library.display()), 403),
        (app.library.join("link.png").display().to_string(), 403),
        ("relative.png".to_string(), 400),
        (format!("{}/nope.png", app.library.display()), 400),
    ];
    for (path, want) in cases {
        let (status, body) = app
            .post("/v1/jobs", &json!({"image": {"path": path}}))
            .await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body["error"]["message"].is_string());
    }
    let (status, job) = app
        .post("/v1/jobs", &json!({"image": {"path": inside}}))
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(
        app.wait_job(job["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413_and_a_json_error() {
    let app = TestApp::spawn(TestOptions {
        body_limit_mib: 1,
        ..TestOptions::default()
    })
    .await;
    let big = "A".repeat(2 * 1024 * 1024);
    let (status, body) = app.post("/v1/jobs", &json!({"image": {"data": big}})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "body_too_large");
}

#[tokio::test]
async fn a_corrupt_image_fails_its_job_with_a_reason_while_others_succeed() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let good = png(50, 40, 5);
    let mut truncated = png(200, 150, 6);
    truncated.truncate(truncated.len() / 2);
    let (_, bad) = app.enqueue(&truncated, json!({})).await;
    let (_, ok) = app.enqueue(&good, json!({})).await;
    let bad = app.wait_job(bad["id"].as_str().unwrap()).await;
    let ok = app.wait_job(ok["id"].as_str().unwrap()).await;
    assert_eq!(bad["state"], "failed");
    assert_eq!(bad["error"]["code"], "image_unreadable", "{bad}");
    assert_eq!(bad["attempt"], 1, "a permanent error is not retried");
    assert_eq!(ok["state"], "succeeded");
}

#[tokio::test]
async fn bad_requests_get_4xx_json_errors() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let r = app
        .client
        .post(format!("{}/v1/jobs", app.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let cases = [
        (json!({"image": {"data": "aGVsbG8="}}), "invalid_image"),
        (json!({"image": {"data": "***"}}), "invalid_base64"),
        (
            json!({"task": "query", "image": {"data": common::data_uri(&png(10, 10, 1))}}),
            "invalid_params",
        ),
        (json!({"task": "paint"}), "invalid_json"),
        (json!({}), "missing_image"),
        (
            json!({"image": {"data": common::data_uri(&png(10, 10, 1))}, "max_tokens": "many"}),
            "invalid_json",
        ),
    ];
    for (body, code) in cases {
        let (status, resp) = app.post("/v1/jobs", &body).await;
        assert!((400..500).contains(&status), "{body} → {status}");
        assert_eq!(resp["error"]["code"], code, "{body} → {resp}");
    }
    assert_eq!(app.get("/v1/jobs/not-a-uuid").await.0, 400);
    assert_eq!(
        app.get("/v1/jobs/01a21eaa-8359-7143-8198-74bd5f7c5d37")
            .await
            .0,
        404
    );
    assert_eq!(app.get("/nowhere").await.0, 404);
}

#[tokio::test]
async fn a_multipart_upload_becomes_a_job() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png(50, 40, 7)).file_name("p.png"),
        )
        .text("task", "detect")
        .text("object", "cat");
    let r = app
        .client
        .post(format!("{}/v1/jobs", app.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let job: Value = r.json().await.unwrap();
    let done = app.wait_job(job["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["result"]["objects"].is_array());
}

#[tokio::test]
async fn stats_and_metrics_report_the_queue() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let (_, job) = app.enqueue(&png(50, 40, 1), json!({})).await;
    app.wait_job(job["id"].as_str().unwrap()).await;
    let (status, stats) = app.get("/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["jobs"]["succeeded"], 1);
    assert_eq!(stats["workers"]["target"], 1);
    let text = app.get_text("/metrics").await;
    assert!(
        text.contains("captiond_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_batch_reuses_jobs_whose_idempotency_key_exists() {
    let app = TestApp::spawn(TestOptions::default()).await;
    app.post("/v1/queue/pause", &json!({})).await;
    let img = common::data_uri(&png(30, 30, 1));
    let (_, first) = app
        .enqueue(&png(30, 30, 1), json!({"idempotency_key": "k1"}))
        .await;
    let jobs = json!([{"image": {"data": img}, "idempotency_key": "k1"}, {"image": {"data": img}, "idempotency_key": "k2"}, {"image": {"data": img}}]);
    let (status, body) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    assert_eq!(status, 202, "{body}");
    let ids = body["job_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[0], first["id"]);
    assert_ne!(ids[1], ids[2]);
    assert_eq!(app.get("/v1/stats").await.1["jobs"]["queued"], 3);
}
