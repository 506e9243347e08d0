//! Settings: command-line flags override `CAPTIOND_*` environment variables (and a
//! `.env` file), which override the defaults. `.env.example` documents every variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::queue::{Durability, RetryPolicy, StoreOptions};
use crate::vision::image::DecodeLimits;
use crate::vision::moondream2::KvFormat;
use crate::vision::moondream2::loader::{
    DEFAULT_MODEL_REPO, DEFAULT_MODEL_REVISION, DEFAULT_TOKENIZER_REPO, ModelSource,
};
use crate::vision::moondream2::precision::Precision;
use crate::vision::{DeviceChoice, ModelOptions, SkillSettings};
use crate::workers::PoolConfig;
use crate::workers::concurrency::ControllerConfig;

/// Where data lives: the database and uploaded images.
#[derive(Debug, Clone, Args)]
pub struct DataSettings {
    /// Folder for the queue database and uploaded images [default: the per-user data folder, e.g. ~/.local/share/captiond].
    #[arg(long, env = "CAPTIOND_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Commit durability: `full` survives power loss; `normal` is faster but may lose the last commits on power loss.
    #[arg(
        long,
        env = "CAPTIOND_DURABILITY",
        default_value = "full",
        value_name = "full|normal"
    )]
    pub durability: Durability,

    /// Queue database: a `sqlite:PATH`, or a `postgres://user:pass@host/db` URL so several hosts share one queue [default: the SQLite file in the data folder].
    #[arg(long = "database", env = "CAPTIOND_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
}

/// How long the upload of a succeeded job is kept: `None` for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepUploads(pub Option<Duration>);

impl std::str::FromStr for KeepUploads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("forever") {
            return Ok(Self(None));
        }
        match s.parse::<u64>() {
            Ok(days) if days <= 100_000 => Ok(Self(Some(Duration::from_secs(days * 86_400)))),
            _ => Err(format!(
                "expected a number of days (0 to 100000) or `forever`, got {s:?}"
            )),
        }
    }
}

impl DataSettings {
    /// The data folder, defaulting to the platform's per-user data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            directories::ProjectDirs::from("", "", "captiond")
                .map(|d| d.data_dir().to_path_buf())
                .unwrap_or_else(|| PathBuf::from(".captiond"))
        })
    }

    /// Path of the SQLite database.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir().join("captiond.db")
    }

    /// Opens the queue database the settings name (the data folder's SQLite file by default).
    pub async fn open_store(&self) -> Result<crate::queue::Store, crate::queue::StoreError> {
        crate::queue::Store::open_url(
            self.database_url.as_deref(),
            &self.database_path(),
            &self.store_options(),
        )
        .await
    }

    /// Whether the queue lives in a PostgreSQL database.
    pub fn uses_postgres(&self) -> bool {
        self.database_url
            .as_deref()
            .is_some_and(crate::queue::Store::is_postgres_url)
    }

    /// Store options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            durability: self.durability,
            ..StoreOptions::default()
        }
    }
}

/// Which model to load and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelSettings {
    /// Local model folder (config.json, model.safetensors, tokenizer.json); overrides the Hub download.
    #[arg(long, env = "CAPTIOND_MODEL_DIR", value_name = "DIR")]
    pub model_dir: Option<PathBuf>,

    /// Hugging Face repository of the model, used when no --model-dir is given.
    #[arg(long, env = "CAPTIOND_MODEL_REPO", default_value = DEFAULT_MODEL_REPO)]
    pub model_repo: String,

    /// Revision of that repository (pinned for reproducible captions).
    #[arg(long, env = "CAPTIOND_MODEL_REVISION", default_value = DEFAULT_MODEL_REVISION)]
    pub model_revision: String,

    /// Repository holding the tokenizer of the Hub model.
    #[arg(long, env = "CAPTIOND_TOKENIZER_REPO", default_value = DEFAULT_TOKENIZER_REPO)]
    pub tokenizer_repo: String,

    /// Never download; use only local files and the Hugging Face cache.
    #[arg(long, env = "CAPTIOND_OFFLINE", default_value_t = false)]
    pub offline: bool,

    /// Device: auto (CUDA when built with it and present), cpu, or cuda.
    #[arg(long, env = "CAPTIOND_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// Weight format: auto (fastest this device supports, logged with the reason), f32, bf16, or q8 (8-bit text weights; CPU only).
    #[arg(
        long,
        env = "CAPTIOND_DTYPE",
        default_value = "auto",
        value_name = "auto|f32|bf16|q8"
    )]
    pub dtype: Precision,

    /// KV cache format on the CPU: auto (bf16 with bf16/q8 weights, f32 with f32), bf16, or q8 (8-bit keys and values with a scale per row: half the bytes each decoded token reads per image, so batched decoding goes faster; opt-in, as it rounds what attention sees).
    #[arg(
        long,
        env = "CAPTIOND_KV_CACHE",
        default_value = "auto",
        value_name = "auto|bf16|q8"
    )]
    pub kv_cache: KvFormat,

    /// Default cap on generated tokens per request.
    #[arg(long, env = "CAPTIOND_MAX_TOKENS", default_value_t = 768)]
    pub max_tokens: usize,

    /// Largest image side accepted, in pixels (decompression-bomb guard).
    #[arg(long, env = "CAPTIOND_MAX_IMAGE_SIDE", default_value_t = 16_384)]
    pub max_image_side: u32,

    /// Largest image area accepted, in pixels.
    #[arg(long, env = "CAPTIOND_MAX_IMAGE_PIXELS", default_value_t = 100_000_000)]
    pub max_image_pixels: u64,
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
        other => Err(format!("unknown device {other:?}; use auto, cpu or cuda")),
    }
}

impl ModelSettings {
    /// Options for [`crate::vision::Moondream::load`].
    pub fn model_options(&self) -> ModelOptions {
        let source = match &self.model_dir {
            Some(dir) => ModelSource::Dir(dir.clone()),
            None => ModelSource::Hub {
                repo: self.model_repo.clone(),
                revision: self.model_revision.clone(),
                tokenizer_repo: self.tokenizer_repo.clone(),
            },
        };
        let offline = self.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        ModelOptions {
            source,
            offline,
            device: self.device,
            precision: self.dtype,
            kv_cache: self.kv_cache,
            limits: self.decode_limits(),
        }
    }

    /// Image decode limits.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_side: self.max_image_side,
            max_pixels: self.max_image_pixels,
        }
    }

    /// Default generation settings.
    pub fn skill_defaults(&self) -> SkillSettings {
        SkillSettings {
            max_tokens: self.max_tokens,
            ..SkillSettings::default()
        }
    }
}

/// Queue and worker behaviour.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Most captions generated at once; their tokens decode together in one batch (one weight read per token for all). With --adaptive the controller scales between 1 and this.
    #[arg(long, env = "CAPTIOND_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Lease of a running job in seconds; a crashed worker's job runs again after this.
    #[arg(long, env = "CAPTIOND_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,

    /// Fallback poll in seconds when no wake-up arrives (at least 1).
    #[arg(long, env = "CAPTIOND_POLL_SECS", default_value_t = 5)]
    pub poll_secs: u64,

    /// Attempts per job before it fails.
    #[arg(long, env = "CAPTIOND_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i64,

    /// Out-of-memory requeues per job before it fails.
    #[arg(long, env = "CAPTIOND_MAX_OOM_RETRIES", default_value_t = 10)]
    pub max_oom_retries: i64,

    /// Seconds running jobs get to finish on shutdown before they are released.
    #[arg(long, env = "CAPTIOND_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Scale concurrency between 1 and --workers from memory pressure (NVML on NVIDIA GPUs, host memory otherwise).
    #[arg(long, env = "CAPTIOND_ADAPTIVE", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub adaptive: bool,

    /// Used memory share at which concurrency halves at once.
    #[arg(long, env = "CAPTIOND_VRAM_HIGH", default_value_t = 0.95)]
    pub vram_high: f64,

    /// Smoothed used share from which concurrency shrinks by a quarter.
    #[arg(long, env = "CAPTIOND_VRAM_ELEVATED", default_value_t = 0.90)]
    pub vram_elevated: f64,

    /// Smoothed used share below which concurrency may grow (with a backlog).
    #[arg(long, env = "CAPTIOND_VRAM_CALM", default_value_t = 0.80)]
    pub vram_calm: f64,

    /// Seconds claiming pauses after repeated out-of-memory errors at concurrency 1 (doubles on repeats).
    #[arg(long, env = "CAPTIOND_VRAM_BLOCK_SECS", default_value_t = 10)]
    pub vram_block_secs: u64,

    /// Run the warm-up calibration on a GPU (1, 2, 4, … generations) unless one is stored for this GPU and model.
    #[arg(long, env = "CAPTIOND_CALIBRATE", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub calibrate: bool,

    /// Memory the calibration leaves free for everything else, in MiB.
    #[arg(long, env = "CAPTIOND_VRAM_RESERVE_MIB", default_value_t = 1024)]
    pub vram_reserve_mib: u64,

    /// NVIDIA GPU index whose memory NVML reads.
    #[arg(long, env = "CAPTIOND_GPU_INDEX", default_value_t = 0)]
    pub gpu_index: u32,
}

impl WorkerSettings {
    /// Pool configuration.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            lease: Duration::from_secs(self.lease_secs.max(3)),
            poll_interval: Duration::from_secs(self.poll_secs.max(1)),
            max_concurrency: self.workers.max(1),
            initial_concurrency: self.adaptive.then_some(1),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            max_oom_retries: self.max_oom_retries.max(1),
            retry: RetryPolicy::default(),
            ..PoolConfig::default()
        }
    }

    /// Adaptive controller settings: bounds 1..=workers and the watermarks.
    pub fn controller_config(&self) -> ControllerConfig {
        ControllerConfig {
            min: 1,
            max: self.workers.max(1),
            high_watermark: self.vram_high,
            elevated_watermark: self.vram_elevated,
            calm_watermark: self.vram_calm,
            block: Duration::from_secs(self.vram_block_secs.max(1)),
            ..ControllerConfig::default()
        }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, Args)]
pub struct ServerSettings {
    /// Address to listen on; keep it on 127.0.0.1 unless a token is set.
    #[arg(long, env = "CAPTIOND_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Bearer token required on every /v1 route when set.
    #[arg(long, env = "CAPTIOND_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Folders whose images may be enqueued by path (repeat the flag, or separate with ':' in the variable).
    #[arg(
        long = "library-root",
        env = "CAPTIOND_LIBRARY_ROOTS",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub library_roots: Vec<PathBuf>,

    /// Largest request body in MiB.
    #[arg(long, env = "CAPTIOND_BODY_LIMIT_MIB", default_value_t = 32)]
    pub body_limit_mib: usize,
    /// Seconds a client has to send a request's headers; a slower connection is closed.
    #[arg(long, env = "CAPTIOND_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a whole request body (slow uploads get 408).
    #[arg(long, env = "CAPTIOND_BODY_TIMEOUT_SECS", default_value_t = 60)]
    pub body_timeout_secs: u64,
    /// Seconds a skill or chat request waits for its result before answering 504.
    #[arg(long, env = "CAPTIOND_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Moondream Station compatibility: listen on port 2020 unless --bind is given.
    #[arg(long, env = "CAPTIOND_STATION", default_value_t = false)]
    pub station: bool,

    /// Days an upload is kept once every job that uses it has succeeded (the results stay; the dashboard then shows no thumbnail), or `forever`. Uploads of waiting, failed and cancelled jobs are always kept.
    #[arg(
        long,
        env = "CAPTIOND_KEEP_UPLOADS_DAYS",
        default_value = "7",
        value_name = "DAYS|forever"
    )]
    pub keep_uploads_days: KeepUploads,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_retention_is_days_or_forever() {
        let day = Duration::from_secs(86_400);
        assert_eq!("7".parse(), Ok(KeepUploads(Some(7 * day))));
        assert_eq!(" 0 ".parse(), Ok(KeepUploads(Some(Duration::ZERO))));
        assert_eq!("Forever".parse(), Ok(KeepUploads(None)));
        for bad in ["", "-1", "7d", "1.5", "never", "100001"] {
            let got: Result<KeepUploads, String> = bad.parse();
            assert!(
                got.as_ref().is_err_and(|e| e.contains("forever")),
                "{bad:?}: {got:?}"
            );
        }
    }
}
