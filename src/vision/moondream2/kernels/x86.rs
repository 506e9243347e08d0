//! x86-64 kernels: AMX tiles for many rows, AVX512-BF16 and AVX512-VNNI for few.
//! Every function here requires the instruction sets named in its `target_feature`
//! (the caller checks [`super::isa`]).

use std::arch::asm;
use std::arch::x86_64::*;

use half::f16;

use super::pack::{PackedQ8, QuantActivations};
use super::{BLOCK_K, BLOCK_N, Q8_AHEAD};

/// f32 → bf16 (round to nearest even), 16 at a time.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    let n = src.len();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n for both slices (dst is at least n long).
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        }
        i += 16;
    }
    for j in i..n {
        dst[j] = half::bf16::from_f32(src[j]).to_bits();
    }
}

/// Rows of 64 → 8 bits with one scale per row (`max |x| / 127`, half to even), as
/// [`super::attention::store_q8`] does them.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_rows_64(rows: &[f32], q: &mut [i8], scale: &mut [f32]) {
    const D: usize = 64;
    let n = rows.len() / D;
    assert!(q.len() >= n * D && scale.len() >= n);
    // SAFETY: row r reads rows[64r..64r + 64] and writes q[64r..64r + 64], in bounds by
    // the assert above.
    unsafe {
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for (r, s_out) in scale.iter_mut().enumerate().take(n) {
            let x = [0, 16, 32, 48].map(|c| _mm512_loadu_ps(rows.as_ptr().add(r * D + c)));
            let m = x.iter().fold(_mm512_setzero_ps(), |m, v| {
                _mm512_max_ps(m, _mm512_abs_ps(*v))
            });
            let s = _mm512_reduce_max_ps(m) / 127.0;
            let inv = _mm512_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
            for (c, v) in x.iter().enumerate() {
                // The default rounding mode rounds half to even.
                let i = _mm512_cvtps_epi32(_mm512_mul_ps(*v, inv));
                let i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
                let out = q.as_mut_ptr().add(r * D + 16 * c) as *mut __m128i;
                _mm_storeu_si128(out, _mm512_cvtepi32_epi8(i));
            }
            *s_out = s;
        }
    }
}

/// `m ≤ 8` bf16 rows times `blocks` (even) packed column blocks into `c` (stride `ldc`).
#[target_feature(enable = "avx512f,avx512bf16")]
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
    assert!(c.len() >= (m - 1) * ldc + blocks * BLOCK_N);
    for b in (0..blocks).step_by(2) {
        // SAFETY: the asserts above bound every offset the tile reads and writes.
        unsafe {
            let w0 = w.as_ptr().add(b * BLOCK_N * kp);
            let w1 = w.as_ptr().add((b + 1) * BLOCK_N * kp);
            let out = c.as_mut_ptr().add(b * BLOCK_N);
            let a = a.as_ptr();
            match m {
                1 => bf16_tile::<1>(a, kp, w0, w1, out, ldc),
                2 => bf16_tile::<2>(a, kp, w0, w1, out, ldc),
                3 => bf16_tile::<3>(a, kp, w0, w1, out, ldc),
                4 => bf16_tile::<4>(a, kp, w0, w1, out, ldc),
                5 => bf16_tile::<5>(a, kp, w0, w1, out, ldc),
                6 => bf16_tile::<6>(a, kp, w0, w1, out, ldc),
                7 => bf16_tile::<7>(a, kp, w0, w1, out, ldc),
                _ => bf16_tile::<8>(a, kp, w0, w1, out, ldc),
            }
        }
    }
}

/// `MR` rows × 32 columns: one `vdpbf16ps` per row and 16 columns per input pair.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_tile<const MR: usize>(
    a: *const u16,
    kp: usize,
    w0: *const u16,
    w1: *const u16,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    for p in 0..kp / 2 {
        // SAFETY: the caller bounds a (MR rows of kp), w0/w1 (kp·16 each) and c.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w0.add(p * 32) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(p * 32) as *const _));
            for r in 0..MR {
                let pair = (a.add(r * kp + 2 * p) as *const i32).read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
            }
        }
    }
    for r in 0..MR {
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(c.add(r * ldc), acc0[r]);
            _mm512_storeu_ps(c.add(r * ldc + BLOCK_N), acc1[r]);
        }
    }
}

/// The q8 product for blocks `b0..b1` into `c` (`m × 16·(b1−b0)`): `vpdpbusd` of the
/// weights (`q + 128`, unsigned) with the activations (signed), per 32-input group,
/// each sum starting at the activations' `start` so that it ends at the signed product.
#[target_feature(enable = "avx512f,avx512vnni,f16c")]
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
    let mut b = b0;
    // Two column blocks per pass, so each activation broadcast feeds twice the products
    // (from four rows on, the broadcasts, not the weights, set the pace); more than four
    // rows go as two passes over the same two blocks, the second from cache.
    let mut tile2 = |r0: usize, rows: usize, b: usize| {
        // SAFETY: the asserts above bound every offset (blocks b and b + 1 and rows
        // r0..r0 + rows exist).
        unsafe {
            let out = c.as_mut_ptr().add((b - b0) * BLOCK_N + r0 * ldc);
            match rows {
                1 => q8_tile2::<1>(a, w, b, r0, out, ldc),
                2 => q8_tile2::<2>(a, w, b, r0, out, ldc),
                3 => q8_tile2::<3>(a, w, b, r0, out, ldc),
                _ => q8_tile2::<4>(a, w, b, r0, out, ldc),
            }
        }
    };
    while b + 2 <= b1 {
        tile2(0, a.m.min(4), b);
        if a.m > 4 {
            tile2(4, a.m - 4, b);
        }
        b += 2;
    }
    for b in b..b1 {
        // SAFETY: the asserts above bound every offset.
        unsafe {
            let out = c.as_mut_ptr().add((b - b0) * BLOCK_N);
            match a.m {
                1 => q8_tile::<1>(a, w, b, out, ldc),
                2 => q8_tile::<2>(a, w, b, out, ldc),
                3 => q8_tile::<3>(a, w, b, out, ldc),
                4 => q8_tile::<4>(a, w, b, out, ldc),
                5 => q8_tile::<5>(a, w, b, out, ldc),
                6 => q8_tile::<6>(a, w, b, out, ldc),
                7 => q8_tile::<7>(a, w, b, out, ldc),
                _ => q8_tile::<8>(a, w, b, out, ldc),
            }
        }
    }
}

/// Activations → 8 bits per 32-input group, as [`QuantActivations`] does it (a scale of
/// `max |x| / 127`, rounding half to even): whole groups of `row` into `q`, `scale` and
/// `start` (−128 × the group's values added up).
#[target_feature(enable = "avx512f")]
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
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for g in 0..groups {
            let x = [
                _mm512_loadu_ps(row.as_ptr().add(g * BLOCK_K)),
                _mm512_loadu_ps(row.as_ptr().add(g * BLOCK_K + 16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x[0]), _mm512_abs_ps(x[1])));
            let s = amax / 127.0;
            let inv = _mm512_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
            let mut total = _mm512_setzero_si512();
            for (h, x) in x.iter().enumerate() {
                // The default rounding mode rounds half to even.
                let v = _mm512_cvtps_epi32(_mm512_mul_ps(*x, inv));
                let v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
                total = _mm512_add_epi32(total, v);
                let bytes = _mm512_cvtepi32_epi8(v);
                _mm_storeu_si128(
                    q.as_mut_ptr().add(g * BLOCK_K + 16 * h) as *mut __m128i,
                    bytes,
                );
            }
            scale[g] = s;
            start[g] = -128 * _mm512_reduce_add_epi32(total);
        }
    }
}

#[target_feature(enable = "avx512f,avx512vnni,f16c")]
unsafe fn q8_tile<const MR: usize>(
    a: &QuantActivations,
    w: &PackedQ8,
    b: usize,
    c: *mut f32,
    ldc: usize,
) {
    let (kp, groups) = (w.kp, w.kp / BLOCK_K);
    let mut acc = [_mm512_setzero_ps(); MR];
    // SAFETY: the caller checked that block b and MR rows of a exist.
    unsafe {
        let q = w.q.as_ptr().add(b * BLOCK_N * kp);
        let scales = w.scales.as_ptr().add(b * groups * BLOCK_N) as *const __m256i;
        let aq = a.q.as_ptr();
        for g in 0..groups {
            let mut dot: [__m512i; MR] =
                std::array::from_fn(|r| _mm512_set1_epi32(a.start[r * groups + g]));
            for quad in 0..BLOCK_K / 4 {
                let wv = _mm512_loadu_si512(q.add(g * 512 + quad * 64) as *const _);
                for (r, d) in dot.iter_mut().enumerate() {
                    let four =
                        (aq.add(r * kp + g * BLOCK_K + quad * 4) as *const i32).read_unaligned();
                    *d = _mm512_dpbusd_epi32(*d, wv, _mm512_set1_epi32(four));
                }
            }
            let sw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(g)));
            for r in 0..MR {
                let s = _mm512_mul_ps(sw, _mm512_set1_ps(a.scale[r * groups + g]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), s, acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), *v);
        }
    }
}

/// [`q8_tile`] for column blocks `b` and `b + 1` and rows `r0..r0 + MR` together: the
/// same products in the same order per column, each activation broadcast used for both
/// blocks. `c` points at row `r0` of block `b`.
#[target_feature(enable = "avx512f,avx512vnni,f16c")]
unsafe fn q8_tile2<const MR: usize>(
    a: &QuantActivations,
    w: &PackedQ8,
    b: usize,
    r0: usize,
    c: *mut f32,
    ldc: usize,
) {
    let (kp, groups) = (w.kp, w.kp / BLOCK_K);
    let mut acc = [[_mm512_setzero_ps(); MR]; 2];
    // SAFETY: the caller checked that blocks b and b + 1 and MR rows of a exist.
    unsafe {
        let q = [
            w.q.as_ptr().add(b * BLOCK_N * kp),
            w.q.as_ptr().add((b + 1) * BLOCK_N * kp),
        ];
        let scales = [
            w.scales.as_ptr().add(b * groups * BLOCK_N) as *const __m256i,
            w.scales.as_ptr().add((b + 1) * groups * BLOCK_N) as *const __m256i,
        ];
        let aq = a.q.as_ptr().add(r0 * kp);
        // Raw reads: rows r0..r0 + MR of `start` and `scale` exist.
        let (start, scale) = (
            a.start.as_ptr().add(r0 * groups),
            a.scale.as_ptr().add(r0 * groups),
        );
        for g in 0..groups {
            let first: [__m512i; MR] =
                std::array::from_fn(|r| _mm512_set1_epi32(*start.add(r * groups + g)));
            let mut dot = [first; 2];
            for quad in 0..BLOCK_K / 4 {
                if r0 == 0 {
                    // The first pass streams from memory: one line of a later group of
                    // both blocks per quad (past the last group, the start of the next
                    // blocks), spread between the products.
                    for block in q {
                        let next = block.wrapping_add((g + Q8_AHEAD) * 512 + quad * 64);
                        _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                    }
                }
                let wv = [
                    _mm512_loadu_si512(q[0].add(g * 512 + quad * 64) as *const _),
                    _mm512_loadu_si512(q[1].add(g * 512 + quad * 64) as *const _),
                ];
                let [d0, d1] = &mut dot;
                for (r, (x0, x1)) in d0.iter_mut().zip(d1.iter_mut()).enumerate() {
                    let four = _mm512_set1_epi32(
                        (aq.add(r * kp + g * BLOCK_K + quad * 4) as *const i32).read_unaligned(),
                    );
                    *x0 = _mm512_dpbusd_epi32(*x0, wv[0], four);
                    *x1 = _mm512_dpbusd_epi32(*x1, wv[1], four);
                }
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let sw = _mm512_cvtph_ps(_mm256_loadu_si256(scales[h].add(g)));
                for r in 0..MR {
                    let s = _mm512_mul_ps(sw, _mm512_set1_ps(*scale.add(r * groups + g)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[h][r]), s, acc[r]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (r, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + h * BLOCK_N), *v);
            }
        }
    }
}

/// q8 → bf16 of one column block, in the bf16 pair layout.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,f16c")]
pub(super) unsafe fn widen_q8_block(src: &[u8], scales: &[f16], kp: usize, dst: &mut [u16]) {
    assert!(src.len() >= BLOCK_N * kp && dst.len() >= BLOCK_N * kp);
    assert!(scales.len() >= kp / BLOCK_K * BLOCK_N);
    // SAFETY: the asserts above bound every load and store.
    unsafe {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let bias = _mm512_set1_epi32(128);
        for g in 0..kp / BLOCK_K {
            let sw = _mm512_cvtph_ps(_mm256_loadu_si256(
                scales.as_ptr().add(g * BLOCK_N) as *const __m256i
            ));
            // Lane l of chunk j holds column 4j + l/4.
            let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let mut per_lane = [_mm512_setzero_ps(); 4];
            for (j, lane) in per_lane.iter_mut().enumerate() {
                *lane = _mm512_permutexvar_ps(
                    _mm512_add_epi32(idx, _mm512_set1_epi32(4 * j as i32)),
                    sw,
                );
            }
            for quad in 0..BLOCK_K / 4 {
                let row = g * BLOCK_K / 4 + quad;
                let base = src.as_ptr().add(row * 64);
                let mut words = [_mm256_setzero_si256(); 4];
                for (j, word) in words.iter_mut().enumerate() {
                    let bytes = _mm_loadu_si128(base.add(16 * j) as *const __m128i);
                    let ints = _mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), bias);
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(ints), per_lane[j]);
                    *word = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                }
                let lo = _mm512_inserti64x4(_mm512_castsi256_si512(words[0]), words[1], 1);
                let hi = _mm512_inserti64x4(_mm512_castsi256_si512(words[2]), words[3], 1);
                let out = dst.as_mut_ptr().add(row * 64) as *mut __m512i;
                _mm512_storeu_si512(out as *mut _, _mm512_permutex2var_epi32(lo, even, hi));
                _mm512_storeu_si512(out.add(1) as *mut _, _mm512_permutex2var_epi32(lo, odd, hi));
            }
        }
    }
}

/// AMX tile configuration (the `ldtilecfg` operand).
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Palette 1 with all eight tiles 16 rows × 64 bytes.
    pub(super) fn full() -> Self {
        let mut cfg = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        cfg
    }
}

/// `c[mp × 16·blocks] = a[mp × kp] · w` with AMX: 32 × 32 outputs per step in four
/// accumulator tiles (tmm0–3), two row tiles of `a` (tmm4–5), two of `w` (tmm6–7).
/// `mp` and `kp` are multiples of 32, `blocks` is even; `c` has row stride `ldc`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn amx_panel(
    a: &[u16],
    mp: usize,
    kp: usize,
    w: &[u16],
    blocks: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(mp.is_multiple_of(32) && kp.is_multiple_of(32) && blocks.is_multiple_of(2));
    assert!(a.len() >= mp * kp && w.len() >= blocks * BLOCK_N * kp);
    assert!(c.len() >= (mp - 1) * ldc + blocks * BLOCK_N);
    let cfg = TileConfig::full();
    let a_stride = kp * 2;
    let c_stride = ldc * 4;
    // SAFETY: AMX use was permitted for this process (isa::amx_enabled); every tile
    // load and store stays inside the slices bounded by the asserts above.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
        for mi in (0..mp).step_by(32) {
            for bj in (0..blocks).step_by(2) {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                let a0 = a.as_ptr().add(mi * kp);
                let a1 = a.as_ptr().add((mi + 16) * kp);
                let w0 = w.as_ptr().add(bj * BLOCK_N * kp);
                let w1 = w.as_ptr().add((bj + 1) * BLOCK_N * kp);
                for kb in 0..kp / 32 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tileloadd tmm7, [{w1} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kb * 32),
                        a1 = in(reg) a1.add(kb * 32),
                        w0 = in(reg) w0.add(kb * 512),
                        w1 = in(reg) w1.add(kb * 512),
                        sa = in(reg) a_stride,
                        sw = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                }
                let c0 = c.as_mut_ptr().add(mi * ldc + bj * BLOCK_N);
                let c1 = c.as_mut_ptr().add((mi + 16) * ldc + bj * BLOCK_N);
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c0b} + {s}*1], tmm1",
                    "tilestored [{c1} + {s}*1], tmm2",
                    "tilestored [{c1b} + {s}*1], tmm3",
                    c0 = in(reg) c0,
                    c0b = in(reg) c0.add(BLOCK_N),
                    c1 = in(reg) c1,
                    c1b = in(reg) c1.add(BLOCK_N),
                    s = in(reg) c_stride,
                    options(nostack),
                );
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Lane `i` of the result is the sum of `d[i]`'s sixteen lanes: a transpose-add tree
/// (pairs of vectors interleaved and added by 32-bit lane, then by pair of lanes, then
/// by 128-bit quarter), about two shuffles a vector instead of a horizontal sum each.
#[inline]
#[target_feature(enable = "avx512f")]
fn sums_of_16(d: &[__m512; 16]) -> __m512 {
    transpose_add(d, |x, y| _mm512_add_ps(x, y))
}

/// [`sums_of_16`] with the lanes added by `add` (f32, or i32 lanes carried in float
/// vectors: the shuffles only move bits).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_add(d: &[__m512; 16], add: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    let by_lane = |x: __m512, y: __m512| add(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    let by_pair = |x: __m512, y: __m512| {
        let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
        add(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
        )
    };
    let by_quarter = |x: __m512, y: __m512| {
        add(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    };
    let l: [__m512; 8] = std::array::from_fn(|i| by_lane(d[2 * i], d[2 * i + 1]));
    let p: [__m512; 4] = std::array::from_fn(|i| by_pair(l[2 * i], l[2 * i + 1]));
    let h = [by_quarter(p[0], p[1]), by_quarter(p[2], p[3])];
    by_quarter(h[0], h[1])
}

/// One head of the decode attention over bf16 cache rows of width 64: `q` `[64]`
/// (scaled), `k`/`v` `[len × 64]` bf16 bits → `o` `[64]`; `next` (only prefetched,
/// may be null) is where the keys of the head computed next begin. Read as 32-bit lanes, a
/// row's two 512-bit loads hold an even dimension in each lane's low half and the next
/// odd one in its high half, so a shift and a mask widen them without shuffles (the
/// query and the output are split the same way). Sixteen keys' dot products are summed
/// together by a transpose-add tree, about two shuffles a key instead of a horizontal
/// sum each; the weighted sum of values stays in registers.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn attend_head_bf16_64(
    q: &[f32],
    k: &[u16],
    v: &[u16],
    next: *const u8,
    o: &mut [f32],
) {
    const D: usize = 64;
    // Rows prefetched ahead (4 KiB): 8.8–9.0 → 7.3–7.5 ms per sequence in
    // `bench-model --kernels`; 16 or 64 rows did worse.
    const AHEAD: usize = 32;
    assert!(q.len() == D && o.len() == D && k.len() == v.len() && k.len().is_multiple_of(D));
    let len = k.len() / D;
    // Query lanes as the loads see them: [even, odd] dimensions of 0..32, then of 32..64.
    let split: [[f32; 16]; 4] = super::split_even_odd(q);
    let mut scores = vec![0f32; len];
    // SAFETY: every load below is within k and v (len × 64 each) as asserted, every
    // store within scores (len) or the 16-float arrays.
    unsafe {
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        let even = |x: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x));
        let odd = |x: __m512i| _mm512_castsi512_ps(_mm512_and_si512(x, high));
        let load = |p: *const u16| _mm512_loadu_si512(p as *const _);
        let qv = split.map(|s| _mm512_loadu_ps(s.as_ptr()));
        // Lane sums of `row · q` spread over 16 lanes.
        let dot = |row: *const u16| -> __m512 {
            let (x0, x1) = (load(row), load(row.add(32)));
            let a = _mm512_mul_ps(qv[0], even(x0));
            let b = _mm512_mul_ps(qv[1], odd(x0));
            let a = _mm512_fmadd_ps(qv[2], even(x1), a);
            let b = _mm512_fmadd_ps(qv[3], odd(x1), b);
            _mm512_add_ps(a, b)
        };
        let kp = k.as_ptr();
        let mut j = 0;
        while j + 16 <= len {
            for i in 0..32 {
                let ahead = j * D + AHEAD * D + 32 * i;
                let p = if ahead < len * D {
                    kp.add(ahead)
                } else {
                    v.as_ptr().wrapping_add(ahead - len * D)
                };
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                // The values too, into L2, so that memory stays busy during the softmax.
                _mm_prefetch::<_MM_HINT_T1>(v.as_ptr().add(j * D + 32 * i) as *const i8);
            }
            let d: [__m512; 16] = std::array::from_fn(|i| dot(kp.add((j + i) * D)));
            _mm512_storeu_ps(scores.as_mut_ptr().add(j), sums_of_16(&d));
            j += 16;
        }
        while j < len {
            scores[j] = _mm512_reduce_add_ps(dot(kp.add(j * D)));
            j += 1;
        }
        let max = super::math::lanes(&scores, f32::NEG_INFINITY, f32::max);
        for s in scores.iter_mut() {
            *s = super::math::exp(*s - max);
        }
        let total = super::math::lanes(&scores, 0.0, |a, b| a + b);
        // Two sets of accumulators (even and odd keys) halve the dependency chains;
        // each set is [even, odd] dimensions of 0..32, then of 32..64.
        let mut acc = [_mm512_setzero_ps(); 8];
        let vp = v.as_ptr();
        let mut add_row = |set: usize, key: usize| {
            // Past the last value, the next head's first keys.
            let ahead = if key + AHEAD < len {
                vp.wrapping_add((key + AHEAD) * D) as *const i8
            } else {
                next.wrapping_add((key + AHEAD - len) * D * 2) as *const i8
            };
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            // The next head's keys into L2 meanwhile.
            let next_keys = next.wrapping_add(key * D * 2) as *const i8;
            _mm_prefetch::<_MM_HINT_T1>(next_keys);
            _mm_prefetch::<_MM_HINT_T1>(next_keys.wrapping_add(64));
            let p = _mm512_set1_ps(scores[key]);
            let row = vp.add(key * D);
            let (x0, x1) = (load(row), load(row.add(32)));
            let a = &mut acc[4 * set..4 * set + 4];
            a[0] = _mm512_fmadd_ps(p, even(x0), a[0]);
            a[1] = _mm512_fmadd_ps(p, odd(x0), a[1]);
            a[2] = _mm512_fmadd_ps(p, even(x1), a[2]);
            a[3] = _mm512_fmadd_ps(p, odd(x1), a[3]);
        };
        let mut j = 0;
        while j + 2 <= len {
            add_row(0, j);
            add_row(1, j + 1);
            j += 2;
        }
        if j < len {
            add_row(0, j);
        }
        let inv = _mm512_set1_ps(1.0 / total);
        let mut lanes = [[0f32; 16]; 4];
        for (c, out) in lanes.iter_mut().enumerate() {
            let sum = _mm512_mul_ps(_mm512_add_ps(acc[c], acc[4 + c]), inv);
            _mm512_storeu_ps(out.as_mut_ptr(), sum);
        }
        super::merge_even_odd(&lanes, o);
    }
}

/// [`attend_head_bf16_64`] over 8-bit cache rows: `k`/`v` are (`[len × 64]` values,
/// `[len]` scales). Integer products instead of widening every value to f32: the
/// query is rounded to 16 bits (one scale for the head), each key row sign-extended to
/// 16 bits and multiplied by `vpdpwssd` (exact in 32 bits); the softmax weights, times
/// each value row's scale, are rounded to 16 bits too and multiply the value rows the
/// same way, even and odd dimensions in separate sums. About a third of the
/// instructions of widening to f32. Rounding: [`super::attention::q8_rounding`] (as
/// the AVX2 kernel).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
pub(super) unsafe fn attend_head_q8_64(
    q: &[f32],
    k: (&[i8], &[f32]),
    v: (&[i8], &[f32]),
    next: *const u8,
    o: &mut [f32],
) {
    const D: usize = 64;
    let len = k.1.len();
    assert!(q.len() == D && o.len() == D && k.0.len() == len * D);
    assert!(v.0.len() == len * D && v.1.len() == len && len > 0);
    let padded = len.next_multiple_of(16);
    // The thread's kept scratch, as the products use it: scores, then the weights'
    // two lane patterns (i32 lanes carried as f32 bits).
    super::with_scratch(3 * padded, |buf| {
        let (scores, rest) = buf.split_at_mut(padded);
        let (even, odd) = rest.split_at_mut(padded);
        // SAFETY: the caller's guarantees (the CPU features) hold; the buffers hold
        // `padded` values each.
        unsafe { q8_head(q, k, v, next, o, scores, even, odd) }
    })
}

/// The 8-bit attention's weight step, `attention::q8_rounding::weights_step` (the
/// portable definition, which the tests hold this to bit for bit), sixteen lanes a
/// vector: the compiler left its loop scalar, about a tenth of the attention's time.
#[target_feature(enable = "avx512f")]
pub(super) fn weights_step(scores: &mut [f32], scales: &[f32]) -> (f32, f32) {
    let len = scores.len();
    assert_eq!(scales.len(), len);
    let whole = len / 16 * 16;
    let (mut max, mut sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for j in (0..whole).step_by(16) {
        // SAFETY: j + 16 ≤ len for both slices.
        unsafe {
            let x = _mm512_mul_ps(
                _mm512_loadu_ps(scores.as_ptr().add(j)),
                _mm512_loadu_ps(scales.as_ptr().add(j)),
            );
            _mm512_storeu_ps(scores.as_mut_ptr().add(j), x);
            // `vmaxps(x, max)`: x where it is larger, as the portable loop compares.
            max = _mm512_max_ps(x, max);
            sum = _mm512_add_ps(sum, x);
        }
    }
    let (mut max_lanes, mut sum_lanes) = ([0f32; 16], [0f32; 16]);
    // SAFETY: each array holds 16 values.
    unsafe {
        _mm512_storeu_ps(max_lanes.as_mut_ptr(), max);
        _mm512_storeu_ps(sum_lanes.as_mut_ptr(), sum);
    }
    super::attention::q8_rounding::weights_step_from(
        &mut scores[whole..],
        &scales[whole..],
        max_lanes,
        sum_lanes,
    )
}

/// The body of [`attend_head_q8_64`], on scratch buffers of `len` rounded up to 16
/// (`even` and `odd` hold i32 lanes as f32 bits; their contents on entry are stale).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn q8_head(
    q: &[f32],
    k: (&[i8], &[f32]),
    v: (&[i8], &[f32]),
    next: *const u8,
    o: &mut [f32],
    scores: &mut [f32],
    even: &mut [f32],
    odd: &mut [f32],
) {
    const D: usize = 64;
    use super::attention::q8_rounding::{TOP, query_step};
    // Rows prefetched ahead: 4 KiB, as for bf16 rows.
    const AHEAD: usize = 64;
    let len = k.1.len();
    let padded = len.next_multiple_of(16);
    assert!(scores.len() == padded && even.len() == padded && odd.len() == padded);
    // SAFETY: every load below is within q (64), k and v (len × 64 values, len scales),
    // q16 (64) or the weight arrays (len, padded to 16), every store within those,
    // scores (len) or o (64).
    unsafe {
        // The query in 16 bits (the default rounding mode rounds half to even): lane i
        // of a vector holds dimensions 2i and 2i + 1.
        let qf = [0, 16, 32, 48].map(|c| _mm512_loadu_ps(q.as_ptr().add(c)));
        let q_max = qf
            .iter()
            .fold(0f32, |m, x| m.max(_mm512_reduce_max_ps(_mm512_abs_ps(*x))));
        let (q_scale, q_inv) = query_step(q_max);
        let q_inv = _mm512_set1_ps(q_inv);
        let mut q16 = [0i16; D];
        for (c, x) in qf.iter().enumerate() {
            let i = _mm512_cvtps_epi32(_mm512_mul_ps(*x, q_inv));
            _mm256_storeu_si256(
                q16.as_mut_ptr().add(16 * c) as *mut __m256i,
                _mm512_cvtepi32_epi16(i),
            );
        }
        let wide = |p: *const i8| _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i));
        let qv = [0, 32].map(|c| _mm512_loadu_si512(q16.as_ptr().add(c) as *const _));
        let dot = |row: *const i8| -> __m512 {
            let acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wide(row), qv[0]);
            _mm512_castsi512_ps(_mm512_dpwssd_epi32(acc, wide(row.add(32)), qv[1]))
        };
        let add_i32 = |x: __m512, y: __m512| {
            _mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_castps_si512(x),
                _mm512_castps_si512(y),
            ))
        };
        let (kp, vp) = (k.0.as_ptr(), v.0.as_ptr());
        let mut j = 0;
        while j + 16 <= len {
            for i in 0..16 {
                let ahead = (j + AHEAD + i) * D;
                let p = if ahead < len * D {
                    kp.add(ahead)
                } else {
                    vp.wrapping_add(ahead - len * D)
                };
                _mm_prefetch::<_MM_HINT_T0>(p);
                // The values too, into L2, so that memory stays busy during the softmax.
                _mm_prefetch::<_MM_HINT_T1>(vp.add((j + i) * D));
            }
            let d: [__m512; 16] = std::array::from_fn(|i| dot(kp.add((j + i) * D)));
            let sums = _mm512_cvtepi32_ps(_mm512_castps_si512(transpose_add(&d, add_i32)));
            let scale = _mm512_mul_ps(
                _mm512_loadu_ps(k.1.as_ptr().add(j)),
                _mm512_set1_ps(q_scale),
            );
            _mm512_storeu_ps(scores.as_mut_ptr().add(j), _mm512_mul_ps(sums, scale));
            j += 16;
        }
        while j < len {
            let sum = _mm512_reduce_add_epi32(_mm512_castps_si512(dot(kp.add(j * D))));
            scores[j] = sum as f32 * (k.1[j] * q_scale);
            j += 1;
        }
        let max = super::math::lanes(&scores[..len], f32::NEG_INFINITY, f32::max);
        for s in scores[..len].iter_mut() {
            *s = super::math::exp(*s - max);
        }
        let total = super::math::lanes(&scores[..len], 0.0, |a, b| a + b);
        // Weights in 16 bits, as the 32-bit lane patterns (w, 0) and (0, w) that pick
        // the even and the odd dimension of each pair.
        let (w_scale, w_inv) = weights_step(&mut scores[..len], v.1);
        let w_inv = _mm512_set1_ps(w_inv);
        scores[len..].fill(0.0);
        let top = _mm512_set1_epi32(TOP as i32);
        for j in (0..padded).step_by(16) {
            let w = _mm512_cvtps_epi32(_mm512_mul_ps(
                _mm512_loadu_ps(scores.as_ptr().add(j)),
                w_inv,
            ));
            let w = _mm512_min_epi32(w, top);
            _mm512_storeu_si512(even.as_mut_ptr().add(j) as *mut _, w);
            _mm512_storeu_si512(
                odd.as_mut_ptr().add(j) as *mut _,
                _mm512_slli_epi32::<16>(w),
            );
        }
        // Two sets of accumulators (even and odd keys) halve the dependency chains;
        // each set is [even, odd] dimensions of 0..32, then of 32..64.
        let mut acc = [_mm512_setzero_si512(); 8];
        let mut add_row = |set: usize, key: usize| {
            // Past the last value, the next head's first keys.
            _mm_prefetch::<_MM_HINT_T0>(if key + AHEAD < len {
                vp.wrapping_add((key + AHEAD) * D)
            } else {
                (next as *const i8).wrapping_add((key + AHEAD - len) * D)
            });
            // The next head's keys into L2 meanwhile.
            _mm_prefetch::<_MM_HINT_T1>((next as *const i8).wrapping_add(key * D));
            let (even, odd) = (
                _mm512_set1_epi32(even[key].to_bits() as i32),
                _mm512_set1_epi32(odd[key].to_bits() as i32),
            );
            let row = vp.add(key * D);
            let (x0, x1) = (wide(row), wide(row.add(32)));
            let a = &mut acc[4 * set..4 * set + 4];
            a[0] = _mm512_dpwssd_epi32(a[0], x0, even);
            a[1] = _mm512_dpwssd_epi32(a[1], x0, odd);
            a[2] = _mm512_dpwssd_epi32(a[2], x1, even);
            a[3] = _mm512_dpwssd_epi32(a[3], x1, odd);
        };
        let mut j = 0;
        while j + 2 <= len {
            add_row(0, j);
            add_row(1, j + 1);
            j += 2;
        }
        if j < len {
            add_row(0, j);
        }
        let scale = _mm512_set1_ps(w_scale / total);
        let mut lanes = [[0f32; 16]; 4];
        for (c, out) in lanes.iter_mut().enumerate() {
            // Each set's sums fit an i32 on their own; added as floats.
            let sum = _mm512_add_ps(_mm512_cvtepi32_ps(acc[c]), _mm512_cvtepi32_ps(acc[4 + c]));
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(sum, scale));
        }
        super::merge_even_odd(&lanes, o);
    }
}
