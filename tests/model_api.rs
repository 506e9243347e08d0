//! The model's public API: loading by name and shape, configuration layouts, the
//! offline error, EXIF orientation, and a full caption through `Captioner`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use captiond::vision::image::{DecodeLimits, decode_rgb};
use captiond::vision::moondream2::Config;
use captiond::vision::moondream2::loader::{
    LoadError, ModelSource, check_tensors, expected_tensors, files_from_hub, read_tensor_index,
};
use captiond::vision::moondream2::precision::Precision;
use captiond::vision::{
    CaptionLength, Captioner, DeviceChoice, ModelOptions, Moondream, RunControl, Skill, SkillError,
    SkillOutput, SkillSettings,
};

fn fixture(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

#[test]
fn the_loader_expects_exactly_the_tensors_of_the_full_checkpoint() {
    let tsv = std::fs::read_to_string(fixture("tensors_full.tsv")).unwrap();
    let mut listed: HashMap<String, Vec<usize>> = HashMap::new();
    for line in tsv.lines().filter(|l| l.starts_with("model.")) {
        let cols: Vec<&str> = line.split('\t').collect();
        let shape = cols[1]
            .trim_matches(['[', ']'])
            .split(',')
            .map(|d| d.trim().parse().unwrap())
            .collect();
        listed.insert(cols[0].to_string(), shape);
    }
    assert_eq!(listed.len(), 592);
    let expected = expected_tensors(&Config::default());
    assert_eq!(expected.len(), listed.len());
    let mut params = 0u64;
    for (name, shape) in &expected {
        assert_eq!(listed.get(&format!("model.{name}")), Some(shape), "{name}");
        params += shape.iter().product::<usize>() as u64;
    }
    assert_eq!(params, 1_927_237_104);
}

#[test]
fn an_empty_hub_config_means_the_full_size_defaults() {
    let real = r#"{"architectures": ["HfMoondream"], "config": {}, "model_type": "moondream1"}"#;
    assert_eq!(
        Config::from_checkpoint_json(real).unwrap(),
        Config::default()
    );
    let tiny = std::fs::read_to_string(fixture("tiny/config.json")).unwrap();
    let direct = Config::from_checkpoint_json(&tiny).unwrap();
    let nested = Config::from_checkpoint_json(&format!(r#"{{"config": {tiny}}}"#)).unwrap();
    assert_eq!(direct, nested);
    assert_eq!(direct.text.dim, 128);
    assert_eq!(
        direct.tokenizer.templates.caption.short,
        vec![1, 408, 2, 124, 3]
    );
    let partial =
        Config::from_checkpoint_json(r#"{"config": {"vision": {"max_crops": 6}}}"#).unwrap();
    assert_eq!(partial.vision.max_crops, 6);
    assert_eq!(partial.text, Config::default().text);
    assert!(Config::from_checkpoint_json(r#"{"text": {"group_size": 128}}"#).is_err());
}

#[test]
fn every_tensor_mismatch_is_reported_at_once() {
    let found = read_tensor_index(&[fixture("tiny/model.safetensors")]).unwrap();
    let mut cfg = Config::from_checkpoint_json(
        &std::fs::read_to_string(fixture("tiny/config.json")).unwrap(),
    )
    .unwrap();
    check_tensors(&cfg, &found).unwrap();
    cfg.text.n_layers = 3;
    cfg.text.vocab_size = 600;
    let Err(LoadError::Mismatch(problems)) = check_tensors(&cfg, &found) else {
        panic!("mismatch expected")
    };
    assert!(
        problems
            .iter()
            .any(|p| p.contains("missing tensor model.text.blocks.2.attn.qkv.weight"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("model.text.wte: shape [512, 128], expected [600, 128]"))
    );
    assert_eq!(
        problems.len(),
        13,
        "10 tensors of block 2, wte, lm_head weight and bias: {problems:#?}"
    );
}

#[test]
fn offline_without_a_cached_model_says_which_files_to_place_where() {
    let empty = tempfile::tempdir().unwrap();
    let err = files_from_hub(
        "vikhyatk/moondream2",
        "2025-06-21",
        "moondream/starmie-v1",
        true,
        Some(empty.path()),
    )
    .unwrap_err();
    let msg = err.to_string();
    for needle in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "moondream/starmie-v1",
        "--model-dir",
    ] {
        assert!(msg.contains(needle), "{needle} missing from: {msg}");
    }
}

/// Corner colours of `img`: top-left, top-right, bottom-left, bottom-right.
fn corners(img: &image::RgbImage) -> [[u8; 3]; 4] {
    let (w, h) = (img.width() - 1, img.height() - 1);
    [
        img.get_pixel(1, 1).0,
        img.get_pixel(w - 1, 1).0,
        img.get_pixel(1, h - 1).0,
        img.get_pixel(w - 1, h - 1).0,
    ]
}

fn near(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) < 40)
}

#[test]
fn all_eight_exif_orientations_are_applied_before_preprocessing() {
    const TL: [u8; 3] = [255, 0, 0];
    const TR: [u8; 3] = [0, 255, 0];
    const BL: [u8; 3] = [0, 0, 255];
    const BR: [u8; 3] = [255, 255, 255];
    let stored = image::RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb(match (x < 24, y < 16) {
            (true, true) => TL,
            (false, true) => TR,
            (true, false) => BL,
            (false, false) => BR,
        })
    });
    let expected = [
        (1, [TL, TR, BL, BR]),
        (2, [TR, TL, BR, BL]),
        (3, [BR, BL, TR, TL]),
        (4, [BL, BR, TL, TR]),
        (5, [TL, BL, TR, BR]),
        (6, [BL, TL, BR, TR]),
        (7, [BR, TR, BL, TL]),
        (8, [TR, BR, TL, BL]),
    ];
    for (orientation, want) in expected {
        let img = decode_rgb(
            &common::jpeg_with_orientation(&stored, orientation),
            DecodeLimits::default(),
        )
        .unwrap();
        let swapped = orientation >= 5;
        assert_eq!(
            (img.width(), img.height()),
            if swapped { (32, 48) } else { (48, 32) },
            "orientation {orientation}"
        );
        let got = corners(&img);
        for (g, w) in got.iter().zip(want) {
            assert!(
                near(*g, w),
                "orientation {orientation}: corners {got:?}, want {want:?}"
            );
        }
    }
}

#[test]
fn images_beyond_the_decode_limits_are_refused_before_decoding() {
    let img = image::RgbImage::new(300, 200);
    let bytes = common::jpeg_with_orientation(&img, 1);
    let limits = DecodeLimits {
        max_side: 256,
        max_pixels: 1_000_000,
    };
    let err = decode_rgb(&bytes, limits).unwrap_err().to_string();
    assert!(err.contains("300x200"), "{err}");
    assert!(decode_rgb(b"", limits).is_err());
    assert!(decode_rgb(b"plain text, not an image", limits).is_err());
}

/// A word-level tokenizer over the tiny model's 512 ids, built here rather than read.
fn write_test_tokenizer(dir: &Path) {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab: HashMap<String, u32> = (0..512u32)
        .map(|i| {
            (
                if i == 0 {
                    "<eos>".to_string()
                } else {
                    format!("t{i}")
                },
                i,
            )
        })
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<eos>".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

#[test]
fn a_caption_runs_through_the_public_api_from_an_exif_rotated_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny").join(f), dir.path().join(f)).unwrap();
    }
    write_test_tokenizer(dir.path());
    let opts = ModelOptions {
        source: ModelSource::Dir(dir.path().to_path_buf()),
        offline: true,
        device: DeviceChoice::Cpu,
        precision: Precision::Auto,
        kv_cache: Default::default(),
        limits: DecodeLimits::default(),
    };
    let (model, report) = Moondream::load(&opts).unwrap();
    assert_eq!(report.parameters, 816_304);

    // Stored sideways with orientation 6 ("rotate 90° clockwise to display").
    let upright = image::open(fixture("tiny/image_wide_720x430.png"))
        .unwrap()
        .to_rgb8();
    let sideways = image::imageops::rotate270(&upright);
    let jpeg = common::jpeg_with_orientation(&sideways, 6);
    let settings = SkillSettings {
        max_tokens: 12,
        ..SkillSettings::default()
    };
    let skill = Skill::Caption {
        length: CaptionLength::Short,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctl = RunControl {
        cancel: None,
        stream: Some(tx),
    };
    let result = model.run(&jpeg, &skill, &settings, &ctl).unwrap();
    let SkillOutput::Caption { caption } = &result.output else {
        panic!("caption expected")
    };
    assert_eq!(caption.split_whitespace().count(), 12, "{caption}");
    assert!(caption.split_whitespace().all(|w| w.starts_with('t')));
    assert_eq!(result.usage.completion_tokens, 12);
    assert!(result.truncated);
    let mut streamed = String::new();
    while let Ok(chunk) = rx.try_recv() {
        streamed.push_str(&chunk);
    }
    assert_eq!(
        streamed.trim(),
        caption,
        "streamed text equals the final caption"
    );

    // The same JPEG pixels rotated by hand give the same caption: the EXIF rotation was applied.
    let plain = image::load_from_memory(&common::jpeg_with_orientation(&sideways, 1))
        .unwrap()
        .to_rgb8();
    let by_hand = image::imageops::rotate90(&plain);
    let mut png = std::io::Cursor::new(Vec::new());
    by_hand.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let again = model
        .run(png.get_ref(), &skill, &settings, &RunControl::default())
        .unwrap();
    assert_eq!(again.output, result.output);
}

fn tiny_moondream() -> Moondream {
    let opts = ModelOptions {
        source: ModelSource::Dir(fixture("tiny")),
        offline: true,
        device: DeviceChoice::Cpu,
        precision: Precision::Auto,
        kv_cache: Default::default(),
        limits: DecodeLimits::default(),
    };
    Moondream::load(&opts).unwrap().0
}

fn small_png() -> Vec<u8> {
    std::fs::read(fixture("tiny/image_small_50x40.png")).unwrap()
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_differs_from_greedy() {
    let model = tiny_moondream();
    let skill = Skill::Caption {
        length: CaptionLength::Normal,
    };
    let run = |temperature: f64, seed: u64| {
        let s = SkillSettings {
            max_tokens: 16,
            temperature,
            top_p: 0.9,
            seed,
            ..SkillSettings::default()
        };
        model
            .run(&small_png(), &skill, &s, &RunControl::default())
            .unwrap()
            .output
    };
    assert_eq!(run(1.0, 7), run(1.0, 7), "same seed, same text");
    let greedy = run(0.0, 0);
    let samples: Vec<_> = (0..4).map(|seed| run(1.5, seed)).collect();
    assert!(
        samples.iter().any(|s| *s != greedy),
        "hot sampling should leave the greedy path"
    );
}

#[test]
fn concurrent_generations_share_the_weights_and_match_a_sequential_run() {
    let model = std::sync::Arc::new(tiny_moondream());
    let skills = [
        Skill::Caption {
            length: CaptionLength::Short,
        },
        Skill::Query {
            question: "t200 t201".into(),
            reasoning: false,
        },
        Skill::Point {
            object: "t150".into(),
        },
        Skill::Detect {
            object: "t150".into(),
        },
    ];
    let settings = SkillSettings {
        max_tokens: 10,
        max_objects: 2,
        ..SkillSettings::default()
    };
    let sequential: Vec<_> = skills
        .iter()
        .map(|s| {
            model
                .run(&small_png(), s, &settings, &RunControl::default())
                .unwrap()
                .output
        })
        .collect();
    let handles: Vec<_> = skills
        .iter()
        .cloned()
        .map(|s| {
            let m = model.clone();
            std::thread::spawn(move || {
                m.run(&small_png(), &s, &settings, &RunControl::default())
                    .unwrap()
                    .output
            })
        })
        .collect();
    let parallel: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(parallel, sequential);
}

/// Polls until `n` images wait for the encode thread (it is held), or fails.
fn wait_for_encodes(model: &Moondream, n: usize) {
    for _ in 0..2000 {
        if model.engine().stats().encodes_waiting == n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("{n} encodes never waited: {:?}", model.engine().stats());
}

#[test]
fn images_waiting_together_are_encoded_in_one_pass_with_the_results_they_get_alone() {
    let model = std::sync::Arc::new(tiny_moondream());
    let wide = std::fs::read(fixture("tiny/image_wide_720x430.png")).unwrap();
    let jobs = [
        (
            wide.clone(),
            Skill::Caption {
                length: CaptionLength::Normal,
            },
        ),
        (
            small_png(),
            Skill::Query {
                question: "t200 t201".into(),
                reasoning: false,
            },
        ),
        (
            wide,
            Skill::Detect {
                object: "t150".into(),
            },
        ),
        (
            small_png(),
            Skill::Point {
                object: "t150".into(),
            },
        ),
    ];
    let settings = SkillSettings {
        max_tokens: 12,
        max_objects: 2,
        ..SkillSettings::default()
    };
    let alone: Vec<_> = jobs
        .iter()
        .map(|(img, s)| {
            model
                .run(img, s, &settings, &RunControl::default())
                .unwrap()
                .output
        })
        .collect();
    let before = model.engine().stats();
    assert_eq!(
        before.largest_encode, 1,
        "alone, one image per pass: {before:?}"
    );
    let hold = model.engine().hold_encodes();
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(img, s)| {
            let m = model.clone();
            std::thread::spawn(move || m.run(&img, &s, &settings, &RunControl::default()))
        })
        .collect();
    wait_for_encodes(&model, jobs.len());
    drop(hold);
    let together: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap().output)
        .collect();
    assert_eq!(together, alone);
    let after = model.engine().stats();
    assert_eq!(after.encode_passes, before.encode_passes + 1, "{after:?}");
    assert_eq!(after.largest_encode, jobs.len(), "{after:?}");
    assert_eq!(after.images_encoded, 2 * jobs.len() as u64, "{after:?}");
}

#[test]
fn an_out_of_memory_error_in_a_batched_encode_fails_each_of_its_images_as_out_of_memory() {
    let model = std::sync::Arc::new(tiny_moondream());
    let skill = Skill::Caption {
        length: CaptionLength::Short,
    };
    let settings = SkillSettings {
        max_tokens: 4,
        ..SkillSettings::default()
    };
    let hold = model.engine().hold_encodes();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (m, s) = (model.clone(), skill.clone());
            std::thread::spawn(move || m.run(&small_png(), &s, &settings, &RunControl::default()))
        })
        .collect();
    wait_for_encodes(&model, 2);
    model
        .engine()
        .fail_next_encode("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected)");
    drop(hold);
    for h in handles {
        match h.join().unwrap() {
            Err(SkillError::OutOfMemory(msg)) => assert!(msg.contains("injected"), "{msg}"),
            other => panic!("expected an out-of-memory error, got {other:?}"),
        }
    }
    // The engine goes on: the next encode succeeds.
    let ok = model.run(&small_png(), &skill, &settings, &RunControl::default());
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(model.engine().stats().largest_encode, 2);
}

#[test]
fn an_image_that_fails_in_a_batched_encode_fails_alone_and_the_others_are_encoded() {
    use captiond::vision::image::Tiling;
    use captiond::vision::moondream2::vision::VisionModel;
    let model = tiny_moondream();
    let m = model.model();
    let good = |name: &str| {
        let bytes = std::fs::read(fixture(&format!("tiny/{name}"))).unwrap();
        let crops = m.prepare(&decode_rgb(&bytes, DecodeLimits::default()).unwrap());
        let t = VisionModel::crops_tensor(&crops, m.device(), m.dtype()).unwrap();
        (t, crops.tiling)
    };
    // Crops of the wrong size: the pass that holds them cannot stack its crops.
    let bad = (
        candle_core::Tensor::zeros((1, 3, 10, 10), m.dtype(), m.device()).unwrap(),
        Tiling { rows: 1, cols: 1 },
    );
    let inputs = [
        good("image_small_50x40.png"),
        bad,
        good("image_wide_720x430.png"),
    ];
    let engine = model.engine();
    let hold = engine.hold_encodes();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .cloned()
            .map(|(t, tiling)| s.spawn(move || engine.encode(t, tiling)))
            .collect();
        wait_for_encodes(&model, inputs.len());
        drop(hold);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results[0].is_ok(), "{:?}", results[0].as_ref().err());
    assert!(results[1].is_err(), "the bad image fails");
    assert!(results[2].is_ok(), "{:?}", results[2].as_ref().err());
    let stats = engine.stats();
    assert_eq!(stats.largest_encode, 3, "{stats:?}");
    // One failed pass of three, then each alone: two encoded.
    assert_eq!(
        (stats.encode_passes, stats.images_encoded),
        (4, 2),
        "{stats:?}"
    );
}
