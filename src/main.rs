//! The `captiond` command line: `serve` runs the HTTP service; `caption` runs a
//! library run; `status` reports it; `export` writes results where photo tools read them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use captiond::config::{DataSettings, KeepUploads, ModelSettings, ServerSettings, WorkerSettings};
use captiond::library::export::{self, ExportOptions, Format, XmpNaming};
use captiond::library::run::{Mode, Remote, RunOptions, RunSummary, run_local, run_remote};
use captiond::library::{ModelIdentity, TaskSpec};
use captiond::queue::{Store, TaskKind};
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
    /// Caption every image under the given folders (or files): the main job.
    ///
    /// Walks folders recursively and picks images by extension and by content. Each
    /// distinct image content is captioned once per model and settings: unchanged files
    /// are skipped without being opened, moved or duplicated files by content hash.
    /// Ctrl-C stops cleanly; running the same command again resumes.
    Caption {
        /// Folders or image files.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// missing: images without a result; all: every image again; failed: retry failures.
        #[arg(long, value_enum, default_value_t = Mode::Missing)]
        mode: Mode,
        #[command(flatten)]
        task: TaskArgs,
        /// Enqueue into a running captiond at this URL instead of running the model here.
        #[arg(long, env = "CAPTIOND_SERVER", value_name = "URL")]
        server: Option<String>,
        /// Print each image's result on stdout at the end: `text` (path TAB caption) or `json`.
        #[arg(long, value_enum, value_name = "FORMAT")]
        print: Option<PrintFormat>,
        #[command(flatten)]
        data: DataSettings,
        #[command(flatten)]
        model: ModelSettings,
        #[command(flatten)]
        workers: WorkerSettings,
    },
    /// Print what is done for the library (images, done, failed, pending) and the queue.
    Status {
        /// Folders to report on (default: everything captioned from this data dir).
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        task: TaskArgs,
        #[command(flatten)]
        data: DataSettings,
        #[command(flatten)]
        model: ModelSettings,
    },
    /// Export results: JSON lines, CSV, .txt files or XMP sidecars beside the images.
    ///
    /// Repeatable and incremental: files that already say the same are not touched, and
    /// text that captiond did not write is kept unless --overwrite.
    Export {
        /// Folders or files to export (default: everything captioned from this data dir).
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// jsonl or csv (to stdout or --output), txt or xmp (files beside each image).
        #[arg(long, value_enum)]
        format: Format,
        /// File for jsonl/csv (written atomically); stdout when absent.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Extension of the text files (txt format).
        #[arg(long, default_value = "txt")]
        txt_extension: String,
        /// Sidecar names: auto (an existing one, else photo.jpg.xmp), ext (photo.jpg.xmp), stem (photo.xmp).
        #[arg(long, value_enum, default_value_t = XmpNaming::Auto)]
        xmp_naming: XmpNaming,
        /// Also write the caption as Iptc4xmpCore:AltTextAccessibility (xmp format).
        #[arg(long)]
        alt_text: bool,
        /// Replace descriptions and text files that captiond did not write.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        task: TaskArgs,
        #[command(flatten)]
        data: DataSettings,
        #[command(flatten)]
        model: ModelSettings,
    },
}

/// The task of a library run; results are keyed by it.
#[derive(Debug, Clone, clap::Args)]
struct TaskArgs {
    /// Caption length: short, normal or long.
    #[arg(long, default_value = "normal", value_parser = parse_length)]
    length: CaptionLength,
    /// Ask this question about every image instead of captioning it.
    #[arg(long, value_name = "TEXT")]
    question: Option<String>,
}

impl TaskArgs {
    fn spec(&self) -> TaskSpec {
        match &self.question {
            Some(q) => TaskSpec {
                task: TaskKind::Query,
                params: TaskParams {
                    question: Some(q.clone()),
                    ..TaskParams::default()
                },
            },
            None => TaskSpec {
                task: TaskKind::Caption,
                params: TaskParams {
                    length: Some(self.length),
                    ..TaskParams::default()
                },
            },
        }
    }
}

/// How `caption --print` shows results.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrintFormat {
    /// `path<TAB>text`.
    Text,
    /// One JSON object per image.
    Json,
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
    captiond::vision::moondream2::loader::single_heap_arena();
    let _ = dotenvy::dotenv();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // `serve --station` moves the default port to 2020 unless --bind (or
    // CAPTIOND_BIND) chose one.
    let bind_given = matches.subcommand_matches("serve").is_some_and(|m| {
        m.value_source("bind")
            .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
    });
    let filter = EnvFilter::try_from_env("CAPTIOND_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            // The service logs what it does; the batch commands keep stderr for
            // progress and the summary unless CAPTIOND_LOG asks for more.
            EnvFilter::new(match cli.command {
                Command::Serve { .. } => "info",
                _ => "warn",
            })
        });
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
    match runtime.block_on(run(cli, bind_given)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, bind_given: bool) -> Result<i32> {
    match cli.command {
        Command::Serve {
            data,
            model,
            workers,
            server,
        } => {
            let mut server = server;
            if server.station && !bind_given {
                server.bind.set_port(2020);
            }
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
            mode,
            task,
            server,
            print,
            data,
            model,
            workers,
        } => {
            let opts = RunOptions {
                paths,
                mode,
                spec: task.spec(),
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            caption(opts, server, print, data, model, workers).await
        }
        Command::Status {
            paths,
            task,
            data,
            model,
        } => status(paths, task, data, model).await,
        Command::Export {
            paths,
            format,
            output,
            txt_extension,
            xmp_naming,
            alt_text,
            overwrite,
            task,
            data,
            model,
        } => {
            let store = open_existing(&data).await?;
            let opts = ExportOptions {
                paths,
                format,
                spec: task.spec(),
                model: ModelIdentity::from_settings(&model),
                output,
                txt_extension,
                xmp_naming,
                alt_text,
                overwrite,
            };
            let s = export::export(&store, &opts).await?;
            // Only a report that missed images asks the queue why.
            let why = if s.with_result < s.images {
                other_settings_note(&store, &opts.model, &opts.spec).await?
            } else {
                Vec::new()
            };
            store.close().await;
            for n in &s.notes {
                eprintln!("note: {n}");
            }
            for k in &s.kept {
                eprintln!("kept: {k} (written by someone else; --overwrite replaces it)");
            }
            for e in &s.errors {
                eprintln!("error: {e}");
            }
            for line in &why {
                eprintln!("note: {line}");
            }
            eprintln!(
                "export: {} images, {} with a result; {} written, {} unchanged, {} kept, {} errors",
                s.images,
                s.with_result,
                s.written,
                s.unchanged,
                s.kept.len(),
                s.errors.len()
            );
            Ok(if s.errors.is_empty() { 0 } else { 1 })
        }
    }
}

/// Lines that explain images without a result when the queue holds library results made
/// with other settings: results are kept per model and task, so a report's flags must
/// match the run's. Empty when there are none.
async fn other_settings_note(
    store: &Store,
    model: &ModelIdentity,
    spec: &TaskSpec,
) -> Result<Vec<String>> {
    let others = export::other_settings(store, model, spec).await?;
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let mut lines = vec![
        "the queue holds library results made with other settings (results are kept per \
         model and task; pass the flags a run used to see its results):"
            .to_string(),
    ];
    const SHOWN: usize = 5;
    for o in others.iter().take(SHOWN) {
        lines.push(format!("  {} results: {}", o.results, o.flags));
    }
    if others.len() > SHOWN {
        lines.push(format!("  and {} more settings", others.len() - SHOWN));
    }
    Ok(lines)
}

/// Opens the data dir's database for reading reports; refuses to create one.
async fn open_existing(data: &DataSettings) -> Result<Store> {
    if data.uses_postgres() {
        return Ok(data.open_store().await?);
    }
    let path = data.database_path();
    if !path.exists() {
        anyhow::bail!(
            "no captiond database at {} (run `captiond caption PATH` first, or pass --data-dir)",
            path.display()
        );
    }
    Ok(data.open_store().await?)
}

async fn status(
    paths: Vec<PathBuf>,
    task: TaskArgs,
    data: DataSettings,
    model: ModelSettings,
) -> Result<i32> {
    let store = open_existing(&data).await?;
    let opts = ExportOptions::for_rows(paths, task.spec(), ModelIdentity::from_settings(&model));
    let rows = export::rows(&store, &opts).await?;
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut distinct = std::collections::HashSet::new();
    for r in &rows {
        *by_state.entry(r.state.as_str()).or_default() += 1;
        distinct.insert(r.hash.as_str());
    }
    let n = |s: &str| by_state.get(s).copied().unwrap_or(0);
    println!(
        "library: {} images ({} distinct)  done {}  failed {}  pending {}  not captioned {}",
        rows.len(),
        distinct.len(),
        n("succeeded"),
        n("failed"),
        n("queued") + n("scheduled") + n("running"),
        n("missing") + n("cancelled"),
    );
    let c = store.counts(None).await?;
    println!(
        "queue:   queued {}  scheduled {}  running {}  succeeded {}  failed {}  cancelled {}  (total {})",
        c.queued,
        c.scheduled,
        c.running,
        c.succeeded,
        c.failed,
        c.cancelled,
        c.total()
    );
    if n("missing") + n("cancelled") > 0 {
        for line in other_settings_note(&store, &opts.model, &opts.spec).await? {
            println!("note:    {line}");
        }
    }
    for r in rows.iter().filter(|r| r.state == "failed") {
        println!(
            "failed:  {}: {}",
            r.path,
            r.error.as_deref().unwrap_or("unknown").trim()
        );
    }
    store.close().await;
    Ok(0)
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

async fn caption(
    opts: RunOptions,
    server: Option<String>,
    print: Option<PrintFormat>,
    data: DataSettings,
    model: ModelSettings,
    workers: WorkerSettings,
) -> Result<i32> {
    let summary = match &server {
        Some(url) => {
            let remote = Remote {
                url: url.clone(),
                token: std::env::var("CAPTIOND_API_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
            };
            run_remote(&remote, &data, &opts, shutdown_signal()).await?
        }
        None => {
            let settings = Settings {
                data: data.clone(),
                model: model.clone(),
                workers,
                server: ServerSettings {
                    bind: "127.0.0.1:0".parse()?,
                    api_token: None,
                    library_roots: Vec::new(),
                    body_limit_mib: 32,
                    request_timeout_secs: 300,
                    body_timeout_secs: 60,
                    header_timeout_secs: 30,
                    station: false,
                    // A library run enqueues no uploads, and leaves the service's
                    // (its data folder may be one `serve` uses) for `serve` to expire.
                    keep_uploads_days: KeepUploads(None),
                },
            };
            run_local(&settings, &opts, shutdown_signal()).await?
        }
    };
    if let Some(fmt) = print
        && server.is_none()
    {
        let store = open_existing(&data).await?;
        let eopts = ExportOptions::for_rows(
            opts.paths.clone(),
            opts.spec.clone(),
            ModelIdentity::from_settings(&model),
        );
        let rows = export::rows(&store, &eopts).await?;
        store.close().await;
        for r in rows.iter().filter(|r| r.text.is_some()) {
            match fmt {
                PrintFormat::Text => {
                    println!("{}\t{}", r.path, r.text.as_deref().unwrap_or_default())
                }
                PrintFormat::Json => println!("{}", serde_json::to_string(r)?),
            }
        }
    }
    print_summary(&summary, server.is_some());
    Ok(if summary.interrupted {
        130
    } else if summary.failures.is_empty() {
        0
    } else {
        2
    })
}

fn print_summary(s: &RunSummary, remote: bool) {
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "{} files, {} images ({} distinct); {} unchanged since the last scan, {} opened",
        s.files, s.images, s.distinct, s.unchanged, s.hashed
    );
    eprintln!(
        "captioned {}, failed {}, skipped {} already done{}",
        s.succeeded,
        s.failures.len(),
        s.already_done,
        if s.failed_before > 0 {
            format!(
                " and {} that failed before (--mode failed retries them)",
                s.failed_before
            )
        } else {
            String::new()
        }
    );
    const SHOWN: usize = 50;
    for f in s.failures.iter().take(SHOWN) {
        eprintln!("failed: {}: {} ({})", f.paths.join(", "), f.message, f.code);
    }
    if s.failures.len() > SHOWN {
        eprintln!(
            "... and {} more failures (captiond status lists them all)",
            s.failures.len() - SHOWN
        );
    }
    if s.interrupted {
        if remote {
            eprintln!(
                "stopped following; the server keeps working on {} images. Run the same command again to follow it.",
                s.pending
            );
        } else {
            eprintln!(
                "interrupted with {} images left; run the same command again to resume.",
                s.pending
            );
        }
    } else {
        eprintln!(
            "finished in {:.1}s. Export with: captiond export --format xmp|txt|jsonl|csv PATH",
            s.elapsed_secs
        );
    }
}
