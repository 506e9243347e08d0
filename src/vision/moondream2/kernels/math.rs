//! Elementwise functions for the packed path, written so that they vectorise: an
//! exponential accurate to about 2e-7 relative, tanh-approximated GELU and softmax.

use rayon::prelude::*;

use super::isa;

/// `e^x` from `2^n · p(r)`, `r = x − n·ln 2`, with a degree-6 polynomial for `p`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5·2²³ trick (vectorises, unlike f32::round).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.666_666_7e-1
                    + r * (4.166_662e-2 + r * (8.333_452e-3 + r * 1.393_739e-3)))));
    // 2^n from the bits of the rounded float (n + 127 lies in 1..=254 after the
    // clamp); integer lanes vectorise where a saturating `as i32` does not.
    let biased = (n + 127.0 + MAGIC).to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(biased << 23)
}

/// GELU with the tanh approximation (`0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))`),
/// written as `x · σ(2u)`, over all threads.
pub fn gelu_tanh_in_place(xs: &mut [f32]) {
    let wide = isa().avx512bf16 || isa().avx512vnni;
    xs.par_chunks_mut(1 << 14).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX512-F is present whenever either AVX512 family is.
            unsafe { gelu_avx512(c) };
            return;
        }
        let _ = wide;
        gelu(c);
    });
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

/// Softmax of each row of `len` values in place.
#[inline(always)]
pub fn softmax_rows(xs: &mut [f32], len: usize) {
    for row in xs.chunks_exact_mut(len) {
        let max = lanes(row, f32::NEG_INFINITY, f32::max);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
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
