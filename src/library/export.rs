//! `captiond export`: library results as JSON lines or CSV, `.txt` files beside the
//! images, or XMP sidecars. Incremental: an export that would write the same bytes
//! writes nothing, and text someone else wrote is kept unless asked to overwrite.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::xmp::{self, Description, Outcome};
use super::{
    KEY_PREFIX, ModelIdentity, TaskSpec, content_key, job_for, path_content_key, settings_tails,
};
use crate::queue::{JobState, LibraryFile, Store, StoreError};

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per image.
    Jsonl,
    /// One CSV row per image, with a header.
    Csv,
    /// A text file beside each image.
    Txt,
    /// An XMP sidecar beside each image.
    Xmp,
}

/// How sidecars are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XmpNaming {
    /// Whichever exists already; `photo.jpg.xmp` when neither does.
    #[default]
    Auto,
    /// `photo.jpg.xmp`.
    Ext,
    /// `photo.xmp`.
    Stem,
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Folders or files to export (empty: everything the library walk recorded).
    pub paths: Vec<PathBuf>,
    /// Output format.
    pub format: Format,
    /// The task and parameters whose results to export.
    pub spec: TaskSpec,
    /// The model whose results to export.
    pub model: ModelIdentity,
    /// Where jsonl/csv go (stdout when absent).
    pub output: Option<PathBuf>,
    /// Extension of the text files.
    pub txt_extension: String,
    /// Sidecar naming.
    pub xmp_naming: XmpNaming,
    /// Also write `Iptc4xmpCore:AltTextAccessibility`.
    pub alt_text: bool,
    /// Replace text that captiond did not write.
    pub overwrite: bool,
}

impl ExportOptions {
    /// Options that only read rows (status, `caption --print`): JSONL, default naming.
    pub fn for_rows(paths: Vec<PathBuf>, spec: TaskSpec, model: ModelIdentity) -> Self {
        Self {
            paths,
            format: Format::Jsonl,
            spec,
            model,
            output: None,
            txt_extension: "txt".into(),
            xmp_naming: XmpNaming::Auto,
            alt_text: false,
            overwrite: false,
        }
    }
}

/// One image's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Image path.
    pub path: String,
    /// BLAKE3 of its content.
    pub hash: String,
    /// Model.
    pub model: String,
    /// Model revision.
    pub revision: String,
    /// Task.
    pub task: String,
    /// Task parameters (JSON).
    pub params: String,
    /// succeeded, failed, queued, ... or `missing` when never enqueued.
    pub state: String,
    /// The caption or answer.
    pub text: Option<String>,
    /// Error of a failed job.
    pub error: Option<String>,
    /// When the work started (RFC 3339).
    pub started_at: Option<String>,
    /// When it finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Run time in milliseconds.
    pub duration_ms: Option<i64>,
}

/// What an export did.
#[derive(Debug, Default, Serialize)]
pub struct ExportSummary {
    /// Images considered.
    pub images: usize,
    /// Images with a result.
    pub with_result: usize,
    /// Files written (or the one output file).
    pub written: usize,
    /// Files that already said the same.
    pub unchanged: usize,
    /// Files kept because someone else wrote them (use --overwrite).
    pub kept: Vec<String>,
    /// Things worth saying (name clashes, ...).
    pub notes: Vec<String>,
    /// Files that could not be written, with the reason.
    pub errors: Vec<String>,
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The output could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Library results made with other settings than a report's: how many, and the flags
/// that select them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherSettings {
    /// Succeeded jobs (distinct contents) with these settings.
    pub results: i64,
    /// The task and model flags that select them (`--length short --model-dir …`).
    pub flags: String,
}

/// The settings, other than `model` with `spec`, under which the queue holds library
/// results (results are kept per model and task, so a report with other flags does not
/// see them); most results first. Results that `model` finds (by their keys' settings
/// digest: a moved model folder's, made under its old path) are not other settings;
/// those `model` made with another task are named by `model` as it is now.
pub async fn other_settings(
    store: &Store,
    model: &ModelIdentity,
    spec: &TaskSpec,
) -> Result<Vec<OtherSettings>, ExportError> {
    let params = serde_json::to_value(&spec.params).unwrap_or_default();
    let found = settings_tails(model, spec);
    let mut out: Vec<OtherSettings> = Vec::new();
    for r in store.result_settings(KEY_PREFIX).await? {
        let stored: serde_json::Value = serde_json::from_str(&r.params).unwrap_or_default();
        let same = found.contains(&r.key_tail)
            || (r.task == spec.task.as_str() && stored == params && model_made(model, &r.model));
        if same {
            continue;
        }
        // Made by this model (its settings digest for the stored task), maybe under a
        // folder's old path: named by the model as it is now.
        let this_model = crate::queue::TaskKind::parse(&r.task)
            .zip(serde_json::from_str(&r.params).ok())
            .map(|(task, params)| TaskSpec { task, params })
            .is_some_and(|s| settings_tails(model, &s).contains(&r.key_tail));
        let label = if this_model {
            model.label()
        } else {
            r.model.clone()
        };
        let flags = format!("{} {}", task_flags(&r.task, &stored), model_flags(&label));
        // Key formats of one model and task (before and after keys left out a
        // folder's path) are one line.
        match out.iter_mut().find(|o| o.flags == flags) {
            Some(o) => o.results += r.jobs,
            None => out.push(OtherSettings {
                results: r.jobs,
                flags,
            }),
        }
    }
    out.sort_by_key(|o| std::cmp::Reverse(o.results));
    Ok(out)
}

/// Whether `label` (how a worker names its model: a folder, or `repo@revision`) is the
/// model `model` identifies.
fn model_made(model: &ModelIdentity, label: &str) -> bool {
    match model.name.strip_prefix("dir:") {
        Some(dir) => std::fs::canonicalize(label).is_ok_and(|l| l == Path::new(dir)),
        None => label == model.label(),
    }
}

/// The `caption`/`status`/`export` flags of a library task's stored parameters.
fn task_flags(task: &str, params: &serde_json::Value) -> String {
    let field = |k: &str| params.get(k).and_then(|v| v.as_str());
    match (task, field("length"), field("question")) {
        ("caption", Some(length), _) => format!("--length {}", shell_word(length)),
        ("query", _, Some(q)) => format!("--question {}", shell_word(q)),
        _ => format!("(task {task}, parameters {params})"),
    }
}

/// The model flags that select the model a worker labelled `label` (a folder, or
/// `repo@revision`).
fn model_flags(label: &str) -> String {
    let folder = Path::new(label).is_absolute() || Path::new(label).is_dir();
    match label.rsplit_once('@') {
        Some((repo, rev)) if !folder => format!(
            "--model-repo {} --model-revision {}",
            shell_word(repo),
            shell_word(rev)
        ),
        _ if folder && !Path::new(label).exists() => format!(
            "--model-dir {} (no longer there: give the folder it moved to)",
            shell_word(label)
        ),
        _ => format!("--model-dir {}", shell_word(label)),
    }
}

/// `s` as one shell word: as is when plain, else single-quoted.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:@=+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The rows of the images under `opts.paths` (or the whole library), sorted by path.
pub async fn rows(store: &Store, opts: &ExportOptions) -> Result<Vec<Row>, ExportError> {
    let mut files: Vec<LibraryFile> = Vec::new();
    if opts.paths.is_empty() {
        files = store.library_files_under("/").await?;
    } else {
        for p in &opts.paths {
            let c = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            let mut prefix = c.to_string_lossy().into_owned();
            if c.is_dir() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            files.extend(store.library_files_under(&prefix).await?);
        }
    }
    files.retain(|f| f.is_image);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);
    let keys: HashMap<String, (String, Option<String>)> = files
        .iter()
        .map(|f| {
            (
                f.hash.clone(),
                (
                    content_key(&f.hash, &opts.model, &opts.spec),
                    path_content_key(&f.hash, &opts.model, &opts.spec),
                ),
            )
        })
        .collect();
    let key_list: Vec<String> = keys
        .values()
        .flat_map(|(key, path_key)| std::iter::once(key).chain(path_key))
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let jobs = store.jobs_by_keys(&key_list).await?;
    let done: Vec<uuid::Uuid> = jobs
        .values()
        .filter(|j| j.state == JobState::Succeeded)
        .map(|j| j.id)
        .collect();
    let results = store.results_of(&done).await?;
    let params = opts.spec.params_json();
    let field = opts.spec.output_field();
    Ok(files
        .into_iter()
        .map(|f| {
            let job = keys
                .get(f.hash.as_str())
                .and_then(|(key, path_key)| job_for(&jobs, key, path_key.as_deref()))
                .map(|(_, j)| j);
            let text = job
                .and_then(|j| results.get(&j.id))
                .and_then(|r| r.output.get(field))
                .and_then(|t| t.as_str())
                .map(|t| t.trim().to_string());
            Row {
                path: f.path,
                hash: f.hash,
                model: opts.model.name.clone(),
                revision: opts.model.revision.clone(),
                task: opts.spec.task.as_str().into(),
                params: params.clone(),
                state: job.map_or("missing", |j| j.state.as_str()).into(),
                text,
                error: job
                    .and_then(|j| j.error.as_ref())
                    .filter(|_| job.is_some_and(|j| j.state != JobState::Succeeded))
                    .map(|e| format!("{}: {}", e.code, e.message)),
                started_at: job
                    .and_then(|j| j.started_at)
                    .map(crate::api::jobs::rfc3339),
                finished_at: job
                    .and_then(|j| j.finished_at)
                    .map(crate::api::jobs::rfc3339),
                duration_ms: job.and_then(|j| Some(j.finished_at? - j.started_at?)),
            }
        })
        .collect())
}

/// Writes `bytes` to `path` atomically (a temporary file in the same folder, synced,
/// then renamed over it).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".captiond-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The jsonl or csv document of `rows`.
pub fn render(rows: &[Row], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Csv => {
            out.push_str("path,hash,model,revision,task,params,state,text,error,started_at,finished_at,duration_ms\n");
            for r in rows {
                let cols = [
                    r.path.clone(),
                    r.hash.clone(),
                    r.model.clone(),
                    r.revision.clone(),
                    r.task.clone(),
                    r.params.clone(),
                    r.state.clone(),
                    r.text.clone().unwrap_or_default(),
                    r.error.clone().unwrap_or_default(),
                    r.started_at.clone().unwrap_or_default(),
                    r.finished_at.clone().unwrap_or_default(),
                    r.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
                ];
                let line: Vec<String> = cols.iter().map(|c| csv_field(c)).collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
        }
        _ => {
            for r in rows {
                out.push_str(&serde_json::to_string(r).unwrap_or_default());
                out.push('\n');
            }
        }
    }
    out
}

/// Runs an export.
pub async fn export(store: &Store, opts: &ExportOptions) -> Result<ExportSummary, ExportError> {
    let rows = rows(store, opts).await?;
    let mut s = ExportSummary {
        images: rows.len(),
        with_result: rows.iter().filter(|r| r.text.is_some()).count(),
        ..ExportSummary::default()
    };
    match opts.format {
        Format::Jsonl | Format::Csv => {
            let doc = render(&rows, opts.format);
            match &opts.output {
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(doc.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(|source| ExportError::Io {
                            path: "stdout".into(),
                            source,
                        })?;
                    s.written = 1;
                }
                Some(path) => {
                    if std::fs::read(path).is_ok_and(|old| old == doc.as_bytes()) {
                        s.unchanged = 1;
                    } else {
                        write_atomic(path, doc.as_bytes()).map_err(|source| ExportError::Io {
                            path: path.clone(),
                            source,
                        })?;
                        s.written = 1;
                    }
                }
            }
        }
        Format::Txt => export_txt(store, opts, &rows, &mut s).await?,
        Format::Xmp => export_xmp(opts, &rows, &mut s),
    }
    Ok(s)
}

/// `a.txt` beside `a.jpg`; `a.jpg.txt` for every image whose stem another image in
/// the same folder shares.
fn txt_targets(rows: &[Row], ext: &str) -> (Vec<PathBuf>, Vec<String>) {
    let stem_of = |p: &Path| p.with_extension("");
    let mut count: HashMap<PathBuf, usize> = HashMap::new();
    for r in rows {
        *count.entry(stem_of(Path::new(&r.path))).or_default() += 1;
    }
    let mut notes = Vec::new();
    let targets = rows
        .iter()
        .map(|r| {
            let p = Path::new(&r.path);
            if count[&stem_of(p)] > 1 {
                let t = PathBuf::from(format!("{}.{ext}", r.path));
                notes.push(format!(
                    "{} shares its name with another image; wrote {}",
                    r.path,
                    t.display()
                ));
                t
            } else {
                p.with_extension(ext)
            }
        })
        .collect();
    (targets, notes)
}

async fn export_txt(
    store: &Store,
    opts: &ExportOptions,
    rows: &[Row],
    s: &mut ExportSummary,
) -> Result<(), ExportError> {
    let ext = opts.txt_extension.trim_start_matches('.');
    let (targets, notes) = txt_targets(rows, ext);
    s.notes.extend(notes);
    for (r, target) in rows.iter().zip(targets) {
        let Some(text) = &r.text else { continue };
        let content = format!("{text}\n");
        let key = target.to_string_lossy().into_owned();
        match std::fs::read(&target) {
            Ok(old) if old == content.as_bytes() => {
                s.unchanged += 1;
                continue;
            }
            Ok(old) => {
                let ours = store.export_record(&key).await?
                    == Some(blake3::hash(&old).to_hex().to_string());
                if !ours && !opts.overwrite {
                    s.kept.push(key);
                    continue;
                }
            }
            Err(_) => {}
        }
        match write_atomic(&target, content.as_bytes()) {
            Ok(()) => {
                store
                    .put_export_record(&key, &blake3::hash(content.as_bytes()).to_hex())
                    .await?;
                s.written += 1;
            }
            Err(e) => s.errors.push(format!("{key}: {e}")),
        }
    }
    Ok(())
}

/// The sidecar of `image` under `naming`.
pub fn sidecar_path(image: &Path, naming: XmpNaming) -> PathBuf {
    let ext = PathBuf::from(format!("{}.xmp", image.display()));
    let stem = image.with_extension("xmp");
    match naming {
        XmpNaming::Ext => ext,
        XmpNaming::Stem => stem,
        XmpNaming::Auto if !ext.exists() && stem.exists() => stem,
        XmpNaming::Auto => ext,
    }
}

fn export_xmp(opts: &ExportOptions, rows: &[Row], s: &mut ExportSummary) {
    for r in rows {
        let Some(text) = &r.text else { continue };
        let target = sidecar_path(Path::new(&r.path), opts.xmp_naming);
        let shown = target.display().to_string();
        let existing = match std::fs::read_to_string(&target) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                s.errors.push(format!("{shown}: {e}"));
                continue;
            }
        };
        let d = Description {
            text,
            alt_text: opts.alt_text,
            overwrite: opts.overwrite,
        };
        match xmp::update(existing.as_deref(), &d) {
            Ok(Outcome::Unchanged) => s.unchanged += 1,
            Ok(Outcome::KeptPersonDescription(_)) => s.kept.push(shown),
            Ok(Outcome::Write(doc)) => match write_atomic(&target, doc.as_bytes()) {
                Ok(()) => s.written += 1,
                Err(e) => s.errors.push(format!("{shown}: {e}")),
            },
            Err(e) => s.errors.push(format!("{shown}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_settings_read_as_the_flags_that_select_them() {
        let caption = serde_json::json!({ "length": "short" });
        assert_eq!(task_flags("caption", &caption), "--length short");
        let query = serde_json::json!({ "question": "What's in it?" });
        assert_eq!(
            task_flags("query", &query),
            r#"--question 'What'\''s in it?'"#
        );
        assert_eq!(
            model_flags("vikhyatk/moondream2@2025-06-21"),
            "--model-repo vikhyatk/moondream2 --model-revision 2025-06-21"
        );
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().join("my model@v2");
        std::fs::create_dir(&spaced).unwrap();
        let spaced = spaced.display().to_string();
        assert_eq!(model_flags(&spaced), format!("--model-dir '{spaced}'"));
        let plain = dir.path().display().to_string();
        assert_eq!(model_flags(&plain), format!("--model-dir {plain}"));
        // A folder that has gone (moved, or deleted) is said to be gone.
        assert_eq!(
            model_flags("/nonexistent/models/md2"),
            "--model-dir /nonexistent/models/md2 (no longer there: give the folder it moved to)"
        );
    }

    #[test]
    fn a_hub_model_is_matched_by_repo_and_revision() {
        let m = ModelIdentity {
            name: "vikhyatk/moondream2".into(),
            revision: "2025-06-21".into(),
        };
        assert!(model_made(&m, "vikhyatk/moondream2@2025-06-21"));
        assert!(!model_made(&m, "vikhyatk/moondream2@2025-01-09"));
        let dir = tempfile::tempdir().unwrap();
        let d = ModelIdentity {
            name: format!("dir:{}", dir.path().canonicalize().unwrap().display()),
            revision: String::new(),
        };
        assert!(model_made(&d, &dir.path().display().to_string()));
        assert!(!model_made(&d, "/nonexistent/model"));
    }
}
