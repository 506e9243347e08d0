//! Hostile HTTP input against the real binary: hand-written attacks and
//! property-based fuzzing of every route in `/openapi.json`. Every answer must be a
//! 4xx JSON error (never a 5xx), the server must stay up, and its peak memory must
//! stay bounded. `scripts/reliability` runs more fuzz cases (and schemathesis).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Rng, Server, data_uri, png, png_bomb, report, scale};
use serde_json::{Map, Value, json};

/// A real small JPEG whose frame header is patched to declare `w`×`h`.
fn jpeg_bomb(w: u16, h: u16) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9]));
    let mut out = common::jpeg_with_orientation(&img, 1);
    let sof = out
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("a baseline JPEG has SOF0");
    out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    out
}

struct Checker {
    client: reqwest::Client,
    base: String,
    cases: usize,
    failures: Vec<String>,
}

impl Checker {
    /// Sends a request and checks the answer: no 5xx; a 4xx has a JSON error.
    async fn check(
        &mut self,
        name: &str,
        rb: reqwest::RequestBuilder,
        want: &[u16],
    ) -> (u16, Value) {
        self.cases += 1;
        let r = match rb.send().await {
            Ok(r) => r,
            Err(e) if e.is_builder() => return (0, Value::Null), // the client refused to send it
            Err(e) => {
                self.failures.push(format!("{name}: no answer: {e}"));
                return (0, Value::Null);
            }
        };
        let status = r.status().as_u16();
        let stream = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if stream && status == 200 {
            // An event stream (the dashboard's feed) does not end: the answer is its head.
            if !want.is_empty() && !want.contains(&status) {
                self.failures
                    .push(format!("{name}: {status} (wanted {want:?})"));
            }
            return (status, Value::Null);
        }
        let mut text = r.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        if status >= 500 {
            self.failures.push(format!("{name}: {status} {text}"));
        } else if status >= 400 && body.get("error").is_none() {
            self.failures
                .push(format!("{name}: {status} without a JSON error: {text}"));
        } else if !want.is_empty() && !want.contains(&status) {
            self.failures
                .push(format!("{name}: {status} (wanted {want:?}) {text}"));
        }
        (status, body)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.base))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_json_errors_and_the_server_stays_up_and_small() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let lib = tmp.path().join("lib");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.png"), png(10, 10, 1)).unwrap();
    std::fs::write(lib.join("ok.png"), png(10, 10, 2)).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.png"), lib.join("link.png")).unwrap();
    std::os::unix::fs::symlink(&outside, lib.join("door")).unwrap();
    let lib = lib.canonicalize().unwrap();
    let lib_s = lib.display().to_string();
    let server = Server::start(
        &data,
        &[
            "--library-root",
            &lib_s,
            "--body-timeout-secs",
            "2",
            "--header-timeout-secs",
            "2",
            "--max-tokens",
            "4",
        ],
        &[],
    );
    let client = reqwest::Client::new();
    server.wait_ready(&client).await;
    let mut c = Checker {
        client: client.clone(),
        base: server.base.clone(),
        cases: 0,
        failures: Vec::new(),
    };
    let json_ct = |rb: reqwest::RequestBuilder| rb.header("content-type", "application/json");

    // Malformed JSON and wrong types.
    for body in [
        "{\"image\":",
        "[]",
        "null",
        "{\"image\": \"x\"}",
        "{\"task\": 5}",
        "{\"task\": \"paint\", \"image\": {\"data\": \"AA==\"}}",
        "{\"image\": {\"data\": \"AA==\"}, \"max_tokens\": \"ten\"}",
        "{\"image\": {\"path\": 7}}",
        "{\"image\": {\"path\": \"/x\", \"data\": \"AA==\"}}",
        "{\"image\": {\"data\": \"AA==\"}, \"priority\": 1e400}",
        "{\"image\": {\"data\": \"AA==\"}, \"max_attempts\": -1}",
        "\u{0}",
    ] {
        c.check(
            &format!("malformed {body}"),
            json_ct(c.post("/v1/jobs")).body(body.to_string()),
            &[400, 415, 422],
        )
        .await;
    }
    c.check(
        "invalid UTF-8",
        json_ct(c.post("/v1/jobs")).body(vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']),
        &[400],
    )
    .await;
    for path in [
        "/v1/batches",
        "/v1/caption",
        "/v1/chat/completions",
        "/v1/jobs/lookup",
    ] {
        c.check(
            &format!("malformed {path}"),
            json_ct(c.post(path)).body("{{{"),
            &[400],
        )
        .await;
        c.check(
            &format!("wrong type {path}"),
            c.post(path)
                .json(&json!({"jobs": 1, "image_url": 2, "messages": "x", "ids": [1]})),
            &[400, 422],
        )
        .await;
    }
    c.check(
        "too many ids and keys /v1/jobs/lookup",
        c.post("/v1/jobs/lookup").json(&json!({
            "ids": [uuid::Uuid::now_v7()],
            "keys": vec!["lib:k"; 10_000],
        })),
        &[400],
    )
    .await;
    // Bodies too large: declared, and streamed without a length.
    let big = vec![b'a'; 100 << 20];
    c.check(
        "100 MB body",
        json_ct(c.post("/v1/jobs")).body(big.clone()),
        &[413],
    )
    .await;
    let stream =
        futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 1 << 20])));
    c.check(
        "100 MB chunked",
        json_ct(c.post("/v1/jobs")).body(reqwest::Body::wrap_stream(stream)),
        &[413],
    )
    .await;
    drop(big);
    // Base64 that is not base64, and base64 that is not an image.
    c.check(
        "invalid base64",
        c.post("/v1/jobs")
            .json(&json!({"image": {"data": "@@@not base64@@@"}})),
        &[400],
    )
    .await;
    c.check(
        "base64 of text",
        c.post("/v1/jobs")
            .json(&json!({"image": {"data": data_uri(b"hello, I am not an image")}})),
        &[400],
    )
    .await;
    c.check(
        "empty image",
        c.post("/v1/jobs").json(&json!({"image": {"data": ""}})),
        &[400],
    )
    .await;
    c.check(
        "data URI without base64",
        c.post("/v1/jobs")
            .json(&json!({"image": {"data": "data:image/png,abc"}})),
        &[400],
    )
    .await;
    // Decompression bombs.
    c.check(
        "PNG 60000x60000",
        c.post("/v1/jobs")
            .json(&json!({"image": {"data": data_uri(&png_bomb(60_000, 60_000))}})),
        &[422],
    )
    .await;
    c.check(
        "JPEG 60000x60000",
        c.post("/v1/jobs")
            .json(&json!({"image": {"data": data_uri(&jpeg_bomb(60_000, 60_000))}})),
        &[422],
    )
    .await;
    c.check(
        "PNG bomb via Station",
        c.post("/v1/caption")
            .json(&json!({"image_url": data_uri(&png_bomb(60_000, 60_000))})),
        &[400, 422],
    )
    .await;
    c.check(
        "PNG bomb via multipart",
        c.post("/v1/jobs")
            .multipart(reqwest::multipart::Form::new().part(
                "image",
                reqwest::multipart::Part::bytes(png_bomb(50_000, 50_000)).file_name("b.png"),
            )),
        &[422],
    )
    .await;
    // A truncated image is accepted (its header is fine) and fails with a reason.
    let p = png(64, 64, 3);
    let (status, job) = c
        .check(
            "truncated image",
            c.post("/v1/jobs")
                .json(&json!({"image": {"data": data_uri(&p[..p.len() / 2])}})),
            &[202],
        )
        .await;
    if status == 202 {
        let id = job["id"].as_str().unwrap();
        let (_, j) = c
            .check(
                "truncated image job",
                c.get(&format!("/v1/jobs/{id}?wait=30s")),
                &[200],
            )
            .await;
        if j["state"] != "failed" || j["error"]["code"] != "image_unreadable" {
            c.failures.push(format!("truncated image: {j}"));
        }
    }
    // Path traversal.
    for (name, path, want) in [
        (
            "dot-dot",
            format!("{lib_s}/../outside/secret.png"),
            &[403][..],
        ),
        ("absolute outside", "/etc/passwd".to_string(), &[403]),
        (
            "symlinked file out of the root",
            format!("{lib_s}/link.png"),
            &[403],
        ),
        (
            "symlinked folder out of the root",
            format!("{lib_s}/door/secret.png"),
            &[403],
        ),
        (
            "NUL byte",
            format!("{lib_s}/ok.png\u{0}/../../etc/passwd"),
            &[400],
        ),
        ("relative", "ok.png".to_string(), &[400]),
        ("a folder", lib_s.clone(), &[400]),
        ("missing", format!("{lib_s}/missing.png"), &[400]),
    ] {
        c.check(
            &format!("path {name}"),
            c.post("/v1/jobs").json(&json!({"image": {"path": path}})),
            want,
        )
        .await;
    }
    c.check(
        "path inside the root works",
        c.post("/v1/jobs")
            .json(&json!({"image": {"path": format!("{lib_s}/ok.png")}})),
        &[202],
    )
    .await;
    // Unknown ids and odd paths.
    let unknown = uuid::Uuid::now_v7();
    c.check("unknown job", c.get(&format!("/v1/jobs/{unknown}")), &[404])
        .await;
    c.check(
        "unknown cancel",
        c.post(&format!("/v1/jobs/{unknown}/cancel")),
        &[404],
    )
    .await;
    c.check(
        "unknown retry",
        c.post(&format!("/v1/jobs/{unknown}/retry")),
        &[404],
    )
    .await;
    c.check(
        "unknown batch",
        c.get(&format!("/v1/batches/{unknown}")),
        &[404],
    )
    .await;
    c.check("not a uuid", c.get("/v1/jobs/not-a-uuid"), &[400])
        .await;
    c.check(
        "encoded traversal",
        c.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
        &[400, 404],
    )
    .await;
    c.check(
        "bad wait",
        c.get(&format!("/v1/jobs/{unknown}?wait=forever")),
        &[400],
    )
    .await;
    c.check(
        "bad list filter",
        c.get("/v1/jobs?state=exploded&limit=-5"),
        &[400],
    )
    .await;
    c.check(
        "wrong method",
        c.client.delete(format!("{}/v1/jobs", c.base)),
        &[405],
    )
    .await;

    // 50 concurrent posts with one idempotency key → one job.
    let body = json!({"image": {"data": data_uri(&png(12, 12, 77))}, "idempotency_key": "race-1"});
    let mut posts = Vec::new();
    for _ in 0..50 {
        posts.push(c.post("/v1/jobs").json(&body).send());
    }
    let answers = futures::future::join_all(posts).await;
    let mut ids = std::collections::HashSet::new();
    for a in answers {
        let r = a.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        c.cases += 1;
        if status != 202 && status != 200 {
            c.failures.push(format!("idempotency race: {status} {v}"));
        }
        ids.insert(v["id"].as_str().unwrap_or_default().to_string());
    }
    if ids.len() != 1 {
        c.failures
            .push(format!("idempotency race made {} jobs", ids.len()));
    }

    // Uploads refused while the client is still sending (a declared length over the
    // limit is refused at once; a chunked body once the limit is crossed): the answer
    // must survive the unread rest of the body (no reset before the client reads it).
    let addr = server.base.trim_start_matches("http://").to_string();
    for (i, chunked) in [false, true, false, true].into_iter().enumerate() {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked"
        } else {
            "Content-Length: 104857600"
        };
        s.write_all(
            format!("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut chunk = Vec::new();
        if chunked {
            chunk.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        }
        chunk.resize(chunk.len() + (1 << 20), b'a');
        if chunked {
            chunk.extend_from_slice(b"\r\n");
        }
        // Past the 32 MiB limit, a pause for the server to answer, then more body.
        for _ in 0..34 {
            let _ = s.write_all(&chunk);
        }
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..4 {
            let _ = s.write_all(&chunk);
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let head = match s.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
            Err(e) => format!("read failed: {e}"),
        };
        c.cases += 1;
        if !head.starts_with("HTTP/1.1 413") {
            c.failures
                .push(format!("refused upload still sending {i}: {head:?}"));
            break;
        }
    }

    // Slow-loris: bodies trickled a byte at a time get 408 after the deadline, and the
    // server keeps answering others meanwhile.
    let mut slow = Vec::new();
    for _ in 0..scale(40, 200) {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").unwrap();
        slow.push(s);
    }
    let t = Instant::now();
    let (status, _) = c
        .check(
            "a normal request during slow-loris",
            c.get("/v1/stats"),
            &[200],
        )
        .await;
    if status == 200 && t.elapsed() > Duration::from_secs(1) {
        c.failures
            .push(format!("slow clients delayed others: {:?}", t.elapsed()));
    }
    for s in &mut slow {
        let _ = s.write_all(b" ");
    }
    std::thread::sleep(Duration::from_millis(2500));
    for (i, mut s) in slow.into_iter().enumerate() {
        let _ = s.write_all(b" ");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        c.cases += 1;
        if !head.starts_with("HTTP/1.1 408") {
            c.failures.push(format!("slow-loris {i}: {head:?}"));
            break;
        }
    }

    // Header slow-loris: a request whose headers trickle in a line at a time is dropped
    // once the header deadline passes, and others are answered meanwhile.
    let mut slow = Vec::new();
    for _ in 0..scale(40, 200) {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        for s in &mut slow {
            let _ = s.write_all(format!("X-Slow-{round}: 1\r\n").as_bytes());
        }
    }
    let (status, _) = c
        .check(
            "a normal request during header slow-loris",
            c.get("/v1/stats"),
            &[200],
        )
        .await;
    assert_eq!(status, 200);
    for (i, mut s) in slow.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let read = s.read(&mut buf);
        c.cases += 1;
        // Closed (EOF or reset), never answered: the request never finished.
        let closed = matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        if !closed {
            c.failures.push(format!(
                "header slow-loris {i} still open after {:?}: {read:?}",
                started.elapsed()
            ));
            break;
        }
    }

    // Property-based fuzzing of every route in the OpenAPI document.
    let fuzz = fuzz_openapi(&mut c, scale(25, 400)).await;

    let (status, _) = c.check("still alive", c.get("/health"), &[200]).await;
    assert_eq!(status, 200);
    let peak_mib = server.peak_rss_kib() / 1024;
    server.kill();
    let note = format!("{fuzz} fuzz cases; peak RSS {peak_mib} MiB");
    report("hostile HTTP input", c.cases, c.failures.len(), 0, &note);
    println!("{note}");
    assert!(c.failures.is_empty(), "{:#?}", c.failures);
    assert!(peak_mib < 1024, "memory stays bounded: {peak_mib} MiB");
}

/// A value for `schema`: usually shaped like it, sometimes hostile.
fn value_for(schema: &Value, defs: &Map<String, Value>, rng: &mut Rng, depth: u32) -> Value {
    if depth > 6 || rng.chance(12) {
        return hostile(rng);
    }
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return match defs.get(name) {
            Some(s) => value_for(s, defs, rng, depth + 1),
            None => Value::Null,
        };
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(opts) = schema.get(key).and_then(Value::as_array)
            && !opts.is_empty()
        {
            let pick = &opts[rng.below(opts.len() as u64) as usize];
            return value_for(pick, defs, rng, depth + 1);
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.is_empty()
    {
        return e[rng.below(e.len() as u64) as usize].clone();
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) if !ts.is_empty() => ts[rng.below(ts.len() as u64) as usize]
            .as_str()
            .unwrap_or("null")
            .to_string(),
        _ => "object".into(),
    };
    match ty.as_str() {
        "string" => json!(
            [
                "",
                "x",
                "data:image/png;base64,iVBORw0KGgo=",
                "AAAA",
                "caption",
                "../../etc/passwd",
                "\u{202e}\u{0}",
                "😀"
            ][rng.below(8) as usize]
        ),
        "integer" => json!([0, 1, -1, 7, 100, 2048, 1_000_000, i64::MAX][rng.below(8) as usize]),
        "number" => json!([0.0, 0.5, -1.0, 1.0, 5.5, 1e300][rng.below(6) as usize]),
        "boolean" => json!(rng.chance(50)),
        "null" => Value::Null,
        "array" => {
            let n = rng.below(4);
            let item = schema.get("items").cloned().unwrap_or(json!({}));
            Value::Array(
                (0..n)
                    .map(|_| value_for(&item, defs, rng, depth + 1))
                    .collect(),
            )
        }
        _ => {
            let mut m = Map::new();
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    if required.contains(&k.as_str()) || rng.chance(50) {
                        if required.contains(&k.as_str()) && rng.chance(5) {
                            continue; // a missing required field
                        }
                        m.insert(k.clone(), value_for(s, defs, rng, depth + 1));
                    }
                }
            }
            if rng.chance(10) {
                m.insert("unexpected_field".into(), hostile(rng));
            }
            Value::Object(m)
        }
    }
}

fn hostile(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::Null,
        1 => json!("A".repeat(50_000)),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!([[[[[[[[[[[]]]]]]]]]]]),
        5 => json!({"$ref": "#/nope", "__proto__": {}}),
        6 => json!("\u{0}\u{ffff}\\'\"<script>"),
        7 => json!(true),
        _ => json!(1.5e308),
    }
}

async fn fuzz_openapi(c: &mut Checker, per_route: usize) -> usize {
    let mut rng = Rng::from_clock("fuzz");
    let (_, doc) = c.check("openapi", c.get("/openapi.json"), &[200]).await;
    let defs = doc["components"]["schemas"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut n = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for _ in 0..per_route {
                let id = match rng.below(4) {
                    0 => "not-a-uuid".to_string(),
                    1 => "%00%ff".to_string(),
                    _ => uuid::Uuid::now_v7().to_string(),
                };
                let mut url = path.replace("{id}", &id);
                let mut query = Vec::new();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] == "query" && rng.chance(50) {
                        let v = value_for(&p["schema"], &defs, &mut rng, 3);
                        let mut s = match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        s.truncate(s.char_indices().nth(1500).map_or(s.len(), |(i, _)| i));
                        query.push(format!("{}={}", p["name"].as_str().unwrap(), urlencode(&s)));
                    }
                }
                if !query.is_empty() {
                    url = format!("{url}?{}", query.join("&"));
                }
                let rb = if method == "get" {
                    c.get(&url)
                } else {
                    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                    let body = if schema.is_null() {
                        json!({})
                    } else {
                        value_for(schema, &defs, &mut rng, 0)
                    };
                    // Interactive routes wait for their job: keep them short.
                    let body = match body {
                        Value::Object(mut m)
                            if path.starts_with("/v1/chat")
                                || path.starts_with("/v1/caption")
                                || path.starts_with("/v1/query") =>
                        {
                            m.insert("max_tokens".into(), json!(2));
                            Value::Object(m)
                        }
                        other => other,
                    };
                    c.post(&url).json(&body)
                };
                c.check(
                    &format!("fuzz {method} {path}"),
                    rb.timeout(Duration::from_secs(60)),
                    &[],
                )
                .await;
                n += 1;
            }
        }
    }
    n
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
