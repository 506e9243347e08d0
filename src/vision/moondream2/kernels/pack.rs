//! Packing weights into the kernels' layouts, and activations into bf16 or 8-bit rows.

use half::{bf16, f16};

use super::huge::HugeBuf;
use super::{BLOCK_K, BLOCK_N, Isa};

/// A Linear weight `[n, k]` packed for the kernels.
#[derive(Debug, Clone)]
pub enum PackedWeight {
    /// bf16 values.
    Bf16(PackedBf16),
    /// 8-bit values with one f16 scale per 32 inputs of each output.
    Q8(PackedQ8),
}

impl PackedWeight {
    /// Output features.
    pub fn n(&self) -> usize {
        match self {
            Self::Bf16(w) => w.n,
            Self::Q8(w) => w.n,
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match self {
            Self::Bf16(w) => w.k,
            Self::Q8(w) => w.k,
        }
    }

    /// Inputs padded to a multiple of 32.
    pub(super) fn kp(&self) -> usize {
        match self {
            Self::Bf16(w) => w.kp,
            Self::Q8(w) => w.kp,
        }
    }

    /// Column blocks of 16 (an even count).
    pub(super) fn blocks(&self) -> usize {
        match self {
            Self::Bf16(w) => w.blocks(),
            Self::Q8(w) => w.blocks(),
        }
    }

    /// Bytes the packed weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Bf16(w) => w.data.len() * 2,
            Self::Q8(w) => w.q.len() + w.scales.len() * 2,
        }
    }
}

fn padded(n: usize, k: usize) -> (usize, usize) {
    let blocks = n.div_ceil(BLOCK_N).next_multiple_of(2);
    (blocks, k.next_multiple_of(BLOCK_K))
}

/// bf16 weight: per block of 16 columns, `[kp/2][16][2]` (pairs of inputs).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) kp: usize,
    pub(super) data: HugeBuf<u16>,
}

impl PackedBf16 {
    /// Packs a row-major f32 weight `[n, k]`, rounding to nearest even.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not n × k");
        let (blocks, kp) = padded(n, k);
        let mut data = HugeBuf::filled(blocks * BLOCK_N * kp, 0u16);
        for (row, values) in w.chunks_exact(k).enumerate() {
            let (b, c) = (row / BLOCK_N, row % BLOCK_N);
            let block = &mut data[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
            for (kk, &v) in values.iter().enumerate() {
                block[(kk / 2) * 2 * BLOCK_N + c * 2 + kk % 2] = bf16::from_f32(v).to_bits();
            }
        }
        Self { n, k, kp, data }
    }

    /// Packs the transpose of a row-major f32 matrix `v[k, n]` (`W[j][i] = v[i][j]`).
    pub fn from_cols(v: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(v.len(), n * k, "matrix is not k × n");
        let (blocks, kp) = padded(n, k);
        let mut data = HugeBuf::filled(blocks * BLOCK_N * kp, 0u16);
        for (kk, row) in v.chunks_exact(n).enumerate() {
            for (col, &x) in row.iter().enumerate() {
                let (b, c) = (col / BLOCK_N, col % BLOCK_N);
                data[b * BLOCK_N * kp + (kk / 2) * 2 * BLOCK_N + c * 2 + kk % 2] =
                    bf16::from_f32(x).to_bits();
            }
        }
        Self { n, k, kp, data }
    }

    pub(super) fn blocks(&self) -> usize {
        self.data.len() / (BLOCK_N * self.kp)
    }

    /// The packed values of column blocks `b0..b1`.
    pub(super) fn block_range(&self, b0: usize, b1: usize) -> &[u16] {
        &self.data[b0 * BLOCK_N * self.kp..b1 * BLOCK_N * self.kp]
    }
}

/// 8-bit weight: per block of 16 columns, `[kp/4][16][4]` bytes holding `q + 128`
/// (q in −127..=127), and `[kp/32][16]` f16 scales; value = q · scale.
#[derive(Debug, Clone)]
pub struct PackedQ8 {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) kp: usize,
    pub(super) q: HugeBuf<u8>,
    pub(super) scales: HugeBuf<f16>,
}

impl PackedQ8 {
    /// Quantizes a row-major f32 weight `[n, k]`: per 32 inputs of a row, the scale
    /// is max|w| / 127 and each value is rounded to the nearest step.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not n × k");
        let (blocks, kp) = padded(n, k);
        let groups = kp / BLOCK_K;
        let mut q = HugeBuf::filled(blocks * BLOCK_N * kp, 128u8);
        let mut scales = HugeBuf::filled(blocks * BLOCK_N * groups, f16::ZERO);
        for (row, values) in w.chunks_exact(k).enumerate() {
            let (b, c) = (row / BLOCK_N, row % BLOCK_N);
            let block = &mut q[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
            for (g, group) in values.chunks(BLOCK_K).enumerate() {
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The scale is stored in f16, so quantize against the stored value.
                let scale = f16::from_f32(amax / 127.0);
                scales[(b * groups + g) * BLOCK_N + c] = scale;
                let inv = if scale.to_f32() > 0.0 {
                    1.0 / scale.to_f32()
                } else {
                    0.0
                };
                for (i, &v) in group.iter().enumerate() {
                    let kk = g * BLOCK_K + i;
                    let qv = (v * inv).round().clamp(-127.0, 127.0) as i32;
                    block[(kk / 4) * 4 * BLOCK_N + c * 4 + kk % 4] = (qv + 128) as u8;
                }
            }
        }
        Self {
            n,
            k,
            kp,
            q,
            scales,
        }
    }

    pub(super) fn blocks(&self) -> usize {
        self.q.len() / (BLOCK_N * self.kp)
    }

    /// Writes column blocks `b0..b1` as bf16 in [`PackedBf16`]'s layout into `out`.
    pub(super) fn widen_to_bf16(&self, isa: &Isa, b0: usize, b1: usize, out: &mut Vec<u16>) {
        let (kp, groups) = (self.kp, self.kp / BLOCK_K);
        out.clear();
        out.resize((b1 - b0) * BLOCK_N * kp, 0);
        for b in b0..b1 {
            let src = &self.q[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
            let dst = &mut out[(b - b0) * BLOCK_N * kp..(b - b0 + 1) * BLOCK_N * kp];
            let scales = &self.scales[b * groups * BLOCK_N..(b + 1) * groups * BLOCK_N];
            #[cfg(target_arch = "x86_64")]
            if isa.avx512bf16 {
                // SAFETY: AVX512-BF16 is present; slices are one block each.
                unsafe { super::x86::widen_q8_block(src, scales, kp, dst) };
                continue;
            }
            widen_q8_block(src, scales, kp, dst);
        }
    }
}

/// Scalar form of the q8 → bf16 widening of one column block.
pub(super) fn widen_q8_block(src: &[u8], scales: &[f16], kp: usize, dst: &mut [u16]) {
    for kk in 0..kp {
        let g = kk / BLOCK_K;
        for c in 0..BLOCK_N {
            let q = i32::from(src[(kk / 4) * 4 * BLOCK_N + c * 4 + kk % 4]) - 128;
            let v = q as f32 * scales[g * BLOCK_N + c].to_f32();
            dst[(kk / 2) * 2 * BLOCK_N + c * 2 + kk % 2] = bf16::from_f32(v).to_bits();
        }
    }
}

/// `rows × kp` bf16 copy of the `m × k` activations, zero-padded.
pub(super) fn activations_bf16(
    isa: &Isa,
    a: &[f32],
    m: usize,
    k: usize,
    kp: usize,
    rows: usize,
) -> Vec<u16> {
    let mut out = vec![0u16; rows * kp];
    for (src, dst) in a.chunks_exact(k).zip(out.chunks_exact_mut(kp)).take(m) {
        to_bf16(isa, src, &mut dst[..k]);
    }
    out
}

/// `src` → bf16 bits in `dst` (as long), rounding to nearest even; AVX512-BF16 when
/// `isa` has it.
pub(super) fn to_bf16(isa: &Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx512bf16 {
        // SAFETY: AVX512-BF16 is present; `dst` is as long as `src`.
        unsafe { super::x86::f32_to_bf16(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2 {
        // SAFETY: AVX2 is present; `dst` is as long as `src`.
        unsafe { super::avx2::f32_to_bf16(src, dst) };
        return;
    }
    let _ = isa;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s).to_bits();
    }
}

/// Activations quantized like the weights: per row and 32 inputs, 8-bit values, the
/// scale, and −128 × the sum of the values (where a product with the weights stored as
/// `q + 128` starts, so that it ends at the product with `q`).
#[derive(Debug)]
pub(super) struct QuantActivations {
    pub(super) m: usize,
    pub(super) kp: usize,
    pub(super) q: Vec<i8>,
    pub(super) scale: Vec<f32>,
    pub(super) start: Vec<i32>,
}

impl QuantActivations {
    /// Quantizes the `m × k` activations (rows padded to `kp`), rounding half to even.
    pub(super) fn new(isa: &Isa, a: &[f32], m: usize, k: usize, kp: usize) -> Self {
        let groups = kp / BLOCK_K;
        let mut q = vec![0i8; m * kp];
        let mut scale = vec![0f32; m * groups];
        let mut start = vec![0i32; m * groups];
        for (r, row) in a.chunks_exact(k).enumerate().take(m) {
            let (q, scale, start) = (
                &mut q[r * kp..(r + 1) * kp],
                &mut scale[r * groups..(r + 1) * groups],
                &mut start[r * groups..(r + 1) * groups],
            );
            let mut whole = 0;
            #[cfg(target_arch = "x86_64")]
            if isa.avx512vnni {
                whole = k / BLOCK_K;
                // SAFETY: AVX512-F is present with VNNI; the slices hold `whole` groups.
                unsafe { super::x86::quantize_groups(&row[..whole * BLOCK_K], q, scale, start) };
            } else if isa.avx2 {
                whole = k / BLOCK_K;
                // SAFETY: AVX2 and FMA are present; the slices hold `whole` groups.
                unsafe { super::avx2::quantize_groups(&row[..whole * BLOCK_K], q, scale, start) };
            }
            let _ = isa;
            let tail = &row[whole * BLOCK_K..];
            let at = whole * BLOCK_K;
            quantize_groups_portable(tail, &mut q[at..], &mut scale[whole..], &mut start[whole..]);
        }
        Self {
            m,
            kp,
            q,
            scale,
            start,
        }
    }
}

/// The 8-bit quantization of [`QuantActivations`] for `row` (its last group may be
/// short): per 32 inputs the scale `max |x| / 127`, the values divided by it and rounded
/// half to even, and −128 × their sum.
#[inline(always)]
pub(super) fn quantize_groups_portable(
    row: &[f32],
    q: &mut [i8],
    scale: &mut [f32],
    start: &mut [i32],
) {
    for (g, group) in row.chunks(BLOCK_K).enumerate() {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let mut total = 0i32;
        for (i, &v) in group.iter().enumerate() {
            // Within −127..=127 before the cast, so the cast cannot saturate.
            let qv = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
            q[g * BLOCK_K + i] = qv as i8;
            total += qv;
        }
        scale[g] = s;
        start[g] = -128 * total;
    }
}
