//! Parity of the candle Moondream2 port with the reference PyTorch implementation,
//! on the tiny checkpoints and golden outputs in `tests/fixtures/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use captiond::vision::image::{
    CropGeometry, DecodeLimits, decode_rgb, pixel_norm_lut, prepare_crops,
};
use captiond::vision::moondream2::generate::SpatialRef;
use captiond::vision::moondream2::loader::{files_in_dir, load_model};
use captiond::vision::moondream2::text::KvCache;
use captiond::vision::moondream2::{EncodedImage, GenerateOptions, Moondream2, StopReason};
use serde_json::Value;

/// The device under test: CPU, or CUDA with `CAPTIOND_TEST_DEVICE=cuda` (used by
/// `scripts/gpu-check` on a `--features cuda` build). Always f32.
fn device() -> Device {
    match std::env::var("CAPTIOND_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("CUDA device (build with --features cuda)"),
        _ => Device::Cpu,
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Golden {
    tensors: HashMap<String, Tensor>,
    json: Value,
}

impl Golden {
    fn load(name: &str) -> Self {
        let dir = fixtures().join(name);
        let tensors =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
            .unwrap();
        Self { tensors, json }
    }

    fn t(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name}"))
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&device())
            .unwrap()
    }

    fn run(&self, image: &str, run: &str) -> &Value {
        if image == "textonly" {
            return &self.json["runs"]["textonly"][run];
        }
        &self.json["runs"][image]["runs"][format!("{image}.{run}")]
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model(name: &str) -> Moondream2 {
    let files = files_in_dir(&fixtures().join(name)).unwrap();
    load_model(&files, &device(), DType::F32).unwrap().0
}

/// Largest absolute difference, checked against `1e-4 * max(1, max |expected|)`.
#[track_caller]
fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let a = actual
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = expected
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = e.iter().fold(1f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&e)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max abs diff {diff} exceeds {}",
        1e-4 * scale
    );
}

fn load_png(name: &str) -> image::RgbImage {
    let bytes = std::fs::read(fixtures().join("tiny").join(name)).unwrap();
    decode_rgb(&bytes, DecodeLimits::default()).unwrap()
}

#[test]
fn pixel_normalisation_matches_the_reference_bf16_table_exactly() {
    let g = Golden::load("tiny");
    let lut = Tensor::new(&pixel_norm_lut()[..], &device()).unwrap();
    let diff = (lut - g.t("pixel_norm_lut"))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn tiling_matches_the_reference_table() {
    let g = Golden::load("tiny");
    for case in g.json["tiling_table"]["cases"].as_array().unwrap() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        for max_crops in [12, 6] {
            let geo = CropGeometry {
                crop_size: 378,
                margin_px: 56,
                max_crops,
            };
            let t = geo.tiling(h, w);
            let want = ids(&case[format!("tiling_max_crops_{max_crops}")]);
            assert_eq!(
                [t.rows as u32, t.cols as u32],
                [want[0], want[1]],
                "{h}x{w} max_crops {max_crops}"
            );
        }
    }
}

#[test]
fn crops_match_the_reference_pixel_for_pixel() {
    let g = Golden::load("tiny");
    let m = model("tiny");
    for (image, png, tiling) in [
        ("small", "image_small_50x40.png", (1, 1)),
        ("wide", "image_wide_720x430.png", (2, 3)),
    ] {
        let crops = prepare_crops(&load_png(png), &m.crop_geometry());
        assert_eq!((crops.tiling.rows, crops.tiling.cols), tiling);
        let ours =
            Tensor::from_slice(&crops.data, (crops.n_crops, 3, 378, 378), &Device::Cpu).unwrap();
        let diff = (ours - g.t(&format!("{image}.crops")))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{image} crops");
    }
}

#[test]
fn vision_encoder_stitching_pooling_and_projection_match() {
    let g = Golden::load("tiny");
    let m = model("tiny");
    for (image, tiling) in [("small", (1, 1)), ("wide", (2, 3))] {
        let out = m.vision().encode(&g.t(&format!("{image}.crops"))).unwrap();
        assert_close(
            &format!("{image}.vision_out"),
            &out,
            &g.t(&format!("{image}.vision_out")),
        );
        let golden_out = g.t(&format!("{image}.vision_out"));
        let n = golden_out.dim(0).unwrap();
        let tiling = captiond::vision::image::Tiling {
            rows: tiling.0,
            cols: tiling.1,
        };
        let grid = m
            .vision()
            .reconstruct(&golden_out.narrow(0, 1, n - 1).unwrap(), tiling)
            .unwrap();
        assert_close(
            &format!("{image}.reconstructed"),
            &grid,
            &g.t(&format!("{image}.reconstructed")),
        );
        let pooled = m
            .vision()
            .pool(&g.t(&format!("{image}.reconstructed")))
            .unwrap();
        let pooled = pooled.reshape((729, ())).unwrap();
        assert_close(
            &format!("{image}.pooled"),
            &pooled,
            &g.t(&format!("{image}.pooled")),
        );
        let emb = m
            .vision()
            .project(
                &golden_out.get(0).unwrap(),
                &g.t(&format!("{image}.pooled")),
            )
            .unwrap();
        assert_close(
            &format!("{image}.img_emb"),
            &emb,
            &g.t(&format!("{image}.img_emb")),
        );
    }
}

#[test]
fn bidirectional_prefix_hidden_states_match() {
    let g = Golden::load("tiny");
    let m = model("tiny");
    let bos = m.text().embed(&[0]).unwrap();
    let prefix = Tensor::cat(&[&bos, &g.t("small.img_emb")], 0).unwrap();
    let mut cache = KvCache::new(2);
    let hidden = m.text().feed_all_hidden(&prefix, &mut cache, 730).unwrap();
    let golden = g.t("small.prefix_hidden");
    for (i, h) in hidden.iter().enumerate() {
        assert_close(
            &format!("prefix_hidden layer {i}"),
            h,
            &golden.get(i).unwrap(),
        );
    }
}

/// Feeds the prompt and then the golden ids one by one; returns every step's logits.
fn teacher_force(
    m: &Moondream2,
    mut cache: KvCache,
    prompt: &Tensor,
    generated: &[u32],
    prefix: usize,
) -> (Tensor, Vec<Tensor>) {
    let first = m.text().feed(prompt, &mut cache, prefix).unwrap();
    let steps = generated
        .iter()
        .map(|&id| {
            m.text()
                .feed(&m.text().embed(&[id]).unwrap(), &mut cache, prefix)
                .unwrap()
                .logits
        })
        .collect();
    (first.logits, steps)
}

fn check_logits(g: &Golden, key: &str, prefill: &Tensor, steps: &[Tensor]) {
    assert_close(
        &format!("{key}.prefill_logits"),
        prefill,
        &g.t(&format!("{key}.prefill_logits")),
    );
    let golden_steps = g.t(&format!("{key}.step_logits"));
    assert_eq!(
        golden_steps.dim(0).unwrap(),
        steps.len(),
        "{key}: step count"
    );
    for (i, s) in steps.iter().enumerate() {
        assert_close(
            &format!("{key}.step_logits[{i}]"),
            s,
            &golden_steps.get(i).unwrap(),
        );
    }
}

fn opts(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

fn check_text_runs(g: &Golden, m: &Moondream2, image: &str, enc: &EncodedImage) {
    for length in ["short", "normal", "long"] {
        let run = g.run(image, &format!("caption_{length}"));
        let key = format!("{image}.caption_{length}");
        let prompt_ids = ids(&run["prompt_ids"]);
        let want = ids(&run["generated_ids"]);
        let prompt = m.text().embed(&prompt_ids).unwrap();
        let (prefill, steps) = teacher_force(m, enc.cache(), &prompt, &want, 730);
        check_logits(g, &key, &prefill, &steps);
        let got = m
            .caption_ids(enc, &prompt_ids, &opts(20), &mut |_| {})
            .unwrap();
        assert_eq!(got.ids, want, "{key} ids");
        assert_eq!(got.stop, StopReason::MaxTokens);
    }

    let run = g.run(image, "query");
    let question = ids(&run["question_fake_ids"]);
    let (prompt_ids, _, _) = m.query_prompt(&question, &[], false);
    assert_eq!(
        prompt_ids,
        ids(&run["prompt_ids"]),
        "query prompt (suffix twice)"
    );
    let want = ids(&run["generated_ids"]);
    let (prefill, steps) = teacher_force(
        m,
        enc.cache(),
        &m.text().embed(&prompt_ids).unwrap(),
        &want,
        730,
    );
    check_logits(g, &format!("{image}.query"), &prefill, &steps);
    let got = m
        .query_ids(Some(enc), &question, &[], &opts(20), &mut |_| {})
        .unwrap();
    assert_eq!(got.ids, want, "{image}.query ids");

    let run = g.run(image, "query_spatial");
    let question = ids(&run["question_fake_ids"]);
    let refs: Vec<SpatialRef> = run["spatial_refs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v: Vec<f32> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            if v.len() == 2 {
                SpatialRef::Point(v[0], v[1])
            } else {
                SpatialRef::Box(v[0], v[1], v[2], v[3])
            }
        })
        .collect();
    let (prompt_ids, coords, sizes) = m.query_prompt(&question, &refs, false);
    assert_eq!(prompt_ids, ids(&run["prompt_ids"]));
    let prompt = m.prompt_embeddings(&prompt_ids, &coords, &sizes).unwrap();
    assert_close(
        &format!("{image}.query_spatial.prompt_emb"),
        &prompt,
        &g.t(&format!("{image}.query_spatial.prompt_emb")),
    );
    let want = ids(&run["generated_ids"]);
    let (prefill, steps) = teacher_force(m, enc.cache(), &prompt, &want, 730);
    check_logits(g, &format!("{image}.query_spatial"), &prefill, &steps);
    let got = m
        .query_ids(Some(enc), &question, &refs, &opts(20), &mut |_| {})
        .unwrap();
    assert_eq!(got.ids, want, "{image}.query_spatial ids");

    let run = g.run(image, "query_reasoning");
    let question: Vec<u32> = ids(&g.run(image, "query")["question_fake_ids"]);
    let (prompt_ids, _, _) = m.query_prompt(&question, &[], true);
    assert_eq!(prompt_ids, ids(&run["prompt_ids"]));
    let reasoning = ids(&run["reasoning_ids"]);
    let answer = ids(&run["answer_ids"]);
    let mut cache = enc.cache();
    let first = m
        .text()
        .feed(&m.text().embed(&prompt_ids).unwrap(), &mut cache, 730)
        .unwrap();
    let steps: Vec<Tensor> = reasoning
        .iter()
        .map(|&id| {
            m.text()
                .feed(&m.text().embed(&[id]).unwrap(), &mut cache, 730)
                .unwrap()
                .logits
        })
        .collect();
    check_logits(
        g,
        &format!("{image}.query_reasoning.reasoning"),
        &first.logits,
        &steps,
    );
    assert_eq!(
        cache.len() as u64,
        run["answer_prompt_pos"].as_u64().unwrap()
    );
    let (prefill, steps) = teacher_force(
        m,
        cache,
        &m.text().embed(&ids(&run["answer_prompt_ids"])).unwrap(),
        &answer,
        730,
    );
    check_logits(
        g,
        &format!("{image}.query_reasoning.answer"),
        &prefill,
        &steps,
    );
    let got = m
        .query_reasoning_ids(enc, &question, &[], &opts(10), &mut |_| {})
        .unwrap();
    assert_eq!(got.reasoning.ids, reasoning, "{image} reasoning ids");
    assert_eq!(got.answer.ids, answer, "{image} answer ids");
    assert!(got.grounding.is_empty());
}

fn check_region_runs(g: &Golden, m: &Moondream2, image: &str, enc: &EncodedImage) {
    for skill in ["detect", "point"] {
        let run = g.run(image, skill);
        let key = format!("{image}.{skill}");
        let object = ids(&run["object_fake_ids"]);
        let bins = ids(&run["coord_bins"]);
        let sizes: Vec<Vec<u32>> = run["size_bins_wh"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let mut cache = enc.cache();
        let mut step = m
            .text()
            .feed(
                &m.text().embed(&ids(&run["prompt_ids"])).unwrap(),
                &mut cache,
                730,
            )
            .unwrap();
        let (mut hidden, mut coord_logits, mut size_logits, mut token_logits) =
            (vec![], vec![], vec![], vec![step.logits.clone()]);
        for obj in 0..bins.len() / 2 {
            for axis in 0..2 {
                hidden.push(step.hidden.clone());
                coord_logits.push(m.region().decode_coordinate(&step.hidden).unwrap());
                let c = bins[obj * 2 + axis] as f32 / 1024.0;
                step = m
                    .text()
                    .feed(&m.region().encode_coordinate(c).unwrap(), &mut cache, 730)
                    .unwrap();
            }
            if skill == "detect" {
                size_logits.push(m.region().decode_size(&step.hidden).unwrap());
                let (w, h) = (
                    m.region().size_value(sizes[obj][0] as usize),
                    m.region().size_value(sizes[obj][1] as usize),
                );
                step = m
                    .text()
                    .feed(&m.region().encode_size(w, h).unwrap(), &mut cache, 730)
                    .unwrap();
            }
            token_logits.push(step.logits.clone());
        }
        assert_close(
            &format!("{key}.coord_hidden"),
            &Tensor::stack(&hidden, 0).unwrap(),
            &g.t(&format!("{key}.coord_hidden")),
        );
        assert_close(
            &format!("{key}.coord_logits"),
            &Tensor::stack(&coord_logits, 0).unwrap(),
            &g.t(&format!("{key}.coord_logits")),
        );
        assert_close(
            &format!("{key}.token_logits"),
            &Tensor::stack(&token_logits, 0).unwrap(),
            &g.t(&format!("{key}.token_logits")),
        );
        let max = run["max_objects"].as_u64().unwrap() as usize;
        if skill == "detect" {
            assert_close(
                &format!("{key}.size_logits"),
                &Tensor::stack(&size_logits, 0).unwrap(),
                &g.t(&format!("{key}.size_logits")),
            );
            let boxes = m.detect_ids(enc, &object, max, None).unwrap();
            let want = run["objects"].as_array().unwrap();
            assert_eq!(boxes.len(), want.len());
            for (b, w) in boxes.iter().zip(want) {
                for (v, k) in [
                    (b.x_min, "x_min"),
                    (b.y_min, "y_min"),
                    (b.x_max, "x_max"),
                    (b.y_max, "y_max"),
                ] {
                    assert!(
                        (v - w[k].as_f64().unwrap()).abs() < 1e-6,
                        "{key} {k}: {v} vs {}",
                        w[k]
                    );
                }
            }
        } else {
            let points = m.point_ids(enc, &object, max, None).unwrap();
            let want = run["points"].as_array().unwrap();
            assert_eq!(points.len(), want.len());
            for (p, w) in points.iter().zip(want) {
                assert!(
                    (p.x - w["x"].as_f64().unwrap()).abs() < 1e-6
                        && (p.y - w["y"].as_f64().unwrap()).abs() < 1e-6,
                    "{key}"
                );
            }
        }
    }
}

fn check_text_only(g: &Golden, m: &Moondream2) {
    let run = g.run("textonly", "query");
    let prompt_ids = ids(&run["prompt_ids"]);
    let want = ids(&run["generated_ids"]);
    let cache = KvCache::new(m.config().text.n_layers);
    let (prefill, steps) = teacher_force(m, cache, &m.text().embed(&prompt_ids).unwrap(), &want, 0);
    check_logits(g, "textonly.query", &prefill, &steps);
    let question = &prompt_ids[4..prompt_ids.len() - 2];
    let got = m
        .query_ids(None, question, &[], &opts(20), &mut |_| {})
        .unwrap();
    assert_eq!(got.ids, want, "textonly ids");
}

#[test]
fn tiny_small_image_skills_match_the_reference() {
    let g = Golden::load("tiny");
    let m = model("tiny");
    let enc = m.encode_embeddings(&g.t("small.img_emb")).unwrap();
    check_text_runs(&g, &m, "small", &enc);
    check_region_runs(&g, &m, "small", &enc);
    check_text_only(&g, &m);
}

#[test]
fn tiny_wide_image_skills_match_the_reference_end_to_end_from_the_png() {
    let g = Golden::load("tiny");
    let m = model("tiny");
    let enc = m.encode_image(&load_png("image_wide_720x430.png")).unwrap();
    check_text_runs(&g, &m, "wide", &enc);
    check_region_runs(&g, &m, "wide", &enc);
}

#[test]
fn grouped_query_attention_model_matches_the_reference() {
    let g = Golden::load("tiny_gqa");
    let m = model("tiny_gqa");
    let enc = m.encode_image(&load_png("image_small_50x40.png")).unwrap();
    check_text_runs(&g, &m, "small", &enc);
    check_region_runs(&g, &m, "small", &enc);
    check_text_only(&g, &m);
}
