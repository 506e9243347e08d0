//! Full-size Moondream2 benchmark on this machine (run by `scripts/bench-model`).
//!
//! Builds a checkpoint with random weights from `tests/fixtures/tensors_full.tsv`
//! (into `target/bench-model/`, not committed). Measures this machine's limits in the
//! same run (f32 and bf16 matmul peaks, the bf16 instruction peak, memory bandwidth),
//! then for each weight format (`--dtype f32,bf16,q8,auto`, each in its own process so
//! that peak RSS is its own) loads the checkpoint through the real loader and reports,
//! for a 1-crop and a 12-crop image: vision encode, prefill, decode ms/token, seconds
//! per short caption, load time, RSS after load and peak RSS, each stage as a fraction
//! of the limit that binds it. `--service` also times `POST /v1/caption` against
//! `captiond serve` (the path users run). `--batch 1,2,4,8` instead sweeps batched
//! decoding (tokens/s and images/s per batch size, beside batch 1), on the CPU or, with
//! `CAPTIOND_BENCH_DEVICE=cuda`, the GPU. Prints figures; asserts nothing about time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::process::Command;

use candle_core::{Device, Tensor};
use captiond::vision::image::{DecodeLimits, Tiling};
use captiond::vision::moondream2::batch::decode_together;
use captiond::vision::moondream2::kernels::{self, PackedBf16, PackedWeight};
use captiond::vision::moondream2::loader::{ModelFiles, process_rss_bytes};
use captiond::vision::moondream2::precision::{LoadPlan, Precision};
use captiond::vision::moondream2::vision::VisionModel;
use captiond::vision::moondream2::{Config, GenerateOptions};
use captiond::vision::{CaptionLength, Captioner, Moondream, RunControl, Skill, SkillSettings};
use captiond::workers::vram::{NvmlProbe, VramProbe};

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

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// This machine's limits, measured at the start of the run.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// candle's f32 matmul, 2048³.
    f32_gemm: f64,
    /// captiond's bf16 kernel, 2048³.
    bf16_gemm: f64,
    /// bf16 multiply-adds with operands in registers.
    bf16_instr: f64,
    /// Bytes read per second from a 2 GiB buffer by all threads.
    bandwidth: f64,
}

impl Limits {
    fn measure() -> Self {
        let n = 2048;
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).unwrap();
        let flops = 2.0 * (n as f64).powi(3);
        let f32_gemm = best_rate(flops, || {
            let _ = a.matmul(&b).unwrap();
        });
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = PackedWeight::Bf16(PackedBf16::from_rows(&av, n, n));
        let mut out = vec![0f32; n * n];
        let bf16_gemm = best_rate(flops, || kernels::matmul(&av, n, &w, None, &mut out));
        let bf16_instr =
            kernels::instruction_peak_gflops(kernels::isa(), std::time::Duration::from_millis(500))
                .map(|g| g * 1e9)
                .unwrap_or(0.0);
        Self {
            f32_gemm,
            bf16_gemm,
            bf16_instr,
            bandwidth: bandwidth(),
        }
    }

    fn to_env(self) -> String {
        format!(
            "{} {} {} {}",
            self.f32_gemm, self.bf16_gemm, self.bf16_instr, self.bandwidth
        )
    }

    fn from_env(s: &str) -> Option<Self> {
        let v: Vec<f64> = s.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [f32_gemm, bf16_gemm, bf16_instr, bandwidth] = v[..] else {
            return None;
        };
        Some(Self {
            f32_gemm,
            bf16_gemm,
            bf16_instr,
            bandwidth,
        })
    }
}

/// The decode step's two memory-bound kernels, streaming from memory (not cache): q8
/// products at 1–8 rows over 285 MB of weights in the MLP's two shapes (fc1's short
/// rows, fc2's long ones), and one sequence's attention over a 730-position KV cache of
/// 24 layers × 32 heads (143 MB in bf16, 76 MB in 8 bits).
fn decode_kernels() {
    for (k, n) in [(2048, 8192), (8192, 2048)] {
        q8_products(k, n, 16);
    }
    decode_attention();
}

/// q8 products of 1, 2, 4 and 8 rows over `mats` matrices `k → n`.
fn q8_products(k: usize, n: usize, mats: usize) {
    let ws: Vec<PackedWeight> = (0..mats)
        .map(|j| {
            let w: Vec<f32> = (0..n * k)
                .map(|i| (((i + j) % 89) as f32 - 44.0) / 89.0)
                .collect();
            PackedWeight::Q8(kernels::PackedQ8::from_rows(&w, n, k))
        })
        .collect();
    let bytes: usize = ws.iter().map(PackedWeight::bytes).sum();
    for m in [1usize, 2, 4, 8] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let mut out = vec![0f32; m * n];
        let rate = best_rate(bytes as f64, || {
            for w in &ws {
                kernels::matmul(&a, m, w, None, &mut out);
            }
        });
        println!(
            "q8 products, {m} row(s) × {k} → {n}, {mats} matrices ({:.0} MB): {:.2} ms, {:.1} GB/s",
            bytes as f64 / 1e6,
            bytes as f64 / rate * 1e3,
            rate / 1e9
        );
    }
}

/// One sequence's decode attention over a 730-position cache, bf16 then 8-bit rows.
fn decode_attention() {
    let (len, dim, heads, layers) = (730usize, 64usize, 32usize, 24usize);
    let rows = |seed: usize| -> Vec<u16> {
        (0..len * dim)
            .map(|i| half::bf16::from_f32((((i + seed) % 83) as f32 - 41.0) / 83.0).to_bits())
            .collect()
    };
    let ks: Vec<Vec<Vec<u16>>> = (0..layers)
        .map(|l| (0..heads).map(|h| rows(l * heads + h)).collect())
        .collect();
    let vs: Vec<Vec<Vec<u16>>> = (0..layers)
        .map(|l| (0..heads).map(|h| rows(7 + l * heads + h)).collect())
        .collect();
    let q: Vec<f32> = (0..heads * dim)
        .map(|i| ((i % 31) as f32 - 15.0) / 64.0)
        .collect();
    let mut out = vec![0f32; heads * dim];
    let cache = (layers * heads * len * dim * 2 * 2) as f64;
    let rate = best_rate(cache, || {
        for (kl, vl) in ks.iter().zip(&vs) {
            let k: Vec<kernels::KvRows> = kl.iter().map(|r| kernels::KvRows::Bf16(r)).collect();
            let v: Vec<kernels::KvRows> = vl.iter().map(|r| kernels::KvRows::Bf16(r)).collect();
            kernels::attend_one(&q, &k, &v, dim, &mut out);
        }
    });
    println!(
        "decode attention, one sequence, {len} positions × {layers} layers × {heads} heads ({:.0} MB bf16): {:.2} ms, {:.1} GB/s",
        cache / 1e6,
        cache / rate * 1e3,
        rate / 1e9
    );
    // The same cache in 8 bits with a scale per row (--kv-cache q8).
    let q8 = |rows: &[u16]| -> (Vec<i8>, Vec<f32>) {
        let mut q = Vec::with_capacity(rows.len());
        let mut scale = Vec::with_capacity(rows.len() / dim);
        for row in rows.chunks_exact(dim) {
            let f: Vec<f32> = row
                .iter()
                .map(|b| half::bf16::from_bits(*b).to_f32())
                .collect();
            let s = f.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            q.extend(f.iter().map(|x| (x / s).round() as i8));
            scale.push(s);
        }
        (q, scale)
    };
    let per_layer = |all: &[Vec<Vec<u16>>]| -> Vec<Vec<(Vec<i8>, Vec<f32>)>> {
        all.iter()
            .map(|l| l.iter().map(|r| q8(r)).collect())
            .collect()
    };
    let (kq, vq) = (per_layer(&ks), per_layer(&vs));
    let rows8 = |h: &(Vec<i8>, Vec<f32>)| -> usize { h.0.len() + 4 * h.1.len() };
    let cache8: usize = kq.iter().chain(&vq).flatten().map(rows8).sum();
    let cache8 = cache8 as f64;
    let rate = best_rate(cache8, || {
        fn view(l: &[(Vec<i8>, Vec<f32>)]) -> Vec<kernels::KvRows<'_>> {
            l.iter()
                .map(|(q, scale)| kernels::KvRows::Q8 { q, scale })
                .collect()
        }
        for (kl, vl) in kq.iter().zip(&vq) {
            kernels::attend_one(&q, &view(kl), &view(vl), dim, &mut out);
        }
    });
    println!(
        "decode attention, one sequence, same cache in 8 bits ({:.0} MB): {:.2} ms, {:.1} GB/s",
        cache8 / 1e6,
        cache8 / rate * 1e3,
        rate / 1e9
    );
}

/// Best rate of 5 timed runs (after one warm-up), in operations per second.
fn best_rate(ops: f64, mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            ops / secs(t)
        })
        .fold(0.0, f64::max)
}

/// Read bandwidth: every thread sums its share of a 2 GiB buffer; best of 3.
fn bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf: Vec<u64> = (0..(2usize << 30) / 8)
        .into_par_iter()
        .map(|i| i as u64)
        .collect();
    let bytes = (buf.len() * 8) as f64;
    best_rate(bytes, || {
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |s, x| s.wrapping_add(*x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
    })
}

/// Analytic FLOPs of the text prefill of `t` positions (matmuls only).
fn prefill_flops(cfg: &Config, t: usize) -> f64 {
    let c = &cfg.text;
    let (t, d, ff) = (t as f64, c.dim as f64, c.ff_dim as f64);
    let qkv = ((c.n_heads + 2 * c.n_kv_heads) * 64) as f64;
    let layer = 2.0 * t * d * (qkv + d + 2.0 * ff) + 4.0 * t * t * d;
    c.n_layers as f64 * layer
}

/// Bytes of text weights read per decoded token (the Linear weights and the head).
fn decode_weight_bytes(cfg: &Config, precision: Precision) -> f64 {
    let c = &cfg.text;
    let qkv = (c.n_heads + 2 * c.n_kv_heads) * 64;
    let per_layer = c.dim * qkv + c.dim * c.dim + 2 * c.dim * c.ff_dim;
    let params = (c.n_layers * per_layer + c.dim * c.vocab_size) as f64;
    params
        * match precision {
            Precision::F32 => 4.0,
            Precision::Bf16 => 2.0,
            _ => 17.0 / 16.0,
        }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

const IMAGES: [(&str, u32, u32); 2] = [("378x378", 378, 378), ("1024x768", 1024, 768)];
const CAPTION_TOKENS: usize = 24;
const DECODE_STEPS: usize = 16;

/// One weight format, in this process: prints a block and `ROW` lines for the summary.
fn run_mode(precision: Precision, limits: Limits, files: &ModelFiles) {
    let device = Device::Cpu;
    let plan = precision.plan(&device).unwrap();
    let t = Instant::now();
    let (moondream, report) = Moondream::from_files(
        files,
        &device,
        &plan,
        "bench".into(),
        DecodeLimits::default(),
    )
    .unwrap();
    let load_s = secs(t);
    let rss_after = process_rss_bytes().unwrap_or(0) as f64;
    let model = moondream.model();
    let cfg = model.config();
    let resolved = plan.precision;
    let (peak, peak_name) = match resolved {
        Precision::F32 => (limits.f32_gemm, "f32 GEMM peak"),
        _ => (limits.bf16_gemm, "bf16 GEMM peak"),
    };
    println!(
        "\n== --dtype {precision} → {resolved}: {} ({})",
        plan.why,
        kernels::isa().best()
    );
    println!(
        "load {load_s:.1} s; weights {:.2} GiB; RSS after load {:.2} GiB",
        gib(report.weight_bytes as f64),
        gib(rss_after)
    );
    println!(
        "{:<9} {:>5} {:>9} {:>13} {:>10} {:>13} {:>9} {:>17} {:>10}",
        "image",
        "crops",
        "vision s",
        "% of peak",
        "prefill s",
        "% of peak",
        "ms/token",
        "% of bandwidth",
        "caption s"
    );
    for (label, w, h) in IMAGES {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        });
        let crops = model.prepare(&img);
        let tensor = VisionModel::crops_tensor(&crops, &device, model.dtype()).unwrap();
        let encoded_crops = if crops.tiling == (Tiling { rows: 1, cols: 1 }) {
            1
        } else {
            crops.n_crops
        };
        let t = Instant::now();
        let emb = model.vision().embed(&tensor, crops.tiling).unwrap();
        let vision_s = secs(t);
        let vision_share = vision_flops(cfg, encoded_crops) / vision_s / peak;
        let t = Instant::now();
        let enc = model.encode_embeddings(&emb).unwrap();
        let prefill_s = secs(t);
        let prefill_share = prefill_flops(cfg, cfg.prefix_len()) / prefill_s / peak;
        let mut cache = enc.into_cache();
        let prompt = &cfg.tokenizer.templates.caption.short;
        model
            .text()
            .feed(
                &model.text().embed(prompt).unwrap(),
                &mut cache,
                cfg.prefix_len(),
            )
            .unwrap();
        let t = Instant::now();
        for i in 0..DECODE_STEPS {
            let e = model.text().embed(&[(i as u32 * 7919) % 51_200]).unwrap();
            model.text().feed(&e, &mut cache, cfg.prefix_len()).unwrap();
        }
        let token_s = secs(t) / DECODE_STEPS as f64;
        let bw_share = decode_weight_bytes(cfg, resolved) / token_s / limits.bandwidth;
        // Only the caption below should be resident from here (peak RSS = user path,
        // which also hands the image prefix to its one generation instead of copying it).
        drop((cache, emb, tensor));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let (skill, settings) = short_caption();
        let t = Instant::now();
        moondream
            .run(png.get_ref(), &skill, &settings, &RunControl::default())
            .unwrap();
        let caption_s = secs(t);
        println!(
            "{label:<9} {:>5} {vision_s:>9.2} {:>12.0}% {prefill_s:>10.2} {:>12.0}% {:>9.0} {:>16.0}% {caption_s:>10.1}",
            crops.n_crops,
            100.0 * vision_share,
            100.0 * prefill_share,
            token_s * 1000.0,
            100.0 * bw_share,
        );
        println!(
            "ROW\t{precision}\t{resolved}\t{label}\t{}\t{vision_s:.2}\t{:.0}\t{prefill_s:.2}\t{:.0}\t{:.0}\t{:.0}\t{caption_s:.1}\t{load_s:.1}\t{:.2}",
            crops.n_crops,
            100.0 * vision_share,
            100.0 * prefill_share,
            token_s * 1000.0,
            100.0 * bw_share,
            gib(rss_after),
        );
    }
    let peak_rss = peak_rss_mib() / 1024.0;
    println!("peak RSS {peak_rss:.2} GiB (vision and prefill against the {peak_name})");
    println!("PEAK\t{precision}\t{peak_rss:.2}");
}

/// The short caption of `CAPTION_TOKENS` tokens every caption figure is timed on.
fn short_caption() -> (Skill, SkillSettings) {
    (
        Skill::Caption {
            length: CaptionLength::Short,
        },
        SkillSettings {
            max_tokens: CAPTION_TOKENS,
            ..SkillSettings::default()
        },
    )
}

/// A 1-crop test photo, different for each `seed`.
fn one_crop_png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(378, 378, |x, y| {
        image::Rgb([
            (x % 251) as u8,
            (y % 241) as u8,
            ((x * seed + y) % 239) as u8,
        ])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    png.into_inner()
}

/// `precision`'s plan on `device`, with the KV cache format of `--kv-cache` (default
/// auto).
fn plan_with_kv(precision: Precision, device: &Device) -> LoadPlan {
    let mut plan = precision.plan(device).unwrap();
    if let Some(kv) = arg_value("--kv-cache") {
        plan.formats.kv = kv.parse().unwrap();
    }
    plan
}

/// Batched decoding at each size in `sizes`, beside batch 1: (a) the model path, one
/// 1-crop image encoded once and `b` short-caption sequences decoded together (decode
/// ms/step, tokens/s), and `b` distinct 1-crop images encoded (vision and prefix
/// prefill) in one pass (seconds per image); (b) the path users run, `b` threads each captioning its own
/// 1-crop PNG through `Captioner::run`, their answers batched by the decode engine
/// (images/s). On CUDA, also the device memory in use at each size (NVML).
fn run_batches(files: &ModelFiles, device: &Device, precision: Precision, sizes: &[usize]) {
    let plan = plan_with_kv(precision, device);
    let (moondream, _) = Moondream::from_files(
        files,
        device,
        &plan,
        "bench".into(),
        DecodeLimits::default(),
    )
    .unwrap();
    let nvml = if device.is_cuda() {
        NvmlProbe::new(0).ok()
    } else {
        None
    };
    let vram_mib = || {
        nvml.as_ref()
            .and_then(|p| p.read())
            .map(|r| format!("{}", r.used >> 20))
            .unwrap_or_else(|| "-".into())
    };
    let model = moondream.model();
    let cfg = model.config();
    println!(
        "== batched decoding, --dtype {precision} → {}, KV cache {} on {device:?} ({}); short caption of {CAPTION_TOKENS} tokens on 1-crop 378×378 images; device memory after load {} MiB",
        plan.precision,
        plan.formats.kv,
        plan.why,
        vram_mib()
    );
    let img = image::load_from_memory(&one_crop_png(0)).unwrap().to_rgb8();
    let t = Instant::now();
    let enc = model.encode_image(&img).unwrap();
    let _ = device.synchronize();
    let encode_s = secs(t);
    let prompt = model
        .text()
        .embed(&cfg.tokenizer.templates.caption.short)
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: CAPTION_TOKENS,
        ..GenerateOptions::default()
    };
    println!("vision + prefix prefill of one image (first call): {encode_s:.2} s");
    // Distinct 1-crop images for the batched encodes (vision and prefill of b at once).
    let most = sizes.iter().copied().max().unwrap_or(1);
    let inputs: Vec<(Tensor, Tiling)> = (0..most as u32)
        .map(|i| {
            let img = image::load_from_memory(&one_crop_png(100 + i))
                .unwrap()
                .to_rgb8();
            let crops = model.prepare(&img);
            let t = VisionModel::crops_tensor(&crops, device, model.dtype()).unwrap();
            (t, crops.tiling)
        })
        .collect();
    println!(
        "{:>5} {:>12} {:>10} {:>9} {:>11} {:>9} {:>16} {:>11} {:>9} {:>9}",
        "batch",
        "ms/step",
        "tokens/s",
        "× b=1",
        "enc s/img",
        "× b=1",
        "e2e images/s",
        "× b=1",
        "e2e s",
        "MiB used"
    );
    let (mut base_tps, mut base_ips, mut base_enc) = (0.0, 0.0, 0.0);
    let mut rows = Vec::new();
    for &b in sizes {
        // Vision and prefix prefill of b images in one pass, per image.
        let t = Instant::now();
        let encoded = model.encode_many(&inputs[..b]).unwrap();
        let _ = device.synchronize();
        let enc_s = secs(t) / b as f64;
        drop(encoded);
        let (ms_step, tps) = timed_decode(model, &enc, &prompt, &opts, b, device);
        // End to end: b callers at once, each its own image, as b workers would.
        let pngs: Vec<Vec<u8>> = (0..b as u32).map(|i| one_crop_png(i + 1)).collect();
        let (skill, settings) = short_caption();
        let t = Instant::now();
        let peak_used = std::thread::scope(|s| {
            let runs: Vec<_> = pngs
                .iter()
                .map(|png| {
                    let (m, skill, settings) = (&moondream, &skill, &settings);
                    s.spawn(move || m.run(png, skill, settings, &RunControl::default()).unwrap())
                })
                .collect();
            let mut peak = 0u64;
            while !runs.iter().all(|h| h.is_finished()) {
                if let Some(r) = nvml.as_ref().and_then(|p| p.read()) {
                    peak = peak.max(r.used);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            peak
        });
        let e2e_s = secs(t);
        let ips = b as f64 / e2e_s;
        if b == 1 || base_tps == 0.0 {
            (base_tps, base_ips, base_enc) = (tps, ips, enc_s);
        }
        let peak = if nvml.is_some() {
            format!("{}", peak_used >> 20)
        } else {
            "-".to_string()
        };
        println!(
            "{b:>5} {:>12.1} {tps:>10.1} {:>8.2}× {enc_s:>11.2} {:>8.2}× {ips:>16.3} {:>10.2}× {e2e_s:>9.1} {peak:>9}",
            ms_step,
            tps / base_tps,
            base_enc / enc_s,
            ips / base_ips,
        );
        rows.push(format!(
            "| {b} | {:.1} | {tps:.1} | {:.2}× | {enc_s:.2} | {:.2}× | {ips:.3} | {:.2}× | {peak} |",
            ms_step,
            tps / base_tps,
            base_enc / enc_s,
            ips / base_ips
        ));
    }
    println!("engine: {:?}", moondream.engine().stats());
    let interleaved = interleaved_decode(model, &enc, &prompt, &opts, sizes, device);
    println!("\nsummary (markdown):\n");
    println!(
        "| batch | decode ms/step | decode tokens/s | × batch 1 | encode s/image (b together) | × batch 1 | images/s (end to end) | × batch 1 | device MiB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!("{r}");
    }
    if !interleaved.is_empty() {
        println!(
            "\n| batch | decode ms/step, median (min–max) | decode tokens/s, median | × batch 1 | × batch 1, median of rounds |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: |");
        for r in interleaved {
            println!("{r}");
        }
    }
}

/// `b` sequences of the encoded image `enc` answering `prompt`, decoded together:
/// milliseconds per step and tokens per second.
fn timed_decode(
    model: &captiond::vision::moondream2::Moondream2,
    enc: &captiond::vision::moondream2::EncodedImage,
    prompt: &Tensor,
    opts: &GenerateOptions,
    b: usize,
    device: &Device,
) -> (f64, f64) {
    let seqs: Vec<_> = (0..b)
        .map(|_| model.begin_answer(enc.cache(), prompt, opts).unwrap())
        .collect();
    let t = Instant::now();
    let gens = decode_together(model, seqs).unwrap();
    let _ = device.synchronize();
    let s = secs(t);
    let tokens: usize = gens.iter().map(|g| g.ids.len()).sum();
    // The last token of each caption is emitted without a further forward pass.
    let steps = gens.iter().map(|g| g.ids.len()).max().unwrap_or(1).max(2) - 1;
    (s * 1000.0 / steps as f64, tokens as f64 / s)
}

/// Decode alone once more, the sizes interleaved round by round (`--rounds N`, default
/// 5; 0 skips), so that a machine whose speed drifts (a shared VM) slows every size
/// alike: each size's median ms/step, its spread, the ratio of median tokens/s to the
/// first size's, and the median of each round's own ratio. Returns the markdown rows.
fn interleaved_decode(
    model: &captiond::vision::moondream2::Moondream2,
    enc: &captiond::vision::moondream2::EncodedImage,
    prompt: &Tensor,
    opts: &GenerateOptions,
    sizes: &[usize],
    device: &Device,
) -> Vec<String> {
    let rounds: usize = arg_value("--rounds")
        .map(|r| r.parse().expect("--rounds N"))
        .unwrap_or(5);
    if rounds == 0 {
        return Vec::new();
    }
    // Per size: (ms per step, tokens/s) of each round. The order of the sizes flips
    // from round to round: a run tends to go a few per cent faster right after another
    // (warm caches, allocator state), and a fixed order would hand that to the larger
    // sizes every time.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); sizes.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            runs[i].push(timed_decode(model, enc, prompt, opts, sizes[i], device));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    println!(
        "decode alone, the sizes interleaved over {rounds} rounds (order flipped each round): \
         median ms/step (min–max), median tokens/s, × batch 1, median of the rounds' own × batch 1"
    );
    // The first size's runs, to pair each round with (the ratio within a round).
    let first: Vec<f64> = runs
        .first()
        .map(|r| r.iter().map(|x| x.1).collect())
        .unwrap_or_default();
    let mut base = 0.0;
    let mut rows = Vec::new();
    for (&b, r) in sizes.iter().zip(&runs) {
        let paired = median(r.iter().zip(&first).map(|(x, f)| x.1 / f).collect());
        let ms: Vec<f64> = r.iter().map(|x| x.0).collect();
        let (lo, hi) = (
            ms.iter().copied().fold(f64::INFINITY, f64::min),
            ms.iter().copied().fold(0.0, f64::max),
        );
        let (ms, tps) = (median(ms), median(r.iter().map(|x| x.1).collect()));
        if b == 1 || base == 0.0 {
            base = tps;
        }
        println!(
            "{b:>5} {ms:>8.1} ({lo:.1}–{hi:.1}) {tps:>8.1} {:>6.2}× {paired:>6.2}×",
            tps / base
        );
        rows.push(format!(
            "| {b} | {ms:.1} ({lo:.1}–{hi:.1}) | {tps:.1} | {:.2}× | {paired:.2}× |",
            tps / base
        ));
    }
    rows
}

/// `POST /v1/caption` against `captiond serve` on the checkpoint: one warm-up, then
/// three timed requests (a 300×200 PNG, short, 20 tokens, greedy, one worker).
fn run_service(precision: Precision, dir: &Path) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/captiond");
    if !bin.is_file() {
        println!(
            "service: {} missing (cargo build --release); skipped",
            bin.display()
        );
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(&bin)
        .args(["serve", "--model-dir"])
        .arg(dir)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "1",
            "--dtype",
            &precision.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let img = image::RgbImage::from_fn(300, 200, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, 77])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    use base64::Engine;
    let body = serde_json::json!({
        "image_url": format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png.get_ref())),
        "length": "short",
        "settings": {"max_tokens": 20, "temperature": 0},
    });
    let times: Vec<f64> = rt.block_on(async {
        let client = reqwest::Client::new();
        let t = Instant::now();
        while client
            .get(format!("{base}/ready"))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        println!("service ({precision}): ready after {:.1} s", secs(t));
        let mut out = Vec::new();
        for i in 0..4 {
            let t = Instant::now();
            let r = client
                .post(format!("{base}/v1/caption"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "caption request failed: {}",
                r.status()
            );
            let _ = r.bytes().await;
            if i > 0 {
                out.push(secs(t));
            }
        }
        out
    });
    let _ = child.kill();
    let _ = child.wait();
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "service ({precision}): POST /v1/caption 300x200 short, 20 tokens: {}; best {best:.1} s",
        times
            .iter()
            .map(|t| format!("{t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("SERVICE\t{precision}\t{best:.1}");
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    // As `captiond` does (peak RSS figures are the service's).
    captiond::vision::moondream2::loader::single_heap_arena();
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
    let files = ModelFiles {
        config: dir.join("config.json"),
        weights: vec![dir.join("model.safetensors")],
        tokenizer: Some(dir.join("tokenizer.json")),
    };
    if std::env::args().any(|a| a == "--kernels") {
        // bf16 kernel throughput on the model's shapes (rows × inputs → outputs), then
        // the decode step's memory-bound kernels.
        for (m, k, n) in [
            (2048, 2048, 2048),
            (730, 2048, 6144),
            (730, 8192, 2048),
            (729, 1152, 4304),
            (9477, 1152, 3456),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let w = PackedWeight::Bf16(PackedBf16::from_rows(&w, n, k));
            let mut out = vec![0f32; m * n];
            let rate = best_rate(2.0 * (m * n * k) as f64, || {
                kernels::matmul(&a, m, &w, None, &mut out)
            });
            println!("{m:>5} × {k:>5} → {n:>5}: {:>6.0} GFLOP/s", rate / 1e9);
        }
        decode_kernels();
        return;
    }
    if let Some(steps) = arg_value("--decode-only") {
        // For profilers: load in the given --dtype, encode one image, decode `steps`
        // tokens for `--batch B` sequences together (default 1).
        let precision: Precision = arg_value("--dtype")
            .unwrap_or_else(|| "auto".into())
            .parse()
            .unwrap();
        let batch: usize = arg_value("--batch")
            .and_then(|b| b.parse().ok())
            .unwrap_or(1);
        let plan = plan_with_kv(precision, &Device::Cpu);
        let (md, _) = Moondream::from_files(
            &files,
            &Device::Cpu,
            &plan,
            "bench".into(),
            DecodeLimits::default(),
        )
        .unwrap();
        let m = md.model();
        let img = image::RgbImage::from_fn(378, 378, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, 3])
        });
        let enc = m.encode_image(&img).unwrap();
        let steps: usize = steps.parse().unwrap();
        let prompt = m.text().embed(&[1]).unwrap();
        let opts = GenerateOptions {
            max_tokens: steps + 1,
            ..GenerateOptions::default()
        };
        let seqs = (0..batch)
            .map(|_| m.begin_answer(enc.cache(), &prompt, &opts).unwrap())
            .collect();
        let t = Instant::now();
        decode_together(m, seqs).unwrap();
        println!(
            "{:.1} ms/step for {batch} sequences",
            secs(t) * 1000.0 / steps as f64
        );
        return;
    }
    if let Some(list) = arg_value("--batch") {
        let sizes: Vec<usize> = list.split(',').map(|b| b.parse().unwrap()).collect();
        let cuda = std::env::var("CAPTIOND_BENCH_DEVICE").as_deref() == Ok("cuda");
        let device = if cuda {
            Device::new_cuda(0).expect("CUDA device (build with --features cuda)")
        } else {
            Device::Cpu
        };
        let precision: Precision = arg_value("--dtype")
            .unwrap_or_else(|| "auto".into())
            .parse()
            .unwrap();
        run_batches(&files, &device, precision, &sizes);
        return;
    }
    if let Some(mode) = arg_value("--child") {
        let limits = Limits::from_env(&std::env::var("CAPTIOND_BENCH_LIMITS").unwrap_or_default())
            .expect("CAPTIOND_BENCH_LIMITS from the parent run");
        run_mode(mode.parse().unwrap(), limits, &files);
        return;
    }
    if std::env::var("CAPTIOND_BENCH_DEVICE").as_deref() == Ok("cuda") {
        cuda_run(&files);
        return;
    }
    let modes: Vec<Precision> = arg_value("--dtype")
        .unwrap_or_else(|| "f32,bf16,q8,auto".into())
        .split(',')
        .map(|m| m.parse().unwrap())
        .collect();
    println!(
        "captiond model benchmark: full-size Moondream2 (random weights), CPU, {} threads, kernels {:?}",
        candle_core::utils::get_num_threads(),
        kernels::isa()
    );
    let limits = Limits::measure();
    println!(
        "limits of this machine, measured now: f32 matmul {:.0} GFLOP/s (candle, 2048³); \
         bf16 matmul {:.0} GFLOP/s (captiond kernels, 2048³); bf16 instruction peak {:.0} GFLOP/s \
         (registers only); read bandwidth {:.1} GB/s",
        limits.f32_gemm / 1e9,
        limits.bf16_gemm / 1e9,
        limits.bf16_instr / 1e9,
        limits.bandwidth / 1e9
    );
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for mode in &modes {
        let out = Command::new(&exe)
            .args(["--bench", "--child", &mode.to_string()])
            .env("CAPTIOND_BENCH_LIMITS", limits.to_env())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for line in text.lines() {
            if line.starts_with("ROW\t") || line.starts_with("PEAK\t") {
                rows.push(line.to_string());
            } else {
                println!("{line}");
            }
        }
        if !out.status.success() {
            println!(
                "--dtype {mode} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if std::env::args().any(|a| a == "--service") {
        for mode in &modes {
            println!();
            run_service(*mode, &dir);
        }
    }
    println!("\nsummary (markdown):\n");
    println!(
        "| --dtype | image | crops | vision s | % of peak | prefill s | % of peak | decode ms/token | % of bandwidth | short caption s | load s | RSS after load GiB | peak RSS GiB |"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows.iter().filter(|r| r.starts_with("ROW\t")) {
        let c: Vec<&str> = row.split('\t').collect();
        let peak = rows
            .iter()
            .find(|r| r.starts_with(&format!("PEAK\t{}\t", c[1])))
            .and_then(|r| r.split('\t').nth(2))
            .unwrap_or("?");
        let mode = if c[1] == c[2] {
            c[1].to_string()
        } else {
            format!("{} ({})", c[1], c[2])
        };
        println!(
            "| {mode} | {} | {} | {} | {} % | {} | {} % | {} | {} % | {} | {} | {} | {peak} |",
            c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13]
        );
    }
}

/// The earlier single-mode run on CUDA (bf16), for `scripts/gpu-check`.
fn cuda_run(files: &ModelFiles) {
    let device = Device::new_cuda(0).expect("CUDA device (build with --features cuda)");
    let plan = Precision::Auto.plan(&device).unwrap();
    let t = Instant::now();
    let (moondream, report) = Moondream::from_files(
        files,
        &device,
        &plan,
        "bench".into(),
        DecodeLimits::default(),
    )
    .unwrap();
    println!(
        "CUDA {}: load {:.1} s, device memory after load {:?} bytes",
        plan.precision,
        secs(t),
        report.device_used_bytes
    );
    let model = moondream.model();
    for (label, w, h) in IMAGES {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, 9])
        });
        let crops = model.prepare(&img);
        let tensor = VisionModel::crops_tensor(&crops, &device, model.dtype()).unwrap();
        let t = Instant::now();
        let emb = model.vision().embed(&tensor, crops.tiling).unwrap();
        device.synchronize().unwrap();
        let vision_s = secs(t);
        let t = Instant::now();
        let _enc = model.encode_embeddings(&emb).unwrap();
        device.synchronize().unwrap();
        println!(
            "{label}: {} crops, vision {vision_s:.3} s, prefill {:.3} s",
            crops.n_crops,
            secs(t)
        );
    }
}
