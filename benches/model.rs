//! Full-size Moondream2 benchmark on this machine (run by `scripts/bench-model`).
//!
//! Builds a checkpoint with random weights from `tests/fixtures/tensors_full.tsv`
//! (into `target/bench-model/`, not committed), loads it through the real loader, and
//! reports for a 1-crop and a 12-crop image: vision encode time, prefill time, decode
//! ms/token, seconds per short caption, peak RSS, and achieved GFLOP/s against a
//! measured matmul peak. Prints figures; asserts nothing about time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use captiond::vision::image::{DecodeLimits, Tiling};
use captiond::vision::moondream2::loader::{ModelFiles, process_rss_bytes};
use captiond::vision::moondream2::vision::VisionModel;
use captiond::vision::moondream2::{Config, GenerateOptions};
use captiond::vision::{CaptionLength, Captioner, Moondream, RunControl, Skill, SkillSettings};

/// Deterministic xorshift generator for weights.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Writes a safetensors file (F16) with random values scaled per tensor kind.
fn write_checkpoint(dir: &Path) -> std::io::Result<()> {
    let tsv = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensors_full.tsv"),
    )?;
    let mut tensors = Vec::new();
    for line in tsv.lines().filter(|l| l.starts_with("model.")) {
        let cols: Vec<&str> = line.split('\t').collect();
        let shape: Vec<usize> = cols[1]
            .trim_matches(['[', ']'])
            .split(',')
            .map(|d| d.trim().parse().unwrap_or(1))
            .collect();
        tensors.push((cols[0].to_string(), shape));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.clone(), serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let tmp = dir.join("model.safetensors.partial");
    let mut out = BufWriter::with_capacity(1 << 24, std::fs::File::create(&tmp)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let (mean, scale) = if name.ends_with(".weight") && shape.len() == 1 {
            (1.0, 0.0) // LayerNorm gain
        } else if name.ends_with(".bias") {
            (0.0, 0.0)
        } else if name.ends_with("wte") || name.ends_with("pos_emb") || name.contains("features") {
            (0.0, 0.5)
        } else {
            (0.0, (3.0 / fan_in).sqrt()) // uniform with variance 1/fan_in
        };
        let mut buf = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let v = if scale == 0.0 {
                mean
            } else {
                mean + scale * rng.next_f32()
            };
            buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(tmp, dir.join("model.safetensors"))
}

fn write_tokenizer(dir: &Path) -> std::io::Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: std::collections::HashMap<String, u32> =
        (0..51_200u32).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .map_err(std::io::Error::other)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(std::io::Error::other)
}

fn checkpoint_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-model")
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Measured f32 matmul throughput of this machine with candle (the "peak").
fn matmul_peak_gflops() -> f64 {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
    let _ = a.matmul(&b).unwrap();
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        let _ = a.matmul(&b).unwrap();
    }
    2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Analytic FLOPs of the vision encoder for `crops` crops (matmuls only).
fn vision_flops(cfg: &Config, crops: usize) -> f64 {
    let v = &cfg.vision;
    let (t, d, ff) = (
        (v.grid() * v.grid()) as f64,
        v.enc_dim as f64,
        v.enc_ff_dim as f64,
    );
    let patch = 2.0 * t * (3.0 * 196.0) * d;
    let layer = 2.0 * t * d * (3.0 * d + d + 2.0 * ff) + 4.0 * t * t * d;
    crops as f64 * (patch + v.enc_n_layers as f64 * layer)
}

/// CPU (f32) by default; `CAPTIOND_BENCH_DEVICE=cuda` on a `--features cuda` build (bf16).
fn bench_device() -> (Device, DType) {
    match std::env::var("CAPTIOND_BENCH_DEVICE").as_deref() {
        Ok("cuda") => (
            Device::new_cuda(0).expect("CUDA device (build with --features cuda)"),
            DType::BF16,
        ),
        _ => (Device::Cpu, DType::F32),
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn main() {
    let dir = checkpoint_dir();
    std::fs::create_dir_all(&dir).unwrap();
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing a full-size random checkpoint to {} (3.9 GB, once)...",
            dir.display()
        );
        let t = Instant::now();
        write_checkpoint(&dir).unwrap();
        eprintln!("  done in {:.0} s", secs(t));
    }
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["HfMoondream"], "config": {}}"#,
    )
    .unwrap();
    if !dir.join("tokenizer.json").is_file() {
        write_tokenizer(&dir).unwrap();
    }
    if std::env::args().any(|a| a == "--checkpoint-only") {
        println!("checkpoint ready in {}", dir.display());
        return;
    }
    let peak = matmul_peak_gflops();
    let files = ModelFiles {
        config: dir.join("config.json"),
        weights: vec![dir.join("model.safetensors")],
        tokenizer: Some(dir.join("tokenizer.json")),
    };
    let t = Instant::now();
    let (device, dtype) = bench_device();
    let (moondream, report) = Moondream::from_files(
        &files,
        &device,
        dtype,
        "bench".into(),
        DecodeLimits::default(),
    )
    .unwrap();
    let model = moondream.model();
    println!(
        "captiond model benchmark: full-size Moondream2 (random weights), {device:?} {dtype:?}, {} CPU threads",
        candle_core::utils::get_num_threads()
    );
    println!(
        "load: {:.1} s, {} parameters, weights {:.0} MiB, RSS after load {:.0} MiB",
        secs(t),
        report.parameters,
        report.weight_bytes as f64 / 1048576.0,
        process_rss_bytes().unwrap_or(0) as f64 / 1048576.0
    );
    println!("measured f32 matmul peak (2048³, candle): {peak:.0} GFLOP/s");
    println!(
        "{:<10} {:>7} {:>12} {:>10} {:>12} {:>10} {:>14}",
        "image", "crops", "vision s", "GFLOP/s", "prefill s", "ms/token", "short caption s"
    );
    for (label, w, h) in [("378x378", 378u32, 378u32), ("1024x768", 1024, 768)] {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        });
        let crops = model.prepare(&img);
        let tensor = VisionModel::crops_tensor(&crops, &device, dtype).unwrap();
        let encoded_crops = if crops.tiling == (Tiling { rows: 1, cols: 1 }) {
            1
        } else {
            crops.n_crops
        };
        let t = Instant::now();
        let emb = model.vision().embed(&tensor, crops.tiling).unwrap();
        device.synchronize().unwrap();
        let vision_s = secs(t);
        let gflops = vision_flops(model.config(), encoded_crops) / vision_s / 1e9;
        let t = Instant::now();
        let enc = model.encode_embeddings(&emb).unwrap();
        device.synchronize().unwrap();
        let prefill_s = secs(t);
        let n = 16;
        let opts = GenerateOptions {
            max_tokens: n,
            ..GenerateOptions::default()
        };
        let prompt = &model.config().tokenizer.templates.caption.short;
        let t = Instant::now();
        let g = model.caption_ids(&enc, prompt, &opts, &mut |_| {}).unwrap();
        let per_token = secs(t) * 1000.0 / g.ids.len().max(1) as f64;
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let settings = SkillSettings {
            max_tokens: 24,
            ..SkillSettings::default()
        };
        let t = Instant::now();
        moondream
            .run(
                png.get_ref(),
                &Skill::Caption {
                    length: CaptionLength::Short,
                },
                &settings,
                &RunControl::default(),
            )
            .unwrap();
        let caption_s = secs(t);
        println!(
            "{label:<10} {:>7} {vision_s:>12.2} {gflops:>10.0} {prefill_s:>12.2} {per_token:>10.0} {caption_s:>14.1}",
            crops.n_crops
        );
    }
    println!(
        "peak RSS: {:.0} MiB (short caption = 24 tokens, the cap; random weights never emit EOS)",
        peak_rss_mib()
    );
    println!(
        "vision GFLOP/s as a share of the matmul peak tells how much the attention and glue cost beyond matmuls."
    );
}
