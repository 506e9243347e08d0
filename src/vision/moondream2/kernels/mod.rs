//! CPU matrix kernels for weights packed at load time: bf16 and 8-bit (q8, one f16
//! scale per 32 inputs of each output). `y = x · Wᵀ + b` with f32 activations in and
//! out; the packed layout serves AMX tiles, AVX512-BF16/VNNI vectors and a portable
//! scalar path alike. Not for anything but the Linear layers of the model.
//!
//! Packed layout: output columns in blocks of 16 (padded to an even number of blocks);
//! inside a block, the inputs in pairs (bf16: `[k/2][16][2]`) or quads (q8:
//! `[k/4][16][4]`), so one 64-byte row is one AMX tile row and one 512-bit vector.

mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod huge;
mod isa;
pub mod math;
mod pack;
mod peak;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{KvRows, attend_all, attend_each, attend_one, store_bf16, store_q8};
pub use isa::{Isa, isa};
pub use pack::{PackedBf16, PackedQ8, PackedWeight};
pub use peak::instruction_peak_gflops;

/// Output columns per block.
pub const BLOCK_N: usize = 16;
/// Inputs per block of `k` (one AMX tile's depth, one q8 scale group).
pub const BLOCK_K: usize = 32;

/// How many 32-input groups ahead the few-row q8 kernels prefetch their weights (4 KiB
/// per block), on the first pass over a block. AVX512, where from four rows on the
/// products no longer hide the memory latency by themselves: four rows 15.0 →
/// 12.3–12.9 ms over 285 MB in `bench-model --kernels`; AVX2 (Zen 3, eight rounds
/// alternating with no prefetch): one row 14.0 → 10.2 ms, four rows 20.0 → 18.9
/// (medians).
#[cfg(target_arch = "x86_64")]
const Q8_AHEAD: usize = 8;

/// Rows up to which the vector (GEMV-style) kernels are used; above, the tiled ones.
const SMALL_M: usize = 8;

/// `out[m × n] = a[m × k] · Wᵀ (+ bias)`, all row-major f32.
pub fn matmul(a: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_with(isa(), a, m, w, bias, out)
}

/// [`matmul`] restricted to the instruction sets in `isa` (a subset of [`isa()`]).
pub fn matmul_with(
    isa: &Isa,
    a: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    matmul_on(isa, a, m, w, bias, out, true, false)
}

/// `out = gelu_tanh(a · Wᵀ + bias)`: [`matmul`] with the GELU applied by each thread to
/// the columns it computed, while they are in cache.
pub fn matmul_gelu(a: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_on(isa(), a, m, w, bias, out, true, true)
}

/// [`matmul`] on the calling thread only (for use inside parallel loops).
pub fn matmul_serial(a: &[f32], m: usize, w: &PackedWeight, out: &mut [f32]) {
    matmul_on(isa(), a, m, w, None, out, false, false)
}

#[allow(clippy::too_many_arguments)]
fn matmul_on(
    isa: &Isa,
    a: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    parallel: bool,
    gelu: bool,
) {
    let (n, k) = (w.n(), w.k());
    assert_eq!(a.len(), m * k, "activation is not m × k");
    assert_eq!(out.len(), m * n, "output is not m × n");
    if m == 0 {
        return;
    }
    // Column chunks: one per thread for the tiled products; four per thread for the
    // few-row ones (the decode step's), so that a thread that wakes late takes fewer
    // instead of the others waiting for it. Sixteen 2048 → 8192 products, 40 rounds
    // interleaved on two Zen 3 vCPUs: 4 rows 13.1 → 11.0 ms (min), 13.6 → 11.8
    // (median); 1 row alike (9.2, 9.7–9.9); 2 or 8 a thread as 4.
    let (few_rows, many_rows) = if parallel {
        let threads = rayon::current_num_threads();
        (4 * threads, threads)
    } else {
        (1, 1)
    };
    match w {
        PackedWeight::Bf16(w) if m <= SMALL_M => {
            let a = pack::activations_bf16(isa, a, m, k, w.kp, m);
            run_blocks(
                w.blocks(),
                m,
                n,
                (bias, gelu),
                out,
                few_rows,
                |b0, b1, c| small_bf16(isa, &a, m, w, b0, b1, c),
            );
        }
        PackedWeight::Q8(w) if m <= SMALL_M => {
            let a = pack::QuantActivations::new(isa, a, m, k, w.kp);
            run_blocks(
                w.blocks(),
                m,
                n,
                (bias, gelu),
                out,
                few_rows,
                |b0, b1, c| small_q8(isa, &a, w, b0, b1, c),
            );
        }
        #[cfg(target_arch = "x86_64")]
        _ if isa.avx2 && !isa.amx && !isa.avx512bf16 => {
            // Activations rounded to bf16 as on every other path, held in f32 (rows of
            // kp, zero-padded).
            let kp = w.kp();
            let mut rounded = vec![0f32; m * kp];
            for (src, dst) in a.chunks_exact(k).zip(rounded.chunks_exact_mut(kp)) {
                // SAFETY: AVX2 is present; both slices hold k values.
                unsafe { avx2::round_to_bf16(src, &mut dst[..k]) };
            }
            let a = rounded;
            run_blocks(
                w.blocks(),
                m,
                n,
                (bias, gelu),
                out,
                many_rows,
                // SAFETY: AVX2, FMA and F16C are present; `a` holds m rows of kp and
                // `c` m rows of the chunk's columns (run_blocks sizes it).
                |b0, b1, c| unsafe { avx2::tiled(&a, m, w, b0, b1, c) },
            );
        }
        _ => {
            let mp = m.next_multiple_of(32);
            let kp = w.kp();
            let a = pack::activations_bf16(isa, a, m, k, kp, mp);
            run_blocks(
                w.blocks(),
                mp,
                n,
                (bias, gelu),
                out,
                many_rows,
                |b0, b1, c| tiled(isa, &a, mp, kp, w, b0, b1, c),
            );
        }
    }
}

/// Splits the column blocks into up to `parts` chunks run on the CPU threads; each
/// call of `f(b0, b1, c)` fills `c` (`rows × 16·(b1−b0)` f32) for blocks `b0..b1`; the
/// same thread then adds the bias (and applies GELU, when `then.1`) and writes those
/// columns of `out`.
fn run_blocks(
    blocks: usize,
    rows: usize,
    n: usize,
    then: (Option<&[f32]>, bool),
    out: &mut [f32],
    parts: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let m = out.len() / n;
    let parts = parts.clamp(1, (blocks / 2).max(1));
    // Chunks in pairs of blocks, so that the tiled kernels' 32-column steps line up.
    let pairs = blocks / 2;
    let per = pairs.div_ceil(parts);
    let chunks: Vec<(usize, usize)> = (0..parts)
        .map(|t| (2 * (t * per).min(pairs), 2 * ((t + 1) * per).min(pairs)))
        .filter(|(a, b)| a < b)
        .collect();
    let (bias, gelu) = then;
    let target = OutColumns(out.as_mut_ptr());
    let work = |&(b0, b1): &(usize, usize)| {
        let width = BLOCK_N * (b1 - b0);
        let col0 = BLOCK_N * b0;
        let cols = width.min(n.saturating_sub(col0));
        with_scratch(rows * width, |c| {
            f(b0, b1, c);
            for i in 0..m {
                let src = &c[i * width..i * width + cols];
                // SAFETY: `out` is m × n; each chunk writes only its own columns
                // col0..col0 + cols of each row, and the chunks' columns are disjoint.
                let dst = unsafe { target.row(i * n + col0, cols) };
                match bias {
                    Some(b) => {
                        for ((d, s), b) in dst.iter_mut().zip(src).zip(&b[col0..col0 + cols]) {
                            *d = s + b;
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
                if gelu {
                    math::gelu_tanh_in_place(dst);
                }
            }
        });
    };
    if chunks.len() == 1 {
        work(&chunks[0]);
    } else {
        use rayon::prelude::*;
        chunks.par_iter().for_each(work);
    }
}

/// Starts loading, for writing, the cache lines that hold `values`, so that writing
/// them a little later finds them in cache instead of waiting on memory. A hint only;
/// nothing on other CPUs.
pub fn prefetch_lines<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
        let bytes = size_of_val(values);
        if bytes == 0 {
            return;
        }
        let start = values.as_ptr() as *const i8;
        // From the line that holds the first byte to the one that holds the last.
        let skew = start as usize % 64;
        let first = start.wrapping_sub(skew);
        for line in 0..(skew + bytes).div_ceil(64) {
            // SAFETY: a prefetch only hints; it reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(first.wrapping_add(64 * line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Scratch buffers up to this many floats (1 MiB) are kept by each thread between
/// products and 8-bit attention heads (the decode step's); larger ones (prefill,
/// vision) are allocated each time.
const KEEP_SCRATCH: usize = 1 << 18;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of scratch: this thread's kept buffer when small enough
/// (its contents are stale: the kernels overwrite every value they hand back).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len > KEEP_SCRATCH {
        return f(&mut vec![0f32; len]);
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < len {
                kept.resize(len, 0.0);
            }
            f(&mut kept[..len])
        }
        // Already in use further up this thread's stack.
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// The output of [`run_blocks`], shared by the threads that fill disjoint columns.
#[derive(Clone, Copy)]
struct OutColumns(*mut f32);

// SAFETY: the threads write disjoint parts of the buffer (see `row`), which outlives
// the parallel loop.
unsafe impl Send for OutColumns {}
// SAFETY: as above.
unsafe impl Sync for OutColumns {}

impl OutColumns {
    /// `len` floats from `start`.
    ///
    /// # Safety
    /// In bounds of the buffer, and not written by any other thread meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: per the contract above.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn small_bf16(isa: &Isa, a: &[u16], m: usize, w: &PackedBf16, b0: usize, b1: usize, c: &mut [f32]) {
    let (kp, bw, blocks, ldc) = (w.kp, w.block_range(b0, b1), b1 - b0, BLOCK_N * (b1 - b0));
    #[cfg(target_arch = "x86_64")]
    if isa.avx512bf16 {
        // SAFETY: the CPU has AVX512-BF16 (checked at start-up); slices are sized by pack.
        unsafe { x86::bf16_rows_into(a, m, kp, bw, blocks, c, ldc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked at start-up); slices are sized by pack.
        unsafe { avx2::bf16_rows_into(a, m, kp, bw, blocks, c, ldc) };
        return;
    }
    let _ = isa;
    scalar::bf16_rows_into(a, m, kp, bw, blocks, c, ldc);
}

/// A row of 64 as the bf16 kernels' vectors see it, `N` vectors of `L` lanes: vector
/// `2c` holds the even dimensions of the `c`-th run of `2L`, vector `2c + 1` the odd
/// ones (each 32-bit lane of a bf16 row load holds an even and the next odd value).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn split_even_odd<const L: usize, const N: usize>(row: &[f32]) -> [[f32; L]; N] {
    assert_eq!(row.len(), L * N);
    let mut out = [[0f32; L]; N];
    for (c, part) in row.chunks_exact(2 * L).enumerate() {
        for (i, pair) in part.chunks_exact(2).enumerate() {
            out[2 * c][i] = pair[0];
            out[2 * c + 1][i] = pair[1];
        }
    }
    out
}

/// The inverse of [`split_even_odd`]: `lanes` back into `row`'s order.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn merge_even_odd<const L: usize, const N: usize>(lanes: &[[f32; L]; N], row: &mut [f32]) {
    assert_eq!(row.len(), L * N);
    for (c, part) in row.chunks_exact_mut(2 * L).enumerate() {
        for (i, pair) in part.chunks_exact_mut(2).enumerate() {
            pair[0] = lanes[2 * c][i];
            pair[1] = lanes[2 * c + 1][i];
        }
    }
}

fn small_q8(
    isa: &Isa,
    a: &pack::QuantActivations,
    w: &PackedQ8,
    b0: usize,
    b1: usize,
    c: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512vnni {
        // SAFETY: the CPU has AVX512-VNNI (checked at start-up); slices are sized by pack.
        unsafe { x86::q8_rows(a, w, b0, b1, c) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2 {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at start-up); slices are sized
        // by pack.
        unsafe { avx2::q8_rows(a, w, b0, b1, c) };
        return;
    }
    let _ = isa;
    scalar::q8_rows(a, w, b0, b1, c);
}

/// Many rows: AMX tiles where available, else AVX512-BF16 in 8-row steps, else scalar.
/// q8 weights are widened to bf16 one panel at a time (cheap beside the arithmetic).
#[allow(clippy::too_many_arguments)]
fn tiled(
    isa: &Isa,
    a: &[u16],
    mp: usize,
    kp: usize,
    w: &PackedWeight,
    b0: usize,
    b1: usize,
    c: &mut [f32],
) {
    // Panels of at most ~1 MiB of bf16 weights stay in L2 while every row passes.
    let panel = ((1 << 20) / (kp * BLOCK_N * 2)).clamp(2, 16) & !1;
    let mut scratch = Vec::new();
    let width = BLOCK_N * (b1 - b0);
    let mut p0 = b0;
    while p0 < b1 {
        let p1 = (p0 + panel).min(b1);
        let bw: &[u16] = match w {
            PackedWeight::Bf16(w) => w.block_range(p0, p1),
            PackedWeight::Q8(w) => {
                w.widen_to_bf16(isa, p0, p1, &mut scratch);
                &scratch
            }
        };
        let col = BLOCK_N * (p0 - b0);
        #[cfg(target_arch = "x86_64")]
        {
            if isa.amx {
                // SAFETY: AMX is enabled for this process (checked at start-up); `a`
                // holds `mp` rows (a multiple of 32) of `kp` values; `c` holds `mp`
                // rows of `width` floats.
                unsafe { x86::amx_panel(a, mp, kp, bw, p1 - p0, &mut c[col..], width) };
                p0 = p1;
                continue;
            }
            if isa.avx512bf16 {
                for r in (0..mp).step_by(SMALL_M) {
                    let rows = &a[r * kp..(r + SMALL_M) * kp];
                    // SAFETY: AVX512-BF16 is present (checked at start-up).
                    unsafe {
                        x86::bf16_rows_into(
                            rows,
                            SMALL_M,
                            kp,
                            bw,
                            p1 - p0,
                            &mut c[r * width + col..],
                            width,
                        )
                    };
                }
                p0 = p1;
                continue;
            }
        }
        let _ = isa;
        for r in (0..mp).step_by(SMALL_M) {
            let rows = &a[r * kp..(r + SMALL_M) * kp];
            scalar::bf16_rows_into(
                rows,
                SMALL_M,
                kp,
                bw,
                p1 - p0,
                &mut c[r * width + col..],
                width,
            );
        }
        p0 = p1;
    }
}

#[cfg(test)]
mod tests;
