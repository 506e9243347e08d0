//! The folder walk: recursive, symlink-loop safe, images chosen by extension or by
//! content; unchanged files (same path, size, mtime) are not reopened.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::queue::{LibraryFile, Store, StoreError};

/// Extensions that select a file as an image without looking inside.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "tif", "tiff", "gif", "bmp"];

/// A file the walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Canonical path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i64,
    /// Selected without a content check: an image extension, or named on the command line.
    pub selected: bool,
}

/// What a walk found, and what it could not read.
#[derive(Debug, Default)]
pub struct Walk {
    /// Every regular file, sorted by path, each once.
    pub files: Vec<Candidate>,
    /// Folders skipped (loops, unreadable) and entries that could not be read.
    pub warnings: Vec<String>,
    /// What was walked, as path prefixes: each folder with a trailing `/`, each file as is.
    pub prefixes: Vec<String>,
}

/// Modification time of `meta` in nanoseconds since the epoch (0 when unknown).
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Walks `roots` (folders recursively, or single files). Symlinks are followed; a
/// folder reached twice (a symlink loop) is walked once and reported.
pub fn walk(roots: &[PathBuf]) -> Walk {
    let mut out = Walk::default();
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut push_file = |out: &mut Walk, path: PathBuf, meta: &std::fs::Metadata, named: bool| {
        if seen_files.insert(path.clone()) {
            out.files.push(Candidate {
                selected: named || has_image_extension(&path),
                size: meta.len(),
                mtime_ns: mtime_ns(meta),
                path,
            });
        }
    };
    for root in roots {
        let canonical = match std::fs::canonicalize(root) {
            Ok(c) => c,
            Err(e) => {
                out.warnings
                    .push(format!("cannot open {}: {e}", root.display()));
                continue;
            }
        };
        match std::fs::metadata(&canonical) {
            Ok(m) if m.is_file() => {
                out.prefixes.push(canonical.to_string_lossy().into_owned());
                push_file(&mut out, canonical, &m, true);
                continue;
            }
            Ok(m) if m.is_dir() => {
                let mut p = canonical.to_string_lossy().into_owned();
                if !p.ends_with('/') {
                    p.push('/');
                }
                out.prefixes.push(p);
            }
            Ok(_) => continue,
            Err(e) => {
                out.warnings
                    .push(format!("cannot open {}: {e}", root.display()));
                continue;
            }
        }
        let mut stack = vec![canonical];
        while let Some(dir) = stack.pop() {
            let real = match std::fs::canonicalize(&dir) {
                Ok(c) => c,
                Err(e) => {
                    out.warnings
                        .push(format!("cannot open {}: {e}", dir.display()));
                    continue;
                }
            };
            if !seen_dirs.insert(real.clone()) {
                out.warnings.push(format!(
                    "skipped {}: it leads to {}, already walked (symlink loop or second link)",
                    dir.display(),
                    real.display()
                ));
                continue;
            }
            let entries = match std::fs::read_dir(&real) {
                Ok(e) => e,
                Err(e) => {
                    out.warnings
                        .push(format!("cannot read folder {}: {e}", dir.display()));
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        out.warnings
                            .push(format!("cannot read an entry of {}: {e}", dir.display()));
                        continue;
                    }
                };
                let path = entry.path();
                // Follows symlinks; a dangling link is reported.
                let meta = match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) => {
                        out.warnings
                            .push(format!("cannot open {}: {e}", path.display()));
                        continue;
                    }
                };
                if meta.is_dir() {
                    stack.push(path);
                } else if meta.is_file() {
                    let real_file = if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                        match std::fs::canonicalize(&path) {
                            Ok(c) => c,
                            Err(_) => continue,
                        }
                    } else {
                        real.join(entry.file_name())
                    };
                    push_file(&mut out, real_file, &meta, false);
                }
            }
        }
    }
    out.files.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Whether the first bytes of the file are a known image signature.
pub fn sniff_image(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; 32];
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        let k = f.read(&mut head[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(image::guess_format(&head[..n]).is_ok())
}

/// BLAKE3 of a file's content, hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// The walk's files with their content hashes, and how they were obtained.
#[derive(Debug, Default)]
pub struct Classified {
    /// Images (by extension or content), with their hashes, sorted by path.
    pub images: Vec<LibraryFile>,
    /// Files whose record matched (path, size, mtime): not opened.
    pub unchanged: usize,
    /// Files opened and hashed (or sniffed) in this run.
    pub hashed: usize,
    /// Files that could not be read, with the reason.
    pub unreadable: Vec<(String, String)>,
    /// Recorded files no longer found (deleted or moved), now forgotten.
    pub forgotten: usize,
}

/// Hashes new and changed files (in parallel), reuses the stored hash of unchanged
/// ones without opening them, and records what it learnt. `progress` is called with
/// the number of files handled so far.
pub async fn classify(
    store: &Store,
    walked: Walk,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Classified, StoreError> {
    let files = walked.files;
    let mut known: HashMap<String, LibraryFile> = HashMap::new();
    for prefix in &walked.prefixes {
        for f in store.library_files_under(prefix).await? {
            known.insert(f.path.clone(), f);
        }
    }
    let mut out = Classified::default();
    let mut todo = Vec::new();
    for c in files {
        let path = c.path.to_string_lossy().into_owned();
        match known.remove(&path) {
            Some(k) if k.size == c.size as i64 && k.mtime_ns == c.mtime_ns => {
                out.unchanged += 1;
                if k.is_image {
                    out.images.push(k);
                }
            }
            _ => todo.push(c),
        }
    }
    // What is recorded under the walked folders but was not found is gone.
    out.forgotten = known.len();
    let gone: Vec<String> = known.into_keys().collect();
    store.forget_library_files(&gone).await?;
    progress(out.unchanged);
    let base = out.unchanged;
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    let mut learnt = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(256) {
        let chunk = chunk.to_vec();
        let results = tokio::task::spawn_blocking(move || hash_all(&chunk, threads))
            .await
            .map_err(|e| StoreError::InvalidRow(format!("hashing stopped: {e}")))?;
        for r in results {
            match r {
                Ok(f) => learnt.push(f),
                Err(u) => out.unreadable.push(u),
            }
        }
        out.hashed = learnt.len() + out.unreadable.len();
        progress(base + out.hashed);
        if learnt.len() >= 4096 {
            store.put_library_files(&learnt).await?;
            out.images.extend(learnt.drain(..).filter(|f| f.is_image));
        }
    }
    store.put_library_files(&learnt).await?;
    out.images.extend(learnt.into_iter().filter(|f| f.is_image));
    out.images.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

type Hashed = Result<LibraryFile, (String, String)>;

fn hash_all(chunk: &[Candidate], threads: usize) -> Vec<Hashed> {
    let per = chunk.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = chunk
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(hash_one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn hash_one(c: &Candidate) -> Hashed {
    let path = c.path.to_string_lossy().into_owned();
    let fail = |e: std::io::Error| (path.clone(), e.to_string());
    let is_image = c.selected || sniff_image(&c.path).map_err(fail)?;
    let hash = if is_image {
        hash_file(&c.path).map_err(fail)?
    } else {
        String::new()
    };
    Ok(LibraryFile {
        path: path.clone(),
        size: c.size as i64,
        mtime_ns: c.mtime_ns,
        hash,
        is_image,
    })
}
