//! `App::build(settings)`: the one way the service is assembled, used by `main` and by
//! the integration tests. Owns the data-dir lock, the store, the HTTP server, model
//! loading and the worker pool, and shuts them down in order.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::{self, AppState};
use crate::blobs::BlobStore;
use crate::config::{DataSettings, ModelSettings, ServerSettings, WorkerSettings};
use crate::queue::Calibration;
use crate::queue::{JobEvents, Store, StoreError, Wakeup};
use crate::vision::Captioner;
use crate::vision::Moondream;
use crate::workers::calibrate::{CalibrationLimits, warm_up};
use crate::workers::caption::CaptionHandler;
use crate::workers::governor::Governor;
use crate::workers::vram::{VramProbe, detect_probe};
use crate::workers::{JobHandler, WorkerPool};

/// Exit code after an unrecoverable device fault: supervisors should restart on it.
pub const EXIT_DEVICE_FAULT: i32 = 75;

/// All settings of `captiond serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data folder and durability.
    pub data: DataSettings,
    /// Model.
    pub model: ModelSettings,
    /// Workers.
    pub workers: WorkerSettings,
    /// HTTP server.
    pub server: ServerSettings,
}

/// What runs the jobs.
pub enum Engine {
    /// Load Moondream2 from the model settings (in the background; `/ready` tells).
    LoadModel,
    /// Use an already-loaded captioner.
    Captioner(Arc<dyn Captioner>),
    /// Use any handler (benchmarks and tests of the queue machinery).
    Handler(Arc<dyn JobHandler>),
}

/// Start-up failures, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir could not be created or locked.
    #[error("data dir {path}: {message}")]
    DataDir {
        /// Folder.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// The database could not be opened.
    #[error("opening the queue database: {0}")]
    Store(#[from] StoreError),
    /// A library root does not exist.
    #[error("library root {path}: {message}")]
    LibraryRoot {
        /// Folder.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Why the service stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Asked to stop (signal or test).
    Requested,
    /// The model could not be loaded.
    ModelLoadFailed(String),
    /// The device failed irrecoverably.
    DeviceFault(String),
}

impl StopReason {
    /// Process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Requested => 0,
            StopReason::ModelLoadFailed(_) => 1,
            StopReason::DeviceFault(_) => EXIT_DEVICE_FAULT,
        }
    }
}

/// A running service.
pub struct App {
    addr: SocketAddr,
    state: AppState,
    server_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    stop_rx: watch::Receiver<Option<StopReason>>,
    stop_tx: watch::Sender<Option<StopReason>>,
    engine_stop: CancellationToken,
    engine: Option<tokio::task::JoinHandle<()>>,
    _lock: File,
}

/// Reads the stored calibration for this device and model, or (GPU probes only, when
/// enabled) runs the warm-up and stores it. Returns the probe for the governor.
async fn calibrate(
    store: &Store,
    workers: &WorkerSettings,
    probe: Box<dyn VramProbe>,
    captioner: Option<Arc<dyn Captioner>>,
) -> (Box<dyn VramProbe>, Option<Calibration>) {
    let Some(captioner) = captioner.filter(|_| workers.calibrate && probe.is_gpu()) else {
        return (probe, None);
    };
    let (device, model) = (probe.device_id(), captioner.model_id());
    match store.calibration(&device, &model).await {
        Ok(Some(c)) => {
            info!(device = %c.device, max = c.max_concurrency, "using the stored calibration");
            return (probe, Some(c));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the stored calibration"),
    }
    let limits = CalibrationLimits {
        max: workers.workers.max(1),
        reserve_bytes: workers.vram_reserve_mib << 20,
    };
    info!(%device, max = limits.max, "calibrating: 1, 2, 4, … concurrent generations");
    let Ok((probe, calibration)) = tokio::task::spawn_blocking(move || {
        let c = warm_up(captioner.as_ref(), probe.as_ref(), limits);
        (probe, c)
    })
    .await
    else {
        return (detect_probe(workers.gpu_index), None);
    };
    if let Some(c) = &calibration {
        info!(
            max = c.max_concurrency,
            per_generation_mib = c.per_generation_bytes >> 20,
            "calibration stored"
        );
        if let Err(e) = store.put_calibration(c).await {
            tracing::warn!(error = %e, "cannot store the calibration");
        }
    }
    (probe, calibration)
}

/// Takes an exclusive lock on `<data dir>/captiond.lock` so two instances never share a queue.
fn lock_data_dir(dir: &Path) -> Result<File, StartError> {
    let err = |message: String| StartError::DataDir {
        path: dir.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    let path = dir.join("captiond.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(err("another captiond process is using this data dir (captiond.lock is held); stop it or choose another --data-dir".into()));
    }
    Ok(file)
}

impl App {
    /// Locks the data dir, opens the store, binds the listener, starts serving, and
    /// starts the workers (after loading the model when `engine` asks for it). Memory
    /// readings for the adaptive controller come from NVML, or host memory without it.
    pub async fn build(settings: &Settings, engine: Engine) -> Result<App, StartError> {
        Self::build_with_probe(settings, engine, None).await
    }

    /// [`App::build`] with a given memory probe (tests replay traces through one).
    pub async fn build_with_probe(
        settings: &Settings,
        engine: Engine,
        probe: Option<Box<dyn VramProbe>>,
    ) -> Result<App, StartError> {
        let data_dir = settings.data.data_dir();
        let lock = lock_data_dir(&data_dir)?;
        let store = settings.data.open_store().await?;
        let blobs = BlobStore::new(data_dir.join("blobs"))
            .map_err(|e| StartError::DataDir {
                path: data_dir.clone(),
                message: format!("cannot create blobs folder: {e}"),
            })?
            .with_database(&store);
        let mut roots = Vec::new();
        for r in &settings.server.library_roots {
            let c = std::fs::canonicalize(r).map_err(|e| StartError::LibraryRoot {
                path: r.clone(),
                message: e.to_string(),
            })?;
            roots.push(c);
        }
        let listener = tokio::net::TcpListener::bind(settings.server.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.server.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.server.bind,
            source,
        })?;
        let server_stop = CancellationToken::new();
        let wakeup = Wakeup::default();
        let pool_cell: Arc<OnceLock<WorkerPool>> = Arc::new(OnceLock::new());
        // On PostgreSQL, jobs inserted or freed on any host wake this one's idle
        // workers, and a pause or resume on any host applies here too.
        let cell = pool_cell.clone();
        let listening = store.spawn_listener(wakeup.clone(), server_stop.clone(), move |paused| {
            if let Some(pool) = cell.get() {
                pool.set_paused(paused);
            }
        });
        if listening {
            info!("queue on PostgreSQL: listening for work from every host");
        }
        tokio::spawn(sweep_uploads(
            blobs.clone(),
            store.clone(),
            settings.server.keep_uploads_days.0,
            server_stop.clone(),
        ));
        let state = AppState {
            store: store.clone(),
            wakeup,
            events: JobEvents::default(),
            blobs: blobs.clone(),
            pool: pool_cell,
            captioner: Arc::new(OnceLock::new()),
            governor: Arc::new(OnceLock::new()),
            ready: Arc::new(AtomicBool::new(false)),
            roots: Arc::new(roots),
            api_token: settings
                .server
                .api_token
                .clone()
                .filter(|t| !t.is_empty())
                .map(Arc::from),
            limits: settings.model.decode_limits(),
            skill_defaults: settings.model.skill_defaults(),
            max_attempts: settings.workers.max_attempts,
            started: Instant::now(),
            model: crate::library::ModelIdentity::from_settings(&settings.model),
            request_timeout: Duration::from_secs(settings.server.request_timeout_secs.max(1)),
            started_unix_ms: crate::queue::now_ms(),
            hub: api::events::EventHub::new(server_stop.clone()),
            thumbs: Arc::default(),
        };
        let router = api::router(
            state.clone(),
            settings.server.body_limit_mib.max(1) * 1024 * 1024,
            Duration::from_secs(settings.server.body_timeout_secs.max(1)),
        );
        let stop = server_stop.clone();
        let header_timeout = Duration::from_secs(settings.server.header_timeout_secs.max(1));
        let server = tokio::spawn(api::serve::serve(listener, router, header_timeout, stop));
        info!(%addr, data_dir = %data_dir.display(), "captiond listening");
        let (stop_tx, stop_rx) = watch::channel(None);
        let mut app = App {
            addr,
            state,
            server_stop,
            server,
            stop_rx,
            stop_tx,
            engine_stop: CancellationToken::new(),
            engine: None,
            _lock: lock,
        };
        app.engine = Some(app.start_engine(settings, engine, blobs, probe));
        Ok(app)
    }

    /// Loads the model (when asked), calibrates, and starts the workers. Stops early,
    /// leaving nothing running, once `engine_stop` is cancelled.
    fn start_engine(
        &self,
        settings: &Settings,
        engine: Engine,
        blobs: BlobStore,
        probe: Option<Box<dyn VramProbe>>,
    ) -> tokio::task::JoinHandle<()> {
        let stopping = self.engine_stop.clone();
        let state = self.state.clone();
        let stop_tx = self.stop_tx.clone();
        let model = settings.model.clone();
        let mut pool_cfg = settings.workers.pool_config();
        // Leases are named by this instance (host and data folder) and process, so a
        // restart rescues exactly its own earlier leases, never another host's.
        let instance = instance_id(&settings.data.data_dir());
        pool_cfg.owner = format!("{instance}{}-{}", std::process::id(), uuid::Uuid::now_v7());
        pool_cfg.own_prefix = Some(instance);
        let workers = settings.workers.clone();
        tokio::spawn(async move {
            let loaded = tokio::select! {
                r = Self::load_engine(engine, &model, blobs, &stop_tx) => r,
                _ = stopping.cancelled() => return,
            };
            let Some((handler, captioner)) = loaded else {
                return;
            };
            if let Some(c) = &captioner {
                let _ = state.captioner.set(c.clone());
            }
            let adaptive = if workers.adaptive {
                let probe = probe.unwrap_or_else(|| detect_probe(workers.gpu_index));
                let calibrated = tokio::select! {
                    c = calibrate(&state.store, &workers, probe, captioner) => c,
                    _ = stopping.cancelled() => return,
                };
                let (probe, calibration) = calibrated;
                let mut cfg = workers.controller_config();
                if let Some(c) = &calibration {
                    cfg.max = cfg.max.min(c.max_concurrency);
                }
                Some((probe, cfg, calibration))
            } else {
                None
            };
            Self::start_pool(state, handler, adaptive, pool_cfg, stop_tx, stopping).await;
        })
    }

    /// The job handler (and the model, for calibration) the engine asks for; `None`
    /// when the model cannot be loaded (the stop reason says why).
    async fn load_engine(
        engine: Engine,
        model: &crate::config::ModelSettings,
        blobs: BlobStore,
        stop_tx: &watch::Sender<Option<StopReason>>,
    ) -> Option<(Arc<dyn JobHandler>, Option<Arc<dyn Captioner>>)> {
        let (handler, captioner): (Arc<dyn JobHandler>, Option<Arc<dyn Captioner>>) = match engine {
            Engine::Handler(h) => (h, None),
            Engine::Captioner(c) => (
                Arc::new(CaptionHandler::new(
                    c.clone(),
                    blobs,
                    model.skill_defaults(),
                )),
                Some(c),
            ),
            Engine::LoadModel => {
                let opts = model.model_options();
                info!(model = %opts.source.label(), "loading the model");
                match tokio::task::spawn_blocking(move || Moondream::load(&opts)).await {
                    Ok(Ok((m, _))) => {
                        let c: Arc<dyn Captioner> = Arc::new(m);
                        (
                            Arc::new(CaptionHandler::new(
                                c.clone(),
                                blobs,
                                model.skill_defaults(),
                            )),
                            Some(c),
                        )
                    }
                    Ok(Err(e)) => {
                        error!("cannot load the model: {e}");
                        let _ = stop_tx.send(Some(StopReason::ModelLoadFailed(e.to_string())));
                        return None;
                    }
                    Err(e) => {
                        let _ = stop_tx.send(Some(StopReason::ModelLoadFailed(e.to_string())));
                        return None;
                    }
                }
            }
        };
        Some((handler, captioner))
    }

    /// Starts the pool and the governor, marks the service ready, and turns a fatal
    /// device error into a stop reason.
    async fn start_pool(
        state: AppState,
        handler: Arc<dyn JobHandler>,
        adaptive: Option<(
            Box<dyn VramProbe>,
            crate::workers::concurrency::ControllerConfig,
            Option<Calibration>,
        )>,
        pool_cfg: crate::workers::PoolConfig,
        stop_tx: watch::Sender<Option<StopReason>>,
        stopping: CancellationToken,
    ) {
        match WorkerPool::start(
            state.store.clone(),
            handler,
            state.wakeup.clone(),
            state.events.clone(),
            pool_cfg,
        )
        .await
        {
            Ok(pool) => {
                if stopping.is_cancelled() {
                    pool.shutdown().await;
                    return;
                }
                if let Some((probe, cfg, calibration)) = adaptive {
                    let g = Governor::spawn(
                        pool.clone(),
                        state.store.clone(),
                        probe,
                        cfg,
                        calibration,
                        Duration::from_secs(1),
                    );
                    let _ = state.governor.set(g);
                }
                let mut fatal = pool.fatal_errors();
                let _ = state.pool.set(pool);
                state.ready.store(true, Ordering::SeqCst);
                info!("ready: workers are claiming jobs");
                tokio::select! {
                    r = fatal.wait_for(|f| f.is_some()) => if let Ok(v) = r {
                        let reason = v.clone().unwrap_or_default();
                        let _ = stop_tx.send(Some(StopReason::DeviceFault(reason)));
                    },
                    _ = stopping.cancelled() => {}
                }
            }
            Err(e) => {
                error!(error = %e, "cannot start the workers");
                let _ = stop_tx.send(Some(StopReason::ModelLoadFailed(e.to_string())));
            }
        }
    }

    /// The bound address (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves when a fatal condition (model load failure, device fault) stops the
    /// service, with the reason; pending forever otherwise.
    pub async fn fatal(&self) -> StopReason {
        let mut rx = self.stop_rx.clone();
        match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or(StopReason::Requested),
            Err(_) => std::future::pending().await,
        }
    }

    /// Shared state (store, pool, ...).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Runs until `shutdown` resolves or a fatal condition stops the service, then
    /// shuts down gracefully and says why it stopped.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> StopReason {
        let mut stop_rx = self.stop_rx.clone();
        let reason = tokio::select! {
            _ = shutdown => StopReason::Requested,
            r = stop_rx.wait_for(|r| r.is_some()) => r.ok().and_then(|r| r.clone()).unwrap_or(StopReason::Requested),
        };
        info!(?reason, "shutting down");
        self.shutdown().await;
        reason
    }

    /// Stops claiming, lets running jobs finish (or releases them), stops the HTTP
    /// server and checkpoints the database.
    pub async fn shutdown(mut self) {
        self.engine_stop.cancel();
        if let Some(engine) = self.engine.take() {
            let _ = engine.await;
        }
        if let Some(pool) = self.state.pool.get() {
            pool.shutdown().await;
        }
        self.server_stop.cancel();
        let _ = self.server.await;
        if let Err(e) = self.state.store.checkpoint().await {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
        self.state.store.close().await;
        info!("stopped");
    }
}

/// This instance's name in lease owners: `captiond@HOST:DIGEST/`, the digest of the
/// canonical data folder (one live process per folder, enforced by its lock file).
fn instance_id(data_dir: &std::path::Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = blake3::hash(dir.to_string_lossy().as_bytes()).to_hex();
    format!("captiond@{host}:{}/", &digest[..12])
}

/// Deletes uploads that no job needs (see [`BlobStore::sweep`]; `keep_succeeded`: how
/// long a succeeded job's upload is kept) a minute after start and then every
/// [`crate::blobs::SWEEP_EVERY`], until the server stops.
async fn sweep_uploads(
    blobs: BlobStore,
    store: Store,
    keep_succeeded: Option<Duration>,
    stop: CancellationToken,
) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = crate::blobs::SWEEP_EVERY;
        match blobs
            .sweep(&store, crate::blobs::SWEEP_GRACE, keep_succeeded)
            .await
        {
            Ok(s) if s.files > 0 || s.rows > 0 => {
                info!(
                    files = s.files,
                    rows = s.rows,
                    "deleted uploads no job needs any more"
                )
            }
            Ok(_) => tracing::debug!("upload sweep: nothing to delete"),
            Err(e) => tracing::warn!(error = %e, "upload sweep failed; trying again later"),
        }
    }
}
