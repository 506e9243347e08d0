//! Portable kernels over the packed layouts: the reference the vector kernels are
//! tested against, and the path on CPUs without AVX512.

use half::bf16;

use super::pack::{PackedQ8, QuantActivations};
use super::{BLOCK_K, BLOCK_N};

fn bf(x: u16) -> f32 {
    bf16::from_bits(x).to_f32()
}

/// `c[r][j] = Σ a[r][kk] · w[j][kk]` for `m` bf16 rows and `blocks` packed column blocks.
pub(super) fn bf16_rows_into(
    a: &[u16],
    m: usize,
    kp: usize,
    w: &[u16],
    blocks: usize,
    c: &mut [f32],
    ldc: usize,
) {
    for r in 0..m {
        let row = &a[r * kp..(r + 1) * kp];
        for b in 0..blocks {
            let block = &w[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
            for col in 0..BLOCK_N {
                let mut acc = 0f32;
                for (kk, &x) in row.iter().enumerate() {
                    acc += bf(x) * bf(block[(kk / 2) * 2 * BLOCK_N + col * 2 + kk % 2]);
                }
                c[r * ldc + b * BLOCK_N + col] = acc;
            }
        }
    }
}

/// The q8 product for blocks `b0..b1` into `c` (`m × 16·(b1−b0)`).
pub(super) fn q8_rows(a: &QuantActivations, w: &PackedQ8, b0: usize, b1: usize, c: &mut [f32]) {
    let (kp, groups) = (w.kp, w.kp / BLOCK_K);
    let ldc = BLOCK_N * (b1 - b0);
    for r in 0..a.m {
        for b in b0..b1 {
            let block = &w.q[b * BLOCK_N * kp..(b + 1) * BLOCK_N * kp];
            for col in 0..BLOCK_N {
                let mut acc = 0f32;
                for g in 0..groups {
                    let mut dot = 0i32;
                    for i in 0..BLOCK_K {
                        let kk = g * BLOCK_K + i;
                        let qw = i32::from(block[(kk / 4) * 4 * BLOCK_N + col * 4 + kk % 4]) - 128;
                        dot += qw * i32::from(a.q[r * kp + kk]);
                    }
                    let sw = w.scales[(b * groups + g) * BLOCK_N + col].to_f32();
                    acc += dot as f32 * sw * a.scale[r * groups + g];
                }
                c[r * ldc + (b - b0) * BLOCK_N + col] = acc;
            }
        }
    }
}
