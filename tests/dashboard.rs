//! The web dashboard, in a real headless Chromium against the real service on the tiny
//! checkpoint: enqueue by file input, watch results arrive, retry a failure, pause and
//! resume, a token, phone width; plus its feed (`/v1/events`) and thumbnails over HTTP.
//! Screenshots land in `target/dashboard-screenshots/`.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use browser::Browser;
use common::{TestApp, TestOptions, jpeg_with_orientation, png, png_bomb};
use futures::StreamExt;
use serde_json::{Value, json};

/// Reads `/v1/events` in the background: every frame as (event name, JSON data).
struct Feed {
    frames: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    async fn open(app: &TestApp) -> Feed {
        let mut req = app.client.get(format!("{}/v1/events", app.base));
        if let Some(t) = &app.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let frames: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>> = Default::default();
        let f2 = frames.clone();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find("\n\n") {
                    let frame = buf[..i].to_string();
                    buf.drain(..i + 2);
                    let mut name = "message".to_string();
                    let mut data = String::new();
                    for line in frame.lines() {
                        if let Some(n) = line.strip_prefix("event:") {
                            name = n.trim().to_string();
                        } else if let Some(d) = line.strip_prefix("data:") {
                            data.push_str(d.strip_prefix(' ').unwrap_or(d));
                        }
                    }
                    if !data.is_empty() {
                        f2.lock()
                            .unwrap()
                            .push((name, serde_json::from_str(&data).unwrap()));
                    }
                }
            }
        });
        Feed { frames, task }
    }

    fn of(&self, name: &str) -> Vec<Value> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every job event: id → how many times it was sent, and the last state sent.
    fn jobs(&self) -> HashMap<String, (usize, String)> {
        let mut out: HashMap<String, (usize, String)> = HashMap::new();
        for f in self.of("jobs") {
            for j in f["jobs"].as_array().unwrap() {
                let e = out
                    .entry(j["id"].as_str().unwrap().to_string())
                    .or_default();
                e.0 += 1;
                e.1 = j["state"].as_str().unwrap().to_string();
            }
        }
        out
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write_pngs(dir: &std::path::Path, n: usize, seed: u8) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("photo-{seed}-{i}.png"));
            std::fs::write(
                &p,
                png(64 + 8 * i as u32, 48 + 4 * i as u32, seed + i as u8),
            )
            .unwrap();
            p
        })
        .collect()
}

async fn wait_state(app: &TestApp, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
        if job["state"] == want {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {want}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The page's number in `[data-count=NAME]`, as a person reads it (digits only).
fn page_count(v: &Value) -> i64 {
    v.as_str()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(-1)
}

async fn page_counts(b: &Browser) -> Value {
    b.eval(
        "Object.fromEntries([...document.querySelectorAll('[data-count]')].map(e => [e.dataset.count, e.textContent]))",
    )
    .await
}

async fn counts_match_stats(b: &Browser, app: &TestApp) -> bool {
    let (_, stats) = app.get("/v1/stats").await;
    let j = &stats["jobs"];
    let page = page_counts(b).await;
    page_count(&page["waiting"]) == j["queued"].as_i64().unwrap() + j["scheduled"].as_i64().unwrap()
        && page_count(&page["running"]) == j["running"].as_i64().unwrap()
        && page_count(&page["succeeded"]) == j["succeeded"].as_i64().unwrap()
        && page_count(&page["failed"]) == j["failed"].as_i64().unwrap()
        && page_count(&page["cancelled"]) == j["cancelled"].as_i64().unwrap()
}

async fn wait_counts_match(b: &Browser, app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !counts_match_stats(b, app).await {
        if Instant::now() > deadline {
            let (_, stats) = app.get("/v1/stats").await;
            panic!(
                "page counts {} never matched /v1/stats {}",
                page_counts(b).await,
                stats["jobs"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_enqueues_shows_results_retries_failures_and_pauses_in_a_real_browser() {
    let Some(b) = Browser::launch().await else {
        return;
    };
    let app = TestApp::spawn(TestOptions {
        workers: 2,
        adaptive: true,
        ..TestOptions::default()
    })
    .await;
    let files = tempfile::tempdir().unwrap();

    b.goto(&format!("{}/#overview", app.base)).await;
    b.wait_for(
        "document.querySelector('#conn').textContent === 'live'",
        "the live feed",
    )
    .await;
    b.wait_for(
        "document.querySelector('#model-state').textContent === 'model ready'",
        "model ready",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('#token-dialog').open").await,
        json!(false),
        "no token is set: the page must not ask for one"
    );

    // Enqueue three images through the file input, as a person picking files does.
    b.click("#tab-enqueue").await;
    b.wait_for(
        "!document.querySelector('#view-enqueue').hidden",
        "the enqueue view",
    )
    .await;
    let pngs = write_pngs(files.path(), 3, 10);
    b.set_files("#file-input", &pngs).await;
    b.wait_for(
        "document.querySelectorAll('#uploads [data-state=succeeded]').length === 3",
        "three uploads to succeed on the page",
    )
    .await;
    let shown: Vec<(String, String)> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('#uploads [data-upload]')].map(e => [e.dataset.upload, e.querySelector('.cap').textContent])")
            .await,
    )
    .unwrap();
    assert_eq!(shown.len(), 3);
    for (id, caption) in &shown {
        let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(job["state"], "succeeded");
        assert_eq!(job["task"], "caption");
        assert_eq!(
            job["result"]["caption"].as_str().unwrap(),
            caption,
            "the page shows the job's caption"
        );
        assert!(
            job["image"]["upload"].is_string(),
            "uploaded, not a path: {job}"
        );
    }
    b.wait_for(
        "[...document.querySelectorAll('#uploads img')].every(i => i.dataset.loaded === '1' && i.naturalWidth > 0)",
        "upload thumbnails",
    )
    .await;
    b.screenshot("enqueue").await;

    // Drag and drop from outside the page: two more images.
    let dropped = write_pngs(files.path(), 2, 70);
    b.drop_files("#drop", &dropped).await;
    b.wait_for(
        "[...document.querySelectorAll('#uploads [data-state=succeeded] .meta')].filter(m => m.textContent.includes('photo-70-')).length === 2",
        "the two dropped images to succeed",
    )
    .await;

    // Detect: the boxes the job found are drawn over its image.
    b.click("input[name=task][value=detect]").await;
    b.wait_for(
        "!document.querySelector('[data-for=\"detect point\"]').hidden",
        "the object field",
    )
    .await;
    b.eval("document.querySelector('input[name=object]').value = 'face'")
        .await;
    let one = write_pngs(files.path(), 1, 40);
    b.set_files("#file-input", &one).await;
    let detect_id = b
        .wait_for(
            "(() => { const e = [...document.querySelectorAll('#uploads [data-upload]')].find(e => e.querySelector('.meta').textContent.includes('photo-40-0') && e.dataset.state === 'succeeded'); return e && e.dataset.upload; })()",
            "the detect job to succeed",
        )
        .await;
    let detect_id = detect_id.as_str().unwrap().to_string();
    let (_, job) = app.get(&format!("/v1/jobs/{detect_id}")).await;
    assert_eq!(job["task"], "detect");
    let boxes = job["result"]["objects"].as_array().unwrap().len();
    let drawn = b
        .eval(&format!(
            "document.querySelectorAll('[data-upload=\"{detect_id}\"] svg rect').length"
        ))
        .await;
    assert_eq!(drawn, json!(boxes), "one rectangle per detected object");

    // The results grid: newest first, thumbnails and captions, live.
    b.click("#tab-results").await;
    b.wait_for(
        "document.querySelectorAll('#grid [data-job]').length >= 6 && [...document.querySelectorAll('#grid img')].every(i => i.dataset.loaded === '1')",
        "six results with thumbnails in the grid",
    )
    .await;
    let grid_ids: Vec<String> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('#grid [data-job]')].map(e => e.dataset.job)")
            .await,
    )
    .unwrap();
    for (id, _) in &shown {
        assert!(grid_ids.contains(id), "{id} is in the grid");
    }
    assert_eq!(grid_ids[0], detect_id, "the newest result comes first");
    b.screenshot("results").await;

    // The detail dialog: full result and history; Escape closes it.
    b.click(&format!("#grid [data-job=\"{}\"] button.open", shown[0].0))
        .await;
    b.wait_for(
        "document.querySelector('#detail').open && document.querySelectorAll('#detail-history li').length >= 3",
        "the job's detail with its history",
    )
    .await;
    let json_shown = b
        .eval("document.querySelector('#detail-json').textContent")
        .await;
    assert!(json_shown.as_str().unwrap().contains(&shown[0].0));
    b.wait_for(
        "document.querySelector('#detail-img').dataset.loaded === '1'",
        "the detail image",
    )
    .await;
    b.screenshot("detail").await;
    b.press("Escape").await;
    b.wait_for(
        "!document.querySelector('#detail').open",
        "the dialog to close",
    )
    .await;

    // Pause from the page; a job enqueued meanwhile waits.
    b.click("#tab-overview").await;
    b.click("#pause").await;
    b.wait_for(
        "document.querySelector('#queue-state').textContent === 'paused'",
        "the paused state",
    )
    .await;
    let (_, stats) = app.get("/v1/stats").await;
    assert_eq!(stats["paused"], true, "the page's button paused the queue");
    let doomed = app.library.join("doomed.png");
    std::fs::write(&doomed, png(50, 40, 99)).unwrap();
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"task": "caption", "image": {"path": doomed.to_str().unwrap()}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let failing = job["id"].as_str().unwrap().to_string();
    std::fs::remove_file(&doomed).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, job) = app.get(&format!("/v1/jobs/{failing}")).await;
    assert_eq!(job["state"], "queued", "paused: nothing is claimed");
    b.wait_for(
        "document.querySelector('[data-count=waiting]').textContent === '1'",
        "the waiting count",
    )
    .await;
    b.screenshot("overview-paused").await;
    b.click("#pause").await;
    b.wait_for(
        "document.querySelector('#queue-state').textContent === 'claiming'",
        "the resumed state",
    )
    .await;
    let job = wait_state(&app, &failing, "failed").await;
    assert_eq!(job["error"]["code"], "image_missing");

    // The failure shows on the Failures view with its code; filter, then retry it.
    b.click("#tab-failures").await;
    b.wait_for(
        &format!("document.querySelector('#failures [data-job=\"{failing}\"]')"),
        "the failed job in the list",
    )
    .await;
    let row = b
        .eval(&format!(
            "document.querySelector('#failures [data-job=\"{failing}\"]').textContent"
        ))
        .await;
    assert!(row.as_str().unwrap().contains("image_missing"), "{row}");
    b.eval("const s = document.querySelector('#fail-code'); s.value = 'image_missing'; s.dispatchEvent(new Event('change'))")
        .await;
    assert_eq!(
        b.eval("document.querySelectorAll('#failures tbody tr[data-job]').length")
            .await,
        json!(1)
    );
    b.wait_for(
        "document.querySelector('#failed-badge').textContent === '1'",
        "the failures badge",
    )
    .await;
    b.screenshot("failures").await;
    std::fs::write(&doomed, png(50, 40, 99)).unwrap();
    b.click(&format!("[data-retry=\"{failing}\"]")).await;
    wait_state(&app, &failing, "succeeded").await;
    b.click("#tab-results").await;
    b.wait_for(
        &format!("document.querySelector('#grid [data-job=\"{failing}\"]')"),
        "the retried job in the results",
    )
    .await;
    b.wait_for(
        "document.querySelectorAll('#failures tbody tr[data-job]').length === 0",
        "the failure list to empty",
    )
    .await;

    // A batch with two failures: one button on the Failures view retries both.
    app.post("/v1/queue/pause", &json!({})).await;
    let mut jobs = Vec::new();
    for i in 0..2 {
        let p = app.library.join(format!("batch-{i}.png"));
        std::fs::write(&p, png(30, 20, 200 + i)).unwrap();
        jobs.push(json!({"task": "caption", "image": {"path": p.to_str().unwrap()}}));
    }
    let (_, batch) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    let bid = batch["batch_id"].as_str().unwrap().to_string();
    let bids: Vec<String> = serde_json::from_value(batch["job_ids"].clone()).unwrap();
    for i in 0..2 {
        std::fs::remove_file(app.library.join(format!("batch-{i}.png"))).unwrap();
    }
    app.post("/v1/queue/resume", &json!({})).await;
    for id in &bids {
        wait_state(&app, id, "failed").await;
    }
    b.click("#tab-failures").await;
    let button = format!("#batch-retries [data-retry-batch=\"{bid}\"]");
    b.wait_for(
        &format!("document.querySelector('{button}')?.textContent.includes('(2)')"),
        "the batch's retry button",
    )
    .await;
    b.screenshot("failures-batch").await;
    for i in 0..2 {
        std::fs::write(
            app.library.join(format!("batch-{i}.png")),
            png(30, 20, 200 + i),
        )
        .unwrap();
    }
    b.click(&button).await;
    for id in &bids {
        wait_state(&app, id, "succeeded").await;
    }

    // Overview and controller views agree with /v1/stats.
    b.click("#tab-overview").await;
    wait_counts_match(&b, &app).await;
    b.wait_for(
        "[...document.querySelectorAll('#batches tbody tr')].length >= 1",
        "the batch list",
    )
    .await;
    b.screenshot("overview").await;
    b.click("#tab-memory").await;
    b.wait_for(
        "document.querySelector('#mem-chart polyline.l-used').getAttribute('points').split(' ').length >= 3",
        "the memory chart",
    )
    .await;
    let title = b
        .eval("document.querySelector('#mem-title').textContent")
        .await;
    assert_eq!(title, "Host memory", "on a CPU the chart shows host memory");
    assert_eq!(
        b.eval("document.querySelector('#controller-off').hidden")
            .await,
        json!(true),
        "the controller is on"
    );
    b.screenshot("memory").await;

    // Keyboard: arrow keys move between tabs.
    b.eval("document.querySelector('#tab-overview').focus()")
        .await;
    b.press("ArrowRight").await;
    b.wait_for(
        "location.hash === '#memory'",
        "ArrowRight to open the next tab",
    )
    .await;
    assert_eq!(b.eval("document.activeElement.id").await, "tab-memory");

    // Phone width: no sideways scrolling, and the views still work.
    b.viewport(390, 844, true).await;
    for view in ["overview", "results", "failures", "enqueue"] {
        b.click(&format!("#tab-{view}")).await;
        b.wait_for(
            &format!("!document.querySelector('#view-{view}').hidden"),
            "the view",
        )
        .await;
        let wide = b
            .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
            .await;
        assert_eq!(wide, json!(true), "{view} scrolls sideways at phone width");
        b.screenshot(&format!("phone-{view}")).await;
    }
    assert!(!b.log().contains("exception"), "page errors:\n{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_token_the_page_asks_for_it_once_keeps_it_out_of_urls_and_the_api_refuses_without_it()
 {
    let Some(b) = Browser::launch().await else {
        return;
    };
    let app = TestApp::spawn(TestOptions {
        token: Some("s3cret-token".into()),
        ..TestOptions::default()
    })
    .await;
    // The page and its assets load without the token; the API does not answer without it.
    for path in [
        "/",
        "/dashboard/app.js",
        "/dashboard/app.css",
        "/favicon.svg",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    for path in ["/v1/events", "/v1/jobs/recent", "/v1/batches"] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }

    b.goto(&app.base).await;
    b.wait_for(
        "document.querySelector('#token-dialog').open",
        "the token prompt",
    )
    .await;
    b.screenshot("token-prompt").await;
    // A wrong token is refused and asked for again.
    b.eval("document.querySelector('#token-input').focus()")
        .await;
    b.type_text("wrong").await;
    b.press("Enter").await;
    b.wait_for(
        "document.querySelector('#token-dialog').open && document.querySelector('#token-error').textContent.includes('refused')",
        "the refusal",
    )
    .await;
    b.eval("document.querySelector('#token-input').focus()")
        .await;
    b.type_text("s3cret-token").await;
    b.press("Enter").await;
    b.wait_for(
        "document.querySelector('#conn').textContent === 'live'",
        "the live feed",
    )
    .await;
    assert_eq!(
        b.eval("sessionStorage.getItem('captiond.token')").await,
        "s3cret-token"
    );
    // Work enqueued over the API shows on the page.
    let (status, job) = app.enqueue(&png(40, 30, 3), json!({})).await;
    assert_eq!(status, 202);
    let id = job["id"].as_str().unwrap().to_string();
    app.wait_job(&id).await;
    b.click("#tab-results").await;
    b.wait_for(
        &format!("document.querySelector('#grid [data-job=\"{id}\"] img')?.dataset.loaded === '1'"),
        "the job's thumbnail, fetched with the token",
    )
    .await;
    // Reloading keeps the session's token: no second prompt. The token is never in a URL.
    b.goto(&format!("{}/#results", app.base)).await;
    b.wait_for(
        "document.querySelector('#conn').textContent === 'live'",
        "the live feed after reload",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('#token-dialog').open").await,
        json!(false)
    );
    let urls = b
        .eval("[location.href, ...performance.getEntriesByType('resource').map(e => e.name)].join('\\n')")
        .await;
    assert!(
        !urls.as_str().unwrap().contains("s3cret"),
        "the token appears in a URL:\n{urls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_events_stream_sends_each_of_200_jobs_once_and_its_cost_does_not_grow_with_clients_or_jobs()
 {
    let app = TestApp::spawn(TestOptions {
        workers: 4,
        ..TestOptions::default()
    })
    .await;
    let browser = Browser::launch().await;
    if let Some(b) = &browser {
        b.goto(&format!("{}/#overview", app.base)).await;
        b.wait_for(
            "document.querySelector('#conn').textContent === 'live'",
            "the live feed",
        )
        .await;
    }
    // Where the overview's figures sit: they must not move while the numbers change.
    let layout = "JSON.stringify([...document.querySelectorAll('.card, .tabs a, #pause')].map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }))";
    let layout_before = match &browser {
        Some(b) => b.eval(layout).await,
        None => Value::Null,
    };
    let a = Feed::open(&app).await;
    let c = Feed::open(&app).await;
    // Wait until both streams have had a tick (the hub is running for them).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.of("tick").is_empty() || c.of("tick").is_empty() {
        assert!(Instant::now() < deadline, "no tick within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hello = &a.of("hello")[0];
    assert!(hello["history"].is_array());
    let (_, before) = app.get("/v1/stats").await;
    let feed0 = before["feed"].clone();
    let streams = if browser.is_some() { 3 } else { 2 };
    assert_eq!(feed0["subscribers"], streams);

    let mut paths = Vec::new();
    for i in 0..200u32 {
        let p = app.library.join(format!("b{i}.png"));
        std::fs::write(&p, png(24 + (i % 7), 20 + (i % 5), i as u8)).unwrap();
        paths.push(p);
    }
    let jobs: Vec<Value> = paths
        .iter()
        .map(|p| json!({"task": "caption", "length": "short", "max_tokens": 2, "image": {"path": p.to_str().unwrap()}}))
        .collect();
    let (status, batch) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    assert_eq!(status, 202, "{batch}");
    let ids: Vec<String> = serde_json::from_value(batch["job_ids"].clone()).unwrap();
    let batch_id = batch["batch_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut layout_checks = 0;
    loop {
        let (_, b) = app.get(&format!("/v1/batches/{batch_id}")).await;
        if b["done"] == true {
            break;
        }
        if let Some(page) = &browser {
            assert_eq!(
                page.eval(layout).await,
                layout_before,
                "the overview's layout moved while it updated"
            );
            layout_checks += 1;
        }
        assert!(Instant::now() < deadline, "batch not done in 300 s: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two more ticks, so the feed has read the last completions.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (_, stats) = app.get("/v1/stats").await;
    for feed in [&a, &c] {
        let seen = feed.jobs();
        assert_eq!(seen.len(), 200, "each stream sees every job of the batch");
        for id in &ids {
            let (n, state) = &seen[id];
            assert_eq!(*n, 1, "job {id} sent {n} times");
            assert_eq!(state, "succeeded");
        }
        let last = feed.of("tick").pop().unwrap();
        assert_eq!(
            last["stats"]["jobs"], stats["jobs"],
            "the last tick's counts are /v1/stats'"
        );
        let batch = last["batches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == batch_id)
            .unwrap()
            .clone();
        assert_eq!(batch["counts"]["succeeded"], 200);
        // Every job event carries its result.
        for f in feed.of("jobs") {
            for j in f["jobs"].as_array().unwrap() {
                assert!(j["result"]["caption"].is_string(), "{j}");
            }
        }
    }
    if let Some(b) = &browser {
        wait_counts_match(b, &app).await;
        let text = b
            .eval("document.querySelector('[data-count=succeeded]').textContent")
            .await;
        assert_eq!(page_count(&text), 200);
        assert!(layout_checks > 3, "the layout was checked during the run");
        assert_eq!(b.eval(layout).await, layout_before);
        b.wait_for(
            &format!("document.querySelector('#batches [data-batch=\"{batch_id}\"]')?.textContent.includes('200 / 200')"),
            "the batch row at 200 / 200",
        )
        .await;
        b.screenshot("overview-batch").await;
        b.click("#tab-results").await;
        b.wait_for(
            "document.querySelectorAll('#grid img').length >= 12 && [...document.querySelectorAll('#grid img')].slice(0, 12).every(i => i.dataset.loaded === '1')",
            "the grid's thumbnails",
        )
        .await;
        b.screenshot("results-batch").await;
    }
    // The feed's database work per tick is fixed: 3 for the stats, 1 for the batches,
    // and one page of finished jobs per 500 — not one per job or per client.
    let feed1 = &stats["feed"];
    let ticks = feed1["ticks"].as_u64().unwrap() - feed0["ticks"].as_u64().unwrap();
    let queries = feed1["queries"].as_u64().unwrap() - feed0["queries"].as_u64().unwrap();
    println!(
        "events feed: {ticks} ticks, {queries} queries ({:.2} per tick) for 200 jobs and {streams} streams",
        queries as f64 / ticks.max(1) as f64
    );
    assert!(ticks > 0);
    assert!(
        queries <= ticks * 5 + 1,
        "{queries} queries in {ticks} ticks: the feed must not query per job or per client"
    );
    let sent = feed1["job_events"].as_u64().unwrap() - feed0["job_events"].as_u64().unwrap();
    assert_eq!(sent, 200 * streams, "each job sent once to each stream");
}

#[tokio::test]
async fn thumbnails_apply_orientation_follow_path_roots_and_limits_and_answer_json_errors() {
    let app = TestApp::spawn(TestOptions::default()).await;
    // EXIF orientation 6 (rotate 90°): a 60×30 landscape becomes portrait.
    let img = image::RgbImage::from_fn(60, 30, |x, _| image::Rgb([(x * 4) as u8, 90, 160]));
    let jpeg = jpeg_with_orientation(&img, 6);
    let r = app
        .client
        .post(format!("{}/v1/jobs", app.base))
        .multipart(
            reqwest::multipart::Form::new()
                .text("task", "caption")
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(jpeg).file_name("r.jpg"),
                ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let url = format!("{}/v1/jobs/{id}/thumbnail?size=128", app.base);
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let thumb = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (thumb.width(), thumb.height()),
        (64, 128),
        "rotated and fitted into 128"
    );
    // The same thumbnail again: 304 with its ETag.
    let r = app
        .client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    let expect = |status: u16, code: &'static str| {
        move |(s, body): (u16, Value)| {
            assert_eq!(s, status, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
        }
    };
    expect(400, "invalid_id")(app.get("/v1/jobs/not-a-uuid/thumbnail").await);
    expect(404, "not_found")(
        app.get("/v1/jobs/01900000-0000-7000-8000-000000000000/thumbnail")
            .await,
    );
    expect(400, "invalid_query")(app.get(&format!("/v1/jobs/{id}/thumbnail?size=5000")).await);
    expect(400, "invalid_query")(app.get(&format!("/v1/jobs/{id}/thumbnail?size=big")).await);

    // Once the job has succeeded, the sweep deletes its upload after the days it is
    // kept (`--keep-uploads-days`; here none, from the file and, on PostgreSQL, the
    // database): the thumbnail is then a 404 that says so.
    assert_eq!(app.wait_job(&id).await["state"], "succeeded");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let state = app.app.as_ref().unwrap().state();
    let swept = state
        .blobs
        .sweep(&state.store, Duration::ZERO, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        (swept.files, swept.rows),
        (1, u64::from(app.pg.is_some())),
        "{swept:?}"
    );
    let (s, body) = app.get(&format!("/v1/jobs/{id}/thumbnail?size=512")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("image_missing")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("CAPTIOND_KEEP_UPLOADS_DAYS"), "{message}");

    // A path job: its file is checked against the roots and limits again when thumbnailed.
    let file = app.library.join("p.png");
    std::fs::write(&file, png(40, 30, 1)).unwrap();
    let (_, job) = app
        .post(
            "/v1/jobs",
            &json!({"task": "caption", "image": {"path": file.to_str().unwrap()}}),
        )
        .await;
    let pid = job["id"].as_str().unwrap().to_string();
    let thumb_of = |pid: &str| format!("/v1/jobs/{pid}/thumbnail");
    let (s, _) = app.get(&thumb_of(&pid)).await;
    assert_eq!(s, 200);
    // Now a link out of the library roots.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.png");
    std::fs::write(&secret, png(40, 30, 2)).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&secret, &file).unwrap();
    expect(403, "path_forbidden")(app.get(&thumb_of(&pid)).await);
    // Gone.
    std::fs::remove_file(&file).unwrap();
    expect(404, "image_missing")(app.get(&thumb_of(&pid)).await);
    // A header declaring 30000×30000 pixels: refused before decoding.
    std::fs::write(&file, png_bomb(30_000, 30_000)).unwrap();
    expect(422, "image_too_large")(app.get(&thumb_of(&pid)).await);
    std::fs::write(&file, b"this is not an image").unwrap();
    expect(422, "invalid_image")(app.get(&thumb_of(&pid)).await);

    // The dashboard's other routes validate their input too.
    expect(400, "invalid_query")(app.get("/v1/jobs/recent?state=running").await);
    expect(400, "invalid_query")(app.get("/v1/jobs/recent?limit=0").await);
    expect(400, "invalid_id")(app.post("/v1/batches/nope/retry", &json!({})).await);
    expect(404, "not_found")(
        app.post(
            "/v1/batches/01900000-0000-7000-8000-000000000000/retry",
            &json!({}),
        )
        .await,
    );
    let (s, recent) = app.get("/v1/jobs/recent?limit=10").await;
    assert_eq!(s, 200);
    assert!(recent["jobs"].is_array());
}

#[tokio::test]
async fn retrying_a_batch_requeues_only_its_failed_jobs() {
    let app = TestApp::spawn(TestOptions::default()).await;
    app.post("/v1/queue/pause", &json!({})).await;
    let mut jobs = Vec::new();
    for i in 0..4 {
        let p = app.library.join(format!("r{i}.png"));
        std::fs::write(&p, png(30, 20, i)).unwrap();
        jobs.push(json!({"task": "caption", "image": {"path": p.to_str().unwrap()}}));
    }
    let (_, batch) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    let bid = batch["batch_id"].as_str().unwrap().to_string();
    let ids: Vec<String> = serde_json::from_value(batch["job_ids"].clone()).unwrap();
    // Two files vanish before the queue resumes: those two fail.
    std::fs::remove_file(app.library.join("r1.png")).unwrap();
    std::fs::remove_file(app.library.join("r3.png")).unwrap();
    app.post("/v1/queue/resume", &json!({})).await;
    for id in &ids {
        app.wait_job(id).await;
    }
    let (_, view) = app.get(&format!("/v1/batches/{bid}")).await;
    assert_eq!(view["counts"]["failed"], 2, "{view}");
    let (_, listed) = app.get("/v1/batches?limit=5").await;
    assert_eq!(listed["batches"][0]["id"], bid.as_str());
    assert_eq!(listed["batches"][0]["counts"]["failed"], 2);
    let (_, failed) = app
        .get(&format!("/v1/jobs/recent?state=failed&batch={bid}"))
        .await;
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 2);

    std::fs::write(app.library.join("r1.png"), png(30, 20, 1)).unwrap();
    std::fs::write(app.library.join("r3.png"), png(30, 20, 3)).unwrap();
    let (s, r) = app
        .post(&format!("/v1/batches/{bid}/retry"), &json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["retried"], 2);
    for id in &ids {
        let job = app.wait_job(id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(job["attempt"].as_i64().unwrap() <= 1);
    }
    let (_, r) = app
        .post(&format!("/v1/batches/{bid}/retry"), &json!({}))
        .await;
    assert_eq!(r["retried"], 0, "nothing left to retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_view_charts_vram_and_lists_the_controllers_decisions_with_reasons() {
    use captiond::workers::concurrency::Reading;
    use captiond::workers::vram::ScriptedProbe;
    let Some(b) = Browser::launch().await else {
        return;
    };
    // A simulated GPU (no NVIDIA device here): calm at 40 % of 24 GiB, so a backlog
    // makes the controller grow the target step by step.
    let total = 24u64 << 30;
    let calm = Reading {
        total,
        used: total * 4 / 10,
        free: total * 6 / 10,
        own: None,
    };
    let opts = TestOptions {
        workers: 3,
        adaptive: true,
        ..TestOptions::default()
    };
    let (tmp, data, lib) = TestApp::folders(&opts);
    let app = TestApp::spawn_custom(
        tmp,
        data,
        lib,
        opts,
        captiond::Engine::LoadModel,
        Some(Box::new(ScriptedProbe::new(vec![calm], true))),
    )
    .await;
    b.goto(&format!("{}/#memory", app.base)).await;
    b.wait_for(
        "document.querySelector('#conn').textContent === 'live'",
        "the live feed",
    )
    .await;
    let mut jobs = Vec::new();
    for i in 0..30u32 {
        let p = app.library.join(format!("c{i}.png"));
        std::fs::write(&p, png(40, 30, i as u8)).unwrap();
        jobs.push(
            json!({"task": "caption", "max_tokens": 4, "image": {"path": p.to_str().unwrap()}}),
        );
    }
    let (status, _) = app.post("/v1/batches", &json!({"jobs": jobs})).await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(120);
    let decisions = loop {
        let (_, stats) = app.get("/v1/stats").await;
        let d = stats["concurrency"]["decisions"]
            .as_array()
            .unwrap()
            .clone();
        if !d.is_empty() {
            break d;
        }
        assert!(Instant::now() < deadline, "no controller decision: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = decisions[0]["reason"].as_str().unwrap().to_string();
    b.wait_for(
        &format!(
            "document.querySelector('#decisions tbody').textContent.includes({})",
            serde_json::to_string(&reason).unwrap()
        ),
        "the decision's reason in the table",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('#mem-title').textContent")
            .await,
        "GPU memory (VRAM)"
    );
    let now = b
        .eval("document.querySelector('#mem-now').textContent")
        .await;
    assert!(
        now.as_str().unwrap().contains("9.6 GiB of 24.0 GiB"),
        "the latest reading, formatted: {now}"
    );
    b.wait_for(
        "document.querySelector('#conc-chart polyline.l-target').getAttribute('points').split(' ').length >= 3",
        "the concurrency chart",
    )
    .await;
    b.screenshot("memory-gpu").await;
}

#[tokio::test]
async fn an_open_event_stream_does_not_hold_up_shutdown() {
    let mut app = TestApp::spawn(TestOptions::default()).await;
    let feed = Feed::open(&app).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while feed.of("tick").is_empty() {
        assert!(Instant::now() < deadline, "no tick");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    app.stop().await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown waited {took:?} for the event stream"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !feed.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stream ended at shutdown");
}
