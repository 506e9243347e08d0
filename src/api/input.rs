//! Parsing client input at the boundary: image sources (library paths, base64, data
//! URIs, uploads) and job requests, so handlers only see valid values.

use std::path::{Component, Path, PathBuf};

use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::queue::{ImageSource, NewJob, TaskKind};
use crate::vision::image::DecodeLimits;
use crate::workers::caption::TaskParams;

/// Where the image of a request comes from.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// A file inside a configured library root.
    #[serde(default)]
    pub path: Option<String>,
    /// Base64 bytes, optionally as a `data:image/...;base64,` URI.
    #[serde(default)]
    pub data: Option<String>,
}

/// One job as a client describes it.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct JobRequest {
    /// caption, query, detect or point (default caption).
    #[serde(default = "default_task")]
    pub task: TaskKind,
    /// The image (absent only in multipart requests, where the file part supplies it).
    #[serde(default)]
    pub image: Option<ImageInput>,
    /// Task parameters and generation settings.
    #[serde(flatten)]
    pub params: TaskParams,
    /// Lower runs first (default 100).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Attempts allowed (1..=20).
    #[serde(default)]
    pub max_attempts: Option<i64>,
    /// Makes the request idempotent: the same key returns the same job.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

fn default_task() -> TaskKind {
    TaskKind::Caption
}

/// Default priority of queued work; interactive requests use a smaller number.
pub const DEFAULT_PRIORITY: i64 = 100;

/// Priority of interactive requests (the skill and chat endpoints): ahead of batches.
pub const INTERACTIVE_PRIORITY: i64 = 10;

/// Decodes base64 or a base64 data URI.
pub fn decode_base64_image(data: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match data.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, body)) if meta.ends_with(";base64") => body,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_image",
                    "data URI must be of the form data:<type>;base64,<data>",
                ));
            }
        },
        None => data,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()))
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_base64",
                format!("image data is not valid base64: {e}"),
            )
        })
}

/// Checks that bytes are an image of a supported format within the decode limits,
/// reading only the header.
pub fn check_image_header(bytes: &[u8], limits: DecodeLimits) -> Result<(), ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request("invalid_image", "the image is empty"));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad_request("invalid_image", e.to_string()))?;
    if reader.format().is_none() {
        return Err(ApiError::bad_request(
            "invalid_image",
            "the data is not an image in a supported format (JPEG, PNG, WebP, TIFF, GIF, BMP)",
        ));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| {
        ApiError::bad_request(
            "invalid_image",
            format!("cannot read the image header: {e}"),
        )
    })?;
    if w > limits.max_side || h > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_too_large",
            format!(
                "image is {w}x{h}, beyond the limits ({} px per side, {} pixels)",
                limits.max_side, limits.max_pixels
            ),
        ));
    }
    Ok(())
}

/// Normalises `.` and `..` without touching the file system.
fn lexical_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Resolves a client path to a canonical file inside one of `roots` (canonical
/// themselves). Outside every root (after `..` and symlinks) → 403.
pub fn resolve_library_path(raw: &str, roots: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, "path_forbidden", m);
    if raw.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path contains a NUL byte",
        ));
    }
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path must be absolute",
        ));
    }
    if roots.is_empty() {
        return Err(forbidden(
            "no library roots are configured; start captiond with --library-root DIR (CAPTIOND_LIBRARY_ROOTS) to enqueue by path".into(),
        ));
    }
    let lexical = lexical_normalize(p);
    let inside = |q: &Path| roots.iter().any(|r| q.starts_with(r));
    if !inside(&lexical) {
        return Err(forbidden(format!("{raw} is outside the library roots")));
    }
    let canonical = std::fs::canonicalize(&lexical).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::bad_request("image_missing", format!("{raw}: no such file"))
        }
        _ => ApiError::bad_request("image_unreadable", format!("{raw}: {e}")),
    })?;
    if !inside(&canonical) {
        return Err(forbidden(format!(
            "{raw} resolves outside the library roots"
        )));
    }
    if !canonical.is_file() {
        return Err(ApiError::bad_request(
            "invalid_path",
            format!("{raw} is not a regular file"),
        ));
    }
    Ok(canonical)
}

impl JobRequest {
    /// Validates the request and stores uploaded bytes; `upload` comes from a
    /// multipart file part.
    pub fn into_new_job(
        self,
        state: &AppState,
        upload: Option<Vec<u8>>,
    ) -> Result<NewJob, ApiError> {
        self.params
            .to_skill(self.task, &state.skill_defaults)
            .map_err(|m| ApiError::bad_request("invalid_params", m))?;
        let params = serde_json::to_value(&self.params)
            .map_err(|e| ApiError::bad_request("invalid_params", e.to_string()))?;
        let source = match (upload, self.image) {
            (Some(bytes), None) => store_upload(state, &bytes)?,
            (
                None,
                Some(ImageInput {
                    path: Some(p),
                    data: None,
                }),
            ) => {
                let path = resolve_library_path(&p, &state.roots)?;
                ImageSource::Path(path.to_string_lossy().into_owned())
            }
            (
                None,
                Some(ImageInput {
                    path: None,
                    data: Some(d),
                }),
            ) => store_upload(state, &decode_base64_image(&d)?)?,
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_image",
                    "give the image either as a file part or in the JSON, not both",
                ));
            }
            _ => {
                return Err(ApiError::bad_request(
                    "missing_image",
                    "give exactly one of image.path or image.data (or upload a file part named image)",
                ));
            }
        };
        let max_attempts = self.max_attempts.unwrap_or(state.max_attempts);
        if !(1..=20).contains(&max_attempts) {
            return Err(ApiError::bad_request(
                "invalid_params",
                "max_attempts must be between 1 and 20",
            ));
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > 200)
        {
            return Err(ApiError::bad_request(
                "invalid_params",
                "idempotency_key must be 1 to 200 characters",
            ));
        }
        Ok(NewJob {
            task: self.task,
            params,
            source,
            priority: self
                .priority
                .unwrap_or(DEFAULT_PRIORITY)
                .clamp(-1_000_000, 1_000_000),
            max_attempts,
            idempotency_key: self.idempotency_key,
        })
    }
}

/// Checks an uploaded image's header and stores it content-addressed.
pub fn store_upload(state: &AppState, bytes: &[u8]) -> Result<ImageSource, ApiError> {
    check_image_header(bytes, state.limits)?;
    let id = state.blobs.put(bytes).map_err(|e| match e {
        crate::blobs::BlobError::DiskFull => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string())
        }
        crate::blobs::BlobError::Database { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            e.to_string(),
        ),
        other => {
            tracing::error!(error = %other, "storing an upload failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not store the upload",
            )
        }
    })?;
    Ok(ImageSource::Blob(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_cannot_climb_out_of_a_root() {
        let root = std::env::temp_dir().canonicalize().unwrap();
        let raw = format!("{}/../etc/passwd", root.display());
        let e = resolve_library_path(&raw, std::slice::from_ref(&root)).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn data_uri_and_plain_base64_decode_alike() {
        assert_eq!(
            decode_base64_image("data:image/png;base64,aGk=").unwrap(),
            b"hi"
        );
        assert_eq!(decode_base64_image("aGk=").unwrap(), b"hi");
        assert!(decode_base64_image("not base64!").is_err());
    }
}
