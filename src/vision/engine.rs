//! The decode engine: one thread per loaded model that advances every running answer
//! generation together, one batched forward pass per token ([`DecodeBatch`]). Threads
//! running skills prefill their own prompt, hand the sequence over and wait for its
//! tokens; sequences join and leave between steps (continuous batching), so N
//! concurrent captions cost about one weight read per token instead of N.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use candle_core::Error;

use super::moondream2::{AnswerSequence, BatchEvent, DecodeBatch, Generation, Moondream2};

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

/// Counters of the engine, for logs, benchmarks and tests.
#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    sequence_steps: AtomicU64,
    largest_batch: AtomicUsize,
    fault: Mutex<Option<String>>,
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
}

/// A running decode engine; dropping it lets the thread end once its batch is empty.
pub struct DecodeEngine {
    admit: Sender<Admission>,
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
    /// Starts the engine thread for `model`, decoding at most `max_batch` sequences
    /// per pass (more wait for a place).
    pub fn start(model: Arc<Moondream2>, max_batch: usize) -> std::io::Result<Self> {
        let (admit, queue) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("captiond-decode".into())
            .spawn(move || run(&model, &queue, &c, max_batch.max(1)))?;
        Ok(Self { admit, counters })
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
        }
    }

    /// Fault injection for tests: the next batched pass fails with `error` (as a
    /// device error would, e.g. "CUDA_ERROR_OUT_OF_MEMORY") before it runs.
    pub fn fail_next_step(&self, error: &str) {
        if let Ok(mut f) = self.counters.fault.lock() {
            *f = Some(error.to_string());
        }
    }
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
        let injected = counters.fault.lock().ok().and_then(|mut f| f.take());
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
