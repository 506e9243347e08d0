//! Batched decoding on the tiny checkpoints: a sequence's tokens must not depend on
//! the batch it decodes in. Every comparison is token for token against the same
//! generation run alone, in f32 and in the packed formats (bf16, q8), with the KV
//! cache in its default format and in 8 bits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use captiond::vision::image::Tiling;
use captiond::vision::image::{DecodeLimits, decode_rgb};
use captiond::vision::moondream2::KvFormat;
use captiond::vision::moondream2::batch::decode_together;
use captiond::vision::moondream2::precision::Precision;
use captiond::vision::moondream2::vision::VisionModel;
use captiond::vision::moondream2::{
    AnswerSequence, BatchEvent, DecodeBatch, EncodedImage, GenerateOptions, Generation, Moondream2,
    Sampling, StopReason,
};
use common::{fixtures, load_tiny_with};

fn encode(m: &Moondream2, name: &str) -> EncodedImage {
    let bytes = std::fs::read(fixtures().join("tiny").join(name)).unwrap();
    m.encode_image(&decode_rgb(&bytes, DecodeLimits::default()).unwrap())
        .unwrap()
}

/// A fixture image's crops as the encoder takes them, and their count.
fn crops(m: &Moondream2, name: &str) -> ((Tensor, Tiling), usize) {
    let bytes = std::fs::read(fixtures().join("tiny").join(name)).unwrap();
    let c = m.prepare(&decode_rgb(&bytes, DecodeLimits::default()).unwrap());
    let t = VisionModel::crops_tensor(&c, m.device(), m.dtype()).unwrap();
    ((t, c.tiling), c.n_crops)
}

const IMAGES: [&str; 2] = ["image_small_50x40.png", "image_wide_720x430.png"];

/// One generation to run alone and in a batch: an image, prompt ids and options.
struct Case {
    image: usize,
    prompt: Vec<u32>,
    opts: GenerateOptions,
}

/// Prompts of different lengths (the three caption templates, two questions),
/// greedy and seeded sampling, different token caps.
fn cases(m: &Moondream2) -> Vec<Case> {
    let t = &m.config().tokenizer.templates.caption;
    let (q_short, ..) = m.query_prompt(&[200], &[], false);
    let (q_long, ..) = m.query_prompt(&[200, 201, 202, 203, 204, 205, 206], &[], false);
    let sampled = |seed| Sampling::TopP {
        temperature: 1.0,
        top_p: 0.9,
        seed,
    };
    let prompts = [
        (0, t.short.clone(), 12, Sampling::Greedy),
        (1, t.normal.clone(), 20, Sampling::Greedy),
        (0, t.long.clone(), 5, sampled(7)),
        (1, q_short, 17, Sampling::Greedy),
        (0, q_long, 9, sampled(11)),
        (1, t.short.clone(), 1, Sampling::Greedy),
    ];
    prompts
        .into_iter()
        .map(|(image, prompt, max_tokens, sampling)| Case {
            image,
            prompt,
            opts: GenerateOptions {
                max_tokens,
                sampling,
                cancel: None,
            },
        })
        .collect()
}

struct Fixture {
    model: Moondream2,
    images: [EncodedImage; 2],
    cases: Vec<Case>,
}

impl Fixture {
    fn new(name: &str, precision: Precision) -> Self {
        Self::with_kv(name, precision, KvFormat::Auto)
    }

    fn with_kv(name: &str, precision: Precision, kv: KvFormat) -> Self {
        let model = load_tiny_with(name, precision, kv);
        let images = IMAGES.map(|name| encode(&model, name));
        let cases = cases(&model);
        Self {
            model,
            images,
            cases,
        }
    }

    fn begin(&self, c: &Case) -> AnswerSequence {
        self.begin_on(&self.images[c.image], c)
    }

    /// [`Self::begin`] after the prefix of `image` (an encoding of the case's image).
    fn begin_on(&self, image: &EncodedImage, c: &Case) -> AnswerSequence {
        let prompt = self.model.text().embed(&c.prompt).unwrap();
        self.model
            .begin_answer(image.cache(), &prompt, &c.opts)
            .unwrap()
    }

    fn alone(&self, c: &Case) -> Generation {
        let prompt = self.model.text().embed(&c.prompt).unwrap();
        self.model
            .generate_answer(self.images[c.image].cache(), &prompt, &c.opts, &mut |_| {})
            .unwrap()
    }
}

const SETUPS: [(&str, Precision, KvFormat); 6] = [
    ("tiny", Precision::F32, KvFormat::Auto),
    ("tiny_gqa", Precision::F32, KvFormat::Auto),
    ("tiny", Precision::Bf16, KvFormat::Auto),
    ("tiny_gqa", Precision::Q8, KvFormat::Auto),
    ("tiny", Precision::Q8, KvFormat::Q8),
    ("tiny_gqa", Precision::Bf16, KvFormat::Q8),
];

#[test]
fn a_batch_of_mixed_prompts_caps_and_sampling_gives_each_sequence_its_tokens_alone() {
    for (name, precision, kv) in SETUPS {
        let f = Fixture::with_kv(name, precision, kv);
        let alone: Vec<Generation> = f.cases.iter().map(|c| f.alone(c)).collect();
        let together =
            decode_together(&f.model, f.cases.iter().map(|c| f.begin(c)).collect()).unwrap();
        assert_eq!(together, alone, "{name} {precision:?} KV {kv}");
        // The cases must exercise what they claim: several tokens, the cap reached.
        assert!(alone.iter().any(|g| g.ids.len() >= 10), "{name}: {alone:?}");
        assert!(
            alone.iter().any(|g| g.stop == StopReason::MaxTokens),
            "{name}: {alone:?}"
        );
    }
}

/// Steps `batch` until it is empty, collecting finished generations by key and the
/// tokens seen; `before_step(n, batch)` runs before the n-th step.
fn drive(
    f: &Fixture,
    batch: &mut DecodeBatch<usize>,
    mut before_step: impl FnMut(usize, &mut DecodeBatch<usize>),
) -> Vec<(usize, Generation, Vec<u32>)> {
    let mut done = Vec::new();
    let mut streamed: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    let mut n = 0;
    loop {
        before_step(n, batch);
        if batch.is_empty() {
            break;
        }
        batch
            .step(&f.model, &mut |&k, e| match e {
                BatchEvent::Token(t) => streamed.entry(k).or_default().push(t),
                BatchEvent::Done(g) => done.push((k, g, streamed.remove(&k).unwrap_or_default())),
            })
            .unwrap();
        n += 1;
    }
    done.sort_by_key(|(k, ..)| *k);
    done
}

#[test]
fn a_sequence_cancelled_mid_batch_leaves_at_once_and_the_others_are_unchanged() {
    let f = Fixture::new("tiny", Precision::Q8);
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cases: Vec<&Case> = f.cases.iter().take(4).collect();
    let mut victim = Case {
        image: 1,
        prompt: f.cases[1].prompt.clone(),
        opts: f.cases[1].opts.clone(),
    };
    victim.opts.cancel = Some(cancel.clone());
    cases.insert(1, &victim);
    let mut batch = DecodeBatch::new();
    for (i, c) in cases.iter().enumerate() {
        batch.admit(i, f.begin(c));
    }
    let done = drive(&f, &mut batch, |n, b| {
        if n == 4 {
            cancel.store(true, Ordering::Relaxed);
        }
        if n == 5 {
            assert_eq!(b.len(), 3, "the cancelled sequence left at the 5th step");
        }
    });
    assert_eq!(done.len(), 5);
    for (k, g, streamed) in &done {
        assert_eq!(&g.ids, streamed, "every emitted token was told as it came");
        let c = cases[*k];
        let mut alone = c.opts.clone();
        alone.cancel = None;
        let expected = f.alone(&Case {
            image: c.image,
            prompt: c.prompt.clone(),
            opts: alone,
        });
        if *k == 1 {
            assert_eq!(g.stop, StopReason::Cancelled);
            assert_eq!(g.ids.len(), 4, "four tokens before the flag was seen");
            assert_eq!(g.ids[..], expected.ids[..4]);
        } else {
            assert_eq!(*g, expected, "case {k}");
        }
    }
}

#[test]
fn a_sequence_joining_a_running_batch_gets_the_tokens_it_gets_alone() {
    for (name, precision) in [("tiny", Precision::F32), ("tiny", Precision::Bf16)] {
        let f = Fixture::new(name, precision);
        let first = &f.cases[1]; // 20 tokens
        let late = [&f.cases[3], &f.cases[0]];
        let mut batch = DecodeBatch::new();
        batch.admit(0, f.begin(first));
        let done = drive(&f, &mut batch, |n, b| {
            // One joins after 3 steps, another after 8, while the first still runs.
            if n == 3 || n == 8 {
                let i = if n == 3 { 0 } else { 1 };
                b.admit(i + 1, f.begin(late[i]));
                assert_eq!(b.len(), i + 2, "{name}: joined a running batch");
            }
        });
        let got: Vec<&Generation> = done.iter().map(|(_, g, _)| g).collect();
        assert_eq!(got[0], &f.alone(first));
        assert_eq!(got[1], &f.alone(late[0]));
        assert_eq!(got[2], &f.alone(late[1]));
    }
}

#[test]
fn images_encoded_together_give_each_sequence_its_tokens_alone() {
    for (name, precision, kv) in SETUPS {
        let f = Fixture::with_kv(name, precision, kv);
        // Images of different crop counts, one of them twice, in one vision and
        // prefill pass.
        let order = [1, 0, 1];
        let inputs: Vec<((Tensor, Tiling), usize)> =
            order.iter().map(|&i| crops(&f.model, IMAGES[i])).collect();
        assert!(
            inputs[0].1 > inputs[1].1,
            "{name}: the images must differ in crop count ({} and {})",
            inputs[0].1,
            inputs[1].1
        );
        let inputs: Vec<(Tensor, Tiling)> = inputs.into_iter().map(|(t, _)| t).collect();
        let together = f.model.encode_many(&inputs).unwrap();
        assert_eq!(together.len(), order.len());
        for (slot, &image) in order.iter().enumerate() {
            for c in f.cases.iter().filter(|c| c.image == image) {
                let mut batch = DecodeBatch::new();
                batch.admit(0, f.begin_on(&together[slot], c));
                let done = drive(&f, &mut batch, |_, _| {});
                assert_eq!(
                    done[0].1,
                    f.alone(c),
                    "{name} {precision:?} KV {kv}: image {image} encoded in slot {slot}"
                );
            }
        }
        // The images lead to different tokens, so a mix-up of slots would show.
        let c = &f.cases[1];
        let mut batch = DecodeBatch::new();
        batch.admit(0, f.begin_on(&together[1], c));
        assert_ne!(drive(&f, &mut batch, |_, _| {})[0].1.ids, f.alone(c).ids);
        assert!(f.model.encode_many(&[]).unwrap().is_empty());
    }
}
