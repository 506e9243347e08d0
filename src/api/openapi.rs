//! The route table: every HTTP route with its documentation. The router is built
//! from it and `/openapi.json` is generated from it (request and query schemas come
//! from the Rust types via schemars), so the document cannot drift from the routes.

use axum::Json;
use axum::extract::State;
use axum::routing::{MethodRouter, get, post};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};

use super::{AppState, dashboard, events, jobs, openai, station};

/// Builds the schema of a type, registering its definitions.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// One route: method, path, and what the document says of it.
#[derive(Clone)]
pub struct RouteDoc {
    /// `get` or `post`.
    pub method: &'static str,
    /// axum path, e.g. `/v1/jobs/{id}`.
    pub path: &'static str,
    /// Operation id.
    pub operation: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Group.
    pub tag: &'static str,
    /// JSON request body.
    pub body: Option<SchemaFn>,
    /// Query parameters (an object schema whose properties are the parameters).
    pub query: Option<SchemaFn>,
    /// JSON success response.
    pub response: Option<SchemaFn>,
    /// Success status.
    pub status: u16,
    /// May answer `text/event-stream` (with `"stream": true`).
    pub streams: bool,
    /// The success body's only media type, for routes that answer no JSON (pages,
    /// images, the event stream).
    pub media: Option<&'static str>,
    /// Error body shape: `api` (`{"error": {"code","message"}}`), `station`
    /// (`{"error": "..."}`) or `openai`.
    pub errors: &'static str,
}

impl RouteDoc {
    const fn new(
        method: &'static str,
        path: &'static str,
        operation: &'static str,
        tag: &'static str,
        summary: &'static str,
    ) -> Self {
        Self {
            method,
            path,
            operation,
            summary,
            tag,
            body: None,
            query: None,
            response: None,
            status: 200,
            streams: false,
            media: None,
            errors: "api",
        }
    }
    fn body(mut self, f: SchemaFn) -> Self {
        self.body = Some(f);
        self
    }
    fn query(mut self, f: SchemaFn) -> Self {
        self.query = Some(f);
        self
    }
    fn response(mut self, f: SchemaFn) -> Self {
        self.response = Some(f);
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
    fn streams(mut self) -> Self {
        self.streams = true;
        self
    }
    fn media(mut self, m: &'static str) -> Self {
        self.media = Some(m);
        self
    }
    fn errors(mut self, e: &'static str) -> Self {
        self.errors = e;
        self
    }
    /// Whether the route needs the bearer token when one is configured.
    pub fn needs_token(&self) -> bool {
        !super::dashboard::is_public(self.path)
    }
}

/// Every route with its handler. The router and `/openapi.json` both come from here.
pub fn table() -> Vec<(RouteDoc, MethodRouter<AppState>)> {
    use RouteDoc as R;
    vec![
        (R::new("get", "/health", "health", "service", "Liveness: always 200 while the process serves."), get(super::health)),
        (R::new("get", "/ready", "ready", "service", "Readiness: 200 once the model is loaded, 503 before."), get(super::ready)),
        (R::new("get", "/metrics", "metrics", "service", "Prometheus text format: jobs by state, throughput, workers, VRAM."), get(super::metrics)),
        (R::new("get", "/openapi.json", "openapi", "service", "This document."), get(openapi_json)),
        (R::new("get", "/v1/stats", "stats", "service", "Counts per state, throughput, workers busy/idle, concurrency, model."), get(super::stats)),
        (R::new("post", "/v1/jobs", "createJob", "jobs", "Enqueue one job (JSON, or multipart with an `image` file part) → 202.")
            .body(schema::<super::input::JobRequest>).response(schema::<jobs::JobView>).status(202), post(jobs::create_job)),
        (R::new("get", "/v1/jobs", "listJobs", "jobs", "List jobs by state and batch, with keyset pagination (`after`).")
            .query(schema::<jobs::ListParams>), get(jobs::list_jobs)),
        (R::new("post", "/v1/jobs/lookup", "lookupJobs", "jobs", "State and error of up to 10,000 jobs at once, by id or idempotency key.")
            .body(schema::<jobs::LookupRequest>), post(jobs::lookup_jobs)),
        (R::new("get", "/v1/jobs/{id}", "getJob", "jobs", "One job with its result; `?wait=30s` long-polls until it is terminal.")
            .query(schema::<jobs::WaitQuery>).response(schema::<jobs::JobView>), get(jobs::get_job)),
        (R::new("post", "/v1/jobs/{id}/cancel", "cancelJob", "jobs", "Cancel: a waiting job at once, a running one at its next token."), post(jobs::cancel_job)),
        (R::new("post", "/v1/jobs/{id}/retry", "retryJob", "jobs", "Queue a failed or cancelled job again."), post(jobs::retry_job)),
        (R::new("post", "/v1/batches", "createBatch", "batches", "Enqueue up to 10,000 jobs in one transaction → 202 with the batch id.")
            .body(schema::<jobs::BatchRequest>).status(202), post(jobs::create_batch)),
        (R::new("get", "/v1/batches/{id}", "getBatch", "batches", "A batch's counts per state, images/s and ETA.")
            .response(schema::<jobs::BatchView>), get(jobs::get_batch)),
        (R::new("post", "/v1/queue/pause", "pauseQueue", "queue", "Stop claiming jobs (persisted across restarts)."), post(jobs::pause_queue)),
        (R::new("post", "/v1/queue/resume", "resumeQueue", "queue", "Claim jobs again."), post(jobs::resume_queue)),
        (R::new("get", "/v1/events", "events", "dashboard", "Server-Sent Events: `hello`, then a `tick` a second (counts, rates, workers, memory, controller, batches) and `jobs` (finished jobs with results).")
            .media("text/event-stream"), get(events::events)),
        (R::new("get", "/v1/jobs/recent", "recentJobs", "dashboard", "Finished jobs, newest first, with results (`state`, `batch`, `before`, `limit`).")
            .query(schema::<dashboard::RecentQuery>), get(dashboard::recent)),
        (R::new("get", "/v1/jobs/{id}/thumbnail", "jobThumbnail", "dashboard", "A JPEG thumbnail of the job's image (EXIF orientation applied), `size` 32–1024 px; 404 once a succeeded job's upload is deleted (`--keep-uploads-days`).")
            .query(schema::<dashboard::ThumbQuery>).media("image/jpeg"), get(dashboard::thumbnail)),
        (R::new("get", "/v1/batches", "listBatches", "batches", "The newest batches with their counts per state.")
            .query(schema::<dashboard::BatchesQuery>), get(dashboard::list_batches)),
        (R::new("post", "/v1/batches/{id}/retry", "retryBatch", "batches", "Queue every failed job of a batch again → {retried}."), post(dashboard::retry_batch)),
        (R::new("get", "/", "dashboard", "dashboard", "The web dashboard (HTML; served without the token, which the page asks for).").media("text/html"), get(dashboard::index)),
        (R::new("get", "/dashboard/app.js", "dashboardScript", "dashboard", "The dashboard's script.").media("text/javascript"), get(dashboard::app_js)),
        (R::new("get", "/dashboard/app.css", "dashboardStyle", "dashboard", "The dashboard's style sheet.").media("text/css"), get(dashboard::app_css)),
        (R::new("get", "/favicon.svg", "favicon", "dashboard", "The dashboard's icon.").media("image/svg+xml"), get(dashboard::icon)),
        (R::new("post", "/v1/caption", "caption", "station", "Moondream Station: caption an image → {caption, request_id, _stats}.")
            .body(schema::<station::SkillRequest>).streams().errors("station"), post(station::caption)),
        (R::new("post", "/v1/query", "query", "station", "Moondream Station: answer a question → {answer, request_id, _stats}.")
            .body(schema::<station::SkillRequest>).streams().errors("station"), post(station::query)),
        (R::new("post", "/v1/detect", "detect", "station", "Moondream Station: boxes of an object → {objects: [{x_min, y_min, x_max, y_max}]}.")
            .body(schema::<station::SkillRequest>).errors("station"), post(station::detect)),
        (R::new("post", "/v1/point", "point", "station", "Moondream Station: points of an object → {points: [{x, y}], count}.")
            .body(schema::<station::SkillRequest>).errors("station"), post(station::point)),
        (R::new("post", "/v1/chat/completions", "chatCompletions", "openai", "OpenAI chat completion over the last user message's image and text.")
            .body(schema::<openai::ChatRequest>).streams().errors("openai"), post(openai::chat_completions)),
        (R::new("get", "/v1/models", "models", "openai", "The model, as an OpenAI list (`data`) and Station entries (`models`)."), get(openai::models)),
    ]
}

/// The error shape (`api`, `station` or `openai`) of the route at `path`, so layers
/// that answer before the handler (body limits, rejections) speak the route's dialect.
pub fn error_shape(path: &str) -> &'static str {
    static SHAPES: std::sync::OnceLock<std::collections::HashMap<&'static str, &'static str>> =
        std::sync::OnceLock::new();
    SHAPES
        .get_or_init(|| {
            table()
                .into_iter()
                .map(|(d, _)| (d.path, d.errors))
                .collect()
        })
        .get(path)
        .copied()
        .unwrap_or("api")
}

/// Renders `e` in `shape`, an `error_shape` answer.
pub fn shaped_error(shape: &str, e: super::ApiError) -> axum::response::Response {
    use axum::response::IntoResponse;
    match shape {
        "station" => station::StationError(e).into_response(),
        "openai" => openai::OpenAiError(e).into_response(),
        _ => e.into_response(),
    }
}

fn error_schema(kind: &str) -> serde_json::Value {
    match kind {
        "station" => serde_json::json!({
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string"}, "code": {"type": "string"}}
        }),
        "openai" => serde_json::json!({
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"}
            }}}
        }),
        _ => serde_json::json!({
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}
            }}}
        }),
    }
}

/// The OpenAPI 3.1 document of every route in [`table`].
pub fn document() -> serde_json::Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut paths = serde_json::Map::new();
    for (doc, _) in table() {
        let mut params: Vec<serde_json::Value> = doc
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                serde_json::json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
            })
            .collect();
        if let Some(q) = doc.query {
            let s = q(&mut g).to_value();
            let s = resolve(&g, &s);
            if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
                for (name, schema) in props {
                    params.push(serde_json::json!({
                        "name": name, "in": "query", "required": false, "schema": schema,
                        "description": schema.get("description").cloned().unwrap_or_default(),
                    }));
                }
            }
        }
        let mut op = serde_json::json!({
            "operationId": doc.operation,
            "summary": doc.summary,
            "tags": [doc.tag],
            "parameters": params,
        });
        if let Some(b) = doc.body {
            op["requestBody"] = serde_json::json!({
                "required": true,
                "content": {"application/json": {"schema": b(&mut g).to_value()}}
            });
        }
        let ok_schema = doc
            .response
            .map(|r| r(&mut g).to_value())
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        let mut content = serde_json::json!({"application/json": {"schema": ok_schema}});
        if doc.streams {
            content["text/event-stream"] = serde_json::json!({"schema": sse_event_schema(
                "Server-Sent Events, when the request asks for \"stream\": true")});
        }
        if doc.path == "/metrics" {
            content = serde_json::json!({"text/plain": {"schema": {"type": "string"}}});
        }
        if let Some(m) = doc.media {
            let schema = if m == "text/event-stream" {
                sse_event_schema("Server-Sent Events; `data` is JSON")
            } else {
                serde_json::json!({"type": "string"})
            };
            content = serde_json::json!({ m: {"schema": schema} });
        }
        let err = serde_json::json!({"description": "error", "content": {"application/json": {"schema": error_schema(doc.errors)}}});
        let mut responses = serde_json::Map::new();
        responses.insert(
            doc.status.to_string(),
            serde_json::json!({"description": "success", "content": content}),
        );
        responses.insert("4XX".into(), err.clone());
        responses.insert("5XX".into(), err);
        op["responses"] = serde_json::Value::Object(responses);
        if doc.needs_token() {
            op["security"] = serde_json::json!([{"bearer": []}, {}]);
        }
        let entry = paths
            .entry(doc.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[doc.method] = op;
    }
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {
            "title": "captiond",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Caption photo libraries with a local Moondream2 model through a durable queue. Moondream Station and OpenAI compatible endpoints included.",
        },
        "paths": paths,
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "Required on every route but /health when CAPTIOND_API_TOKEN is set"}},
        },
    })
}

/// Follows a `$ref` into the generator's definitions.
fn resolve(g: &SchemaGenerator, s: &serde_json::Value) -> serde_json::Value {
    match s.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default();
            g.definitions()
                .get(name)
                .cloned()
                .unwrap_or_else(|| s.clone())
        }
        None => s.clone(),
    }
}

async fn openapi_json(State(_): State<AppState>) -> Json<serde_json::Value> {
    Json(document())
}

/// The schema of one Server-Sent Event as OpenAPI tools read a `text/event-stream`
/// body: an object per event with its name and its (JSON text) data.
fn sse_event_schema(description: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "description": description,
        "properties": {
            "event": {"type": "string"},
            "data": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"}
        }
    })
}
