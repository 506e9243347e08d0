//! The decoding loops of the four skills (`moondream.py`), apart from the layers:
//! caption and query (with optional reasoning and spatial references), detect, point.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

use super::batch::{BatchEvent, DecodeBatch};
use super::text::KvCache;
use super::{EncodedImage, Moondream2};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Argmax (temperature 0), the default.
    Greedy,
    /// Temperature and nucleus sampling, reproducible for a given seed.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
        /// RNG seed.
        seed: u64,
    },
}

/// Limits and controls of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens emitted (default 768).
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Set to stop at the next token boundary.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 768,
            sampling: Sampling::Greedy,
            cancel: None,
        }
    }
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced end-of-sequence (or, in detect/point, chose to stop).
    Eos,
    /// The token or object cap was reached.
    MaxTokens,
    /// The cancel flag was set.
    Cancelled,
    /// Reasoning ended on the answer token.
    Answer,
}

/// Token ids produced by a text skill and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Emitted ids (EOS excluded).
    pub ids: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Prompt length in tokens (for usage statistics).
    pub prompt_tokens: usize,
}

/// A spatial reference placed into a query prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpatialRef {
    /// A point `(x, y)` in 0..1.
    Point(f32, f32),
    /// A box `(x_min, y_min, x_max, y_max)` in 0..1.
    Box(f32, f32, f32, f32),
}

/// A detected box, fractions of the image width and height (not clamped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundingBox {
    /// Left edge.
    pub x_min: f64,
    /// Top edge.
    pub y_min: f64,
    /// Right edge.
    pub x_max: f64,
    /// Bottom edge.
    pub y_max: f64,
}

/// A pointed location, fractions of the image width and height.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Horizontal position.
    pub x: f64,
    /// Vertical position.
    pub y: f64,
}

/// Output of a reasoning query: the reasoning trace, its grounding and the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonedAnswer {
    /// Reasoning token ids (coord tokens included).
    pub reasoning: Generation,
    /// Points grounded in the reasoning, one list per grounded span.
    pub grounding: Vec<Vec<Point>>,
    /// Answer ids.
    pub answer: Generation,
}

/// Chooses tokens under a sampling policy, masking ids as the reference does.
struct Chooser {
    processor: Option<LogitsProcessor>,
}

impl std::fmt::Debug for Chooser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.processor.is_some() {
            "sampling"
        } else {
            "greedy"
        };
        f.write_str(kind)
    }
}

impl Chooser {
    fn new(sampling: Sampling) -> Self {
        let processor = match sampling {
            Sampling::Greedy => None,
            Sampling::TopP {
                temperature,
                top_p,
                seed,
            } => {
                let s = if top_p >= 1.0 {
                    CandleSampling::All { temperature }
                } else {
                    CandleSampling::TopP {
                        p: top_p,
                        temperature,
                    }
                };
                Some(LogitsProcessor::from_sampling(seed, s))
            }
        };
        Self { processor }
    }

    fn choose(&mut self, logits: &Tensor, masked: &[u32]) -> Result<u32> {
        let mask = |v: &mut [f32]| {
            for &m in masked {
                if let Some(x) = v.get_mut(m as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        };
        match &mut self.processor {
            Some(p) => p.sample_f(logits, mask),
            None => {
                let mut v = logits.to_vec1::<f32>()?;
                mask(&mut v);
                Ok(argmax(&v) as u32)
            }
        }
    }
}

/// What an [`AnswerSequence`] does at its next token boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// It emits `token`; unless `last`, it needs one more decode step.
    Emit {
        /// The emitted id.
        token: u32,
        /// The token cap (or the context) is reached with this token.
        last: bool,
    },
    /// It stops without emitting anything more.
    Stop(StopReason),
}

/// One answer generation between decode steps (the reference `_generate_answer`):
/// its own KV cache, token chooser, limits and cancel flag. The same state machine
/// runs alone or in a batch, so a sequence's tokens do not depend on its neighbours.
#[derive(Debug)]
pub struct AnswerSequence {
    pub(super) cache: KvCache,
    chooser: Chooser,
    next: u32,
    ids: Vec<u32>,
    max_tokens: usize,
    max_context: usize,
    eos_id: u32,
    answer_id: u32,
    cancel: Option<Arc<AtomicBool>>,
    prompt_tokens: usize,
}

impl AnswerSequence {
    /// Takes the chosen token: stop (EOS, cap or cancelled) or emit it.
    pub fn advance(&mut self) -> Advance {
        if self.next == self.eos_id {
            return Advance::Stop(StopReason::Eos);
        }
        if self.ids.len() >= self.max_tokens {
            return Advance::Stop(StopReason::MaxTokens);
        }
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Advance::Stop(StopReason::Cancelled);
        }
        self.ids.push(self.next);
        let last = self.ids.len() >= self.max_tokens || self.cache.len() >= self.max_context;
        Advance::Emit {
            token: self.next,
            last,
        }
    }

    /// The id to feed in the next decode step (the one just emitted).
    pub fn input(&self) -> u32 {
        self.next
    }

    /// Chooses the next token from the step's logits (the answer token masked).
    pub fn accept(&mut self, logits: &Tensor) -> Result<()> {
        self.next = self.chooser.choose(logits, &[self.answer_id])?;
        Ok(())
    }

    /// The finished generation.
    pub fn finish(self, stop: StopReason) -> Generation {
        Generation {
            ids: self.ids,
            stop,
            prompt_tokens: self.prompt_tokens,
        }
    }
}

/// Index of the largest value (first one on ties, like torch.argmax on CPU).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

fn cancelled(opts: &GenerateOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

impl Moondream2 {
    /// Position count of the bidirectional prefix.
    fn prefix(&self) -> usize {
        self.cfg.prefix_len()
    }

    /// Prompt embeddings for ids, with `coord_id`/`size_id` positions replaced in order
    /// by encoded coordinates and sizes.
    pub fn prompt_embeddings(
        &self,
        ids: &[u32],
        coords: &[f32],
        sizes: &[(f32, f32)],
    ) -> Result<Tensor> {
        let tok = &self.cfg.tokenizer;
        let plain = self.text.embed(ids)?;
        if coords.is_empty() && sizes.is_empty() {
            return Ok(plain);
        }
        let (mut ci, mut si) = (0, 0);
        let mut rows = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let row = if id == tok.coord_id && ci < coords.len() {
                ci += 1;
                self.region.encode_coordinate(coords[ci - 1])?.get(0)?
            } else if id == tok.size_id && si < sizes.len() {
                si += 1;
                let (w, h) = sizes[si - 1];
                self.region.encode_size(w, h)?.get(0)?
            } else {
                plain.get(i)?
            };
            rows.push(row);
        }
        Tensor::stack(&rows, 0)
    }

    /// The reference `_generate_answer`: prefill the prompt, take the first token
    /// unmasked, then mask `answer_id` at every later step; EOS is never emitted.
    pub fn generate_answer(
        &self,
        cache: KvCache,
        prompt: &Tensor,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        self.answer_loop(cache, prompt, self.prefix(), opts, on_token)
    }

    fn answer_loop(
        &self,
        cache: KvCache,
        prompt: &Tensor,
        prefix: usize,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        // Alone is a batch of one: the same steps as in any batch, so a sequence's
        // tokens cannot depend on whether it was batched.
        let mut batch = DecodeBatch::new();
        batch.admit((), self.begin_answer_at(cache, prompt, prefix, opts)?);
        let mut done = None;
        while !batch.is_empty() {
            batch.step(self, &mut |_, event| match event {
                BatchEvent::Token(t) => on_token(t),
                BatchEvent::Done(g) => done = Some(g),
            })?;
        }
        done.ok_or_else(|| candle_core::Error::Msg("a generation left without finishing".into()))
    }

    /// Prefills an answer prompt after an encoded image's prefix (`image.cache()` for
    /// a copy, `image.into_cache()` to hand it over) and chooses the first token: a
    /// sequence ready to decode, alone ([`Self::generate_answer`] does this) or in a
    /// [`super::batch::DecodeBatch`] with others.
    pub fn begin_answer(
        &self,
        image_prefix: KvCache,
        prompt: &Tensor,
        opts: &GenerateOptions,
    ) -> Result<AnswerSequence> {
        self.begin_answer_at(image_prefix, prompt, self.prefix(), opts)
    }

    fn begin_answer_at(
        &self,
        mut cache: KvCache,
        prompt: &Tensor,
        prefix: usize,
        opts: &GenerateOptions,
    ) -> Result<AnswerSequence> {
        let prompt_tokens = prompt.dim(0)?;
        let mut chooser = Chooser::new(opts.sampling);
        let step = self.text.feed(prompt, &mut cache, prefix)?;
        let next = chooser.choose(&step.logits, &[])?;
        let tok = &self.cfg.tokenizer;
        Ok(AnswerSequence {
            cache,
            chooser,
            next,
            ids: Vec::new(),
            max_tokens: opts.max_tokens,
            max_context: self.cfg.text.max_context,
            eos_id: tok.eos_id,
            answer_id: tok.answer_id,
            cancel: opts.cancel.clone(),
            prompt_tokens,
        })
    }

    /// Caption with a prompt template (`short`, `normal` or `long` ids).
    pub fn caption_ids(
        &self,
        image: &EncodedImage,
        template: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let prompt = self.text.embed(template)?;
        self.generate_answer(image.cache(), &prompt, opts, on_token)
    }

    /// Ids of a query prompt: prefix, spatial placeholders, question, then the suffix
    /// twice (plain) or once followed by `thinking_id` (reasoning).
    pub fn query_prompt(
        &self,
        question: &[u32],
        spatial: &[SpatialRef],
        reasoning: bool,
    ) -> (Vec<u32>, Vec<f32>, Vec<(f32, f32)>) {
        let tok = &self.cfg.tokenizer;
        let t = &tok.templates.query;
        let mut ids = t.prefix.clone();
        let mut coords = Vec::new();
        let mut sizes = Vec::new();
        for r in spatial {
            match *r {
                SpatialRef::Point(x, y) => {
                    ids.extend([tok.coord_id, tok.coord_id]);
                    coords.extend([x, y]);
                }
                SpatialRef::Box(x0, y0, x1, y1) => {
                    ids.extend([tok.coord_id, tok.coord_id, tok.size_id]);
                    coords.extend([(x0 + x1) / 2.0, (y0 + y1) / 2.0]);
                    sizes.push((x1 - x0, y1 - y0));
                }
            }
        }
        ids.extend_from_slice(question);
        ids.extend_from_slice(&t.suffix);
        if reasoning {
            ids.push(tok.thinking_id);
        } else {
            ids.extend_from_slice(&t.suffix);
        }
        (ids, coords, sizes)
    }

    /// Answers a question about an image (or, with `image = None`, without one).
    pub fn query_ids(
        &self,
        image: Option<&EncodedImage>,
        question: &[u32],
        spatial: &[SpatialRef],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let (ids, coords, sizes) = self.query_prompt(question, spatial, false);
        match image {
            Some(img) => {
                let prompt = self.prompt_embeddings(&ids, &coords, &sizes)?;
                self.generate_answer(img.cache(), &prompt, opts, on_token)
            }
            None => {
                let mut all = vec![self.cfg.tokenizer.bos_id];
                all.extend(ids);
                let prompt = self.text.embed(&all)?;
                let cache = KvCache::new(self.cfg.text.n_layers);
                self.generate_answer_causal(cache, &prompt, opts, on_token)
            }
        }
    }

    /// `generate_answer` for a text-only sequence starting at position 0 (no prefix).
    fn generate_answer_causal(
        &self,
        cache: KvCache,
        prompt: &Tensor,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        self.answer_loop(cache, prompt, 0, opts, on_token)
    }

    /// Query with a reasoning phase (`_generate_reasoning`), then the answer.
    pub fn query_reasoning_ids(
        &self,
        image: &EncodedImage,
        question: &[u32],
        spatial: &[SpatialRef],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<ReasonedAnswer> {
        let tok = &self.cfg.tokenizer;
        let (ids, coords, sizes) = self.query_prompt(question, spatial, true);
        let prompt = self.prompt_embeddings(&ids, &coords, &sizes)?;
        let mut cache = image.cache();
        let mut chooser = Chooser::new(opts.sampling);
        let mut step = self.text.feed(&prompt, &mut cache, self.prefix())?;
        let mut next = chooser.choose(&step.logits, &[])?;
        let mut reasoning = Vec::new();
        let mut grounding = Vec::new();
        let mut span: Vec<f32> = Vec::new();
        let stop = loop {
            if next == tok.answer_id {
                break StopReason::Answer;
            }
            if reasoning.len() >= opts.max_tokens || cache.len() >= self.cfg.text.max_context {
                break StopReason::MaxTokens;
            }
            if cancelled(opts) {
                break StopReason::Cancelled;
            }
            reasoning.push(next);
            let emb = if next == tok.coord_id {
                let bin = argmax(
                    &self
                        .region
                        .decode_coordinate(&step.hidden)?
                        .to_vec1::<f32>()?,
                );
                let c = self.region.coordinate_value(bin);
                span.push(c);
                self.region.encode_coordinate(c)?
            } else {
                if next == tok.start_ground_points_id || next == tok.end_ground_id {
                    close_span(&mut span, &mut grounding);
                }
                self.text.embed(&[next])?
            };
            step = self.text.feed(&emb, &mut cache, self.prefix())?;
            next = chooser.choose(&step.logits, &[tok.eos_id, tok.size_id])?;
        };
        close_span(&mut span, &mut grounding);
        let reasoning = Generation {
            ids: reasoning,
            stop,
            prompt_tokens: ids.len(),
        };
        if stop == StopReason::Cancelled {
            let answer = Generation {
                ids: vec![],
                stop,
                prompt_tokens: 0,
            };
            return Ok(ReasonedAnswer {
                reasoning,
                grounding,
                answer,
            });
        }
        let answer_prompt = self.text.embed(&[tok.answer_id])?;
        let answer = self.generate_answer(cache, &answer_prompt, opts, on_token)?;
        Ok(ReasonedAnswer {
            reasoning,
            grounding,
            answer,
        })
    }

    /// Boxes around instances of an object (`object_ids` = ids of `" " + object`).
    pub fn detect_ids(
        &self,
        image: &EncodedImage,
        object_ids: &[u32],
        max_objects: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<BoundingBox>> {
        let t = &self.cfg.tokenizer.templates.detect;
        let found = self.region_loop(
            image,
            &t.prefix,
            object_ids,
            &t.suffix,
            max_objects,
            true,
            cancel,
        )?;
        Ok(found
            .into_iter()
            .map(|(x, y, size)| {
                let (w, h) = size.unwrap_or((0.0, 0.0));
                let (x, y, w, h) = (f64::from(x), f64::from(y), f64::from(w), f64::from(h));
                BoundingBox {
                    x_min: x - w / 2.0,
                    y_min: y - h / 2.0,
                    x_max: x + w / 2.0,
                    y_max: y + h / 2.0,
                }
            })
            .collect())
    }

    /// Points at instances of an object (`object_ids` = ids of `" " + object`).
    pub fn point_ids(
        &self,
        image: &EncodedImage,
        object_ids: &[u32],
        max_objects: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Point>> {
        let t = &self.cfg.tokenizer.templates.point;
        let found = self.region_loop(
            image,
            &t.prefix,
            object_ids,
            &t.suffix,
            max_objects,
            false,
            cancel,
        )?;
        Ok(found
            .into_iter()
            .map(|(x, y, _)| Point {
                x: f64::from(x),
                y: f64::from(y),
            })
            .collect())
    }

    /// Shared detect/point loop: x, y (and size) per object until EOS or the cap.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn region_loop(
        &self,
        image: &EncodedImage,
        prefix: &[u32],
        object: &[u32],
        suffix: &[u32],
        max_objects: usize,
        with_size: bool,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<(f32, f32, Option<(f32, f32)>)>> {
        let eos = self.cfg.tokenizer.eos_id;
        let ids: Vec<u32> = prefix.iter().chain(object).chain(suffix).copied().collect();
        let mut cache = image.cache();
        let mut step = self
            .text
            .feed(&self.text.embed(&ids)?, &mut cache, self.prefix())?;
        let mut found = Vec::new();
        let room = |cache: &KvCache| cache.len() + 3 <= self.cfg.text.max_context;
        while argmax(&step.logits.to_vec1::<f32>()?) as u32 != eos
            && found.len() < max_objects
            && room(&cache)
        {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                break;
            }
            let x = self.decode_coordinate_value(&step.hidden)?;
            step = self.text.feed(
                &self.region.encode_coordinate(x)?,
                &mut cache,
                self.prefix(),
            )?;
            let y = self.decode_coordinate_value(&step.hidden)?;
            step = self.text.feed(
                &self.region.encode_coordinate(y)?,
                &mut cache,
                self.prefix(),
            )?;
            let size = if with_size {
                let logits = self.region.decode_size(&step.hidden)?;
                let w = self
                    .region
                    .size_value(argmax(&logits.get(0)?.to_vec1::<f32>()?));
                let h = self
                    .region
                    .size_value(argmax(&logits.get(1)?.to_vec1::<f32>()?));
                step =
                    self.text
                        .feed(&self.region.encode_size(w, h)?, &mut cache, self.prefix())?;
                Some((w, h))
            } else {
                None
            };
            found.push((x, y, size));
        }
        Ok(found)
    }

    fn decode_coordinate_value(&self, hidden: &Tensor) -> Result<f32> {
        let logits = self.region.decode_coordinate(hidden)?.to_vec1::<f32>()?;
        Ok(self.region.coordinate_value(argmax(&logits)))
    }
}

fn close_span(span: &mut Vec<f32>, grounding: &mut Vec<Vec<Point>>) {
    if span.len() >= 2 {
        let pts = span
            .chunks_exact(2)
            .map(|p| Point {
                x: f64::from(p[0]),
                y: f64::from(p[1]),
            })
            .collect();
        grounding.push(pts);
    }
    span.clear();
}
