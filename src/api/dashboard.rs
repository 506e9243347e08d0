//! The web dashboard: its page and assets (shipped in the binary, no CDN), and the
//! routes it needs beyond the job API: thumbnails, the newest finished jobs, batch
//! lists and retrying a batch's failures. The page itself talks only to the JSON API.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::jobs::{parse_id, rfc3339, view_with};
use super::{ApiError, AppState};
use crate::blobs::BlobError;
use crate::queue::{ImageSource, JobState};
use crate::vision::image::{ImageInputError, decode_rgb};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const ICON_SVG: &str = include_str!("dashboard/icon.svg");

/// Paths served without the bearer token: the page and its assets. The page asks for
/// the token itself and sends it with every API call.
pub fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/" | "/health" | "/dashboard/app.js" | "/dashboard/app.css" | "/favicon.svg"
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard page.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /dashboard/app.js`.
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /dashboard/app.css`.
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `GET /favicon.svg`.
pub async fn icon() -> Response {
    asset("image/svg+xml", ICON_SVG)
}

/// Query of `GET /v1/jobs/{id}/thumbnail`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ThumbQuery {
    /// Longest side in pixels (32..=1024, default 256; rounded up to 128, 256, 512 or 1024).
    pub size: Option<u32>,
}

/// Largest image file read for a thumbnail.
const MAX_THUMB_SOURCE: u64 = 256 << 20;
/// Bytes of thumbnails kept in memory.
const CACHE_BYTES: usize = 64 << 20;

/// Small JPEG thumbnails, made on demand (two at a time) and kept in memory.
pub struct Thumbnails {
    cache: Mutex<ThumbCache>,
    making: Semaphore,
}

#[derive(Default)]
struct ThumbCache {
    map: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Default for Thumbnails {
    fn default() -> Self {
        Self {
            cache: Mutex::new(ThumbCache::default()),
            making: Semaphore::new(2),
        }
    }
}

impl Thumbnails {
    fn get(&self, key: &str) -> Option<Bytes> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.map.get(key).cloned()
    }

    fn put(&self, key: String, jpeg: Bytes) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.contains_key(&key) {
            return;
        }
        c.bytes += jpeg.len();
        c.map.insert(key.clone(), jpeg);
        c.order.push_back(key);
        while c.bytes > CACHE_BYTES {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(b) = c.map.remove(&old) {
                c.bytes -= b.len();
            }
        }
    }
}

/// Where a thumbnail's pixels come from, and the key that changes when they do.
enum Source {
    Path(PathBuf),
    Blob(String),
}

fn thumb_error(e: ImageInputError) -> ApiError {
    match e {
        ImageInputError::TooLarge { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_too_large",
            e.to_string(),
        ),
        _ => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
            e.to_string(),
        ),
    }
}

/// `GET /v1/jobs/{id}/thumbnail?size=256`: a JPEG of the job's image, EXIF
/// orientation applied, under the same path roots and decode limits as image input.
pub async fn thumbnail(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ThumbQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let id = parse_id(&id)?;
    let size = match q.size.unwrap_or(256) {
        s @ 32..=1024 => [128, 256, 512, 1024]
            .into_iter()
            .find(|&b| b >= s)
            .unwrap_or(1024),
        s => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("size must be between 32 and 1024 pixels, got {s}"),
            ));
        }
    };
    let job = state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let succeeded = job.state == JobState::Succeeded;
    let (source, key) = match job.source {
        ImageSource::Path(p) => {
            // Checked again now: the file may have moved, or become a link out of the roots.
            let roots = state.roots.clone();
            let canonical =
                tokio::task::spawn_blocking(move || super::input::resolve_library_path(&p, &roots))
                    .await
                    .map_err(|_| internal("path check crashed"))?
                    .map_err(|e| match e.code {
                        "image_missing" => {
                            ApiError::new(StatusCode::NOT_FOUND, "image_missing", e.message)
                        }
                        _ => e,
                    })?;
            let meta = std::fs::metadata(&canonical).map_err(|e| {
                ApiError::new(StatusCode::NOT_FOUND, "image_missing", e.to_string())
            })?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let key = format!("p:{}:{}:{mtime}:{size}", canonical.display(), meta.len());
            (Source::Path(canonical), key)
        }
        ImageSource::Blob(b) => {
            let key = format!("b:{b}:{size}");
            (Source::Blob(b), key)
        }
    };
    let etag = format!("\"{}\"", &blake3::hash(key.as_bytes()).to_hex()[..20]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = (status, body).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=3600"),
        );
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
        r
    };
    if fresh {
        return Ok(reply(StatusCode::NOT_MODIFIED, Bytes::new()));
    }
    if let Some(jpeg) = state.thumbs.get(&key) {
        return Ok(reply(StatusCode::OK, jpeg));
    }
    let _permit = state
        .thumbs
        .making
        .acquire()
        .await
        .map_err(|_| internal("thumbnailer closed"))?;
    let limits = state.limits;
    let blobs = state.blobs.clone();
    let jpeg = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let bytes = match source {
            Source::Path(p) => {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                if len > MAX_THUMB_SOURCE {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "image_too_large",
                        format!("the file is {len} bytes, more than {MAX_THUMB_SOURCE}"),
                    ));
                }
                std::fs::read(&p).map_err(|e| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "image_missing",
                        format!("{}: {e}", p.display()),
                    )
                })?
            }
            Source::Blob(b) => blobs.get(&b).map_err(|e| {
                let message = match e {
                    BlobError::Missing(_) if succeeded => format!(
                        "{e}: uploads of succeeded jobs are deleted once \
                         CAPTIOND_KEEP_UPLOADS_DAYS (--keep-uploads-days) have passed"
                    ),
                    e => e.to_string(),
                };
                ApiError::new(StatusCode::NOT_FOUND, "image_missing", message)
            })?,
        };
        let rgb = decode_rgb(&bytes, limits).map_err(thumb_error)?;
        let small = image::DynamicImage::ImageRgb8(rgb).thumbnail(size, size);
        let mut out = std::io::Cursor::new(Vec::new());
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        small
            .to_rgb8()
            .write_with_encoder(enc)
            .map_err(|e| internal(&format!("cannot encode the thumbnail: {e}")))?;
        Ok(out.into_inner())
    })
    .await
    .map_err(|_| internal("thumbnailing crashed"))??;
    let jpeg = Bytes::from(jpeg);
    state.thumbs.put(key, jpeg.clone());
    Ok(reply(StatusCode::OK, jpeg))
}

fn internal(msg: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        msg.to_string(),
    )
}

/// Query of `GET /v1/jobs/recent`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RecentQuery {
    /// Only this state (`succeeded`, `failed`, `cancelled`).
    pub state: Option<String>,
    /// Only this batch.
    pub batch: Option<String>,
    /// Jobs finished before this time, Unix milliseconds (the previous page's `next_before`).
    pub before: Option<i64>,
    /// Page size (1..=500, default 48).
    pub limit: Option<i64>,
}

/// `GET /v1/jobs/recent`: finished jobs, newest first, with their results.
pub async fn recent(
    State(state): State<AppState>,
    query: Result<Query<RecentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query?;
    let st = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => match JobState::parse(s) {
            Some(st) if st.is_terminal() => Some(st),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("state must be succeeded, failed or cancelled, got {s:?}"),
                ));
            }
        },
    };
    let limit = q.limit.unwrap_or(48);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 500",
        ));
    }
    let batch = q
        .batch
        .as_deref()
        .filter(|b| !b.is_empty())
        .map(parse_id)
        .transpose()?;
    let before = q.before.unwrap_or(i64::MAX);
    let rows = state
        .store
        .recently_finished(st, batch, before, limit)
        .await?;
    let next_before = if rows.len() as i64 == limit {
        rows.last().and_then(|(j, _)| j.finished_at)
    } else {
        None
    };
    let jobs: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(job, result)| {
            let at = job.finished_at;
            let result = if job.state == JobState::Succeeded {
                result
            } else {
                None
            };
            let mut v = serde_json::to_value(view_with(job, result)).unwrap_or_default();
            v["finished_ms"] = at.into();
            v
        })
        .collect();
    Ok(Json(
        serde_json::json!({"jobs": jobs, "next_before": next_before}),
    ))
}

/// Query of `GET /v1/batches`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BatchesQuery {
    /// How many of the newest batches (1..=100, default 20).
    pub limit: Option<i64>,
}

/// `GET /v1/batches`: the newest batches with their counts per state.
pub async fn list_batches(
    State(state): State<AppState>,
    query: Result<Query<BatchesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 100",
        ));
    }
    let batches: Vec<serde_json::Value> = state
        .store
        .recent_batches(limit)
        .await?
        .into_iter()
        .map(|b| {
            serde_json::json!({
                "id": b.id, "created_at": rfc3339(b.created_at), "total": b.total,
                "counts": b.counts, "done": b.counts.pending() == 0,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "batches": batches })))
}

/// `POST /v1/batches/{id}/retry`: queue every failed job of the batch again.
pub async fn retry_batch(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: Uuid = parse_id(&id)?;
    state
        .store
        .batch(id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch"))?;
    let n = state.store.retry_failed_in_batch(id).await?;
    if n > 0 {
        state.wakeup.wake();
    }
    Ok(Json(serde_json::json!({"batch_id": id, "retried": n})))
}
