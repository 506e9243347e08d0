//! Attention of one new position over the filled part of a host KV cache, reading each
//! key and value once (the decode step); no score matrix is materialised.

use rayon::prelude::*;

use super::isa;

/// `out[h] = softmax(q[h]·K[g]ᵀ) · V[g]` for every query head `h` (KV head `g = h / rep`)
/// over `len` cached positions. `q` and `out` are `[heads × dim]`; `k` and `v` are
/// position-major `[len × kv_heads × dim]`. `q` is already scaled.
pub fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    dim: usize,
    out: &mut [f32],
) {
    let width = kv_heads * dim;
    let len = k.len() / width;
    assert!(
        q.len() == heads * dim
            && out.len() == heads * dim
            && v.len() == k.len()
            && heads % kv_heads == 0
    );
    let rep = heads / kv_heads;
    let wide = isa().avx512bf16 || isa().avx512vnni;
    out.par_chunks_mut(dim).enumerate().for_each(|(h, o)| {
        let qh = &q[h * dim..(h + 1) * dim];
        let off = (h / rep) * dim;
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX512-F is present whenever either AVX512 family is.
            unsafe { head_avx512(qh, k, v, off, width, len, o) };
            return;
        }
        let _ = wide;
        head(qh, k, v, off, width, len, o);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    off: usize,
    width: usize,
    len: usize,
    o: &mut [f32],
) {
    head(q, k, v, off, width, len, o)
}

#[inline(always)]
fn head(q: &[f32], k: &[f32], v: &[f32], off: usize, width: usize, len: usize, o: &mut [f32]) {
    let dim = q.len();
    let mut scores: Vec<f32> = (0..len)
        .map(|j| {
            let kj = &k[j * width + off..j * width + off + dim];
            dot(q, kj)
        })
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut total = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        total += *s;
    }
    o.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        let vj = &v[j * width + off..j * width + off + dim];
        for (x, y) in o.iter_mut().zip(vj) {
            *x += p * y;
        }
    }
    let inv = 1.0 / total;
    for x in o.iter_mut() {
        *x *= inv;
    }
}

/// Dot product with 16 independent sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
