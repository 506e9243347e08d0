//! AVX2 kernels for CPUs without AVX512 (most desktop and laptop CPUs): few rows with
//! the weights widened in registers, many rows with a panel of the weights widened to
//! f32 and handed to the `gemm` crate. Every product equals the scalar path's up to the
//! order of f32 additions: the same bf16 rounding of activations and of widened 8-bit
//! weights, the same exact integer dot products. The decode attention over 8-bit cache
//! rows rounds as the AVX512-VNNI kernel does instead (query and weights in 16 bits,
//! `attention::q8_rounding`).
//! Every function here requires the instruction sets named in its `target_feature`
//! (the caller checks [`super::isa`]).

use std::arch::x86_64::*;

use super::pack::{PackedQ8, PackedWeight, QuantActivations};
use super::{BLOCK_K, BLOCK_N, Q8_AHEAD};

/// Eight f32 rounded to bf16 (nearest even; a NaN stays a NaN, made quiet), as f32
/// bit patterns whose low 16 bits are zero.
#[inline]
#[target_feature(enable = "avx2")]
fn round_bf16(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
    let rounded = _mm256_and_si256(biased, high);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    let kept = _mm256_or_si256(_mm256_and_si256(bits, high), _mm256_set1_epi32(0x0040_0000));
    _mm256_blendv_epi8(rounded, kept, nan)
}

/// f32 → bf16 bits (round to nearest even, NaN kept a quiet NaN), 8 at a time.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: every load and store covers i..i + 8 with i + 8 ≤ n.
    unsafe {
        while i + 8 <= n {
            let v = _mm256_srli_epi32::<16>(round_bf16(_mm256_loadu_ps(src.as_ptr().add(i))));
            // Narrow the eight 32-bit lanes (each below 2¹⁶) to 16 bits, in order.
            let packed = _mm256_packus_epi32(v, v);
            let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
            _mm_storeu_si128(
                dst.as_mut_ptr().add(i) as *mut __m128i,
                _mm256_castsi256_si128(ordered),
            );
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = half::bf16::from_f32(src[j]).to_bits();
    }
}

/// `src` rounded to bf16 but kept in f32 (the values [`f32_to_bf16`] gives, widened),
/// into `dst` (as long), 8 at a time.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn round_to_bf16(src: &[f32], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: every load and store covers i..i + 8 with i + 8 ≤ n.
    unsafe {
        while i + 8 <= n {
            let v = round_bf16(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(v));
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = half::bf16::from_f32(src[j]).to_f32();
    }
}

/// The q8 product for blocks `b0..b1` into `c` (`m × 16·(b1−b0)`): per 32-input group
/// the exact integer dot product of the weights `q` (stored `q + 128`) with the 8-bit
/// activations, as `vpmaddubsw(|q|, sign(a, q))` (no pair reaches the 16-bit limit,
/// as both sides lie in −127..=127), then scaled into f32 sums. The weights are
/// prefetched [`Q8_AHEAD`] groups ahead. At four rows this is bound by its arithmetic
/// (eight vector operations per row for each 64 weight bytes): on two Zen 3 vCPUs
/// 285 MB took 11.9 ms at four rows in slow and fast hours alike, and 8.0 ms at one row
/// when memory was fast (`scripts/bench-model --kernels`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_rows(
    a: &QuantActivations,
    w: &PackedQ8,
    b0: usize,
    b1: usize,
    c: &mut [f32],
) {
    assert!(a.m >= 1 && a.m <= 8 && a.kp == w.kp);
    assert!(c.len() >= a.m * BLOCK_N * (b1 - b0) && b1 * BLOCK_N * w.kp <= w.q.len());
    let ldc = BLOCK_N * (b1 - b0);
    for b in b0..b1 {
        // Up to four rows per pass over the block (more would spill the sums); a second
        // pass reads the block from cache.
        let mut r0 = 0;
        while r0 < a.m {
            let rows = (a.m - r0).min(4);
            // SAFETY: the asserts above bound every offset (block b and rows
            // r0..r0 + rows exist; c holds m rows of ldc).
            unsafe {
                let out = c.as_mut_ptr().add((b - b0) * BLOCK_N + r0 * ldc);
                match rows {
                    1 => q8_block::<1>(a, w, b, r0, out, ldc),
                    2 => q8_block::<2>(a, w, b, r0, out, ldc),
                    3 => q8_block::<3>(a, w, b, r0, out, ldc),
                    _ => q8_block::<4>(a, w, b, r0, out, ldc),
                }
            }
            r0 += rows;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block<const MR: usize>(
    a: &QuantActivations,
    w: &PackedQ8,
    b: usize,
    r0: usize,
    c: *mut f32,
    ldc: usize,
) {
    let (kp, groups) = (w.kp, w.kp / BLOCK_K);
    // SAFETY: the caller checked that block b and rows r0..r0 + MR of `a` exist and
    // that `c` has MR rows of 16 at stride ldc.
    unsafe {
        let q = w.q.as_ptr().add(b * BLOCK_N * kp);
        let scales = w.scales.as_ptr().add(b * groups * BLOCK_N) as *const __m128i;
        let aq = a.q.as_ptr().add(r0 * kp);
        let scale = a.scale.as_ptr().add(r0 * groups);
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for g in 0..groups {
            let mut dot = [[_mm256_setzero_si256(); 2]; MR];
            for quad in 0..BLOCK_K / 4 {
                let at = q.add(g * 512 + quad * 64);
                if r0 == 0 {
                    // The first pass streams from memory: one line of a later group
                    // per quad (past the last group, the start of the next block), as
                    // the AVX512 kernel does; later passes read the block from cache.
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(Q8_AHEAD * 512) as *const i8);
                }
                // Signed weights, −127..=127.
                let w = [
                    _mm256_xor_si256(_mm256_loadu_si256(at as *const __m256i), flip),
                    _mm256_xor_si256(_mm256_loadu_si256(at.add(32) as *const __m256i), flip),
                ];
                let mag = [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])];
                for (r, d) in dot.iter_mut().enumerate() {
                    let four = _mm256_set1_epi32(
                        (aq.add(r * kp + g * BLOCK_K + quad * 4) as *const i32).read_unaligned(),
                    );
                    for h in 0..2 {
                        let pairs = _mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(four, w[h]));
                        d[h] = _mm256_add_epi32(d[h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            let sw = [
                _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * g))),
                _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * g + 1))),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let sa = _mm256_set1_ps(*scale.add(r * groups + g));
                for h in 0..2 {
                    let s = _mm256_mul_ps(sw[h], sa);
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h]), s, acc[h]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), acc[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
        }
    }
}

/// `m ≤ 8` bf16 rows (`a`, `m × kp`) times `blocks` packed bf16 column blocks (`w`)
/// into `c` (stride `ldc`): the weights widened to f32 in registers, two rows per pass
/// with four independent sums each.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn bf16_rows_into(
    a: &[u16],
    m: usize,
    kp: usize,
    w: &[u16],
    blocks: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(a.len() >= m * kp && w.len() >= blocks * BLOCK_N * kp);
    assert!(m >= 1 && c.len() >= (m - 1) * ldc + blocks * BLOCK_N);
    for b in 0..blocks {
        for r0 in (0..m).step_by(2) {
            // SAFETY: the asserts above bound block b, rows r0..r0 + 2 (or the last
            // row) and their outputs.
            unsafe {
                let wb = w.as_ptr().add(b * BLOCK_N * kp);
                let out = c.as_mut_ptr().add(r0 * ldc + b * BLOCK_N);
                let ar = a.as_ptr().add(r0 * kp);
                let first = r0 == 0;
                if m - r0 >= 2 {
                    bf16_block::<2>(ar, kp, wb, out, ldc, first);
                } else {
                    bf16_block::<1>(ar, kp, wb, out, ldc, first);
                }
            }
        }
    }
}

/// How many input pairs ahead [`bf16_block`] prefetches its weights on the first pass
/// (2 KiB). Zen 3, 268 MB of products, two runs of eight rounds alternating with no
/// prefetch (medians): four rows 14.3 → 12.3 and 16.5 → 15.0 ms, one row 8.6 → 8.0
/// and 9.8 → 8.8.
const BF16_AHEAD: usize = 32;

/// MR rows times one bf16 block; `first` (the first pass over the block, which streams
/// it from memory) prefetches [`BF16_AHEAD`] pairs ahead.
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_block<const MR: usize>(
    a: *const u16,
    kp: usize,
    w: *const u16,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    // SAFETY: the caller bounds MR rows of kp from `a`, one block from `w` and MR rows
    // of 16 outputs at stride ldc from `c`.
    unsafe {
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        // Per row: [columns 0–7, 8–15] × [even input, odd input].
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        for pair in 0..kp / 2 {
            let at = w.add(pair * 2 * BLOCK_N);
            if first {
                // One line a pair (past the block's end, the next block's start).
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(BF16_AHEAD * 2 * BLOCK_N) as *const i8);
            }
            let x = [
                _mm256_loadu_si256(at as *const __m256i),
                _mm256_loadu_si256(at.add(16) as *const __m256i),
            ];
            // Each 32-bit lane holds one column's even input (low half) and odd input.
            let wide = [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x[0])),
                _mm256_castsi256_ps(_mm256_and_si256(x[0], high)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x[1])),
                _mm256_castsi256_ps(_mm256_and_si256(x[1], high)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let two = (a.add(r * kp + 2 * pair) as *const u32).read_unaligned();
                let even = _mm256_set1_ps(f32::from_bits(two << 16));
                let odd = _mm256_set1_ps(f32::from_bits(two & 0xffff_0000));
                acc[0] = _mm256_fmadd_ps(wide[0], even, acc[0]);
                acc[1] = _mm256_fmadd_ps(wide[1], odd, acc[1]);
                acc[2] = _mm256_fmadd_ps(wide[2], even, acc[2]);
                acc[3] = _mm256_fmadd_ps(wide[3], odd, acc[3]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), _mm256_add_ps(acc[0], acc[1]));
            _mm256_storeu_ps(c.add(r * ldc + 8), _mm256_add_ps(acc[2], acc[3]));
        }
    }
}

/// Column blocks `b0..b1` of `w` widened to f32, row-major over the inputs
/// (`[kp × 16·(b1−b0)]`, the right-hand side of a product): bf16 exactly, 8-bit values
/// times their scale rounded to bf16 (as the scalar path widens them).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_panel(w: &PackedWeight, b0: usize, b1: usize, out: &mut Vec<f32>) {
    let kp = w.kp();
    let width = BLOCK_N * (b1 - b0);
    out.clear();
    out.resize(kp * width, 0.0);
    assert!(b0 <= b1 && b1 <= w.blocks());
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    for b in b0..b1 {
        let col = BLOCK_N * (b - b0);
        match w {
            PackedWeight::Bf16(w) => {
                let src = w.block_range(b, b + 1);
                for pair in 0..kp / 2 {
                    for h in 0..2 {
                        // SAFETY: the block holds kp/2 pairs of 16 columns; `out` holds
                        // kp rows of `width`, of which these write columns col..col + 16.
                        unsafe {
                            let x = _mm256_loadu_si256(
                                src.as_ptr().add(pair * 2 * BLOCK_N + 16 * h) as *const __m256i,
                            );
                            let row = out.as_mut_ptr().add(2 * pair * width + col + 8 * h);
                            _mm256_storeu_ps(row, _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x)));
                            _mm256_storeu_ps(
                                row.add(width),
                                _mm256_castsi256_ps(_mm256_and_si256(x, high)),
                            );
                        }
                    }
                }
            }
            PackedWeight::Q8(w) => {
                let groups = kp / BLOCK_K;
                let src = &w.q[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
                let scales = &w.scales[b * groups * BLOCK_N..(b + 1) * groups * BLOCK_N];
                let (mask, shift) = (_mm256_set1_epi32(0xff), _mm256_set1_epi32(128));
                let (one, bias) = (_mm256_set1_epi32(1), _mm256_set1_epi32(0x7fff));
                for quad in 0..kp / 4 {
                    let g = quad * 4 / BLOCK_K;
                    for h in 0..2 {
                        // SAFETY: as above; `scales` holds 16 per group.
                        unsafe {
                            let x = _mm256_loadu_si256(
                                src.as_ptr().add(quad * 64 + 32 * h) as *const __m256i
                            );
                            let s = _mm256_cvtph_ps(_mm_loadu_si128(
                                scales.as_ptr().add(g * BLOCK_N + 8 * h) as *const __m128i,
                            ));
                            for i in 0..4 {
                                // Input 4·quad + i of columns 8h..8h + 8: byte i of each lane.
                                let byte = _mm256_and_si256(
                                    _mm256_srlv_epi32(x, _mm256_set1_epi32(8 * i as i32)),
                                    mask,
                                );
                                let v = _mm256_mul_ps(
                                    _mm256_cvtepi32_ps(_mm256_sub_epi32(byte, shift)),
                                    s,
                                );
                                // Round to bf16 (nearest even); the scales are finite.
                                let bits = _mm256_castps_si256(v);
                                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), one);
                                let r = _mm256_add_epi32(_mm256_add_epi32(bits, bias), odd);
                                let r = _mm256_and_si256(r, high);
                                let row =
                                    out.as_mut_ptr().add((4 * quad + i) * width + col + 8 * h);
                                _mm256_storeu_ps(row, _mm256_castsi256_ps(r));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Many rows: `c[m × 16·(b1−b0)] = a[m × kp] · W[b0..b1]ᵀ` with `a` already rounded to
/// bf16 (in f32), one widened panel of ~1 MiB of weights at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiled(
    a: &[f32],
    m: usize,
    w: &PackedWeight,
    b0: usize,
    b1: usize,
    c: &mut [f32],
) {
    let kp = w.kp();
    let width = BLOCK_N * (b1 - b0);
    assert!(a.len() >= m * kp && c.len() >= m * width);
    let panel = ((1 << 20) / (kp * BLOCK_N * 4)).clamp(1, 16);
    let mut wide = Vec::new();
    let mut p0 = b0;
    while p0 < b1 {
        let p1 = (p0 + panel).min(b1);
        let cols = BLOCK_N * (p1 - p0);
        // SAFETY: AVX2, FMA and F16C are present (this function's own features).
        unsafe { widen_panel(w, p0, p1, &mut wide) };
        // SAFETY: `a` is m × kp (row stride kp), `wide` is kp × cols (row stride cols),
        // and `c` from column BLOCK_N·(p0 − b0) holds m rows of cols at stride width.
        unsafe {
            gemm::gemm(
                m,
                cols,
                kp,
                c.as_mut_ptr().add(BLOCK_N * (p0 - b0)),
                1,
                width as isize,
                false,
                a.as_ptr(),
                1,
                kp as isize,
                wide.as_ptr(),
                1,
                cols as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        p0 = p1;
    }
}

/// The 8-bit quantization of [`QuantActivations`] (per 32 inputs, scale `max |x| / 127`,
/// half to even) for whole groups of `row`, as the AVX512 kernel does it: the same
/// values as the portable loop, which the compiler left scalar (rounding and the
/// saturating cast one value at a time). It runs before each product's threads start,
/// so both cores waited on it: in-process A/B on Zen 3 (8-bit weights and cache, 24
/// rounds alternating, 30 steps each), the vector form saved a median 1.8 ms a step
/// at one image (faster in 20 of 24 rounds) and 7.3 ms at four (19 of 24).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_groups(
    row: &[f32],
    q: &mut [i8],
    scale: &mut [f32],
    start: &mut [i32],
) {
    let groups = row.len() / BLOCK_K;
    assert!(q.len() >= groups * BLOCK_K && scale.len() >= groups && start.len() >= groups);
    // SAFETY: group g reads row[32g..32g + 32] and writes q[32g..32g + 32], in bounds by
    // the assert above.
    unsafe {
        for g in 0..groups {
            let x: [__m256; 4] =
                std::array::from_fn(|i| _mm256_loadu_ps(row.as_ptr().add(g * BLOCK_K + 8 * i)));
            let (s, inv) = q8_scale(&x);
            let v = store_q8_32(&x, inv, q.as_mut_ptr().add(g * BLOCK_K));
            let total =
                _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
            let total = _mm_add_epi32(
                _mm256_castsi256_si128(total),
                _mm256_extracti128_si256::<1>(total),
            );
            let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b01_00_11_10>(total));
            let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b10_11_00_01>(total));
            scale[g] = s;
            start[g] = -128 * _mm_cvtsi128_si32(total);
        }
    }
}

/// Rows of 64 → 8 bits with one scale per row (`max |x| / 127`, half to even), as
/// [`super::attention::store_q8`] does them: the AVX2 twin of
/// [`super::x86::quantize_rows_64`] (the cache rows each decoded token appends). On Zen
/// 3, the 6,144 rows of a four-image step (24 layers, K and V, 32 heads) take 0.08 ms
/// against 0.47 ms in the portable loop (release build, five rounds of twenty).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_rows_64(rows: &[f32], q: &mut [i8], scale: &mut [f32]) {
    const D: usize = 64;
    let n = rows.len() / D;
    assert!(q.len() >= n * D && scale.len() >= n);
    // SAFETY: row r reads rows[64r..64r + 64] and writes q[64r..64r + 64], in bounds by
    // the assert above.
    unsafe {
        for (r, s_out) in scale.iter_mut().enumerate().take(n) {
            let x: [__m256; 8] =
                std::array::from_fn(|i| _mm256_loadu_ps(rows.as_ptr().add(r * D + 8 * i)));
            let (s, inv) = q8_scale(&x);
            for half in 0..2 {
                let part = [0, 1, 2, 3].map(|i| x[4 * half + i]);
                store_q8_32(&part, inv, q.as_mut_ptr().add(r * D + 32 * half));
            }
            *s_out = s;
        }
    }
}

/// The 8-bit scale of the values in `x` (`max |x| / 127`) and its inverse (0 for an
/// all-zero block), computed as the portable loops do.
#[inline]
#[target_feature(enable = "avx2")]
fn q8_scale(x: &[__m256]) -> (f32, __m256) {
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let m = x.iter().fold(_mm256_setzero_ps(), |m, v| {
        _mm256_max_ps(m, _mm256_and_ps(*v, magnitude))
    });
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let s = amax / 127.0;
    (s, _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 }))
}

/// Rounds `x · inv` half to even, clamps to ±127 and stores the 32 bytes at `out` in
/// order; returns the clamped values (as dwords, lane order of `x`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_q8_32(x: &[__m256; 4], inv: __m256, out: *mut i8) -> [__m256i; 4] {
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    // The default rounding mode rounds half to even.
    let v: [__m256i; 4] = std::array::from_fn(|i| {
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv));
        _mm256_min_epi32(_mm256_max_epi32(v, lo), hi)
    });
    // The bytes of the two packs come out as dwords of 4 values in the order x0 x1 x2
    // x3 (first halves), then the second halves; the permute puts them in order.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(v[0], v[1]),
        _mm256_packs_epi32(v[2], v[3]),
    );
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // SAFETY: the caller gives 32 writable bytes at `out`.
    unsafe {
        _mm256_storeu_si256(
            out as *mut __m256i,
            _mm256_permutevar8x32_epi32(bytes, order),
        )
    };
    v
}

/// `e^x` on eight lanes: [`super::math::exp`]'s operations in its order, so its results
/// bit for bit. In intrinsics because the dev and test profiles build this crate at
/// opt-level 1, where the scalar loops over it are not vectorised.
#[inline]
#[target_feature(enable = "avx2")]
fn exp8(x: __m256) -> __m256 {
    use super::math::{EXP_LN2, EXP_LOG2E, EXP_MAGIC, EXP_POLY, EXP_RANGE};
    let (add, sub, mul, all) = (_mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_set1_ps);
    // As `clamp`: a NaN stays NaN (min/max return their second operand then).
    let x = _mm256_min_ps(all(EXP_RANGE.1), _mm256_max_ps(all(EXP_RANGE.0), x));
    let n = sub(add(mul(x, all(EXP_LOG2E)), all(EXP_MAGIC)), all(EXP_MAGIC));
    let r = sub(sub(x, mul(n, all(EXP_LN2.0))), mul(n, all(EXP_LN2.1)));
    // Horner from the top, as the scalar expression nests.
    let mut p = all(EXP_POLY[6]);
    for c in EXP_POLY[..6].iter().rev() {
        p = add(all(*c), mul(r, p));
    }
    let biased = _mm256_sub_epi32(
        _mm256_castps_si256(add(add(n, all(127.0)), all(EXP_MAGIC))),
        _mm256_set1_epi32(0x4B40_0000),
    );
    mul(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
}

/// `x ← e^(x − shift)` for every value of `xs`, eight at a time (the iterations are
/// independent, so they overlap in the core without unrolling by hand: measured at
/// opt-level 1, four chains per step were no faster); the last few by
/// [`super::math::exp`], which gives the same results.
#[target_feature(enable = "avx2")]
pub(super) fn exp_shifted(xs: &mut [f32], shift: f32) {
    let s = _mm256_set1_ps(shift);
    let mut eights = xs.chunks_exact_mut(8);
    for c in &mut eights {
        // SAFETY: `c` holds eight floats.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
        }
    }
    for x in eights.into_remainder() {
        *x = super::math::exp(*x - shift);
    }
}

/// Lane `i` of the result is the sum of `d[i]`'s eight lanes (two rounds of pairwise
/// adds within 128-bit halves, then the halves added).
#[inline]
#[target_feature(enable = "avx2")]
fn sums_of_8(d: &[__m256; 8]) -> __m256 {
    let h = [
        _mm256_hadd_ps(d[0], d[1]),
        _mm256_hadd_ps(d[2], d[3]),
        _mm256_hadd_ps(d[4], d[5]),
        _mm256_hadd_ps(d[6], d[7]),
    ];
    // Each 128-bit half: [d0, d1, d2, d3] (or d4..d7) summed over that half's lanes.
    let (a, b) = (_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(a, b),
        _mm256_permute2f128_ps::<0x31>(a, b),
    )
}

/// The decode attention of one head over `len` cached rows of 64: `row(j)` widens
/// row `j` of the keys or values to eight f32 vectors in the lane order of `q`.
/// Returns the weighted sum of values, normalised, in that lane order. Eight keys' dot
/// products are summed together by [`sums_of_8`]. (Its own target features, so that
/// its closures get them.)
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_64(
    q: [__m256; 8],
    len: usize,
    key: impl Fn(usize) -> [__m256; 8],
    value: impl Fn(usize) -> [__m256; 8],
) -> [__m256; 8] {
    // SAFETY: the caller's target features hold (AVX2, FMA); loads go through `key`
    // and `value`, stores into `scores` (len, padded to 8).
    unsafe {
        let dot = |j: usize| {
            let x = key(j);
            let mut a = _mm256_mul_ps(q[0], x[0]);
            let mut b = _mm256_mul_ps(q[1], x[1]);
            for i in (2..8).step_by(2) {
                a = _mm256_fmadd_ps(q[i], x[i], a);
                b = _mm256_fmadd_ps(q[i + 1], x[i + 1], b);
            }
            _mm256_add_ps(a, b)
        };
        let padded = len.next_multiple_of(8);
        super::with_scratch(padded, |scores| {
            let mut j = 0;
            while j + 8 <= len {
                let d: [__m256; 8] = std::array::from_fn(|i| dot(j + i));
                _mm256_storeu_ps(scores.as_mut_ptr().add(j), sums_of_8(&d));
                j += 8;
            }
            for (jj, s) in scores.iter_mut().enumerate().take(len).skip(j) {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), dot(jj));
                *s = lanes.iter().sum();
            }
            let scores = &mut scores[..len];
            let max = super::math::lanes(scores, f32::NEG_INFINITY, f32::max);
            exp_shifted(scores, max);
            let total = super::math::lanes(scores, 0.0, |a, b| a + b);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, p) in scores.iter().enumerate() {
                let w = _mm256_set1_ps(*p);
                let x = value(j);
                for (a, x) in acc.iter_mut().zip(x) {
                    *a = _mm256_fmadd_ps(w, x, *a);
                }
            }
            let inv = _mm256_set1_ps(1.0 / total);
            acc.map(|a| _mm256_mul_ps(a, inv))
        })
    }
}

/// One head of the decode attention over bf16 cache rows of width 64: `q` `[64]`
/// (scaled), `k`/`v` `[len × 64]` bf16 bits → `o` `[64]`. A row's four 256-bit loads
/// hold an even dimension in each 32-bit lane's low half and the next odd one in its
/// high half, so a shift and a mask widen them (the query and output split alike).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_head_bf16_64(q: &[f32], k: &[u16], v: &[u16], o: &mut [f32]) {
    const D: usize = 64;
    assert!(q.len() == D && o.len() == D && k.len() == v.len() && k.len().is_multiple_of(D));
    let len = k.len() / D;
    // Vector 2c holds the even dimensions of 16c..16c + 16, vector 2c + 1 the odd ones.
    let split: [[f32; 8]; 8] = super::split_even_odd(q);
    // SAFETY: rows j < len of k and v (len × 64 each, asserted) are the only loads.
    let acc = unsafe {
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let widen = |p: *const u16| -> [__m256; 8] {
            let x = [0, 16, 32, 48].map(|c| _mm256_loadu_si256(p.add(c) as *const __m256i));
            std::array::from_fn(|i| {
                let x = x[i / 2];
                _mm256_castsi256_ps(if i % 2 == 0 {
                    _mm256_slli_epi32::<16>(x)
                } else {
                    _mm256_and_si256(x, high)
                })
            })
        };
        let qv = split.map(|s| _mm256_loadu_ps(s.as_ptr()));
        let (kp, vp) = (k.as_ptr(), v.as_ptr());
        head_64(qv, len, |j| widen(kp.add(j * D)), |j| widen(vp.add(j * D)))
    };
    let mut lanes = [[0f32; 8]; 8];
    for (l, a) in lanes.iter_mut().zip(acc) {
        // SAFETY: 8 floats into an array of 8.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), a) };
    }
    super::merge_even_odd(&lanes, o);
}

/// [`attend_head_bf16_64`] over 8-bit cache rows: `k`/`v` are (`[len × 64]` values,
/// `[len]` scales). Integer products, rounded as the AVX512-VNNI kernel's
/// ([`super::attention::q8_rounding`]): the query rounded to 16 bits (one scale for the head),
/// key rows sign-extended to 16 bits and multiplied by `vpmaddwd` (exact in 32 bits);
/// the softmax weights times each value row's scale rounded to 16 bits too (their
/// total capped so that every sum fits an i32), two value rows interleaved per
/// `vpmaddwd`. About half the instructions of widening every value to f32. `next` (only
/// prefetched, may be null) is where the keys of the head computed next begin.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_head_q8_64(
    q: &[f32],
    k: (&[i8], &[f32]),
    v: (&[i8], &[f32]),
    next: *const u8,
    o: &mut [f32],
) {
    let len = k.1.len();
    assert!(q.len() == 64 && o.len() == 64 && k.0.len() == len * 64);
    assert!(v.0.len() == len * 64 && v.1.len() == len && len > 0);
    // Scores (len, padded to 8), then the 16-bit weights (len + 1, two to a float).
    let padded = len.next_multiple_of(8);
    super::with_scratch(padded + padded / 2 + 1, |buf| {
        let (scores, weights) = buf.split_at_mut(padded);
        // SAFETY: the caller's guarantees (the CPU features) hold; `weights` holds at
        // least len + 1 16-bit values.
        unsafe { q8_head(q, k, v, next, o, scores, weights.as_mut_ptr() as *mut i16) }
    })
}

/// The 8-bit attention's weight step, `attention::q8_rounding::weights_step` (the
/// portable definition, which the tests hold this to bit for bit), its sixteen lanes as
/// two vectors (the compiler left its loop scalar).
#[target_feature(enable = "avx2")]
pub(super) fn weights_step(scores: &mut [f32], scales: &[f32]) -> (f32, f32) {
    let len = scores.len();
    assert_eq!(scales.len(), len);
    let whole = len / 16 * 16;
    let (mut max, mut sum) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
    for j in (0..whole).step_by(16) {
        for h in 0..2 {
            let at = j + 8 * h;
            // SAFETY: at + 8 ≤ len for both slices.
            unsafe {
                let x = _mm256_mul_ps(
                    _mm256_loadu_ps(scores.as_ptr().add(at)),
                    _mm256_loadu_ps(scales.as_ptr().add(at)),
                );
                _mm256_storeu_ps(scores.as_mut_ptr().add(at), x);
                // `vmaxps(x, max)`: x where it is larger, as the portable loop compares.
                max[h] = _mm256_max_ps(x, max[h]);
                sum[h] = _mm256_add_ps(sum[h], x);
            }
        }
    }
    let (mut max_lanes, mut sum_lanes) = ([0f32; 16], [0f32; 16]);
    for h in 0..2 {
        // SAFETY: each array holds 16 values; 8h + 8 ≤ 16.
        unsafe {
            _mm256_storeu_ps(max_lanes.as_mut_ptr().add(8 * h), max[h]);
            _mm256_storeu_ps(sum_lanes.as_mut_ptr().add(8 * h), sum[h]);
        }
    }
    super::attention::q8_rounding::weights_step_from(
        &mut scores[whole..],
        &scales[whole..],
        max_lanes,
        sum_lanes,
    )
}

/// The body of [`attend_head_q8_64`]: `scores` holds `len` rounded up to 8 floats,
/// `weights` room for `len + 1` 16-bit values (contents on entry are stale).
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_head(
    q: &[f32],
    k: (&[i8], &[f32]),
    v: (&[i8], &[f32]),
    next: *const u8,
    o: &mut [f32],
    scores: &mut [f32],
    weights: *mut i16,
) {
    use super::attention::q8_rounding::{TOP, query_step};
    const D: usize = 64;
    // Rows prefetched ahead (4 KiB), as in the AVX512 kernel.
    const AHEAD: usize = 64;
    let len = k.1.len();
    // SAFETY: every load is within q (64), k and v (len × 64 values, len scales), q16
    // (64), scores (len padded to 8) or weights (len + 1); every store within scores,
    // weights, q16 or o (64).
    unsafe {
        // Eight 32-bit floats as eight 16-bit integers (rounded half to even, the
        // default mode), in order. The values lie within ±32767.
        let to_i16 = |x: __m256, dst: *mut i16| {
            let i = _mm256_cvtps_epi32(x);
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packs_epi32(i, i));
            _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(packed));
        };
        let q_max = super::math::lanes(q, 0.0, |m, x| m.max(x.abs()));
        let (q_scale, q_inv) = query_step(q_max);
        let q_inv = _mm256_set1_ps(q_inv);
        let mut q16 = [0i16; D];
        for c in 0..8 {
            let x = _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(8 * c)), q_inv);
            to_i16(x, q16.as_mut_ptr().add(8 * c));
        }
        let qv: [__m256i; 4] =
            std::array::from_fn(|c| _mm256_loadu_si256(q16.as_ptr().add(16 * c) as *const _));
        // A row's 64 values as four vectors of sixteen 16-bit integers, in order.
        let wide = |row: *const i8| -> [__m256i; 4] {
            std::array::from_fn(|c| {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(16 * c) as *const __m128i))
            })
        };
        // Eight partial sums of a key's dot product with the query.
        let dot = |row: *const i8| -> __m256i {
            let x = wide(row);
            let a = _mm256_add_epi32(
                _mm256_madd_epi16(x[0], qv[0]),
                _mm256_madd_epi16(x[1], qv[1]),
            );
            let b = _mm256_add_epi32(
                _mm256_madd_epi16(x[2], qv[2]),
                _mm256_madd_epi16(x[3], qv[3]),
            );
            _mm256_add_epi32(a, b)
        };
        let (kp, vp) = (k.0.as_ptr(), v.0.as_ptr());
        let qs = _mm256_set1_ps(q_scale);
        let mut j = 0;
        while j + 8 <= len {
            for i in 0..8 {
                let ahead = (j + AHEAD + i) * D;
                _mm_prefetch::<_MM_HINT_T0>(if ahead < len * D {
                    kp.add(ahead)
                } else {
                    vp.wrapping_add(ahead - len * D)
                });
                // The values too, into L2, so that memory stays busy during the softmax.
                _mm_prefetch::<_MM_HINT_T1>(vp.add((j + i) * D));
            }
            let d: [__m256i; 8] = std::array::from_fn(|i| dot(kp.add((j + i) * D)));
            let sums = _mm256_cvtepi32_ps(int_sums_of_8(&d));
            let scale = _mm256_mul_ps(_mm256_loadu_ps(k.1.as_ptr().add(j)), qs);
            _mm256_storeu_ps(scores.as_mut_ptr().add(j), _mm256_mul_ps(sums, scale));
            j += 8;
        }
        while j < len {
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, dot(kp.add(j * D)));
            scores[j] = lanes.iter().sum::<i32>() as f32 * (k.1[j] * q_scale);
            j += 1;
        }
        let scores = &mut scores[..len];
        let max = super::math::lanes(scores, f32::NEG_INFINITY, f32::max);
        exp_shifted(scores, max);
        let total = super::math::lanes(scores, 0.0, |a, b| a + b);
        let (w_scale, w_inv) = weights_step(scores, v.1);
        let mut j = 0;
        while j + 8 <= len {
            let x = _mm256_mul_ps(
                _mm256_loadu_ps(scores.as_ptr().add(j)),
                _mm256_set1_ps(w_inv),
            );
            to_i16(_mm256_min_ps(x, _mm256_set1_ps(TOP)), weights.add(j));
            j += 8;
        }
        for (jj, s) in scores.iter().enumerate().skip(j) {
            *weights.add(jj) = (s * w_inv).round_ties_even().min(TOP) as i16;
        }
        // An odd last row is paired with a weight of 0 (and itself as the other row).
        *weights.add(len) = 0;
        // Rows j and j + 1 interleaved 16 bits at a time, times the pair of weights
        // (w_j, w_j+1): each 32-bit lane gets one dimension of both rows. Within each
        // 128-bit half, the low unpack holds dimensions 0–3 (of its 8), the high 4–7.
        let mut acc = [_mm256_setzero_si256(); 8];
        let mut j = 0;
        while j < len {
            for r in [j, j + 1] {
                // Past the last value, the next head's first keys.
                _mm_prefetch::<_MM_HINT_T0>(if r + AHEAD < len {
                    vp.wrapping_add((r + AHEAD) * D)
                } else {
                    (next as *const i8).wrapping_add((r + AHEAD - len) * D)
                });
                // The next head's keys into L2 meanwhile.
                _mm_prefetch::<_MM_HINT_T1>((next as *const i8).wrapping_add(r * D));
            }
            let second = if j + 1 < len { j + 1 } else { j };
            let (x, y) = (wide(vp.add(j * D)), wide(vp.add(second * D)));
            let w = _mm256_set1_epi32((weights.add(j) as *const i32).read_unaligned());
            for c in 0..4 {
                let (lo, hi) = (
                    _mm256_unpacklo_epi16(x[c], y[c]),
                    _mm256_unpackhi_epi16(x[c], y[c]),
                );
                acc[2 * c] = _mm256_add_epi32(acc[2 * c], _mm256_madd_epi16(lo, w));
                acc[2 * c + 1] = _mm256_add_epi32(acc[2 * c + 1], _mm256_madd_epi16(hi, w));
            }
            j += 2;
        }
        let scale = _mm256_set1_ps(w_scale / total);
        for c in 0..4 {
            // acc[2c]: dimensions 16c + (0–3, 8–11); acc[2c + 1]: 16c + (4–7, 12–15).
            let (a, b) = (acc[2 * c], acc[2 * c + 1]);
            let first = _mm256_permute2x128_si256::<0x20>(a, b);
            let second = _mm256_permute2x128_si256::<0x31>(a, b);
            for (h, x) in [first, second].into_iter().enumerate() {
                let out = _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale);
                _mm256_storeu_ps(o.as_mut_ptr().add(16 * c + 8 * h), out);
            }
        }
    }
}

/// [`sums_of_8`] for 32-bit integers: lane `i` is the sum of `d[i]`'s eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn int_sums_of_8(d: &[__m256i; 8]) -> __m256i {
    let h = [
        _mm256_hadd_epi32(d[0], d[1]),
        _mm256_hadd_epi32(d[2], d[3]),
        _mm256_hadd_epi32(d[4], d[5]),
        _mm256_hadd_epi32(d[6], d[7]),
    ];
    let (a, b) = (_mm256_hadd_epi32(h[0], h[1]), _mm256_hadd_epi32(h[2], h[3]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x31>(a, b),
    )
}
