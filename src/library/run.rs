//! One library run (`captiond caption PATH...`): walk, hash, plan which contents need
//! work, enqueue, follow progress, and summarise. Runs on the embedded queue with
//! the local model, or enqueues into a running captiond (`--server`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::scan::{Classified, classify, walk};
use super::{ModelIdentity, TaskSpec, content_key, job_for, path_content_key};
use crate::app::{App, Engine, Settings, StartError};
use crate::config::DataSettings;
use crate::queue::{ImageSource, JobState, NewJob, Store, StoreError};

/// Which images a run works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Images without a result for these settings (failures are not retried).
    #[default]
    Missing,
    /// Every image again, replacing earlier results.
    All,
    /// Only images whose earlier attempt failed.
    Failed,
}

/// What to run and how to show it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Folders and files to caption.
    pub paths: Vec<PathBuf>,
    /// Which images to work on.
    pub mode: Mode,
    /// Task and parameters.
    pub spec: TaskSpec,
    /// Draw a progress bar on stderr.
    pub show_progress: bool,
}

/// One failed content and the paths that hold it.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Files with this content.
    pub paths: Vec<String>,
    /// Error code (`image_unreadable`, ...).
    pub code: String,
    /// Readable reason.
    pub message: String,
}

/// What a run did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RunSummary {
    /// Regular files walked.
    pub files: usize,
    /// Files selected as images.
    pub images: usize,
    /// Distinct image contents among them.
    pub distinct: usize,
    /// Files skipped without opening (same path, size and mtime as before).
    pub unchanged: usize,
    /// Files opened and hashed in this run.
    pub hashed: usize,
    /// Contents skipped because their result for these settings exists.
    pub already_done: usize,
    /// Contents skipped because they failed before (`--mode failed` retries them).
    pub failed_before: usize,
    /// Contents worked on in this run (new, retried or resumed).
    pub worked: usize,
    /// Of those, the ones that succeeded.
    pub succeeded: usize,
    /// Of those, the ones that failed, with reasons.
    pub failures: Vec<Failure>,
    /// Of those, the ones still pending when the run stopped.
    pub pending: usize,
    /// Stopped by Ctrl-C (or SIGTERM) before the end.
    pub interrupted: bool,
    /// Folders skipped and files that could not be read.
    pub warnings: Vec<String>,
    /// Wall time of the run.
    pub elapsed_secs: f64,
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The service could not start (data dir locked, database unreadable, ...).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The model could not be loaded or the device failed.
    #[error("{0}")]
    Model(String),
    /// The server named with `--server` failed or refused.
    #[error("server: {0}")]
    Server(String),
    /// The options cannot work together.
    #[error("{0}")]
    Invalid(String),
}

/// The contents of a run: paths grouped by hash, with their result keys.
struct Plan {
    /// Hash → paths (sorted), in hash order.
    groups: BTreeMap<String, Vec<String>>,
    /// Hash → key.
    keys: HashMap<String, String>,
    /// Hash → the key with a local model folder's path that earlier versions used.
    path_keys: HashMap<String, String>,
}

impl Plan {
    fn new(classified: &Classified, model: &ModelIdentity, spec: &TaskSpec) -> Self {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for f in &classified.images {
            groups
                .entry(f.hash.clone())
                .or_default()
                .push(f.path.clone());
        }
        let keys = groups
            .keys()
            .map(|h| (h.clone(), content_key(h, model, spec)))
            .collect();
        let path_keys = groups
            .keys()
            .filter_map(|h| Some((h.clone(), path_content_key(h, model, spec)?)))
            .collect();
        Self {
            groups,
            keys,
            path_keys,
        }
    }

    /// Every key a content's result may be under.
    fn key_list(&self) -> Vec<String> {
        let earlier = self.groups.keys().filter_map(|h| self.path_keys.get(h));
        self.groups
            .keys()
            .map(|h| &self.keys[h])
            .chain(earlier)
            .cloned()
            .collect()
    }

    /// The job (among `jobs`, by key) that holds a content's result, with its key.
    fn job_of<'a, J>(
        &'a self,
        hash: &str,
        jobs: &'a HashMap<String, J>,
    ) -> Option<(&'a str, &'a J)> {
        job_for(
            jobs,
            &self.keys[hash],
            self.path_keys.get(hash).map(String::as_str),
        )
    }
}

/// What to do with one content, given its job (if any) and the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    SkipDone,
    SkipFailed,
    Follow(Uuid),
    Retry(Uuid),
    Enqueue,
}

fn decide(mode: Mode, job: Option<(Uuid, JobState)>) -> Option<Action> {
    use JobState::*;
    Some(match (mode, job) {
        (_, Some((id, Queued | Scheduled | Running))) => Action::Follow(id),
        (Mode::Missing, None) | (Mode::All, None) => Action::Enqueue,
        (Mode::Failed, None) => return None,
        (Mode::Missing | Mode::Failed, Some((_, Succeeded))) => Action::SkipDone,
        (Mode::Missing, Some((_, Failed))) => Action::SkipFailed,
        (_, Some((id, Cancelled))) | (Mode::Failed, Some((id, Failed))) => Action::Retry(id),
        (Mode::All, Some((id, Succeeded | Failed))) => Action::Retry(id),
    })
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
struct Progress(ProgressBar);

impl Progress {
    fn new(show: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            None,
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        Self(bar)
    }

    fn scanning(&self, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.set_style(
            ProgressStyle::with_template("scanning {bar:30} {pos}/{len} files {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }

    fn working(&self, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.reset_eta();
        self.0.set_style(
            ProgressStyle::with_template(
                "{spinner} {bar:30} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.0.enable_steady_tick(Duration::from_millis(200));
    }

    fn done(&self) {
        self.0.finish_and_clear();
    }
}

/// Follows a set of jobs until each is terminal: counts, failures, progress.
struct Follow {
    outstanding: HashMap<Uuid, String>,
    summary: RunSummary,
}

impl Follow {
    fn message(&self) -> String {
        format!(
            "done {}  skipped {}  failed {}",
            self.summary.succeeded,
            self.summary.already_done + self.summary.failed_before,
            self.summary.failures.len()
        )
    }

    /// Records a job that reached `state` (once; later reports of it are ignored).
    fn finish(
        &mut self,
        id: Uuid,
        state: JobState,
        error: Option<(String, String)>,
        plan: &Plan,
        progress: &Progress,
    ) {
        let Some(hash) = self.outstanding.remove(&id) else {
            return;
        };
        progress.0.inc(1);
        match state {
            JobState::Succeeded => self.summary.succeeded += 1,
            _ => {
                let (code, message) = error.unwrap_or_else(|| {
                    (
                        state.as_str().to_string(),
                        format!("the job was {}", state.as_str()),
                    )
                });
                self.summary.failures.push(Failure {
                    paths: plan.groups.get(&hash).cloned().unwrap_or_default(),
                    code,
                    message,
                });
            }
        }
    }

    /// The summary once following stops (all done, or interrupted).
    fn end(mut self, progress: &Progress, started: Instant) -> RunSummary {
        progress.done();
        self.summary.pending = self.outstanding.len();
        self.summary.elapsed_secs = started.elapsed().as_secs_f64();
        self.summary
    }
}

/// Runs a library run on the embedded queue with the local model. `shutdown`
/// resolving (Ctrl-C) stops claiming, lets running work finish or releases it, and
/// returns a summary marked interrupted; running again resumes.
pub async fn run_local(
    settings: &Settings,
    opts: &RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let walked = walk_paths(&opts.paths).await?;
    let app = App::build(settings, Engine::LoadModel).await?;
    let result = run_on_app(&app, walked, opts, started, shutdown).await;
    app.shutdown().await;
    result
}

async fn run_on_app(
    app: &App,
    walked: super::scan::Walk,
    opts: &RunOptions,
    started: Instant,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, RunError> {
    let state = app.state();
    let store = &state.store;
    let progress = Progress::new(opts.show_progress);
    let (plan, mut summary) =
        scan_and_plan(store, walked, &state.model, &opts.spec, &progress).await?;
    let keys = plan.key_list();
    let existing = store.jobs_by_keys(&keys).await?;
    let mut to_insert = Vec::new();
    let mut to_supersede = Vec::new();
    let mut follow = HashMap::new();
    for (hash, paths) in &plan.groups {
        let key = &plan.keys[hash];
        let found = plan.job_of(hash, &existing);
        match decide(opts.mode, found.map(|(_, j)| (j.id, j.state))) {
            None => {}
            Some(Action::SkipDone) => summary.already_done += 1,
            Some(Action::SkipFailed) => summary.failed_before += 1,
            Some(Action::Follow(id)) => {
                follow.insert(id, hash.clone());
            }
            Some(Action::Retry(_)) => {
                // Frees the key that holds the job (an earlier version's, maybe): the
                // new job takes this version's.
                if let Some((held, _)) = found {
                    to_supersede.push(held.to_string());
                }
                to_insert.push((hash, paths, key));
            }
            Some(Action::Enqueue) => to_insert.push((hash, paths, key)),
        }
    }
    let mut events = state.events.subscribe();
    if !to_supersede.is_empty() {
        store
            .supersede_keys(
                &to_supersede,
                &[JobState::Succeeded, JobState::Failed, JobState::Cancelled],
            )
            .await?;
    }
    let params =
        serde_json::to_value(&opts.spec.params).map_err(|e| RunError::Invalid(e.to_string()))?;
    for chunk in to_insert.chunks(5_000) {
        let news: Vec<NewJob> = chunk
            .iter()
            .map(|(_, paths, key)| NewJob {
                task: opts.spec.task,
                params: params.clone(),
                source: ImageSource::Path(paths[0].clone()),
                priority: crate::api::input::DEFAULT_PRIORITY,
                max_attempts: state.max_attempts,
                idempotency_key: Some((*key).clone()),
            })
            .collect();
        let (_, ids) = store.insert_batch(&news).await?;
        for ((hash, _, _), id) in chunk.iter().zip(ids) {
            follow.insert(id, (*hash).clone());
        }
    }
    state.wakeup.wake();
    summary.worked = follow.len();
    let mut f = Follow {
        outstanding: follow,
        summary,
    };
    progress.working(f.outstanding.len());
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !f.outstanding.is_empty() {
        if !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
            progress.0.set_message("loading the model…");
        } else {
            progress.0.set_message(f.message());
        }
        let mut check: Vec<Uuid> = Vec::new();
        tokio::select! {
            r = events.recv() => match r {
                Ok(id) => if f.outstanding.contains_key(&id) { check.push(id) },
                Err(RecvError::Lagged(_)) => check = f.outstanding.keys().copied().collect(),
                Err(RecvError::Closed) => { tick.tick().await; }
            },
            _ = tick.tick() => check = f.outstanding.keys().copied().collect(),
            reason = app.fatal() => {
                progress.done();
                return Err(RunError::Model(match reason {
                    crate::app::StopReason::ModelLoadFailed(m) => format!("cannot load the model: {m}"),
                    crate::app::StopReason::DeviceFault(m) => format!("device fault: {m}"),
                    crate::app::StopReason::Requested => "stopped".into(),
                }));
            }
            _ = &mut shutdown => {
                f.summary.interrupted = true;
                break;
            }
        }
        if check.is_empty() {
            continue;
        }
        let states = store.job_states(&check).await?;
        for (id, st) in states {
            if !st.is_terminal() {
                continue;
            }
            let error = if st == JobState::Succeeded {
                None
            } else {
                store
                    .get_job(id)
                    .await?
                    .and_then(|j| j.error)
                    .map(|e| (e.code, e.message))
            };
            f.finish(id, st, error, &plan, &progress);
        }
    }
    Ok(f.end(&progress, started))
}

/// Walks the run's folders off the async runtime.
async fn walk_paths(paths: &[PathBuf]) -> Result<super::scan::Walk, RunError> {
    let paths = paths.to_vec();
    tokio::task::spawn_blocking(move || walk(&paths))
        .await
        .map_err(|e| RunError::Invalid(format!("the folder walk stopped: {e}")))
}

/// Classifies the walked files against the scan record (hashing only what changed),
/// groups images by content and keys each group for `model` and `spec`.
async fn scan_and_plan(
    store: &Store,
    mut walked: super::scan::Walk,
    model: &ModelIdentity,
    spec: &TaskSpec,
    progress: &Progress,
) -> Result<(Plan, RunSummary), RunError> {
    let files = walked.files.len();
    progress.scanning(files);
    let warnings = std::mem::take(&mut walked.warnings);
    let classified = classify(store, walked, &|n| progress.0.set_position(n as u64)).await?;
    let plan = Plan::new(&classified, model, spec);
    let summary = base_summary(files, warnings, &classified, &plan);
    Ok((plan, summary))
}

fn base_summary(
    files: usize,
    warnings: Vec<String>,
    classified: &Classified,
    plan: &Plan,
) -> RunSummary {
    let mut warnings = warnings;
    warnings.extend(
        classified
            .unreadable
            .iter()
            .map(|(p, e)| format!("cannot read {p}: {e}")),
    );
    RunSummary {
        files,
        images: classified.images.len(),
        distinct: plan.groups.len(),
        unchanged: classified.unchanged,
        hashed: classified.hashed,
        warnings,
        ..RunSummary::default()
    }
}

/// A captiond server to enqueue into (`--server`).
#[derive(Debug, Clone)]
pub struct Remote {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer token, when the server requires one.
    pub token: Option<String>,
}

#[derive(serde::Deserialize)]
struct RemoteStats {
    model: ModelIdentity,
}

#[derive(serde::Deserialize)]
struct RemoteBatch {
    job_ids: Vec<Uuid>,
    states: Vec<JobState>,
}

#[derive(serde::Deserialize)]
struct RemoteJob {
    id: Uuid,
    state: JobState,
    error: Option<crate::queue::JobErrorInfo>,
    /// The idempotency key it was looked up by.
    #[serde(default)]
    key: Option<String>,
}

#[derive(serde::Deserialize)]
struct RemoteLookup {
    jobs: Vec<RemoteJob>,
}

impl Remote {
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let rb = client.request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, RunError> {
        let mut rb = self.request(client, method, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| RunError::Server(format!("cannot reach {}: {e}", self.url)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| RunError::Server(format!("{path}: {e}")))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .or_else(|| v.get("error"))
                        .and_then(|m| m.as_str().map(str::to_string))
                })
                .unwrap_or(text);
            return Err(RunError::Server(format!("{path} answered {status}: {msg}")));
        }
        serde_json::from_str(&text)
            .map_err(|e| RunError::Server(format!("{path}: unexpected answer: {e}")))
    }
}

/// Runs a library run against a running captiond: files are walked and hashed here
/// (the scan record lives in this data dir), jobs are enqueued by path with content
/// keys, and progress is followed on the server. The server must list the folders
/// among its `--library-root`s. Ctrl-C stops following; the server keeps working.
pub async fn run_remote(
    remote: &Remote,
    data: &DataSettings,
    opts: &RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, RunError> {
    if opts.mode == Mode::All {
        return Err(RunError::Invalid(
            "--mode all is not available with --server (results on the server are kept); run it on the server's machine without --server".into(),
        ));
    }
    let started = Instant::now();
    let client = reqwest::Client::new();
    let stats: RemoteStats = remote
        .call(&client, reqwest::Method::GET, "/v1/stats", None)
        .await?;
    let walked = walk_paths(&opts.paths).await?;
    std::fs::create_dir_all(data.data_dir()).map_err(|e| {
        RunError::Invalid(format!("cannot create {}: {e}", data.data_dir().display()))
    })?;
    let store = data.open_store().await?;
    let progress = Progress::new(opts.show_progress);
    let planned = scan_and_plan(&store, walked, &stats.model, &opts.spec, &progress).await;
    store.close().await;
    let (plan, mut summary) = planned?;
    let earlier = earlier_jobs(remote, &client, &plan).await?;
    let mut follow = HashMap::new();
    for (hash, (id, st)) in &earlier {
        settle(
            remote,
            &client,
            opts.mode,
            hash,
            *id,
            *st,
            &mut summary,
            &mut follow,
        )
        .await?;
    }
    let hashes: Vec<&String> = plan
        .groups
        .keys()
        .filter(|h| !earlier.contains_key(*h))
        .collect();
    let params =
        serde_json::to_value(&opts.spec.params).map_err(|e| RunError::Invalid(e.to_string()))?;
    for chunk in hashes.chunks(5_000) {
        let jobs: Vec<serde_json::Value> = chunk
            .iter()
            .map(|h| {
                let mut j = params.clone();
                if let Some(o) = j.as_object_mut() {
                    o.insert("task".into(), opts.spec.task.as_str().into());
                    o.insert(
                        "image".into(),
                        serde_json::json!({"path": plan.groups[*h][0]}),
                    );
                    o.insert("idempotency_key".into(), plan.keys[*h].clone().into());
                }
                j
            })
            .collect();
        let batch: RemoteBatch = remote
            .call(
                &client,
                reqwest::Method::POST,
                "/v1/batches",
                Some(serde_json::json!({ "jobs": jobs })),
            )
            .await?;
        for ((h, id), st) in chunk.iter().zip(batch.job_ids).zip(batch.states) {
            settle(
                remote,
                &client,
                opts.mode,
                h,
                id,
                st,
                &mut summary,
                &mut follow,
            )
            .await?;
        }
    }
    summary.worked = follow.len();
    let mut f = Follow {
        outstanding: follow,
        summary,
    };
    progress.working(f.outstanding.len());
    let mut shutdown = std::pin::pin!(shutdown);
    while !f.outstanding.is_empty() {
        progress.0.set_message(f.message());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut shutdown => {
                f.summary.interrupted = true;
                break;
            }
        }
        let ids: Vec<Uuid> = f.outstanding.keys().copied().collect();
        for chunk in ids.chunks(10_000) {
            let found: RemoteLookup = remote
                .call(
                    &client,
                    reqwest::Method::POST,
                    "/v1/jobs/lookup",
                    Some(serde_json::json!({ "ids": chunk })),
                )
                .await?;
            for j in found.jobs {
                if j.state.is_terminal() {
                    let error = j.error.map(|e| (e.code, e.message));
                    f.finish(j.id, j.state, error, &plan, &progress);
                }
            }
        }
    }
    Ok(f.end(&progress, started))
}

/// Counts, follows or retries (on the server) the job `id` that holds the content
/// `hash`, as `mode` says.
#[allow(clippy::too_many_arguments)]
async fn settle(
    remote: &Remote,
    client: &reqwest::Client,
    mode: Mode,
    hash: &str,
    id: Uuid,
    state: JobState,
    summary: &mut RunSummary,
    follow: &mut HashMap<Uuid, String>,
) -> Result<(), RunError> {
    match decide(mode, Some((id, state))) {
        None => {}
        Some(Action::SkipDone) => summary.already_done += 1,
        Some(Action::SkipFailed) => summary.failed_before += 1,
        Some(Action::Follow(_)) | Some(Action::Enqueue) => {
            follow.insert(id, hash.to_string());
        }
        Some(Action::Retry(id)) => {
            let _: serde_json::Value = remote
                .call(
                    client,
                    reqwest::Method::POST,
                    &format!("/v1/jobs/{id}/retry"),
                    None,
                )
                .await?;
            follow.insert(id, hash.to_string());
        }
    }
    Ok(())
}

/// With a server whose model is a local folder: the jobs (by content hash) that hold
/// results under the keys earlier versions gave such a folder's results, with its path.
async fn earlier_jobs(
    remote: &Remote,
    client: &reqwest::Client,
    plan: &Plan,
) -> Result<HashMap<String, (Uuid, JobState)>, RunError> {
    let hash_of: HashMap<&str, &String> = plan
        .path_keys
        .iter()
        .map(|(h, k)| (k.as_str(), h))
        .collect();
    let keys: Vec<&str> = hash_of.keys().copied().collect();
    let mut found = HashMap::new();
    for chunk in keys.chunks(10_000) {
        let got: RemoteLookup = remote
            .call(
                client,
                reqwest::Method::POST,
                "/v1/jobs/lookup",
                Some(serde_json::json!({ "keys": chunk })),
            )
            .await
            .map_err(|e| match e {
                RunError::Server(m) if m.contains("unknown field") => RunError::Server(format!(
                    "{m} (the server is older than this captiond and cannot look up the \
                     results its model folder made before; upgrade it, or they would be \
                     captioned again)"
                )),
                e => e,
            })?;
        for j in got.jobs {
            if let Some(h) = j.key.as_deref().and_then(|k| hash_of.get(k)) {
                found.insert((*h).clone(), (j.id, j.state));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_pick_the_right_contents() {
        let id = Uuid::now_v7();
        use JobState::*;
        assert_eq!(decide(Mode::Missing, None), Some(Action::Enqueue));
        assert_eq!(
            decide(Mode::Missing, Some((id, Succeeded))),
            Some(Action::SkipDone)
        );
        assert_eq!(
            decide(Mode::Missing, Some((id, Failed))),
            Some(Action::SkipFailed)
        );
        assert_eq!(
            decide(Mode::Missing, Some((id, Cancelled))),
            Some(Action::Retry(id))
        );
        assert_eq!(
            decide(Mode::Missing, Some((id, Running))),
            Some(Action::Follow(id))
        );
        assert_eq!(decide(Mode::Failed, None), None);
        assert_eq!(
            decide(Mode::Failed, Some((id, Failed))),
            Some(Action::Retry(id))
        );
        assert_eq!(
            decide(Mode::Failed, Some((id, Succeeded))),
            Some(Action::SkipDone)
        );
        assert_eq!(
            decide(Mode::All, Some((id, Succeeded))),
            Some(Action::Retry(id))
        );
        assert_eq!(
            decide(Mode::All, Some((id, Queued))),
            Some(Action::Follow(id))
        );
        assert_eq!(decide(Mode::All, None), Some(Action::Enqueue));
    }
}
