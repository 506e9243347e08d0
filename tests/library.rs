//! Library runs with the real `captiond` binary on the tiny checkpoint: a generated
//! photo library with the awkward files real libraries have, reruns that do nothing,
//! SIGKILL and resume, and exports read back by ExifTool.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{cli_command as captiond, cli_run as run};

fn caption_args(lib: &Path) -> Vec<String> {
    vec![
        "caption".into(),
        lib.display().to_string(),
        "--max-tokens".into(),
        "6".into(),
        "--workers".into(),
        "2".into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Rows of `captiond export --format jsonl`.
fn export_rows(data: &Path, lib: &Path) -> Vec<Value> {
    let (code, out, err) = run(
        data,
        &["export", &lib.display().to_string(), "--format", "jsonl"],
    );
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Builds a library under `root`: nested folders, EXIF-rotated JPEGs, a duplicate under
/// another name, a corrupt file, a zero-byte file, a text file named .jpg, an image
/// without extension, a non-image file and a symlink loop.
fn make_library(root: &Path) -> PathBuf {
    let lib = root.join("Photos");
    let deep = lib.join("2024/summer/beach");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(lib.join("2023")).unwrap();
    let img = image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 9) as u8, 90])
    });
    std::fs::write(
        deep.join("rotated6.jpg"),
        common::jpeg_with_orientation(&img, 6),
    )
    .unwrap();
    std::fs::write(
        deep.join("rotated3.JPG"),
        common::jpeg_with_orientation(&img, 3),
    )
    .unwrap();
    let png = common::png(30, 20, 7);
    std::fs::write(lib.join("2023/dog.png"), &png).unwrap();
    std::fs::write(lib.join("2024/copy of dog.png"), &png).unwrap();
    std::fs::write(lib.join("scan0001"), common::png(16, 16, 99)).unwrap();
    let jpeg = common::jpeg_with_orientation(&img, 1);
    std::fs::write(lib.join("corrupt.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(lib.join("empty.jpg"), b"").unwrap();
    std::fs::write(lib.join("notes.jpg"), b"shopping list: milk, eggs\n").unwrap();
    std::fs::write(lib.join("README.txt"), b"not a photo\n").unwrap();
    std::os::unix::fs::symlink(&lib, deep.join("back to top")).unwrap();
    lib
}

#[test]
fn a_library_run_captions_each_content_once_and_a_rerun_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = make_library(tmp.path());
    let data = tmp.path().join("data");
    let args = caption_args(&lib);

    let (code, _, err) = run(&data, &strs(&args));
    assert_eq!(code, 2, "failures make exit code 2: {err}");
    assert!(err.contains("symlink loop"), "{err}");
    assert!(err.contains("captioned 4, failed 3"), "{err}");
    for (file, reason) in [
        ("corrupt.jpg", "cannot decode image"),
        ("empty.jpg", "the image file is empty"),
        ("notes.jpg", "unsupported or unrecognised image format"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with("failed: ") && l.contains(file) && l.contains(reason)),
            "{file}: {reason} in {err}"
        );
    }
    // One job per distinct content: 4 images + 3 bad files (the duplicate shares one).
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM jobs"), 7);
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM results"), 4);
    let rows = export_rows(&data, &lib);
    assert_eq!(
        rows.len(),
        8,
        "every image file, duplicates included: {rows:?}"
    );
    let text_of = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .and_then(|r| r["text"].as_str())
            .map(str::to_string)
    };
    assert!(
        text_of("scan0001").is_some(),
        "an image without extension is found by content"
    );
    assert_eq!(text_of("2023/dog.png"), text_of("copy of dog.png"));
    assert!(
        !rows
            .iter()
            .any(|r| r["path"].as_str().unwrap().ends_with("README.txt"))
    );

    // The rerun opens no file and enqueues nothing.
    let (code, _, err) = run(&data, &strs(&args));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("9 files, 8 images (7 distinct); 9 unchanged since the last scan, 0 opened"),
        "{err}"
    );
    assert!(
        err.contains("captioned 0, failed 0, skipped 4 already done and 3 that failed before"),
        "{err}"
    );
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM jobs"), 7);

    // A moved file is recognised by its content.
    std::fs::rename(lib.join("2023/dog.png"), lib.join("dog moved.png")).unwrap();
    let (code, _, err) = run(&data, &strs(&args));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 opened"), "{err}");
    assert!(err.contains("captioned 0"), "{err}");

    // --mode failed retries only the failures (they fail again, with their reasons).
    let mut failed = args.clone();
    failed.extend(["--mode".into(), "failed".into()]);
    let (code, _, err) = run(&data, &strs(&failed));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("captioned 0, failed 3"), "{err}");
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM jobs"), 10);

    // Other settings make earlier results stale: a new length captions everything again.
    let mut short = args.clone();
    short.extend(["--length".into(), "short".into()]);
    let (_, _, err) = run(&data, &strs(&short));
    assert!(err.contains("captioned 4, failed 3"), "{err}");

    let (code, out, _) = run(&data, &["status", &lib.display().to_string()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("library: 8 images (7 distinct)  done 5  failed 3"),
        "{out}"
    );
    assert!(!out.contains("note:"), "{out}");

    // Settings no run used find nothing, and name the settings that have results
    // instead of only saying "not captioned".
    let (code, out, _) = run(
        &data,
        &["status", &lib.display().to_string(), "--length", "long"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("done 0  failed 0"), "{out}");
    assert!(
        out.contains("note:    the queue holds library results made with other settings"),
        "{out}"
    );
    for length in ["normal", "short"] {
        assert!(
            out.contains(&format!(
                "note:      4 results: --length {length} --model-dir "
            )),
            "{length}: {out}"
        );
    }
    let (code, _, err) = run(
        &data,
        &[
            "export",
            &lib.display().to_string(),
            "--format",
            "jsonl",
            "--length",
            "long",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("note:   4 results: --length short --model-dir "),
        "{err}"
    );

    // Partly captioned with these settings: the others are named too.
    std::fs::write(lib.join("new.png"), common::png(12, 12, 5)).unwrap();
    let (_, _, err) = run(&data, &strs(&short));
    assert!(err.contains("captioned 1, failed 0"), "{err}");
    let (code, out, _) = run(&data, &["status", &lib.display().to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("done 5  failed 3"), "{out}");
    assert!(out.contains("not captioned 1"), "{out}");
    assert!(
        out.contains("note:      5 results: --length short --model-dir "),
        "{out}"
    );
    assert!(!out.contains("--length normal --model-dir"), "{out}");
    let (_, out, _) = run(
        &data,
        &["status", &lib.display().to_string(), "--length", "short"],
    );
    assert!(out.contains("done 6  failed 3"), "{out}");
    assert!(!out.contains("note:"), "{out}");
}

/// `captiond ARGS` on `data` with the model folder `model` (instead of the shared one).
fn run_with_model(data: &Path, model: &Path, args: &[&str]) -> (i32, String, String) {
    common::cli_output(common::cli_command_with_model(data, model, args))
}

/// Gives every library job the key earlier versions stored it under (with the model
/// folder's path), as a database they wrote has it; returns how many.
fn rekey_as_before(data: &Path, model: &Path) -> usize {
    use captiond::library::{ModelIdentity, TaskSpec, path_content_key};
    let mut settings = common::settings(data, data, &common::TestOptions::default());
    settings.model.model_dir = Some(model.to_path_buf());
    let identity = ModelIdentity::from_settings(&settings.model);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("captiond.db"));
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let jobs: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT idempotency_key, task, params FROM jobs WHERE idempotency_key LIKE 'lib:%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        for (key, task, params) in &jobs {
            let hash = key.split(':').nth(1).unwrap();
            let spec = TaskSpec {
                task: captiond::queue::TaskKind::parse(task).unwrap(),
                params: serde_json::from_str(params).unwrap(),
            };
            let before = path_content_key(hash, &identity, &spec).unwrap();
            assert_ne!(&before, key);
            sqlx::query("UPDATE jobs SET idempotency_key = ?1 WHERE idempotency_key = ?2")
                .bind(&before)
                .bind(key)
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;
        jobs.len()
    })
}

#[test]
fn a_moved_model_folder_keeps_its_results_and_results_keyed_by_its_path_still_count() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for i in 0..3u8 {
        std::fs::write(lib.join(format!("{i}.png")), common::png(20, 14, i)).unwrap();
    }
    // A copy of the model that keeps its files' times (as `cp -p` or `mv` do).
    let model = tmp.path().join("models/moondream");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(common::tiny_model_dir()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            let to = model.join(f.file_name());
            std::fs::copy(f.path(), &to).unwrap();
            let mtime = f.metadata().unwrap().modified().unwrap();
            std::fs::File::options()
                .write(true)
                .open(&to)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
        }
    }
    let data = tmp.path().join("data");
    let libs = lib.display().to_string();
    let args = ["caption", &libs, "--max-tokens", "4"];
    let (code, _, err) = run_with_model(&data, &model, &args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("captioned 3, failed 0"), "{err}");

    // Moved and renamed: its results still count.
    let moved = tmp.path().join("elsewhere/md2");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&model, &moved).unwrap();
    let (code, _, err) = run_with_model(&data, &moved, &args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("captioned 0, failed 0, skipped 3 already done"),
        "{err}"
    );
    let (code, out, _) = run_with_model(&data, &moved, &["status", &libs]);
    assert_eq!(code, 0);
    assert!(out.contains("done 3  failed 0"), "{out}");
    // A folder captioned only with other settings: status names those, and not the
    // results made under the old path, which are this model's.
    let new = tmp.path().join("new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join("n.png"), common::png(22, 15, 9)).unwrap();
    let news = new.display().to_string();
    let short = ["caption", &news, "--max-tokens", "4", "--length", "short"];
    let (_, _, err) = run_with_model(&data, &moved, &short);
    assert!(err.contains("captioned 1, failed 0"), "{err}");
    let only_other_settings = |out: &str| {
        assert!(out.contains("done 0  failed 0"), "{out}");
        assert!(
            out.contains("note:      1 results: --length short --model-dir "),
            "{out}"
        );
        assert!(!out.contains("3 results"), "{out}");
    };
    let (code, out, _) = run_with_model(&data, &moved, &["status", &news]);
    assert_eq!(code, 0);
    only_other_settings(&out);
    let (_, out, _) = run_with_model(&data, &moved, &["status", &news, "--length", "long"]);
    // The results made under the old path are named by the folder where it is now.
    let here = moved.canonicalize().unwrap().display().to_string();
    assert!(
        out.contains(&format!(
            "note:      3 results: --length normal --model-dir {here}\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "note:      1 results: --length short --model-dir {here}\n"
        )),
        "{out}"
    );
    assert!(!out.contains("no longer there"), "{out}");

    // A database written before keys left out the folder's path: its results count in
    // runs, status and export alike, until --mode all redoes them under the new keys.
    assert_eq!(rekey_as_before(&data, &moved), 4);
    let (code, _, err) = run_with_model(&data, &moved, &args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("captioned 0, failed 0, skipped 3 already done"),
        "{err}"
    );
    let (_, out, _) = run_with_model(&data, &moved, &["status", &libs]);
    assert!(out.contains("done 3  failed 0"), "{out}");
    let (_, out, _) = run_with_model(&data, &moved, &["status", &news]);
    only_other_settings(&out);
    let (code, out, err) = run_with_model(&data, &moved, &["export", &libs, "--format", "jsonl"]);
    assert_eq!(code, 0, "{err}");
    let texts = out
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["text"].is_string())
        .count();
    assert_eq!(texts, 3, "{out}");
    let mut all = args.to_vec();
    all.extend(["--mode", "all"]);
    let (_, _, err) = run_with_model(&data, &moved, &all);
    assert!(err.contains("captioned 3, failed 0"), "{err}");
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM jobs"), 7);
    let (_, _, err) = run_with_model(&data, &moved, &args);
    assert!(
        err.contains("captioned 0, failed 0, skipped 3 already done"),
        "{err}"
    );
    // Results of another model folder (a copy with new file times is another model)
    // that has since been deleted: its old path, said to be gone.
    let other = tmp.path().join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&moved).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), other.join(f.file_name())).unwrap();
        }
    }
    let other_path = other.canonicalize().unwrap().display().to_string();
    let (_, _, err) = run_with_model(&data, &other, &["caption", &news, "--max-tokens", "4"]);
    assert!(err.contains("captioned 1, failed 0"), "{err}");
    std::fs::remove_dir_all(&other).unwrap();
    let (_, out, _) = run_with_model(&data, &moved, &["status", &news, "--length", "long"]);
    assert!(
        out.contains(&format!(
            "note:      1 results: --length normal --model-dir {other_path} (no longer there: \
             give the folder it moved to)"
        )),
        "{out}"
    );
}

#[test]
fn sigkill_during_a_run_then_rerun_captions_every_image_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(lib.join("a/b")).unwrap();
    for i in 0..24u8 {
        let dir = if i % 2 == 0 {
            lib.join("a")
        } else {
            lib.join("a/b")
        };
        std::fs::write(
            dir.join(format!("img{i:02}.png")),
            common::png(32 + u32::from(i), 24, i),
        )
        .unwrap();
    }
    let data = tmp.path().join("data");
    let mut args = caption_args(&lib);
    args[3] = "48".into(); // longer captions, so the kill lands mid-run
    args[5] = "1".into();
    let mut child = captiond(&data, &strs(&args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the run never got going");
        if data.join("captiond.db").exists()
            && common::db_scalar(&data, "SELECT COUNT(*) FROM results") >= 3
        {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before the kill: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = common::db_scalar(&data, "SELECT COUNT(*) FROM results");
    assert!(before < 24, "killed mid-run ({before} done)");

    // Ctrl-C (SIGINT) on the rerun: it stops cleanly, says how to resume, exits 130.
    let child = captiond(&data, &strs(&args))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while common::db_scalar(&data, "SELECT COUNT(*) FROM results") < before + 2 {
        assert!(Instant::now() < deadline, "the rerun never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert_eq!(
        common::db_scalar(&data, "SELECT COUNT(*) FROM jobs WHERE state = 'running'"),
        0,
        "running work was released"
    );
    let before = common::db_scalar(&data, "SELECT COUNT(*) FROM results");

    let (code, _, err) = run(&data, &strs(&args));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("skipped {before} already done")),
        "{err}"
    );
    assert_eq!(common::db_scalar(&data, "SELECT COUNT(*) FROM jobs"), 24);
    assert_eq!(
        common::db_scalar(&data, "SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'"),
        24
    );
    assert_eq!(
        common::db_scalar(&data, "SELECT COUNT(*) FROM results"),
        24,
        "one result per image"
    );
    assert_eq!(
        common::db_scalar(&data, "SELECT COUNT(*) FROM jobs WHERE attempt > 2"),
        0
    );
    let rows = export_rows(&data, &lib);
    assert_eq!(rows.len(), 24);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "succeeded" && r["text"].is_string())
    );
}

fn exiftool(args: &[&str]) -> String {
    let out = Command::new("exiftool")
        .args(args)
        .output()
        .expect("ExifTool is installed (scripts/test installs libimage-exiftool-perl)");
    assert!(
        out.status.success(),
        "exiftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn exports_xmp_that_exiftool_reads_keeping_other_fields_and_peoples_text() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(
        lib.join("a.jpg"),
        common::jpeg_with_orientation(
            &image::RgbImage::from_pixel(20, 20, image::Rgb([200, 10, 10])),
            1,
        ),
    )
    .unwrap();
    std::fs::write(lib.join("a.png"), common::png(20, 20, 3)).unwrap();
    std::fs::write(lib.join("b.png"), common::png(20, 20, 4)).unwrap();
    let data = tmp.path().join("data");
    let (code, _, err) = run(&data, &strs(&caption_args(&lib)));
    assert_eq!(code, 0, "{err}");
    let rows = export_rows(&data, &lib);
    let caption = |name: &str| -> String {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .and_then(|r| r["text"].as_str())
            .unwrap()
            .to_string()
    };
    // A sidecar written by another tool, and one where a person wrote a description.
    let a_xmp = lib.join("a.jpg.xmp");
    exiftool(&[
        "-q",
        "-XMP-dc:Creator=Alice",
        "-XMP-xmp:Rating=4",
        "-o",
        a_xmp.to_str().unwrap(),
        lib.join("a.jpg").to_str().unwrap(),
    ]);
    let b_xmp = lib.join("b.xmp");
    exiftool(&[
        "-q",
        "-XMP-dc:Description=Grandma at the lake",
        "-o",
        b_xmp.to_str().unwrap(),
        lib.join("b.png").to_str().unwrap(),
    ]);

    let lib_s = lib.display().to_string();
    let (code, _, err) = run(&data, &["export", &lib_s, "--format", "xmp", "--alt-text"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 written, 0 unchanged, 1 kept"), "{err}");
    let read = |p: &Path, tag: &str| exiftool(&["-s3", tag, p.to_str().unwrap()]);
    assert_eq!(read(&a_xmp, "-XMP-dc:Description"), caption("a.jpg"));
    assert_eq!(
        read(&a_xmp, "-XMP-iptcCore:AltTextAccessibility"),
        caption("a.jpg")
    );
    assert_eq!(read(&a_xmp, "-XMP-dc:Creator"), "Alice");
    assert_eq!(read(&a_xmp, "-XMP-xmp:Rating"), "4");
    let a_png_xmp = lib.join("a.png.xmp");
    assert_eq!(read(&a_png_xmp, "-XMP-dc:Description"), caption("a.png"));
    assert_eq!(read(&b_xmp, "-XMP-dc:Description"), "Grandma at the lake");
    assert!(
        !lib.join("b.png.xmp").exists(),
        "the existing photo.xmp is the sidecar"
    );

    // Again: nothing changes.
    let before = std::fs::read(&a_xmp).unwrap();
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "xmp", "--alt-text"]);
    assert!(err.contains("0 written, 2 unchanged, 1 kept"), "{err}");
    assert_eq!(std::fs::read(&a_xmp).unwrap(), before);

    // A person's edit of captiond's text is theirs now.
    exiftool(&[
        "-q",
        "-overwrite_original",
        "-XMP-dc:Description=Red square, by me",
        a_png_xmp.to_str().unwrap(),
    ]);
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "xmp"]);
    assert!(err.contains("2 kept"), "{err}");
    assert_eq!(read(&a_png_xmp, "-XMP-dc:Description"), "Red square, by me");

    // --overwrite replaces them.
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "xmp", "--overwrite"]);
    assert!(err.contains("0 kept"), "{err}");
    assert_eq!(read(&b_xmp, "-XMP-dc:Description"), caption("b.png"));
    assert_eq!(read(&a_xmp, "-XMP-dc:Creator"), "Alice");

    // Text files: a.jpg and a.png share a stem, so both get the long name.
    let (code, _, err) = run(&data, &["export", &lib_s, "--format", "txt"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("shares its name"), "{err}");
    assert_eq!(
        std::fs::read_to_string(lib.join("a.jpg.txt"))
            .unwrap()
            .trim(),
        caption("a.jpg")
    );
    assert_eq!(
        std::fs::read_to_string(lib.join("a.png.txt"))
            .unwrap()
            .trim(),
        caption("a.png")
    );
    assert_eq!(
        std::fs::read_to_string(lib.join("b.txt")).unwrap().trim(),
        caption("b.png")
    );
    std::fs::write(lib.join("b.txt"), "my own notes\n").unwrap();
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "txt"]);
    assert!(err.contains("0 written, 2 unchanged, 1 kept"), "{err}");
    assert_eq!(
        std::fs::read_to_string(lib.join("b.txt")).unwrap(),
        "my own notes\n"
    );

    // CSV to a file, written once.
    let csv = tmp.path().join("out.csv");
    let csv_s = csv.display().to_string();
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "csv", "-o", &csv_s]);
    assert!(err.contains("1 written"), "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("path,hash,model,revision,task,params,state,text"));
    assert_eq!(text.lines().count(), 4);
    let (_, _, err) = run(&data, &["export", &lib_s, "--format", "csv", "-o", &csv_s]);
    assert!(err.contains("0 written, 1 unchanged"), "{err}");
}

#[test]
fn caption_with_server_enqueues_into_a_running_captiond_and_follows_it() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for i in 0..3u8 {
        std::fs::write(lib.join(format!("p{i}.png")), common::png(20, 20, i)).unwrap();
    }
    std::fs::write(lib.join("p3.png"), common::png(20, 20, 0)).unwrap(); // duplicate
    std::fs::write(lib.join("bad.jpg"), b"not a jpeg").unwrap();
    let server_data = tmp.path().join("server");
    let mut server = captiond(
        &server_data,
        &["serve", "--bind", "127.0.0.1:0", "--max-tokens", "6"],
    )
    .arg("--library-root")
    .arg(&lib)
    .env("CAPTIOND_LOG", "info")
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server address");
    let url = format!("http://{addr}");
    let client_data = tmp.path().join("client");
    let lib_s = lib.display().to_string();
    let args = ["caption", lib_s.as_str(), "--server", url.as_str()];
    let (code, _, err) = run(&client_data, &args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("captioned 3, failed 1"), "{err}");
    assert!(err.contains("bad.jpg"), "{err}");
    let (code, _, err) = run(&client_data, &args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("captioned 0, failed 0, skipped 3 already done and 1 that failed before"),
        "{err}"
    );
    assert!(err.contains("0 opened"), "{err}");
    // A server database written before keys left out the model folder's path: the
    // client finds those results by their earlier keys (`/v1/jobs/lookup` by key),
    // and retries a failure in place.
    assert_eq!(rekey_as_before(&server_data, &common::tiny_model_dir()), 4);
    let (code, _, err) = run(&client_data, &args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("captioned 0, failed 0, skipped 3 already done and 1 that failed before"),
        "{err}"
    );
    let mut failed = args.to_vec();
    failed.extend(["--mode", "failed"]);
    let (code, _, err) = run(&client_data, &failed);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("captioned 0, failed 1"), "{err}");
    assert_eq!(
        common::db_scalar(&server_data, "SELECT COUNT(*) FROM jobs"),
        4
    );
    // A folder that does not exist is reported, not fatal.
    let (_, err2) = {
        let (c, _, e) = run(
            &client_data,
            &["caption", "/nonexistent-folder", "--server", url.as_str()],
        );
        (c, e)
    };
    assert!(err2.contains("cannot open /nonexistent-folder"), "{err2}");
    server.kill().unwrap();
    server.wait().unwrap();
}
