//! Finding and loading a Moondream2 checkpoint: a local folder in the Hugging Face
//! layout, or the pinned default release from the Hugging Face cache (downloaded when
//! online). Every tensor's name and shape is checked before any weight is read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::{Config, ConfigError};
use super::layers::LinearFormat;
use super::precision::{LoadPlan, Precision};
use super::{Moondream2, text::HEAD_DIM};

/// Hugging Face repository of the default model.
pub const DEFAULT_MODEL_REPO: &str = "vikhyatk/moondream2";
/// Pinned revision of the default model.
pub const DEFAULT_MODEL_REVISION: &str = "2025-06-21";
/// Repository of the tokenizer the default model uses.
pub const DEFAULT_TOKENIZER_REPO: &str = "moondream/starmie-v1";
/// Prefix the Hugging Face wrapper puts before every tensor name.
const HF_PREFIX: &str = "model.";

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder with `config.json`, `model.safetensors` (or shards) and `tokenizer.json`.
    Dir(PathBuf),
    /// A Hugging Face repository at a revision, with the tokenizer's repository.
    Hub {
        /// Model repository id.
        repo: String,
        /// Revision (tag, branch or commit).
        revision: String,
        /// Repository holding `tokenizer.json`.
        tokenizer_repo: String,
    },
}

impl Default for ModelSource {
    fn default() -> Self {
        Self::Hub {
            repo: DEFAULT_MODEL_REPO.into(),
            revision: DEFAULT_MODEL_REVISION.into(),
            tokenizer_repo: DEFAULT_TOKENIZER_REPO.into(),
        }
    }
}

impl ModelSource {
    /// A short name for logs and results: the folder name or `repo@revision`.
    pub fn label(&self) -> String {
        match self {
            Self::Dir(p) => p.display().to_string(),
            Self::Hub { repo, revision, .. } => format!("{repo}@{revision}"),
        }
    }
}

/// The files of one checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// Weight files (one, or the shards of an index).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<PathBuf>,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is missing.
    #[error("{0}")]
    MissingFiles(String),
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ConfigError,
    },
    /// A safetensors header or index is malformed.
    #[error("{path}: malformed safetensors: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Tensors are missing or have the wrong shape (all listed).
    #[error("checkpoint does not match the configuration ({} problems):\n  {}", .0.len(), .0.join("\n  "))]
    Mismatch(Vec<String>),
    /// The Hugging Face download failed.
    #[error("{0}")]
    Download(String),
    /// The device cannot run the asked-for weight format.
    #[error("{0}")]
    Unsupported(String),
    /// The decode engine's thread could not be started.
    #[error("cannot start the decode thread: {0}")]
    Thread(std::io::Error),
    /// Building the tensors failed.
    #[error("loading weights: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Every tensor name (without `model.`) and shape the configuration requires.
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
    let v = &cfg.vision;
    let t = &cfg.text;
    let r = &cfg.region;
    let linear = |push: &mut dyn FnMut(String, &[usize]), name: &str, i: usize, o: usize| {
        push(format!("{name}.weight"), &[o, i]);
        push(format!("{name}.bias"), &[o]);
    };
    let norm = |push: &mut dyn FnMut(String, &[usize]), name: &str, d: usize| {
        push(format!("{name}.weight"), &[d]);
        push(format!("{name}.bias"), &[d]);
    };
    let (e, g) = (v.enc_dim, v.grid());
    push("vision.pos_emb".into(), &[1, g * g, e]);
    linear(
        &mut push,
        "vision.patch_emb",
        v.in_channels * v.enc_patch_size * v.enc_patch_size,
        e,
    );
    for i in 0..v.enc_n_layers {
        let b = format!("vision.blocks.{i}");
        norm(&mut push, &format!("{b}.ln1"), e);
        norm(&mut push, &format!("{b}.ln2"), e);
        linear(&mut push, &format!("{b}.attn.qkv"), e, 3 * e);
        linear(&mut push, &format!("{b}.attn.proj"), e, e);
        linear(&mut push, &format!("{b}.mlp.fc1"), e, v.enc_ff_dim);
        linear(&mut push, &format!("{b}.mlp.fc2"), v.enc_ff_dim, e);
    }
    norm(&mut push, "vision.post_ln", e);
    linear(&mut push, "vision.proj_mlp.fc1", 2 * e, v.proj_inner_dim);
    linear(
        &mut push,
        "vision.proj_mlp.fc2",
        v.proj_inner_dim,
        v.proj_out_dim,
    );
    push("text.wte".into(), &[t.vocab_size, t.dim]);
    for i in 0..t.n_layers {
        let b = format!("text.blocks.{i}");
        norm(&mut push, &format!("{b}.ln"), t.dim);
        linear(
            &mut push,
            &format!("{b}.attn.qkv"),
            t.dim,
            (t.n_heads + 2 * t.n_kv_heads) * HEAD_DIM,
        );
        linear(&mut push, &format!("{b}.attn.proj"), t.dim, t.dim);
        linear(&mut push, &format!("{b}.mlp.fc1"), t.dim, t.ff_dim);
        linear(&mut push, &format!("{b}.mlp.fc2"), t.ff_dim, t.dim);
    }
    norm(&mut push, "text.post_ln", t.dim);
    linear(&mut push, "text.lm_head", t.dim, t.vocab_size);
    push("region.coord_features".into(), &[1, r.coord_feat_dim / 2]);
    push("region.size_features".into(), &[2, r.size_feat_dim / 2]);
    linear(&mut push, "region.coord_encoder", r.coord_feat_dim, r.dim);
    linear(&mut push, "region.coord_decoder.fc1", r.dim, r.inner_dim);
    linear(
        &mut push,
        "region.coord_decoder.fc2",
        r.inner_dim,
        r.coord_out_dim,
    );
    linear(&mut push, "region.size_encoder", r.size_feat_dim, r.dim);
    linear(&mut push, "region.size_decoder.fc1", r.dim, r.inner_dim);
    linear(
        &mut push,
        "region.size_decoder.fc2",
        r.inner_dim,
        r.size_out_dim,
    );
    out
}

/// Where one tensor's bytes lie in a weight file.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    shape: Vec<usize>,
    dtype: String,
    /// Absolute byte range in the file.
    range: (u64, u64),
}

/// Every tensor of the weight files by name, read from the headers only.
fn tensor_entries(files: &[PathBuf]) -> Result<BTreeMap<String, TensorEntry>, LoadError> {
    let mut out = BTreeMap::new();
    for (index, path) in files.iter().enumerate() {
        let io = |source| LoadError::Io {
            path: path.clone(),
            source,
        };
        let fmt = |message: String| LoadError::Format {
            path: path.clone(),
            message,
        };
        let mut f = File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(fmt(format!("header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| fmt(e.to_string()))?;
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| fmt(format!("tensor {name} has no shape")))?;
            let dtype = info
                .get("dtype")
                .and_then(|d| d.as_str())
                .unwrap_or("?")
                .to_string();
            let offsets: Vec<u64> = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                .unwrap_or_default();
            let [start, end] = offsets[..] else {
                return Err(fmt(format!("tensor {name} has no data_offsets")));
            };
            let range = (8 + len + start, 8 + len + end);
            out.insert(
                name,
                TensorEntry {
                    file: index,
                    shape,
                    dtype,
                    range,
                },
            );
        }
    }
    Ok(out)
}

/// Name → (shape, dtype) of every tensor in the weight files, read from headers only.
pub fn read_tensor_index(
    files: &[PathBuf],
) -> Result<BTreeMap<String, (Vec<usize>, String)>, LoadError> {
    Ok(tensor_entries(files)?
        .into_iter()
        .map(|(name, e)| (name, (e.shape, e.dtype)))
        .collect())
}

/// Reads tensors from safetensors files with positioned reads, one tensor at a time
/// (no file map, so only the tensor being converted is resident beside the weights).
struct FileTensors {
    files: Vec<(PathBuf, File)>,
    entries: BTreeMap<String, TensorEntry>,
}

impl FileTensors {
    fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let files = paths
            .iter()
            .map(|p| {
                File::open(p)
                    .map(|f| (p.clone(), f))
                    .map_err(|source| LoadError::Io {
                        path: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            files,
            entries: tensor_entries(paths)?,
        })
    }

    fn read(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        use std::os::unix::fs::FileExt;
        let e = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let stored = match e.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => candle_core::bail!("tensor {name}: unsupported dtype {other}"),
        };
        let (path, file) = &self.files[e.file];
        let want = e.shape.iter().product::<usize>() * stored.size_in_bytes();
        let len = usize::try_from(e.range.1.saturating_sub(e.range.0)).unwrap_or(usize::MAX);
        if len != want {
            candle_core::bail!(
                "tensor {name} in {}: {len} bytes for shape {:?}",
                path.display(),
                e.shape
            );
        }
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, e.range.0).map_err(|err| {
            candle_core::Error::Msg(format!("reading {name} from {}: {err}", path.display()))
        })?;
        let t = candle_core::Tensor::from_raw_buffer(&bytes, stored, &e.shape, &Device::Cpu)?;
        drop(bytes);
        t.to_dtype(dtype)?.to_device(device)
    }
}

impl candle_nn::var_builder::SimpleBackend for FileTensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self.read(name, dtype, dev)?;
        if t.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt())?
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// Compares the files' tensors with the configuration; lists every problem at once.
pub fn check_tensors(
    cfg: &Config,
    found: &BTreeMap<String, (Vec<usize>, String)>,
) -> Result<(), LoadError> {
    let mut problems = Vec::new();
    for (name, shape) in expected_tensors(cfg) {
        let full = format!("{HF_PREFIX}{name}");
        match found.get(&full).or_else(|| found.get(&name)) {
            None => problems.push(format!("missing tensor {full} {shape:?}")),
            Some((s, _)) if *s != shape => {
                problems.push(format!("tensor {full}: shape {s:?}, expected {shape:?}"))
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoadError::Mismatch(problems))
    }
}

/// Collects the files of a local model folder.
pub fn files_in_dir(dir: &Path) -> Result<ModelFiles, LoadError> {
    let config = dir.join("config.json");
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        shards_from_index(&index)?
    } else {
        vec![]
    };
    let mut missing = Vec::new();
    if !config.is_file() {
        missing.push("config.json");
    }
    if weights.is_empty() {
        missing.push("model.safetensors (or model.safetensors.index.json with its shards)");
    }
    if !missing.is_empty() {
        return Err(LoadError::MissingFiles(format!(
            "model folder {} lacks {}",
            dir.display(),
            missing.join(" and ")
        )));
    }
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(ModelFiles {
        config,
        weights,
        tokenizer,
    })
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
        path: index.into(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Format {
        path: index.into(),
        message: e.to_string(),
    })?;
    let mut shards: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// Resolves a Hub source through the Hugging Face cache (`cache_dir`, or the standard
/// one from `HF_HOME`/`HF_HUB_CACHE`), downloading when `offline` is false; offline
/// and not cached gives one error naming the files and where to put them.
pub fn files_from_hub(
    repo: &str,
    revision: &str,
    tokenizer_repo: &str,
    offline: bool,
    cache_dir: Option<&Path>,
) -> Result<ModelFiles, LoadError> {
    use hf_hub::{Cache, Repo, RepoType};
    let cache = match cache_dir {
        Some(d) => Cache::new(d.to_path_buf()),
        None => Cache::from_env(),
    };
    let model = Repo::with_revision(repo.into(), RepoType::Model, revision.into());
    let tok = Repo::model(tokenizer_repo.into());
    let cached_model = cache.repo(model.clone());
    let cached_tok = cache.repo(tok.clone());
    let local = (
        cached_model.get("config.json"),
        cached_model.get("model.safetensors"),
        cached_tok.get("tokenizer.json"),
    );
    if let (Some(config), Some(weights), Some(tokenizer)) = local {
        return Ok(ModelFiles {
            config,
            weights: vec![weights],
            tokenizer: Some(tokenizer),
        });
    }
    let explain = |why: String| {
        LoadError::Download(format!(
            "{why}\nThe model {repo}@{revision} is not in the Hugging Face cache ({}).\n\
             Either go online once so captiond can download it, or download these files by hand:\n  \
             config.json and model.safetensors from https://huggingface.co/{repo}/tree/{revision}\n  \
             tokenizer.json from https://huggingface.co/{tokenizer_repo}\n\
             into one folder and pass it with --model-dir (CAPTIOND_MODEL_DIR).",
            cache.path().display()
        ))
    };
    if offline {
        return Err(explain(
            "offline mode (HF_HUB_OFFLINE or --offline) and files not cached.".into(),
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| explain(format!("cannot start the Hugging Face client: {e}")))?;
    let get = |r: &Repo, f: &str| {
        api.repo(r.clone())
            .get(f)
            .map_err(|e| explain(format!("downloading {f}: {e}")))
    };
    Ok(ModelFiles {
        config: get(&model, "config.json")?,
        weights: vec![get(&model, "model.safetensors")?],
        tokenizer: Some(get(&tok, "tokenizer.json")?),
    })
}

/// Figures logged after load: the Rust form of Moondream Station's post-load cleanup.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LoadReport {
    /// Parameters in the checkpoint.
    pub parameters: u64,
    /// Bytes the weights take on the device.
    pub weight_bytes: u64,
    /// Resident set size of the process after cleanup, in bytes.
    pub rss_bytes: Option<u64>,
    /// Device memory in use after load (CUDA devices with NVML available), in bytes.
    pub device_used_bytes: Option<u64>,
    /// Seconds spent loading.
    pub load_seconds: f64,
    /// The weight format in effect.
    pub precision: Precision,
}

/// Reads the config, checks every tensor and builds the model on `device` with every
/// weight a candle tensor in `dtype`.
pub fn load_model(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
) -> Result<(Moondream2, LoadReport), LoadError> {
    load_model_with(files, device, &LoadPlan::candle(dtype))
}

/// Reads the config, checks every tensor and builds the model on `device` as `plan`
/// says. On the CPU tensors are read one at a time and converted as they come (peak
/// memory: the weights in their final format plus one tensor); on a GPU through a file
/// map. File maps and host copies are released before returning.
pub fn load_model_with(
    files: &ModelFiles,
    device: &Device,
    plan: &LoadPlan,
) -> Result<(Moondream2, LoadReport), LoadError> {
    let started = std::time::Instant::now();
    let text = std::fs::read_to_string(&files.config).map_err(|source| LoadError::Io {
        path: files.config.clone(),
        source,
    })?;
    let cfg = Config::from_checkpoint_json(&text).map_err(|source| LoadError::Config {
        path: files.config.clone(),
        source,
    })?;
    let found = read_tensor_index(&files.weights)?;
    check_tensors(&cfg, &found)?;
    let prefixed = found.keys().any(|k| k.starts_with(HF_PREFIX));
    let expected = expected_tensors(&cfg);
    let parameters: u64 = expected
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let model = if device.is_cpu() {
        let backend = FileTensors::open(&files.weights)?;
        let vb = VarBuilder::from_backend(Box::new(backend), plan.dtype, device.clone());
        let vb = if prefixed { vb.pp("model") } else { vb };
        Moondream2::with_formats(&cfg, vb, plan.formats)?
    } else {
        // SAFETY: the files are memory-mapped read-only while the tensors are copied out;
        // the map is dropped at the end of this block. Modifying a weight file during
        // load is outside what captiond supports.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, plan.dtype, device)? };
        let vb = if prefixed { vb.pp("model") } else { vb };
        Moondream2::with_formats(&cfg, vb, plan.formats)?
    };
    release_freed_memory();
    if device.is_cpu() {
        keep_large_buffers();
    }
    let report = LoadReport {
        parameters,
        weight_bytes: expected
            .iter()
            .map(|(name, shape)| stored_bytes(name, shape, plan))
            .sum(),
        rss_bytes: process_rss_bytes(),
        device_used_bytes: match device {
            Device::Cuda(_) => device.synchronize().ok().and_then(|_| nvml_used_bytes()),
            _ => None,
        },
        load_seconds: started.elapsed().as_secs_f64(),
        precision: plan.precision,
    };
    Ok((model, report))
}

/// Bytes one checkpoint tensor takes once loaded under `plan`.
fn stored_bytes(name: &str, shape: &[usize], plan: &LoadPlan) -> u64 {
    let count = shape.iter().product::<usize>() as u64;
    let format = if name.starts_with("vision.") {
        plan.formats.vision
    } else {
        plan.formats.text
    };
    let is_linear_weight = name.ends_with(".weight") && shape.len() == 2;
    match format {
        LinearFormat::Bf16 if is_linear_weight || name == "text.wte" => count * 2,
        LinearFormat::Q8 if is_linear_weight => count * 17 / 16,
        LinearFormat::Q8 if name == "text.wte" => count * 2,
        _ => count * plan.dtype.size_in_bytes() as u64,
    }
}

/// Returns freed heap pages to the OS (glibc keeps them otherwise).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc serve the model's large per-call buffers (up to 256 MiB) from the heap
/// and keep up to 256 MiB of freed heap: by default every block over its threshold is a
/// fresh mapping, so each layer's outputs paid page faults and zeroing again (a fifth
/// of CPU time in a profile of the packed path).
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Makes glibc keep one heap arena for all threads. With one per thread, each arena
/// keeps its own freed blocks (up to 256 MiB, see `keep_large_buffers`), so a buffer
/// freed by one thread (a worker's vision pass) is not reused by another (the encode
/// thread's prefill): peak RSS rose by 50 MB in bf16 and 240 MB in f32 once encodes
/// moved to their own thread. Call it first in `main`, before other threads allocate.
pub fn single_heap_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Memory in use on GPU 0 according to NVML; `None` without a driver.
fn nvml_used_bytes() -> Option<u64> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    Some(nvml.device_by_index(0).ok()?.memory_info().ok()?.used)
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}
