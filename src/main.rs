//! The `captiond` command line: `serve` runs the HTTP service; `caption` captions
//! folders in-process on the embedded queue; `status` prints queue counts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use captiond::api::input::{JobRequest, resolve_library_path};
use captiond::config::{DataSettings, ModelSettings, ServerSettings, WorkerSettings};
use captiond::queue::{JobState, Store};
use captiond::vision::CaptionLength;
use captiond::workers::caption::TaskParams;
use captiond::{App, Engine, Settings};

/// Caption whole photo libraries with a local Moondream2 model through a durable queue.
///
/// Settings come from flags, then CAPTIOND_* environment variables (also read from a
/// .env file in the working directory), then defaults. See .env.example.
#[derive(Debug, Parser)]
#[command(name = "captiond", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service: enqueue over /v1/jobs, poll results, survive crashes.
    Serve {
        #[command(flatten)]
        data: DataSettings,
        #[command(flatten)]
        model: ModelSettings,
        #[command(flatten)]
        workers: WorkerSettings,
        #[command(flatten)]
        server: ServerSettings,
    },
    /// Caption every image under the given folders (or files) and print the captions.
    ///
    /// Runs in-process on the embedded queue. Images already captioned with the same
    /// settings are skipped, so running the same command again resumes an interrupted run.
    Caption {
        /// Folders or image files.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Caption length.
        #[arg(long, default_value = "normal", value_parser = parse_length)]
        length: CaptionLength,
        /// Print one JSON object per image instead of `path<TAB>caption`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataSettings,
        #[command(flatten)]
        model: ModelSettings,
        #[command(flatten)]
        workers: WorkerSettings,
    },
    /// Print job counts of the queue in the data dir.
    Status {
        #[command(flatten)]
        data: DataSettings,
    },
}

fn parse_length(s: &str) -> Result<CaptionLength, String> {
    match s {
        "short" => Ok(CaptionLength::Short),
        "normal" => Ok(CaptionLength::Normal),
        "long" => Ok(CaptionLength::Long),
        other => Err(format!(
            "unknown length {other:?}; use short, normal or long"
        )),
    }
}

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("CAPTIOND_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Serve {
            data,
            model,
            workers,
            server,
        } => {
            let settings = Settings {
                data,
                model,
                workers,
                server,
            };
            let app = App::build(&settings, Engine::LoadModel).await?;
            let reason = app.run_until_stopped(shutdown_signal()).await;
            if let captiond::StopReason::ModelLoadFailed(e) = &reason {
                eprintln!("error: {e}");
            }
            Ok(reason.exit_code())
        }
        Command::Caption {
            paths,
            length,
            json,
            data,
            model,
            workers,
        } => caption(paths, length, json, data, model, workers).await,
        Command::Status { data } => {
            let store = Store::open(&data.database_path(), &data.store_options()).await?;
            let c = store.counts(None).await?;
            println!(
                "queued {}  scheduled {}  running {}  succeeded {}  failed {}  cancelled {}  (total {})",
                c.queued,
                c.scheduled,
                c.running,
                c.succeeded,
                c.failed,
                c.cancelled,
                c.total()
            );
            Ok(0)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "tif", "tiff", "gif", "bmp"];

/// Image files under `root` (or `root` itself), sorted; unreadable folders are reported.
fn collect_images(root: &Path, out: &mut Vec<PathBuf>) {
    if root.is_file() {
        out.push(root.to_path_buf());
        return;
    }
    let mut stack = vec![root.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        let Ok(canonical) = std::fs::canonicalize(&dir) else {
            continue;
        };
        if !seen.insert(canonical) {
            eprintln!("warning: skipping {} (symlink loop)", dir.display());
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("warning: cannot read {}: {e}", dir.display());
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(path);
            }
        }
    }
}

async fn caption(
    paths: Vec<PathBuf>,
    length: CaptionLength,
    json: bool,
    data: DataSettings,
    model: ModelSettings,
    workers: WorkerSettings,
) -> Result<i32> {
    let mut roots = Vec::new();
    let mut images = Vec::new();
    for p in &paths {
        let c = std::fs::canonicalize(p).with_context(|| format!("cannot open {}", p.display()))?;
        roots.push(if c.is_file() {
            c.parent().map(Path::to_path_buf).unwrap_or(c.clone())
        } else {
            c.clone()
        });
        collect_images(&c, &mut images);
    }
    images.sort();
    images.dedup();
    if images.is_empty() {
        eprintln!(
            "no images found under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(0);
    }
    let server = ServerSettings {
        bind: "127.0.0.1:0".parse()?,
        api_token: None,
        library_roots: roots.clone(),
        body_limit_mib: 32,
    };
    let settings = Settings {
        data,
        model,
        workers,
        server,
    };
    let app = App::build(&settings, Engine::LoadModel).await?;
    let state = app.state().clone();
    let mut news = Vec::with_capacity(images.len());
    for img in &images {
        let meta = std::fs::metadata(img)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let canonical = resolve_library_path(&img.to_string_lossy(), &state.roots)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let key = format!(
            "caption:{:?}:{}:{}:{}",
            length,
            canonical.display(),
            meta.len(),
            mtime
        );
        let req = JobRequest {
            task: captiond::queue::TaskKind::Caption,
            image: Some(captiond::api::input::ImageInput {
                path: Some(canonical.to_string_lossy().into_owned()),
                data: None,
            }),
            params: TaskParams {
                length: Some(length),
                ..TaskParams::default()
            },
            priority: None,
            max_attempts: None,
            idempotency_key: Some(key),
        };
        news.push(
            req.into_new_job(&state, None)
                .map_err(|e| anyhow::anyhow!(e.message))?,
        );
    }
    let mut ids = Vec::with_capacity(news.len());
    let mut batches = Vec::new();
    for chunk in news.chunks(5_000) {
        let (batch, chunk_ids) = state.store.insert_batch(chunk).await?;
        batches.push(batch);
        ids.extend(chunk_ids);
    }
    state.wakeup.wake();
    eprintln!(
        "{} images; captioning (Ctrl-C stops; run the same command again to resume)",
        ids.len()
    );
    let started = Instant::now();
    let total = ids.len();
    let interrupted = tokio::select! {
        _ = wait_all(&state.store, &ids, &batches, total, started) => false,
        _ = shutdown_signal() => true,
    };
    let mut failed = 0;
    for id in &ids {
        let Some(job) = state.store.get_job(*id).await? else {
            continue;
        };
        let path = match &job.source {
            captiond::queue::ImageSource::Path(p) => p.clone(),
            captiond::queue::ImageSource::Blob(b) => b.clone(),
        };
        match job.state {
            JobState::Succeeded => {
                let result = state.store.get_result(*id).await?;
                let caption = result
                    .as_ref()
                    .and_then(|r| r.output.get("caption"))
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"path": path, "caption": caption, "model": result.map(|r| r.model)})
                    );
                } else {
                    println!("{path}\t{caption}");
                }
            }
            JobState::Failed => {
                failed += 1;
                let why = job
                    .error
                    .map(|e| format!("{}: {}", e.code, e.message))
                    .unwrap_or_default();
                eprintln!("failed: {path}: {why}");
            }
            _ => {}
        }
    }
    app.shutdown().await;
    if interrupted {
        eprintln!("interrupted; run the same command again to resume");
        return Ok(130);
    }
    eprintln!(
        "done in {:.1}s; {} failed",
        started.elapsed().as_secs_f64(),
        failed
    );
    Ok(if failed > 0 { 2 } else { 0 })
}

/// Waits until every job is terminal. Jobs that already existed (same image and
/// settings) sit in earlier batches, so they are checked one by one once.
async fn wait_all(
    store: &Store,
    ids: &[uuid::Uuid],
    batches: &[uuid::Uuid],
    total: usize,
    started: Instant,
) {
    let mut earlier = Vec::new();
    for id in ids {
        if let Ok(Some(j)) = store.get_job(*id).await
            && !j.batch_id.is_some_and(|b| batches.contains(&b))
        {
            earlier.push(*id);
        }
    }
    loop {
        let mut done = 0;
        for b in batches {
            if let Ok(c) = store.counts(Some(*b)).await {
                done += (c.total() - c.pending()) as usize;
            }
        }
        for id in &earlier {
            if let Ok(Some(j)) = store.get_job(*id).await
                && j.state.is_terminal()
            {
                done += 1;
            }
        }
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        if tty {
            eprint!(
                "\r{done}/{total} done, {:.1} images/s   ",
                done as f64 / started.elapsed().as_secs_f64().max(0.001)
            );
        }
        if done == total {
            if tty {
                eprintln!();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
