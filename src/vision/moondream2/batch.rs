//! Continuous batching of answer generations: every sequence in a [`DecodeBatch`]
//! advances by one token per [`DecodeBatch::step`], in one forward pass that reads the
//! weights once for all of them. Sequences join and leave between steps; a finished or
//! cancelled one frees its place at once. Prefill stays per sequence
//! ([`Moondream2::begin_answer`]), so prompts of any length mix freely.

use super::Moondream2;
use super::generate::{Advance, AnswerSequence, Generation, StopReason};

/// What happened to one sequence in a step.
#[derive(Debug)]
pub enum BatchEvent {
    /// It emitted a token.
    Token(u32),
    /// It finished (EOS, cap or cancelled) and left the batch.
    Done(Generation),
}

/// Sequences decoding together, each under a caller's key.
#[derive(Debug, Default)]
pub struct DecodeBatch<K> {
    entries: Vec<(K, AnswerSequence)>,
}

impl<K> DecodeBatch<K> {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Adds a prefilled sequence; it takes part from the next step on.
    pub fn admit(&mut self, key: K, seq: AnswerSequence) {
        self.entries.push((key, seq));
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no sequence is decoding.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps only the sequences whose key passes `keep` (drops those whose caller left).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|(k, _)| keep(k));
    }

    /// Removes every sequence and returns the keys, e.g. after a failed step.
    pub fn drain_keys(&mut self) -> Vec<K> {
        self.entries.drain(..).map(|(k, _)| k).collect()
    }

    /// One token boundary for every sequence: each emits its chosen token or stops
    /// (told through `on_event`), then those still running are fed their token in
    /// one batched forward pass and choose the next. On an error the sequences of
    /// the failed pass stay in the batch; the caller decides (see [`Self::drain_keys`]).
    pub fn step(
        &mut self,
        model: &Moondream2,
        on_event: &mut dyn FnMut(&K, BatchEvent),
    ) -> candle_core::Result<()> {
        let mut i = 0;
        while i < self.entries.len() {
            let stop = match self.entries[i].1.advance() {
                Advance::Stop(stop) => Some(stop),
                Advance::Emit { token, last } => {
                    on_event(&self.entries[i].0, BatchEvent::Token(token));
                    last.then_some(StopReason::MaxTokens)
                }
            };
            match stop {
                Some(stop) => {
                    let (key, seq) = self.entries.swap_remove(i);
                    on_event(&key, BatchEvent::Done(seq.finish(stop)));
                }
                None => i += 1,
            }
        }
        if self.entries.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = self.entries.iter().map(|(_, s)| s.input()).collect();
        let xs = model.text().embed(&ids)?;
        let mut caches: Vec<_> = self.entries.iter_mut().map(|(_, s)| &mut s.cache).collect();
        let steps = model.text().feed_batch(&xs, &mut caches)?;
        for ((_, seq), step) in self.entries.iter_mut().zip(&steps) {
            seq.accept(&step.logits)?;
        }
        Ok(())
    }
}

/// Runs sequences to the end in one batch, all admitted at once (for tests and
/// benchmarks; the service admits them as they come, see `crate::vision`).
pub fn decode_together(
    model: &Moondream2,
    seqs: Vec<AnswerSequence>,
) -> candle_core::Result<Vec<Generation>> {
    let n = seqs.len();
    let mut batch = DecodeBatch::new();
    for (i, s) in seqs.into_iter().enumerate() {
        batch.admit(i, s);
    }
    let mut out: Vec<Option<Generation>> = (0..n).map(|_| None).collect();
    while !batch.is_empty() {
        batch.step(model, &mut |&i, e| {
            if let BatchEvent::Done(g) = e {
                out[i] = Some(g);
            }
        })?;
    }
    Ok(out.into_iter().flatten().collect())
}
