//! The model engine: per loaded model, one thread that advances every running answer
//! generation together, one batched forward pass per token ([`DecodeBatch`]), and one
//! that encodes images (vision and prefix prefill) in batches. Threads running skills
//! decode and crop their image themselves, hand the crops to the encode thread (which
//! takes every image waiting, up to its cap, in one pass), prefill their own prompt,
//! then hand the sequence over and wait for its tokens. Sequences join and leave
//! between steps (continuous batching), so N concurrent captions cost about one
//! weight read per token instead of N.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use candle_core::{Error, Tensor};

use super::image::Tiling;
use super::moondream2::{
    AnswerSequence, BatchEvent, DecodeBatch, EncodedImage, Generation, Moondream2,
};

/// What the engine tells a waiting sequence.
enum Event {
    Token(u32),
    Done(Generation),
    Failed(Error),
}

struct Admission {
    seq: AnswerSequence,
    events: Sender<Event>,
}

/// One image waiting to be encoded, and where its prefix goes.
struct EncodeRequest {
    image: (Tensor, Tiling),
    reply: Sender<candle_core::Result<EncodedImage>>,
}

/// Counters of the engine, for logs, benchmarks and tests.
#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    sequence_steps: AtomicU64,
    largest_batch: AtomicUsize,
    fault: Mutex<Option<String>>,
    encode_passes: AtomicU64,
    images_encoded: AtomicU64,
    largest_encode: AtomicUsize,
    encodes_waiting: AtomicUsize,
    encode_fault: Mutex<Option<String>>,
    /// While true, the encode thread leaves requests waiting ([`EncodeHold`]).
    encode_held: Mutex<bool>,
    encode_released: Condvar,
}

/// What the engine has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EngineStats {
    /// Batched forward passes run.
    pub steps: u64,
    /// Sequence-steps in them (the sum of batch sizes).
    pub sequence_steps: u64,
    /// The most sequences decoded in one pass.
    pub largest_batch: usize,
    /// Batched encode passes (vision and prefix prefill) run.
    pub encode_passes: u64,
    /// Images encoded in them.
    pub images_encoded: u64,
    /// The most images encoded in one pass.
    pub largest_encode: usize,
    /// Images waiting for the encode thread now.
    pub encodes_waiting: usize,
}

/// While alive, the encode thread leaves images waiting; dropping it lets everything
/// waiting (up to the cap) go in one pass. For tests and benchmarks that need a
/// batch of a known size.
pub struct EncodeHold {
    counters: Arc<Counters>,
}

impl Drop for EncodeHold {
    fn drop(&mut self) {
        if let Ok(mut held) = self.counters.encode_held.lock() {
            *held = false;
        }
        self.counters.encode_released.notify_all();
    }
}

/// A running engine (its decode and encode threads); dropping it lets each thread end
/// once its work is done.
pub struct DecodeEngine {
    admit: Sender<Admission>,
    encode: Sender<EncodeRequest>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for DecodeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeEngine")
            .field("stats", &self.stats())
            .finish()
    }
}

impl DecodeEngine {
    /// Starts the engine's threads for `model`: decoding at most `max_batch` sequences
    /// per pass and encoding at most `max_encode` images per pass (more wait).
    pub fn start(
        model: Arc<Moondream2>,
        max_batch: usize,
        max_encode: usize,
    ) -> std::io::Result<Self> {
        let (admit, queue) = mpsc::channel();
        let (encode, images) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let (m, c) = (model.clone(), counters.clone());
        std::thread::Builder::new()
            .name("captiond-encode".into())
            .spawn(move || run_encodes(&m, &images, &c, max_encode.max(1)))?;
        let c = counters.clone();
        std::thread::Builder::new()
            .name("captiond-decode".into())
            .spawn(move || run(&model, &queue, &c, max_batch.max(1)))?;
        Ok(Self {
            admit,
            encode,
            counters,
        })
    }

    /// Encodes one image's crops (`[n, 3, side, side]` on the model's device) with the
    /// images of other callers waiting at the same time, in one vision and prefill
    /// pass. Blocking. An error in a pass fails every image of that pass.
    pub fn encode(&self, crops: Tensor, tiling: Tiling) -> candle_core::Result<EncodedImage> {
        let (reply, rx) = mpsc::channel();
        self.counters
            .encodes_waiting
            .fetch_add(1, Ordering::Relaxed);
        let sent = self.encode.send(EncodeRequest {
            image: (crops, tiling),
            reply,
        });
        if sent.is_err() {
            self.counters
                .encodes_waiting
                .fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Msg("the encode thread has stopped".into()));
        }
        rx.recv()
            .map_err(|_| Error::Msg("the encode thread stopped during an encode".into()))?
    }

    /// Holds the encode thread until the returned guard is dropped (see [`EncodeHold`]).
    pub fn hold_encodes(&self) -> EncodeHold {
        if let Ok(mut held) = self.counters.encode_held.lock() {
            *held = true;
        }
        EncodeHold {
            counters: self.counters.clone(),
        }
    }

    /// Decodes `seq` to its end in the shared batch, calling `on_token` for each
    /// emitted id on this thread. Blocking. An error in a batched pass fails every
    /// sequence of that pass with the same error.
    pub fn decode(
        &self,
        seq: AnswerSequence,
        on_token: &mut dyn FnMut(u32),
    ) -> candle_core::Result<Generation> {
        let (events, rx) = mpsc::channel();
        self.admit
            .send(Admission { seq, events })
            .map_err(|_| Error::Msg("the decode engine has stopped".into()))?;
        for event in rx {
            match event {
                Event::Token(t) => on_token(t),
                Event::Done(g) => return Ok(g),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Msg(
            "the decode engine stopped during a generation".into(),
        ))
    }

    /// Steps, sequence-steps and the largest batch so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            steps: c.steps.load(Ordering::Relaxed),
            sequence_steps: c.sequence_steps.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            encode_passes: c.encode_passes.load(Ordering::Relaxed),
            images_encoded: c.images_encoded.load(Ordering::Relaxed),
            largest_encode: c.largest_encode.load(Ordering::Relaxed),
            encodes_waiting: c.encodes_waiting.load(Ordering::Relaxed),
        }
    }

    /// Fault injection for tests: the next batched pass fails with `error` (as a
    /// device error would, e.g. "CUDA_ERROR_OUT_OF_MEMORY") before it runs.
    pub fn fail_next_step(&self, error: &str) {
        arm(&self.counters.fault, error);
    }

    /// Fault injection for tests: the next encode pass fails with `error` before it runs.
    pub fn fail_next_encode(&self, error: &str) {
        arm(&self.counters.encode_fault, error);
    }
}

/// Sets an injected fault for the next pass to take ([`take`]).
fn arm(fault: &Mutex<Option<String>>, error: &str) {
    if let Ok(mut f) = fault.lock() {
        *f = Some(error.to_string());
    }
}

/// The injected fault, if one is set, clearing it.
fn take(fault: &Mutex<Option<String>>) -> Option<String> {
    fault.lock().ok().and_then(|mut f| f.take())
}

/// The encode loop: wait for an image, take every image waiting up to the cap (once
/// no [`EncodeHold`] holds them), encode them in one pass and hand each its prefix.
/// When a pass of several fails for any reason but a lack of memory, each of its images
/// is encoded again alone.
fn run_encodes(
    model: &Moondream2,
    queue: &Receiver<EncodeRequest>,
    counters: &Counters,
    max_images: usize,
) {
    while let Ok(first) = queue.recv() {
        if let Ok(mut held) = counters.encode_held.lock() {
            while *held {
                held = match counters.encode_released.wait(held) {
                    Ok(h) => h,
                    Err(_) => break,
                };
            }
        }
        let mut batch = vec![first];
        while batch.len() < max_images {
            match queue.try_recv() {
                Ok(r) => batch.push(r),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let size = batch.len();
        counters.encodes_waiting.fetch_sub(size, Ordering::Relaxed);
        counters.largest_encode.fetch_max(size, Ordering::Relaxed);
        let injected = take(&counters.encode_fault);
        let result = match injected {
            Some(msg) => Err(Error::Msg(msg)),
            None => encode_pass(model, &batch, counters),
        };
        match result {
            Ok(encoded) => {
                for (request, image) in batch.into_iter().zip(encoded) {
                    let _ = request.reply.send(Ok(image));
                }
            }
            Err(e) if size > 1 && !super::says_out_of_memory(&format!("{e:?}")) => {
                // Not a lack of memory, so possibly one image's fault: each goes again
                // alone, so that one bad image fails only its own job.
                tracing::warn!(images = size, error = %e, "batched encode failed; encoding each alone");
                for request in batch {
                    let alone = encode_pass(model, std::slice::from_ref(&request), counters);
                    let _ = request.reply.send(alone.map(|mut one| one.remove(0)));
                }
            }
            Err(e) => {
                // Each caller gets the error and decides (an out-of-memory error
                // requeues the job without counting an attempt).
                let text = format!("{e:?}");
                tracing::warn!(images = size, error = %e, "batched encode failed");
                for request in batch {
                    let _ = request.reply.send(Err(Error::Msg(text.clone())));
                }
            }
        }
    }
}

/// One encode pass over `batch`'s images, counted; a panic inside fails the pass
/// instead of the thread, and every image gets exactly one encoding or the pass fails.
fn encode_pass(
    model: &Moondream2,
    batch: &[EncodeRequest],
    counters: &Counters,
) -> candle_core::Result<Vec<EncodedImage>> {
    let images: Vec<(Tensor, Tiling)> = batch.iter().map(|r| r.image.clone()).collect();
    counters.encode_passes.fetch_add(1, Ordering::Relaxed);
    let encoded =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.encode_many(&images)))
            .unwrap_or_else(|_| Err(Error::Msg("a batched encode panicked".into())))?;
    if encoded.len() != images.len() {
        candle_core::bail!("{} images gave {} encodings", images.len(), encoded.len());
    }
    counters
        .images_encoded
        .fetch_add(images.len() as u64, Ordering::Relaxed);
    Ok(encoded)
}

/// The engine loop: wait for work when idle, admit what is waiting up to the cap, step.
fn run(model: &Moondream2, queue: &Receiver<Admission>, counters: &Counters, max_batch: usize) {
    let mut batch: DecodeBatch<(u64, Sender<Event>)> = DecodeBatch::new();
    let mut next_key = 0u64;
    let mut admit = |batch: &mut DecodeBatch<_>, a: Admission| {
        next_key += 1;
        batch.admit((next_key, a.events), a.seq);
    };
    loop {
        if batch.is_empty() {
            match queue.recv() {
                Ok(a) => admit(&mut batch, a),
                Err(_) => return,
            }
        }
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(a) => admit(&mut batch, a),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let size = batch.len();
        let mut gone = Vec::new();
        let injected = take(&counters.fault);
        let result = match injected {
            Some(msg) => Err(Error::Msg(msg)),
            // A panic inside a step fails that step's sequences instead of the engine.
            None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                batch.step(model, &mut |(key, tx), event| {
                    let event = match event {
                        BatchEvent::Token(t) => Event::Token(t),
                        BatchEvent::Done(g) => Event::Done(g),
                    };
                    if tx.send(event).is_err() {
                        gone.push(*key);
                    }
                })
            }))
            .unwrap_or_else(|_| Err(Error::Msg("a batched decode step panicked".into()))),
        };
        counters.steps.fetch_add(1, Ordering::Relaxed);
        counters
            .sequence_steps
            .fetch_add(size as u64, Ordering::Relaxed);
        counters.largest_batch.fetch_max(size, Ordering::Relaxed);
        if let Err(e) = result {
            // Every sequence of the failed pass gets the error; its caller decides
            // (an out-of-memory error requeues the job without counting an attempt).
            let text = format!("{e:?}");
            tracing::warn!(batch = size, error = %e, "batched decode step failed");
            for (_, tx) in batch.drain_keys() {
                let _ = tx.send(Event::Failed(Error::Msg(text.clone())));
            }
            continue;
        }
        if !gone.is_empty() {
            batch.retain(|(key, _)| !gone.contains(key));
        }
    }
}
