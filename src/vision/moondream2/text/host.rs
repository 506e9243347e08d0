//! The decode step on the host (CPU, packed weights): one new position of each of
//! several sequences through every block on plain f32 buffers and the CPU kernels,
//! with no candle op in between (at a few rows, each op's dispatch, copies and thread
//! wake-ups cost more than its arithmetic). Every row is computed the same way
//! whatever the batch, so a sequence decodes alike alone or batched.

use candle_core::Result;
use candle_nn::LayerNorm;

use super::super::kernels::isa;
use super::super::kernels::math::layer_norm_rows;
use super::super::layers::{LN_EPS, Linear, Mlp, PackedLinear};
use super::{Block, HEAD_DIM, KvCache, ROT_DIM, TextModel};

/// An affine LayerNorm's weight and bias on the host.
#[derive(Debug, Clone)]
struct HostNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl HostNorm {
    /// The host copy of `ln`; `None` when it has no bias (not a Moondream2 norm).
    fn new(ln: &LayerNorm) -> Result<Option<Self>> {
        let Some(bias) = ln.bias() else {
            return Ok(None);
        };
        let host = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        Ok(Some(Self {
            weight: host(ln.weight())?,
            bias: host(bias)?,
        }))
    }

    /// Normalises each row of `x` into `out` (same length).
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        layer_norm_rows(x, &self.weight, &self.bias, LN_EPS as f32, out);
    }
}

/// A block's weights as the host step reads them (the packed weights are shared).
#[derive(Debug, Clone)]
pub(super) struct HostBlock {
    ln: HostNorm,
    qkv: PackedLinear,
    proj: PackedLinear,
    fc1: PackedLinear,
    fc2: PackedLinear,
}

impl HostBlock {
    /// The host form of a block whose Linear layers are all packed; `None` otherwise.
    pub(super) fn new(
        ln: &LayerNorm,
        qkv: &Linear,
        proj: &Linear,
        mlp: &Mlp,
    ) -> Result<Option<Self>> {
        let (fc1, fc2) = mlp.layers();
        let (Some(qkv), Some(proj), Some(fc1), Some(fc2)) =
            (qkv.packed(), proj.packed(), fc1.packed(), fc2.packed())
        else {
            return Ok(None);
        };
        let Some(ln) = HostNorm::new(ln)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            ln,
            qkv: qkv.clone(),
            proj: proj.clone(),
            fc1: fc1.clone(),
            fc2: fc2.clone(),
        }))
    }
}

/// Rotary cosines and sines `[max_context × 16]` on the host.
#[derive(Debug, Clone)]
pub(super) struct HostRope {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

impl HostRope {
    /// The cosines and sines of position `pos`.
    fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        self.span(pos, 1)
    }

    /// The cosines and sines of positions `pos..pos + n`, `[n × 16]` each.
    pub(super) fn span(&self, pos: usize, n: usize) -> (&[f32], &[f32]) {
        let half = ROT_DIM / 2;
        let range = pos * half..(pos + n) * half;
        (&self.cos[range.clone()], &self.sin[range])
    }
}

/// The output head on the host: the final LayerNorm and the packed `lm_head`.
#[derive(Debug, Clone)]
pub(super) struct HostLogits {
    post_ln: HostNorm,
    lm_head: PackedLinear,
}

impl HostLogits {
    /// The host form of `post_ln` and `lm_head`, when the latter is packed.
    pub(super) fn new(post_ln: &LayerNorm, lm_head: &Linear) -> Result<Option<Self>> {
        let (Some(lm_head), Some(post_ln)) = (lm_head.packed(), HostNorm::new(post_ln)?) else {
            return Ok(None);
        };
        Ok(Some(Self {
            post_ln,
            lm_head: lm_head.clone(),
        }))
    }

    /// `lm_head(post_ln(hidden))` for `b` rows `[b × dim]` → `[b × vocab]`.
    pub(super) fn logits(&self, hidden: &[f32], b: usize) -> Vec<f32> {
        let mut h = vec![0f32; hidden.len()];
        self.post_ln.apply(hidden, &mut h);
        self.lm_head.forward_rows(&h, b, false)
    }
}

impl TextModel {
    /// Feeds row `i` of `x` (`[b × dim]`) to `caches[i]` at its next position through
    /// every block → the last block's output `[b × dim]`. The caches' lengths are not
    /// advanced (the caller does, once the step succeeded).
    pub(super) fn step_host(
        &self,
        rope: &HostRope,
        x: Vec<f32>,
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>> {
        // On a thread of the CPU pool (the caller waits): each product and attention
        // below then starts on that thread at once, and only the others are woken,
        // instead of this thread handing every one of them to the pool and sleeping
        // until it is done (about 120 hand-overs a step).
        rayon::scope(|_| self.step_host_in_pool(rope, x, caches))
    }

    /// The body of [`Self::step_host`].
    fn step_host_in_pool(
        &self,
        rope: &HostRope,
        mut x: Vec<f32>,
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>> {
        let b = caches.len();
        let dim = self.cfg.dim;
        if x.len() != b * dim {
            candle_core::bail!("host step: {} values for {b} rows of {dim}", x.len());
        }
        self.check_room(caches)?;
        let mut h = vec![0f32; b * dim];
        // Attention and MLP both read `h` and neither needs the other (the parallel
        // block). Without the AVX512 kernels they run side by side: the attention's
        // cache reads overlap the MLP's products and neither waits idle at the other's
        // barriers. In-process A/B, eight rounds alternating the order on two Zen 3
        // vCPUs (8-bit weights and cache): 4 images 99.5 → 88.8 ms a step, one image
        // 72.0 → 66.9 (medians). With the AVX512
        // kernels one after the other, as last measured there: attention beside the
        // MLP's first product cost one image 3.5 ms (both memory-bound).
        let side_by_side = !isa().avx512();
        // Buffers reused by every block.
        let (mut qkv, mut attn, mut inner, mut mlp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (layer, block) in self.blocks.iter().enumerate() {
            let Some(w) = &block.host else {
                candle_core::bail!("host step: block {layer} has no packed weights");
            };
            w.ln.apply(&x, &mut h);
            let mut attention = || -> Result<()> {
                w.qkv.forward_into(&h, b, false, &mut qkv);
                let heads = block.attend_rows(&qkv, layer, caches, rope)?;
                w.proj.forward_into(&heads, b, false, &mut attn);
                Ok(())
            };
            let mut feed_forward = || {
                w.fc1.forward_into(&h, b, true, &mut inner);
                w.fc2.forward_into(&inner, b, false, &mut mlp);
            };
            if side_by_side {
                rayon::join(attention, feed_forward).0?;
            } else {
                attention()?;
                feed_forward();
            }
            for ((x, a), m) in x.iter_mut().zip(&attn).zip(&mlp) {
                *x = (*x + a) + m;
            }
        }
        Ok(x)
    }
}

impl Block {
    /// Attention of the host step: splits each row of `qkv` (`[b × (heads + 2·kv_heads)·64]`)
    /// into heads, rotates queries and keys at that sequence's position, appends keys
    /// and values to its cache and attends over it → `[b × heads·64]`.
    fn attend_rows(
        &self,
        qkv: &[f32],
        layer: usize,
        caches: &mut [&mut KvCache],
        rope: &HostRope,
    ) -> Result<Vec<f32>> {
        let (q_w, kv_w) = (self.n_heads * HEAD_DIM, self.n_kv_heads * HEAD_DIM);
        let width = q_w + 2 * kv_w;
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        // The appends below write one new row in each head of each sequence; their
        // lines load together instead of one miss after another.
        for cache in caches.iter() {
            cache.prefetch_append(layer);
        }
        let mut q = vec![0f32; caches.len() * q_w];
        let mut k = vec![0f32; kv_w];
        for ((row, qi), cache) in qkv
            .chunks_exact(width)
            .zip(q.chunks_exact_mut(q_w))
            .zip(caches.iter_mut())
        {
            let (cos, sin) = rope.at(cache.len);
            qi.copy_from_slice(&row[..q_w]);
            for head in qi.chunks_exact_mut(HEAD_DIM) {
                rotate(head, cos, sin);
                for v in head.iter_mut() {
                    *v *= scale;
                }
            }
            k.copy_from_slice(&row[q_w..q_w + kv_w]);
            for head in k.chunks_exact_mut(HEAD_DIM) {
                rotate(head, cos, sin);
            }
            cache.append_host(layer, self.n_kv_heads, &k, &row[q_w + kv_w..], self.kv);
        }
        super::attend_caches(&q, layer, caches)
    }
}

/// Splits the qkv product of `b × n` positions (`[b·n × (heads + 2·kv_heads)·64]`, row
/// `i·n + p` for position `p` of entry `i`) into head-major queries `[b × heads × n ×
/// 64]` (rotated, then scaled by 1/8), keys `[b × kv_heads × n × 64]` (rotated) and
/// values, in one parallel pass; `cos`/`sin` are the positions' rotary rows `[n × 16]`.
/// The same arithmetic as the candle ops of [`Block::qkv_heads`].
pub(super) fn split_heads(
    qkv: &[f32],
    (b, n): (usize, usize),
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&[f32], &[f32]),
) -> [Vec<f32>; 3] {
    use rayon::prelude::*;
    let width = (heads + 2 * kv_heads) * HEAD_DIM;
    let half = ROT_DIM / 2;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let part = |first: usize, count: usize, rotary: bool, scaled: bool| -> Vec<f32> {
        let mut out = vec![0f32; b * count * n * HEAD_DIM];
        out.par_chunks_mut(n * HEAD_DIM)
            .enumerate()
            .for_each(|(entry_head, dst)| {
                let (entry, head) = (entry_head / count, entry_head % count);
                for (p, d) in dst.chunks_exact_mut(HEAD_DIM).enumerate() {
                    let at = (entry * n + p) * width + (first + head) * HEAD_DIM;
                    d.copy_from_slice(&qkv[at..at + HEAD_DIM]);
                    if rotary {
                        let rows = p * half..(p + 1) * half;
                        rotate(d, &cos[rows.clone()], &sin[rows]);
                    }
                    if scaled {
                        d.iter_mut().for_each(|v| *v *= scale);
                    }
                }
            });
        out
    };
    [
        part(0, heads, true, true),
        part(heads, kv_heads, true, false),
        part(heads + kv_heads, kv_heads, false, false),
    ]
}

/// The half-split rotary embedding of a head's first 32 dimensions, as candle's
/// `rope` computes it; the other 32 pass through.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = ROT_DIM / 2;
    let (a, b) = head[..ROT_DIM].split_at_mut(half);
    for (((x, y), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (x0, y0) = (*x, *y);
        *x = x0 * c - y0 * s;
        *y = x0 * s + y0 * c;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{Device, Module};

    use super::super::KvCache;
    use crate::vision::moondream2::loader::{files_in_dir, load_model_with};
    use crate::vision::moondream2::precision::Precision;

    /// The host split of a multi-position qkv product into rotated, scaled heads is
    /// the candle ops' split value for value, for two entries at positions past 0.
    #[test]
    fn the_host_head_split_equals_the_candle_ops() {
        use super::super::{HEAD_DIM, ROT_DIM, rotary_values, split_heads_candle};
        let (b, n, heads, kv_heads) = (2, 5, 4, 2);
        let width = (heads + 2 * kv_heads) * HEAD_DIM;
        let data: Vec<f32> = (0..b * n * width)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0)
            .collect();
        let (cos, sin) = rotary_values(16);
        let half = ROT_DIM / 2;
        let (cos, sin) = (&cos[3 * half..8 * half], &sin[3 * half..8 * half]);
        let host = super::split_heads(&data, (b, n), (heads, kv_heads), (cos, sin));
        let qkv = candle_core::Tensor::from_vec(data, (b, n, width), &Device::Cpu).unwrap();
        let table = |v: &[f32]| candle_core::Tensor::from_slice(v, (n, half), &Device::Cpu);
        let (q, k, v) = split_heads_candle(
            &qkv,
            (heads, kv_heads),
            &table(cos).unwrap(),
            &table(sin).unwrap(),
        )
        .unwrap();
        for (got, want) in host.iter().zip([q, k, v]) {
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, &want);
        }
    }

    /// The host step and the candle blocks (the path of other devices and f32 weights)
    /// agree to float rounding on the tiny checkpoints, for sequences at different
    /// positions in one batch; the host step is what single positions go through.
    #[test]
    fn the_host_step_matches_the_candle_blocks() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (name, precision) in [("tiny", Precision::Q8), ("tiny_gqa", Precision::Bf16)] {
            let files = files_in_dir(&fixtures.join(name)).unwrap();
            let plan = precision.plan(&Device::Cpu).unwrap();
            let model = load_model_with(&files, &Device::Cpu, &plan).unwrap().0;
            let text = model.text();
            let rope = text
                .host_rope
                .as_ref()
                .expect("packed weights have a host step");
            // Three sequences with 4, 9 and 1 positions already fed.
            let mut caches: Vec<KvCache> = [4usize, 9, 1]
                .iter()
                .map(|&n| {
                    let mut c = KvCache::new(text.cfg.n_layers);
                    let ids: Vec<u32> = (0..n as u32).map(|i| 3 + 7 * i).collect();
                    if n == 1 {
                        // One position alone would take the host step itself.
                        let x = text.embed(&ids).unwrap().unsqueeze(0).unwrap();
                        text.run_blocks(&x, &mut [&mut c], 0, &mut |_| Ok(()))
                            .unwrap();
                    } else {
                        text.feed(&text.embed(&ids).unwrap(), &mut c, 0).unwrap();
                    }
                    c
                })
                .collect();
            let mut copies = caches.clone();
            let xs = text.embed(&[11, 2, 40]).unwrap();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let host = text
                .step_host(rope, super::super::host_values(&xs).unwrap(), &mut refs)
                .unwrap();
            let mut refs: Vec<&mut KvCache> = copies.iter_mut().collect();
            let candle = text.run_batch_blocks(&xs, &mut refs).unwrap();
            // The output head too: host LayerNorm and product against candle's.
            let head = text.host_logits.as_ref().expect("a packed lm_head");
            let host_logits = head.logits(&host, 3);
            let candle_logits = text
                .lm_head
                .forward(&text.post_ln.forward(&candle).unwrap())
                .unwrap();
            let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let candle_logits = candle_logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (what, host, candle) in [
                ("blocks", &host, &candle),
                ("logits", &host_logits, &candle_logits),
            ] {
                assert_eq!(host.len(), candle.len());
                let worst = host
                    .iter()
                    .zip(candle)
                    .map(|(h, c)| (h - c).abs() / (1.0 + c.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{name} {precision:?} {what}: worst difference {worst}"
                );
            }
            // Both appended the new keys and values.
            for (a, b) in caches.iter().zip(&copies) {
                let (ka, va) = a
                    .tensors(0, text.cfg.n_kv_heads, candle_core::DType::F32)
                    .unwrap();
                let (kb, vb) = b
                    .tensors(0, text.cfg.n_kv_heads, candle_core::DType::F32)
                    .unwrap();
                assert_eq!(ka.dims(), kb.dims());
                let diff = |x: candle_core::Tensor, y: candle_core::Tensor| {
                    (x - y)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                assert!(
                    diff(ka, kb) < 1e-3 && diff(va, vb) < 1e-3,
                    "{name}: cache rows differ"
                );
            }
        }
    }
}
