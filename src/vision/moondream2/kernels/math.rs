//! Elementwise functions for the packed path, written so that they vectorise: an
//! exponential accurate to about 2e-7 relative, tanh-approximated GELU and softmax.

use super::isa;

/// `log₂ e`, by which [`exp`] scales `x` to find `n`.
pub(super) const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two (high part exact in few bits), so that `x − n·ln 2` keeps its
/// precision.
pub(super) const EXP_LN2: (f32, f32) = (0.693_359_4, -2.121_944_4e-4);
/// Adding and subtracting 1.5·2²³ rounds to the nearest integer (and vectorises,
/// unlike `f32::round`).
pub(super) const EXP_MAGIC: f32 = 12_582_912.0;
/// The range [`exp`] clamps its argument to, so that `2^n` stays a normal float.
pub(super) const EXP_RANGE: (f32, f32) = (-87.0, 88.0);
/// The coefficients of `p(r) ≈ e^r`, lowest degree first.
pub(super) const EXP_POLY: [f32; 7] = [
    1.0,
    1.0,
    0.5,
    1.666_666_7e-1,
    4.166_662e-2,
    8.333_452e-3,
    1.393_739e-3,
];

/// `e^x` from `2^n · p(r)`, `r = x − n·ln 2`, with a degree-6 polynomial for `p`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const C: [f32; 7] = EXP_POLY;
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let n = (x * EXP_LOG2E + EXP_MAGIC) - EXP_MAGIC;
    let r = x - n * EXP_LN2.0 - n * EXP_LN2.1;
    let p = C[0] + r * (C[1] + r * (C[2] + r * (C[3] + r * (C[4] + r * (C[5] + r * C[6])))));
    // 2^n from the bits of the rounded float (n + 127 lies in 1..=254 after the
    // clamp); integer lanes vectorise where a saturating `as i32` does not.
    let biased = (n + 127.0 + EXP_MAGIC).to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(biased << 23)
}

/// GELU with the tanh approximation (`0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))`),
/// written as `x · σ(2u)`, on the calling thread.
pub fn gelu_tanh_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa().avx512() {
        // SAFETY: AVX512-F is present whenever either AVX512 family is.
        unsafe { gelu_avx512(xs) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa().avx2 {
        // SAFETY: AVX2 and FMA are present (checked at start-up).
        unsafe { gelu_avx2(xs) };
        return;
    }
    gelu(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(xs: &mut [f32]) {
    gelu(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(xs: &mut [f32]) {
    gelu(xs)
}

#[inline(always)]
fn gelu(xs: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for x in xs.iter_mut() {
        let u = C * (*x + 0.044_715 * *x * *x * *x);
        *x /= 1.0 + exp(-2.0 * u);
    }
}

/// Affine LayerNorm of each row of `w.len()` values of `x` into `out`:
/// `(x − mean) / √(var + eps) · w + b`, on the calling thread.
pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    assert!(w.len() == b.len() && !w.is_empty() && x.len() == out.len());
    assert!(x.len().is_multiple_of(w.len()));
    #[cfg(target_arch = "x86_64")]
    if isa().avx512() {
        // SAFETY: AVX512-F is present whenever either AVX512 family is.
        unsafe { layer_norm_avx512(x, w, b, eps, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa().avx2 {
        // SAFETY: AVX2 and FMA are present (checked at start-up).
        unsafe { layer_norm_avx2(x, w, b, eps, out) };
        return;
    }
    layer_norm(x, w, b, eps, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_avx2(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm(x, w, b, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn layer_norm_avx512(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm(x, w, b, eps, out)
}

#[inline(always)]
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = lanes(row, 0.0, |a, b| a + b) / dim as f32;
        for (o, x) in o.iter_mut().zip(row) {
            *o = x - mean;
        }
        let var = sum_of_squares(o) / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, w), b) in o.iter_mut().zip(w).zip(b) {
            *o = *o * inv * w + b;
        }
    }
}

/// Softmax of each row of `len` values in place.
#[inline(always)]
pub fn softmax_rows(xs: &mut [f32], len: usize) {
    for row in xs.chunks_exact_mut(len) {
        let max = lanes(row, f32::NEG_INFINITY, f32::max);
        exp_shifted(row, max);
        let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `x ← e^(x − shift)` for every value of `xs`. On AVX2 without AVX512 in intrinsics
/// (the same results; fast in the opt-level-1 test builds too), elsewhere a loop the
/// compiler vectorises in release builds.
#[inline(always)]
fn exp_shifted(xs: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if isa().avx2 && !isa().avx512() {
        // SAFETY: AVX2 is present (checked at start-up).
        unsafe { super::avx2::exp_shifted(xs, shift) };
        return;
    }
    for x in xs.iter_mut() {
        *x = exp(*x - shift);
    }
}

/// `Σ x²` over 16 independent lanes, so that it vectorises.
#[inline(always)]
fn sum_of_squares(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i] * c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Reduces `xs` with `f` over 16 independent lanes, so that it vectorises.
#[inline(always)]
pub(super) fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    acc.iter().fold(tail, |a, &b| f(a, b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_exponential_is_accurate_to_a_few_ulps_over_the_range_used() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(super::exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    #[test]
    fn layer_norm_matches_f64() {
        let dim = 2048 + 5;
        let x: Vec<f32> = (0..3 * dim)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + 3.0)
            .collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 13) as f32 / 10.0).collect();
        let b: Vec<f32> = (0..dim).map(|i| (i % 7) as f32 / 10.0 - 0.3).collect();
        let mut out = vec![0f32; x.len()];
        super::layer_norm_rows(&x, &w, &b, 1e-5, &mut out);
        for (row, got) in x.chunks_exact(dim).zip(out.chunks_exact(dim)) {
            let n = dim as f64;
            let mean = row.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|v| (f64::from(*v) - mean).powi(2))
                .sum::<f64>()
                / n;
            for (i, (x, g)) in row.iter().zip(got).enumerate() {
                let want = (f64::from(*x) - mean) / (var + 1e-5).sqrt() * f64::from(w[i])
                    + f64::from(b[i]);
                assert!(
                    (f64::from(*g) - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{g} vs {want}"
                );
            }
        }
    }

    /// The AVX2 exponential gives the scalar one's results bit for bit, NaN included.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_exponential_equals_the_scalar_one_bit_for_bit() {
        if !super::isa().avx2 {
            return;
        }
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-30,
            88.5,
        ];
        xs.extend((-300_000..300_000).map(|i| i as f32 * 3.3e-4));
        // Whole, and lengths that end in each path (eight at a time, one at a time).
        for n in [xs.len(), 45, 40, 13, 3] {
            let xs = &xs[..n];
            for shift in [0.0, 1.5, -40.0] {
                let want: Vec<u32> = xs.iter().map(|x| super::exp(x - shift).to_bits()).collect();
                let mut got = xs.to_vec();
                // SAFETY: AVX2 is present (checked above).
                unsafe { super::super::avx2::exp_shifted(&mut got, shift) };
                for ((g, w), x) in got.iter().zip(&want).zip(xs) {
                    let same = g.to_bits() == *w || (g.is_nan() && f32::from_bits(*w).is_nan());
                    assert!(same, "e^({x} - {shift}): {g} vs {}", f32::from_bits(*w));
                }
            }
        }
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 / 200.0).collect();
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| {
                let x = f64::from(x);
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            })
            .collect();
        super::gelu_tanh_in_place(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }
}
