//! Uploaded images stored content-addressed under the data dir, so a job that refers
//! to them survives restarts. Writes are atomic (temp file, fsync, rename).

use std::io::Write;
use std::path::{Path, PathBuf};

/// A folder of blobs named by their BLAKE3 hex digest.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
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
        Ok(Self { root })
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
        let path = self.path_of(&id)?;
        if path.is_file() {
            return Ok(id);
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
        Ok(id)
    }

    /// Reads a blob.
    pub fn get(&self, id: &str) -> Result<Vec<u8>, BlobError> {
        let path = self.path_of(id)?;
        std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BlobError::Missing(id.to_string())
            } else {
                BlobError::Io { path, source }
            }
        })
    }
}
