//! Uploaded images stored content-addressed under the data dir, so a job that refers
//! to them survives restarts. Writes are atomic (temp file, fsync, rename). With a
//! PostgreSQL queue the bytes also go into the database, so every host can read every
//! upload; the local folder is then a cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long an upload no job refers to is kept: the gap between storing an upload and
/// inserting its job is far shorter, so a sweep never takes one from a request in flight.
pub const SWEEP_GRACE: Duration = Duration::from_secs(3600);
/// How often a server sweeps its uploads.
pub const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Upload files (and leftover temp files) deleted from this host's folder.
    pub files: usize,
    /// Rows deleted from the database's `blobs` table (PostgreSQL).
    pub rows: u64,
}

/// A folder of blobs named by their BLAKE3 hex digest (and, with a PostgreSQL queue,
/// the database's `blobs` table behind it).
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    shared: Option<(crate::queue::Store, tokio::runtime::Handle)>,
}

/// Blob store errors.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The digest is not 64 lowercase hex characters.
    #[error("invalid blob id {0:?}")]
    InvalidId(String),
    /// No blob with that digest.
    #[error("uploaded image {0} is missing from the data dir")]
    Missing(String),
    /// The disk is full.
    #[error("no space left to store the upload")]
    DiskFull,
    /// The shared database could not store or return the bytes.
    #[error("uploaded image {id}: database: {message}")]
    Database {
        /// Digest.
        id: String,
        /// Cause.
        message: String,
    },
    /// Another I/O error.
    #[error("blob I/O on {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl BlobStore {
    /// Uses (and creates) `root`.
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root, shared: None })
    }

    /// Keeps uploads in `store` too when it is PostgreSQL (several hosts); `handle`
    /// runs its queries. `put` and `get` must then be called off the async runtime
    /// (from blocking threads), as all callers do.
    pub fn with_database(mut self, store: &crate::queue::Store) -> Self {
        if store.postgres().is_some()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            self.shared = Some((store.clone(), handle));
        }
        self
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, BlobError> {
        let valid = id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(BlobError::InvalidId(id.to_string()));
        }
        Ok(self.root.join(&id[..2]).join(id))
    }

    /// Stores bytes (once per content) and returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<String, BlobError> {
        let id = blake3::hash(bytes).to_hex().to_string();
        if let Some((store, handle)) = &self.shared
            && let Some(pg) = store.postgres()
        {
            handle
                .block_on(pg.put_blob(&id, bytes))
                .map_err(|e| BlobError::Database {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
        }
        self.put_local(&id, bytes)?;
        Ok(id)
    }

    fn put_local(&self, id: &str, bytes: &[u8]) -> Result<(), BlobError> {
        let path = self.path_of(id)?;
        if path.is_file() {
            // Stored again: renew its time, which the sweep's grace counts from.
            if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
            return Ok(());
        }
        let io = |path: &Path, source: std::io::Error| {
            // tempfile wraps errors (adding the path), so the raw errno can be gone:
            // look at the kind as well.
            let full = source.raw_os_error() == Some(libc::ENOSPC)
                || matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                );
            if full {
                BlobError::DiskFull
            } else {
                BlobError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io(dir, e))?;
        tmp.write_all(bytes).map_err(|e| io(&path, e))?;
        tmp.as_file().sync_all().map_err(|e| io(&path, e))?;
        tmp.persist(&path).map_err(|e| io(&path, e.error))?;
        Ok(())
    }

    /// Reads a blob.
    pub fn get(&self, id: &str) -> Result<Vec<u8>, BlobError> {
        let path = self.path_of(id)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                // Another host's upload: fetch it from the database and cache it here.
                if let Some((store, handle)) = &self.shared
                    && let Some(pg) = store.postgres()
                {
                    let found =
                        handle
                            .block_on(pg.get_blob(id))
                            .map_err(|e| BlobError::Database {
                                id: id.to_string(),
                                message: e.to_string(),
                            })?;
                    if let Some(bytes) = found {
                        let _ = self.put_local(id, &bytes);
                        return Ok(bytes);
                    }
                }
                Err(BlobError::Missing(id.to_string()))
            }
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    /// Deletes the uploads no job needs that were stored (or stored again) more than
    /// `grace` ago: this host's files, leftover temp files of interrupted writes, and
    /// with PostgreSQL the database rows. No job needs an upload whose request failed
    /// after storing it, a re-sent idempotency key's bytes, or (with `keep_succeeded`)
    /// one whose jobs all succeeded longer than that ago; waiting, running, failed and
    /// cancelled jobs (which can be retried) keep theirs, and `None` keeps succeeded
    /// jobs' uploads for ever. Jobs and their results are never deleted.
    pub async fn sweep(
        &self,
        store: &crate::queue::Store,
        grace: Duration,
        keep_succeeded: Option<Duration>,
    ) -> Result<Swept, BlobError> {
        let now = SystemTime::now();
        let cutoff = now.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let unix_ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let succeeded_before =
            keep_succeeded.map(|k| unix_ms(now.checked_sub(k).unwrap_or(SystemTime::UNIX_EPOCH)));
        let root = self.root.clone();
        let (old, temps) = tokio::task::spawn_blocking(move || old_files(&root, cutoff))
            .await
            .map_err(|e| BlobError::Io {
                path: self.root.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        // Listed after the files: a job inserted meanwhile refers to a file stored
        // within the grace, which is not a candidate. Without old files (a PostgreSQL
        // host's cache, most hours) the jobs are not read here at all.
        let in_use = if old.is_empty() {
            Default::default()
        } else {
            store
                .blobs_in_use(succeeded_before)
                .await
                .map_err(|e| BlobError::Database {
                    id: "uploads in use".into(),
                    message: e.to_string(),
                })?
        };
        let mut files = 0;
        for path in old
            .into_iter()
            .filter(|(id, _)| !in_use.contains(id))
            .map(|(_, p)| p)
            .chain(temps)
        {
            // Stored again since it was listed: a request may be about to use it.
            let renewed = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= cutoff);
            if !renewed && std::fs::remove_file(&path).is_ok() {
                files += 1;
            }
        }
        let mut rows = 0;
        if let Some(pg) = store.postgres() {
            rows = pg
                .sweep_blobs(unix_ms(cutoff), succeeded_before)
                .await
                .map_err(|e| BlobError::Database {
                    id: "unreferenced uploads".into(),
                    message: e.to_string(),
                })?;
        }
        Ok(Swept { files, rows })
    }
}

/// Upload files under `root` last written before `cutoff` (digest and path), and temp
/// files of interrupted writes from before it.
#[allow(clippy::type_complexity)]
fn old_files(
    root: &Path,
    cutoff: SystemTime,
) -> Result<(Vec<(String, PathBuf)>, Vec<PathBuf>), BlobError> {
    let io = |path: &Path, source: std::io::Error| BlobError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (mut old, mut temps) = (Vec::new(), Vec::new());
    for shard in std::fs::read_dir(root).map_err(|e| io(root, e))? {
        let shard = shard.map_err(|e| io(root, e))?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&shard).map_err(|e| io(&shard, e))? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || meta.modified().map_or(true, |t| t >= cutoff) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                temps.push(path);
            } else if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                old.push((name, path));
            }
        }
    }
    Ok((old, temps))
}
