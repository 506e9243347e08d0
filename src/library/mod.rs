//! Photo-library runs: walk folders, recognise images by content, skip what is done
//! (by path, size and mtime, then by content hash), and export results where photo
//! tools read them.

pub mod export;
pub mod run;
pub mod scan;
pub mod xmp;

use std::path::Path;

use serde::Serialize;

use crate::config::ModelSettings;
use crate::queue::TaskKind;
use crate::workers::caption::TaskParams;

/// Which model produced (or will produce) a result: results from another model or
/// revision are stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    /// Repository id, or `dir:` and the folder.
    pub name: String,
    /// Hub revision, or a fingerprint of a local folder's files (names, sizes, mtimes).
    pub revision: String,
}

impl ModelIdentity {
    /// The identity of the model the settings select, without loading it.
    pub fn from_settings(m: &ModelSettings) -> Self {
        match &m.model_dir {
            Some(dir) => {
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                Self {
                    name: format!("dir:{}", dir.display()),
                    revision: dir_fingerprint(&dir),
                }
            }
            None => Self {
                name: m.model_repo.clone(),
                revision: m.model_revision.clone(),
            },
        }
    }
}

/// A short fingerprint of a model folder: the names, sizes and mtimes of its files.
fn dir_fingerprint(dir: &Path) -> String {
    let mut entries: Vec<(String, u64, i64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    meta.is_file().then(|| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            meta.len(),
                            scan::mtime_ns(&meta),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let mut h = blake3::Hasher::new();
    for (name, size, mtime) in entries {
        h.update(name.as_bytes());
        h.update(&size.to_le_bytes());
        h.update(&mtime.to_le_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// What to run on each image of a library: the task and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSpec {
    /// Caption or query.
    pub task: TaskKind,
    /// Its parameters as stored in the job.
    pub params: TaskParams,
}

impl TaskSpec {
    /// The parameters in the stable JSON form used in keys and exports.
    pub fn params_json(&self) -> String {
        serde_json::to_string(&self.params).unwrap_or_default()
    }

    /// The text field of a result for this task (`caption` or `answer`).
    pub fn output_field(&self) -> &'static str {
        match self.task {
            TaskKind::Query => "answer",
            _ => "caption",
        }
    }
}

/// What every library result's key starts with.
pub const KEY_PREFIX: &str = "lib:";

/// The key a library result is stored under: content hash, model and revision, task
/// and parameters. It is the job's idempotency key, so one content is captioned once.
/// The settings part is a digest, so the key stays within the 200-character limit.
pub fn content_key(hash: &str, model: &ModelIdentity, spec: &TaskSpec) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        model.name.as_str(),
        model.revision.as_str(),
        spec.task.as_str(),
        spec.params_json().as_str(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    format!(
        "{KEY_PREFIX}{hash}:{}:{}",
        spec.task.as_str(),
        &h.finalize().to_hex()[..16]
    )
}
