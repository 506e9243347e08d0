//! Photo-library runs: walk folders, recognise images by content, skip what is done
//! (by path, size and mtime, then by content hash), and export results where photo
//! tools read them.

pub mod export;
pub mod run;
pub mod scan;
pub mod xmp;

use std::collections::HashMap;
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

    /// How a worker labels this model in its results: the folder, or `repo@revision`.
    pub fn label(&self) -> String {
        match self.name.strip_prefix("dir:") {
            Some(dir) => dir.to_string(),
            None => format!("{}@{}", self.name, self.revision),
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
/// A local folder enters it by its fingerprint alone, not its path, so a moved or
/// renamed model folder keeps its results.
pub fn content_key(hash: &str, model: &ModelIdentity, spec: &TaskSpec) -> String {
    let name = if model.name.starts_with("dir:") {
        "dir"
    } else {
        model.name.as_str()
    };
    key_for(hash, name, &model.revision, spec)
}

/// The key a local folder's results had before keys left out the folder's path
/// (captiond before 2026-12-07): looked up too, so that results made then still count.
/// `None` for a hub model, whose key is unchanged.
pub fn path_content_key(hash: &str, model: &ModelIdentity, spec: &TaskSpec) -> Option<String> {
    model
        .name
        .starts_with("dir:")
        .then(|| key_for(hash, &model.name, &model.revision, spec))
}

/// The settings digests (a key's last 16 characters) under which `model` and `spec`
/// find their results: the path-free key's, and for a local folder the one from before
/// keys left out its path.
pub fn settings_tails(model: &ModelIdentity, spec: &TaskSpec) -> Vec<String> {
    let tail = |key: String| key[key.len().saturating_sub(16)..].to_string();
    std::iter::once(content_key("", model, spec))
        .chain(path_content_key("", model, spec))
        .map(tail)
        .collect()
}

/// The job that holds a content's result among `jobs` (by key): the one under `key`,
/// else one under the key from before keys left out a folder's path; with its key.
pub fn job_for<'a, J>(
    jobs: &'a HashMap<String, J>,
    key: &'a str,
    path_key: Option<&'a str>,
) -> Option<(&'a str, &'a J)> {
    std::iter::once(key)
        .chain(path_key)
        .find_map(|k| jobs.get(k).map(|j| (k, j)))
}

fn key_for(hash: &str, name: &str, revision: &str, spec: &TaskSpec) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        name,
        revision,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::CaptionLength;

    fn spec() -> TaskSpec {
        TaskSpec {
            task: TaskKind::Caption,
            params: TaskParams {
                length: Some(CaptionLength::Short),
                ..TaskParams::default()
            },
        }
    }

    fn folder(path: &str, fingerprint: &str) -> ModelIdentity {
        ModelIdentity {
            name: format!("dir:{path}"),
            revision: fingerprint.into(),
        }
    }

    #[test]
    fn a_folder_is_keyed_by_its_files_not_its_path_and_its_earlier_keys_are_kept() {
        let h = "ab".repeat(32);
        let (here, moved) = (
            folder("/models/moondream2", "0123456789abcdef"),
            folder("/data/md2", "0123456789abcdef"),
        );
        assert_eq!(
            content_key(&h, &here, &spec()),
            content_key(&h, &moved, &spec())
        );
        let changed = folder("/models/moondream2", "fedcba9876543210");
        assert_ne!(
            content_key(&h, &here, &spec()),
            content_key(&h, &changed, &spec())
        );
        // The keys earlier versions stored, pinned: a database written by them keeps
        // its results (computed with the code of commit 48f8e2d).
        let prefix = format!("lib:{h}:caption:");
        assert_eq!(
            path_content_key(&h, &here, &spec()),
            Some(format!("{prefix}ea4dce904052ffa3"))
        );
        let hub = ModelIdentity {
            name: "vikhyatk/moondream2".into(),
            revision: "2025-06-21".into(),
        };
        assert_eq!(
            content_key(&h, &hub, &spec()),
            format!("{prefix}55ef2c83867c0eab")
        );
        assert_eq!(path_content_key(&h, &hub, &spec()), None);

        let key = content_key(&h, &here, &spec());
        let old = path_content_key(&h, &here, &spec()).unwrap();
        let mut jobs = HashMap::from([(old.clone(), 1)]);
        assert_eq!(job_for(&jobs, &key, Some(&old)), Some((old.as_str(), &1)));
        jobs.insert(key.clone(), 2);
        assert_eq!(job_for(&jobs, &key, Some(&old)), Some((key.as_str(), &2)));
        assert_eq!(job_for(&jobs, "other", None), None);
    }
}
