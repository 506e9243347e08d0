//! Moondream Station and OpenAI wire formats over real HTTP against the tiny model:
//! every skill, streaming and not, the error shapes, a client that disconnects, and
//! the OpenAPI document covering every route.

mod common;

use std::time::Duration;

use common::{TestApp, TestOptions, data_uri, png};
use futures::StreamExt;
use serde_json::{Value, json};

async fn post_raw(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.base))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body.
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn image() -> String {
    data_uri(&png(48, 32, 5))
}

#[tokio::test]
async fn station_skills_answer_in_station_shapes_with_request_ids_and_token_stats() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let raw_b64 = image().split_once(',').unwrap().1.to_string();
    let (status, v) = app
        .post(
            "/v1/caption",
            &json!({"image_url": raw_b64, "length": "short", "settings": {"max_tokens": 7}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["caption"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    let tokens = v["_stats"]["tokens"].as_u64().unwrap();
    assert!((1..=7).contains(&tokens), "max_tokens honoured: {v}");
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(tokens));
    assert!(v["_stats"]["tokens_per_sec"].as_f64().unwrap() > 0.0);
    // request_id is the job: it ran at interactive priority, with these parameters.
    let (_, job) = app
        .get(&format!("/v1/jobs/{}", v["request_id"].as_str().unwrap()))
        .await;
    assert_eq!(job["priority"], 10);
    assert_eq!(job["params"]["length"], "short");
    assert_eq!(job["result"]["caption"], v["caption"]);

    let (status, v) = app
        .post("/v1/query", &json!({"image_url": image(), "question": "What is it?", "reasoning": false, "settings": {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9}}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["answer"].is_string() && v["request_id"].is_string(),
        "{v}"
    );

    let (status, v) = app
        .post(
            "/v1/detect",
            &json!({"image_url": image(), "object": "dog"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for o in v["objects"].as_array().unwrap() {
        for k in ["x_min", "y_min", "x_max", "y_max"] {
            assert!(o[k].is_f64(), "{o}");
        }
    }
    let (status, v) = app
        .post("/v1/point", &json!({"image_url": image(), "object": "dog"}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["count"].as_u64().unwrap() as usize,
        v["points"].as_array().unwrap().len()
    );

    let (status, v) = app.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["models"][0]["id"], v["data"][0]["id"]);
}

#[tokio::test]
async fn station_streams_whole_words_then_stats_then_completed() {
    let app = TestApp::spawn(TestOptions::default()).await;
    for (path, body) in [
        (
            "/v1/caption",
            json!({"image_url": image(), "stream": true, "settings": {"max_tokens": 40}}),
        ),
        (
            "/v1/query",
            json!({"image_url": image(), "question": "What?", "stream": true, "settings": {"max_tokens": 40}}),
        ),
    ] {
        let r = post_raw(&app, path, &body).await;
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = sse_events(&r.text().await.unwrap());
        let parsed: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(parsed.last().unwrap(), &json!({"completed": true}));
        let stats = &parsed[parsed.len() - 2];
        assert!(stats["stats"]["tokens"].as_u64().unwrap() > 0, "{stats}");
        let chunks: Vec<&str> = parsed[..parsed.len() - 2]
            .iter()
            .map(|p| p["chunk"].as_str().expect("chunk events"))
            .collect();
        assert!(chunks.len() > 1, "{chunks:?}");
        for c in &chunks[..chunks.len() - 1] {
            assert!(
                c.ends_with(char::is_whitespace),
                "a word was split: {chunks:?}"
            );
        }
        let streamed: String = chunks.concat();
        let (_, job) = app
            .get(&format!(
                "/v1/jobs/{}",
                stats["request_id"].as_str().unwrap()
            ))
            .await;
        let field = if path == "/v1/caption" {
            "caption"
        } else {
            "answer"
        };
        assert_eq!(job["result"][field].as_str().unwrap(), streamed);
    }
}

#[tokio::test]
async fn station_errors_have_real_status_codes_and_a_top_level_error_string() {
    let app = TestApp::spawn(TestOptions {
        body_limit_mib: 1,
        request_timeout_secs: 1,
        ..TestOptions::default()
    })
    .await;
    let cases = [
        (json!({"image_url": "!!!not base64"}), 400, "/v1/caption"),
        (
            json!({"image_url": data_uri(b"plain text, not an image")}),
            400,
            "/v1/caption",
        ),
        (json!({"image_url": image()}), 400, "/v1/detect"), // no object
        (
            json!({"image_url": image(), "length": "epic"}),
            400,
            "/v1/caption",
        ),
        (json!({"length": "short"}), 400, "/v1/caption"),
        (
            json!({"image_url": image(), "settings": {"max_tokens": 0}}),
            400,
            "/v1/caption",
        ),
        (
            json!({"image_url": "A".repeat(2 << 20)}),
            413,
            "/v1/caption",
        ),
    ];
    for (body, want, path) in cases {
        let (status, v) = app.post(path, &body).await;
        assert_eq!(status, want, "{path} {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // Paused → 503.
    app.post("/v1/queue/pause", &json!({})).await;
    let (status, v) = app
        .post("/v1/caption", &json!({"image_url": image()}))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("paused"));
    app.post("/v1/queue/resume", &json!({})).await;
    // A long job holds the only worker: the request times out (504) and its job is cancelled.
    let (_, long) = app
        .enqueue(&png(720, 430, 1), json!({"max_tokens": 2048}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, v) = app
        .post("/v1/caption", &json!({"image_url": image()}))
        .await;
    assert_eq!(status, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cancelled"), "{v}");
    let (_, list) = app.get("/v1/jobs?state=cancelled").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
    app.post(
        &format!("/v1/jobs/{}/cancel", long["id"].as_str().unwrap()),
        &json!({}),
    )
    .await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_job() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let r = post_raw(
        &app,
        "/v1/caption",
        &json!({"image_url": data_uri(&png(720, 430, 9)), "stream": true, "settings": {"max_tokens": 2048}}),
    )
    .await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chunk"));
    let (_, running) = app.get("/v1/jobs?state=running").await;
    let id = running["jobs"][0]["id"].as_str().unwrap().to_string();
    drop(body); // the client goes away mid-stream
    let job = app.wait_job(&id).await;
    assert_eq!(job["state"], "cancelled", "{job}");

    // Without streaming, too: the request future is dropped with the connection.
    let client = app.client.clone();
    let url = format!("{}/v1/caption", app.base);
    let req = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"image_url": data_uri(&png(720, 430, 8)), "settings": {"max_tokens": 2048}}))
            .send()
            .await
    });
    let mut id = None;
    for _ in 0..200 {
        let (_, running) = app.get("/v1/jobs?state=running").await;
        if let Some(j) = running["jobs"][0]["id"].as_str() {
            id = Some(j.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    req.abort();
    let job = app.wait_job(&id.expect("the request's job runs")).await;
    assert_eq!(job["state"], "cancelled", "{job}");
}

#[tokio::test]
async fn chat_completions_speak_the_openai_format() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let msg = |text: &str| {
        json!([
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": image()}}
            ]}
        ])
    };
    let (status, v) = app
        .post("/v1/chat/completions", &json!({"model": "moondream", "messages": msg("Describe this image."), "max_tokens": 6}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(u["completion_tokens"].as_u64().unwrap() <= 6);
    let (_, job) = app
        .get(&format!("/v1/jobs/{}", v["request_id"].as_str().unwrap()))
        .await;
    assert_eq!(job["task"], "caption");

    let (_, v) = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": msg("How many dogs are there?"), "max_tokens": 6}),
        )
        .await;
    let (_, job) = app
        .get(&format!("/v1/jobs/{}", v["request_id"].as_str().unwrap()))
        .await;
    assert_eq!(job["task"], "query");
    assert_eq!(job["params"]["question"], "How many dogs are there?");

    let r = post_raw(
        &app,
        "/v1/chat/completions",
        &json!({"messages": msg(""), "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 20}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.is_empty());
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert!(matches!(finish, Some("stop" | "length")));
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{usage}");

    let (status, v) = app
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("no image"));
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_answers() {
    let app = TestApp::spawn(TestOptions::default()).await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{path}"
            );
            let url = format!(
                "{}{}",
                app.base,
                path.replace("{id}", &uuid::Uuid::now_v7().to_string())
            );
            let rb = match method.as_str() {
                "get" => app.client.get(url),
                "post" => app.client.post(url).json(&json!({})),
                other => panic!("unexpected method {other}"),
            };
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            // An event stream never ends: its status and type are the answer.
            let endless = op["responses"]["200"]["content"]
                .as_object()
                .is_some_and(|c| c.len() == 1 && c.contains_key("text/event-stream"));
            let text = if endless {
                let kind = r.headers()["content-type"].to_str().unwrap().to_string();
                assert!(kind.starts_with("text/event-stream"), "{path}: {kind}");
                String::new()
            } else {
                r.text().await.unwrap()
            };
            assert!(
                status != 405 && !text.contains("no such route"),
                "{method} {path}: {status} {text}"
            );
        }
    }
    // The router is built from the same table; the list is what the issue names.
    for p in [
        "/v1/jobs",
        "/v1/batches",
        "/v1/caption",
        "/v1/query",
        "/v1/detect",
        "/v1/point",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert_eq!(operations, captiond::api::openapi::table().len());
    // Request schemas come from the Rust types.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in ["JobRequest", "SkillRequest", "ChatRequest", "JobView"] {
        assert!(schemas.contains_key(s), "{s}");
    }
    // A route that is not in the table does not exist.
    let (status, v) = app.get("/v1/not-a-route").await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "not_found");
}

#[tokio::test]
async fn skills_answer_503_until_the_model_is_loaded() {
    let opts = TestOptions::default();
    let (_tmp, data_dir, library) = TestApp::folders(&opts);
    let mut settings = common::settings(&data_dir, &library, &opts);
    settings.model.model_dir = Some(library.join("no-model-here"));
    let app = captiond::App::build(&settings, captiond::Engine::LoadModel)
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/caption", app.address()))
        .json(&json!({"image_url": image()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("model"), "{v}");
    app.shutdown().await;
}

/// The first stderr lines of `captiond serve` with `args` until it names its address
/// (or fails to bind); the process is killed afterwards.
fn serve_address(args: &[&str], env: &[(&str, &str)]) -> String {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = common::serve_command(tmp.path(), args, env)
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("addr=") || line.contains("cannot listen") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

#[test]
fn station_mode_listens_on_2020_unless_an_address_is_given() {
    // Either it listens on 2020, or 2020 is taken here and the error names it.
    let out = serve_address(&["--station"], &[]);
    assert!(out.contains("127.0.0.1:2020"), "{out}");
    let out = serve_address(&["--station", "--bind", "127.0.0.1:0"], &[]);
    assert!(out.contains("addr=") && !out.contains(":2020"), "{out}");
    let out = serve_address(
        &[],
        &[
            ("CAPTIOND_STATION", "true"),
            ("CAPTIOND_BIND", "127.0.0.1:0"),
        ],
    );
    assert!(out.contains("addr=") && !out.contains(":2020"), "{out}");
    let out = serve_address(&["--bind", "127.0.0.1:0"], &[]);
    assert!(!out.contains(":2020"), "{out}");
}
