//! Attention of one new position over the filled part of a host KV cache, reading each
//! key and value once (the decode step); no score matrix is materialised.

use rayon::prelude::*;

use super::math::softmax_rows;
use super::{PackedBf16, PackedWeight, isa, matmul_serial};

/// Queries per step of [`attend_all`]: bounds the score block to `128 × keys` floats.
const QUERY_BLOCK: usize = 128;

/// Full (unmasked) attention with bf16 products and f32 softmax: `q` is
/// `[heads × nq × dim]`, `k` and `v` are `[kv_heads × nk × dim]`, `out` is like `q`.
/// Each head packs its keys and values once, then takes its queries 128 at a time, so
/// the score matrix is never whole. `q` is already scaled.
pub fn attend_all(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    dim: usize,
    out: &mut [f32],
) {
    let nq = q.len() / (heads * dim);
    let nk = k.len() / (kv_heads * dim);
    assert!(out.len() == q.len() && v.len() == k.len() && heads.is_multiple_of(kv_heads));
    let rep = heads / kv_heads;
    let wide = isa().avx512();
    out.par_chunks_mut(nq * dim).enumerate().for_each(|(h, o)| {
        let g = h / rep;
        let kh = &k[g * nk * dim..(g + 1) * nk * dim];
        let vh = &v[g * nk * dim..(g + 1) * nk * dim];
        let qh = &q[h * nq * dim..(h + 1) * nq * dim];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX512-F is present whenever either AVX512 family is.
            unsafe { attend_head_avx512(qh, kh, vh, dim, o) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa().avx2 {
            // SAFETY: AVX2 and FMA are present (checked at start-up).
            unsafe { attend_head_avx2(qh, kh, vh, dim, o) };
            return;
        }
        let _ = wide;
        attend_head(qh, kh, vh, dim, o);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_head_avx512(q: &[f32], k: &[f32], v: &[f32], dim: usize, o: &mut [f32]) {
    attend_head(q, k, v, dim, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(q: &[f32], k: &[f32], v: &[f32], dim: usize, o: &mut [f32]) {
    attend_head(q, k, v, dim, o)
}

/// One head of [`attend_all`]: `q` `[nq × dim]`, `k`/`v` `[nk × dim]`.
#[inline(always)]
fn attend_head(q: &[f32], k: &[f32], v: &[f32], dim: usize, o: &mut [f32]) {
    let (nq, nk) = (q.len() / dim, k.len() / dim);
    let keys = PackedWeight::Bf16(PackedBf16::from_rows(k, nk, dim));
    let values = PackedWeight::Bf16(PackedBf16::from_cols(v, nk, dim));
    let mut scores = vec![0f32; QUERY_BLOCK.min(nq) * nk];
    for start in (0..nq).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(nq - start);
        let s = &mut scores[..rows * nk];
        matmul_serial(&q[start * dim..(start + rows) * dim], rows, &keys, s);
        softmax_rows(s, nk);
        matmul_serial(s, rows, &values, &mut o[start * dim..(start + rows) * dim]);
    }
}

/// One KV head's cached keys or values, `[len × dim]`, in f32, as bf16 bits, or in
/// 8 bits with one scale per row.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// Row `j` is `q[j·dim..(j + 1)·dim] × scale[j]`.
    Q8 {
        /// The 8-bit values, `[len × dim]`.
        q: &'a [i8],
        /// One scale per row, `[len]`.
        scale: &'a [f32],
    },
}

impl KvRows<'_> {
    /// Where the rows begin (for prefetching).
    fn as_ptr(&self) -> *const u8 {
        match self {
            Self::F32(v) => v.as_ptr() as *const u8,
            Self::Bf16(v) => v.as_ptr() as *const u8,
            Self::Q8 { q, .. } => q.as_ptr() as *const u8,
        }
    }

    /// Number of values (`len × dim`).
    pub fn values(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::Q8 { q, .. } => q.len(),
        }
    }

    /// The rows in f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.extend_f32(&mut out);
        out
    }

    /// Appends the rows in f32 to `out` (a row or a whole slice at a time, so that
    /// the conversion vectorises).
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        match self {
            Self::F32(v) => out.extend_from_slice(v),
            Self::Bf16(v) => out.extend(v.iter().map(|b| u16::get(*b))),
            Self::Q8 { q, scale } => {
                let dim = q.len() / scale.len().max(1);
                out.reserve(q.len());
                for (row, s) in q.chunks_exact(dim.max(1)).zip(scale.iter()) {
                    out.extend(row.iter().map(|x| f32::from(*x) * s));
                }
            }
        }
    }
}

/// Stores `rows` (f32) as bf16 cache rows into `out` (as long), rounding to nearest
/// even.
pub fn store_bf16(rows: &[f32], out: &mut [u16]) {
    assert_eq!(rows.len(), out.len(), "bf16 rows: room for every value");
    super::pack::to_bf16(isa(), rows, out);
}

/// Stores `rows` (f32, `[n × dim]`) as 8-bit cache rows into `q` (as long) and `scale`
/// (`n`): per row the scale `max |x| / 127` and the values divided by it, rounded half
/// to even.
pub fn store_q8(rows: &[f32], dim: usize, q: &mut [i8], scale: &mut [f32]) {
    assert!(dim > 0 && rows.len().is_multiple_of(dim));
    assert!(q.len() == rows.len() && scale.len() == rows.len() / dim);
    #[cfg(target_arch = "x86_64")]
    if dim == 64 && isa().avx512() {
        // SAFETY: AVX512-F is present whenever either AVX512 family is; the slices
        // hold the rows.
        unsafe { super::x86::quantize_rows_64(rows, q, scale) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if dim == 64 && isa().avx2 {
        // SAFETY: AVX2 and FMA are present (checked at start-up); the slices hold the
        // rows.
        unsafe { super::avx2::quantize_rows_64(rows, q, scale) };
        return;
    }
    store_q8_portable(rows, dim, q, scale);
}

/// [`store_q8`] without vector kernels.
pub(super) fn store_q8_portable(rows: &[f32], dim: usize, q: &mut [i8], scale: &mut [f32]) {
    // Adding and taking away 1.5·2²³ rounds half to even (and vectorises).
    const MAGIC: f32 = 12_582_912.0;
    for ((row, out), s) in rows
        .chunks_exact(dim)
        .zip(q.chunks_exact_mut(dim))
        .zip(scale)
    {
        *s = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        let inv = if *s > 0.0 { 1.0 / *s } else { 0.0 };
        for (o, x) in out.iter_mut().zip(row) {
            *o = ((x * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
        }
    }
}

/// An element of a cache row.
trait Elem: Copy {
    fn get(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

impl Elem for i8 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from(self)
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

/// `out[h] = softmax(q[h]·K[g]ᵀ) · V[g]` for every query head `h` (KV head `g = h / rep`)
/// over the cached positions; `q` and `out` are `[heads × dim]`, `k[g]` and `v[g]`
/// `[len × dim]` each. `q` is already scaled.
pub fn attend_one(q: &[f32], k: &[KvRows<'_>], v: &[KvRows<'_>], dim: usize, out: &mut [f32]) {
    attend_each(q, &[(k, v)], dim, out)
}

/// [`attend_one`] for several sequences of a decode batch in one parallel pass: `q`
/// and `out` are `[seqs × heads × dim]`, `caches[s]` holds sequence `s`'s keys and
/// values per KV head. Each (sequence, head) pair is computed exactly as alone.
pub fn attend_each(
    q: &[f32],
    caches: &[(&[KvRows<'_>], &[KvRows<'_>])],
    dim: usize,
    out: &mut [f32],
) {
    let seqs = caches.len();
    assert!(seqs > 0 && out.len() == q.len() && q.len().is_multiple_of(seqs * dim));
    let heads = q.len() / (seqs * dim);
    for (k, v) in caches {
        assert!(k.len() == v.len() && !k.is_empty() && heads.is_multiple_of(k.len()));
        for (kh, vh) in k.iter().zip(v.iter()) {
            assert!(kh.values() == vh.values() && kh.values().is_multiple_of(dim));
        }
    }
    let wide = isa().avx512();
    out.par_chunks_mut(dim).enumerate().for_each(|(i, o)| {
        let (k, v) = caches[i / heads];
        let h = i % heads;
        let rep = heads / k.len();
        let qh = &q[i * dim..(i + 1) * dim];
        let (kg, vg) = (k[h / rep], v[h / rep]);
        // The keys of the pair this thread most likely takes next, to prefetch while
        // this one's last values are read.
        let next = match caches.get((i + 1) / heads) {
            Some((k, _)) => k[(i + 1) % heads / (heads / k.len())].as_ptr(),
            None => std::ptr::null(),
        };
        #[cfg(target_arch = "x86_64")]
        if wide {
            match (kg, vg, dim) {
                (KvRows::Bf16(kb), KvRows::Bf16(vb), 64) => {
                    // SAFETY: AVX512-F and FMA are present whenever either AVX512 family
                    // is; `next` is only prefetched.
                    unsafe { super::x86::attend_head_bf16_64(qh, kb, vb, next, o) };
                    return;
                }
                (KvRows::Q8 { q: kq, scale: ks }, KvRows::Q8 { q: vq, scale: vs }, 64)
                    if isa().avx512vnni =>
                {
                    // SAFETY: AVX512-VNNI comes with AVX512-F and -BW (isa::detect); FMA
                    // with AVX512-F; `next` is only prefetched.
                    unsafe { super::x86::attend_head_q8_64(qh, (kq, ks), (vq, vs), next, o) };
                    return;
                }
                _ => {}
            }
            // SAFETY: AVX512-F is present whenever either AVX512 family is.
            unsafe { head_avx512(qh, kg, vg, o) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa().avx2 {
            // SAFETY (all three): AVX2 and FMA are present (checked at start-up).
            match (kg, vg, dim) {
                (KvRows::Bf16(kb), KvRows::Bf16(vb), 64) => unsafe {
                    super::avx2::attend_head_bf16_64(qh, kb, vb, o)
                },
                (KvRows::Q8 { q: kq, scale: ks }, KvRows::Q8 { q: vq, scale: vs }, 64) => unsafe {
                    super::avx2::attend_head_q8_64(qh, (kq, ks), (vq, vs), next, o)
                },
                _ => unsafe { head_avx2(qh, kg, vg, o) },
            }
            return;
        }
        let _ = (wide, next);
        head_any(qh, kg, vg, o);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_avx512(q: &[f32], k: KvRows<'_>, v: KvRows<'_>, o: &mut [f32]) {
    head_any(q, k, v, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(q: &[f32], k: KvRows<'_>, v: KvRows<'_>, o: &mut [f32]) {
    head_any(q, k, v, o)
}

#[inline(always)]
fn head_any(q: &[f32], k: KvRows<'_>, v: KvRows<'_>, o: &mut [f32]) {
    match (k, v) {
        (KvRows::F32(k), KvRows::F32(v)) => head(q, k, v, o),
        (KvRows::Bf16(k), KvRows::Bf16(v)) => head(q, k, v, o),
        (KvRows::F32(k), KvRows::Bf16(v)) => head(q, k, v, o),
        (KvRows::Bf16(k), KvRows::F32(v)) => head(q, k, v, o),
        (KvRows::Q8 { q: kq, scale: ks }, KvRows::Q8 { q: vq, scale: vs }) => {
            head_q8(q, (kq, ks), (vq, vs), o)
        }
        (k, v) => head(q, &k.to_f32(), &v.to_f32(), o),
    }
}

/// [`head`] over 8-bit rows: each key's dot product and each value's weight are
/// multiplied by that row's scale.
#[inline(always)]
fn head_q8(q: &[f32], k: (&[i8], &[f32]), v: (&[i8], &[f32]), o: &mut [f32]) {
    let dim = q.len();
    let mut scores: Vec<f32> =
        k.0.chunks_exact(dim)
            .zip(k.1)
            .map(|(row, s)| dot(q, row) * s)
            .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = super::math::exp(*s - max);
        total += *s;
    }
    o.fill(0.0);
    for ((p, row), s) in scores.iter().zip(v.0.chunks_exact(dim)).zip(v.1) {
        let w = p * s;
        for (x, y) in o.iter_mut().zip(row) {
            *x += w * y.get();
        }
    }
    let inv = 1.0 / total;
    for x in o.iter_mut() {
        *x *= inv;
    }
}

/// One head of [`attend_one`], in plain loops (closures would not inherit the
/// caller's target features, and did not vectorise).
#[inline(always)]
fn head<K: Elem, V: Elem>(q: &[f32], k: &[K], v: &[V], o: &mut [f32]) {
    let dim = q.len();
    let len = k.len() / dim;
    let mut scores = vec![0f32; len];
    let mut max = f32::NEG_INFINITY;
    for (s, kj) in scores.iter_mut().zip(k.chunks_exact(dim)) {
        *s = dot(q, kj);
        max = max.max(*s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = super::math::exp(*s - max);
        total += *s;
    }
    o.fill(0.0);
    for (p, vj) in scores.iter().zip(v.chunks_exact(dim)) {
        for (x, y) in o.iter_mut().zip(vj) {
            *x += p * y.get();
        }
    }
    let inv = 1.0 / total;
    for x in o.iter_mut() {
        *x *= inv;
    }
}

/// Dot product with 16 independent sums, so that it vectorises.
#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut total = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        total += x * y.get();
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i].get();
        }
    }
    for v in acc {
        total += v;
    }
    total
}

/// The rounding rules of the integer decode attention over 8-bit cache rows, shared by
/// the AVX512-VNNI and AVX2 kernels so that they round alike: the query and the softmax
/// weights (times each value row's scale) in 16 bits, each with one step per head.
pub(super) mod q8_rounding {
    /// The largest 16-bit magnitude a rounded value takes.
    pub const TOP: f32 = 32_767.0;

    /// The largest total of 16-bit weights whose products with values up to 127 still
    /// add up within an i32 (2³¹ / 127, less a margin for rounding up).
    const WEIGHT_BUDGET: f32 = 16_900_000.0;

    /// The query's rounding step for its largest magnitude `max`, and its inverse
    /// (0 for an all-zero query): half a step of error is 2⁻¹⁶ of `max`.
    pub fn query_step(max: f32) -> (f32, f32) {
        with_inverse(max / TOP)
    }

    /// Turns the softmax numerators `scores` into weights in place (times the value
    /// rows' `scales`) and returns the weights' rounding step and its inverse:
    /// 1/32,767 of the largest, coarser only where their total must be capped at
    /// [`WEIGHT_BUDGET`] (flat attention past 516 positions: 2⁻¹⁴ at 2,048). The
    /// kernels compute it a vector at a time (`x86::weights_step`, `avx2::weights_step`),
    /// tested against this.
    #[cfg(test)]
    pub fn weights_step(scores: &mut [f32], scales: &[f32]) -> (f32, f32) {
        weights_step_from(scores, scales, [0.0; 16], [0.0; 16])
    }

    /// `weights_step` where the first values are done: `max` and `sum` hold its sixteen
    /// lanes' maxima and sums after them (lane `i` over values `i`, `i + 16`, …) and
    /// `scores`/`scales` are the rest. The vector kernels do whole vectors of sixteen
    /// and finish here, so that every path gives the same step bit for bit.
    #[inline(always)]
    pub fn weights_step_from(
        scores: &mut [f32],
        scales: &[f32],
        mut max: [f32; 16],
        mut sum: [f32; 16],
    ) -> (f32, f32) {
        assert_eq!(scores.len(), scales.len());
        // Sixteen independent maxima and sums; the maxima as compares, which is what
        // `vmaxps` does (a NaN weight is passed over, as `f32::max` did).
        let mut chunks = scores.chunks_exact_mut(16);
        let mut rows = scales.chunks_exact(16);
        for (c, r) in (&mut chunks).zip(&mut rows) {
            for i in 0..16 {
                c[i] *= r[i];
                max[i] = larger(max[i], c[i]);
                sum[i] += c[i];
            }
        }
        for (i, (x, r)) in chunks
            .into_remainder()
            .iter_mut()
            .zip(rows.remainder())
            .enumerate()
        {
            *x *= r;
            max[i] = larger(max[i], *x);
            sum[i] += *x;
        }
        let max = max.iter().fold(0f32, |m, x| m.max(*x));
        let sum: f32 = sum.iter().sum();
        with_inverse((max / TOP).max(sum / WEIGHT_BUDGET))
    }

    /// `x` if it is larger than `m`, else `m`: `vmaxps(x, m)`.
    #[inline(always)]
    fn larger(m: f32, x: f32) -> f32 {
        if x > m { x } else { m }
    }

    /// `step` and `1 / step` (0 for a step of 0).
    fn with_inverse(step: f32) -> (f32, f32) {
        (step, if step > 0.0 { 1.0 / step } else { 0.0 })
    }
}
