//! Every kernel path against an f64 product of the same inputs.

use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// The instruction-set subsets this CPU can run, scalar first.
fn paths() -> Vec<Isa> {
    let best = *isa();
    let scalar = Isa {
        amx: false,
        avx512bf16: false,
        avx512vnni: false,
    };
    let mut out = vec![scalar];
    if best.avx512bf16 || best.avx512vnni {
        out.push(Isa { amx: false, ..best });
    }
    if best.amx {
        out.push(best);
    }
    out
}

fn reference(
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = f64::from(a[i * k + kk]) * f64::from(w[j * k + kk]);
                y[i * n + j] += p;
                mag[i * n + j] += p.abs();
            }
            y[i * n + j] += f64::from(bias[j]);
        }
    }
    (y, mag)
}

/// Largest error relative to Σ|a·w| of each output.
fn worst(
    isa: &Isa,
    w: &PackedWeight,
    a: &[f32],
    bias: &[f32],
    m: usize,
    want: &(Vec<f64>, Vec<f64>),
) -> f64 {
    let mut out = vec![0f32; m * w.n()];
    matmul_with(isa, a, m, w, Some(bias), &mut out);
    out.iter()
        .zip(&want.0)
        .zip(&want.1)
        .map(|((got, y), mag)| (f64::from(*got) - y).abs() / mag.max(1e-3))
        .fold(0.0, f64::max)
}

const SHAPES: &[(usize, usize)] = &[(16, 32), (37, 50), (100, 588), (64, 256), (33, 1000)];
const ROWS: &[usize] = &[1, 2, 3, 4, 6, 8, 9, 31, 45, 70];

/// Every shape, row count and path of `pack` stays within `tolerance` (relative to
/// Σ|a·w|) of the f64 product.
fn check_format(
    seed: u64,
    name: &str,
    tolerance: f64,
    pack: impl Fn(&[f32], usize, usize) -> PackedWeight,
) {
    let mut rng = Rng(seed);
    for &(n, k) in SHAPES {
        let w = rng.vec(n * k);
        let bias = rng.vec(n);
        let packed = pack(&w, n, k);
        for &m in ROWS {
            let a = rng.vec(m * k);
            let want = reference(&a, &w, &bias, m, n, k);
            for isa in paths() {
                let err = worst(&isa, &packed, &a, &bias, m, &want);
                assert!(
                    err < tolerance,
                    "{name} {isa:?} m={m} n={n} k={k}: relative error {err}"
                );
            }
        }
    }
}

#[test]
fn bf16_products_match_within_bf16_rounding_on_every_path() {
    // Two bf16 roundings (8-bit mantissa) per product: |δ| ≤ 2·2⁻⁹.
    check_format(0x1234_5678_9abc_def1, "bf16", 8e-3, |w, n, k| {
        PackedWeight::Bf16(PackedBf16::from_rows(w, n, k))
    });
}

#[test]
fn q8_products_match_within_quantization_error_on_every_path() {
    // Half a step of 1/127 of the group maximum on each side, plus bf16 rounding on
    // the many-row path.
    check_format(0x0fed_cba9_8765_4321, "q8", 2.5e-2, |w, n, k| {
        PackedWeight::Q8(PackedQ8::from_rows(w, n, k))
    });
}

#[test]
fn vector_paths_agree_with_the_scalar_path_to_float_rounding() {
    let mut rng = Rng(0x5555_aaaa_1234_4321);
    let (n, k) = (48, 200);
    let w = rng.vec(n * k);
    for packed in [
        PackedWeight::Bf16(PackedBf16::from_rows(&w, n, k)),
        PackedWeight::Q8(PackedQ8::from_rows(&w, n, k)),
    ] {
        for &m in ROWS {
            let a = rng.vec(m * k);
            let all = paths();
            let mut base = vec![0f32; m * n];
            matmul_with(&all[0], &a, m, &packed, None, &mut base);
            for isa in &all[1..] {
                let mut out = vec![0f32; m * n];
                matmul_with(isa, &a, m, &packed, None, &mut out);
                for (x, y) in out.iter().zip(&base) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{isa:?} m={m}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_sizes_are_those_of_the_format() {
    let w = vec![0.5f32; 64 * 128];
    assert_eq!(
        PackedWeight::Bf16(PackedBf16::from_rows(&w, 64, 128)).bytes(),
        64 * 128 * 2
    );
    // 1 byte per value plus an f16 scale per 32 values: 1.0625 bytes per parameter.
    assert_eq!(
        PackedWeight::Q8(PackedQ8::from_rows(&w, 64, 128)).bytes(),
        64 * 128 * 17 / 16
    );
}

/// `softmax(q·Kᵀ)·V` in f64 for one head.
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], dim: usize) -> Vec<f64> {
    let len = k.len() / dim;
    let scores: Vec<f64> = (0..len)
        .map(|j| {
            (0..dim)
                .map(|d| f64::from(q[d]) * f64::from(k[j * dim + d]))
                .sum()
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = p.iter().sum();
    (0..dim)
        .map(|d| {
            (0..len)
                .map(|j| p[j] * f64::from(v[j * dim + d]))
                .sum::<f64>()
                / total
        })
        .collect()
}

#[test]
fn decode_attention_over_bf16_and_f32_rows_matches_f64_and_batches_exactly() {
    let mut rng = Rng(0x5EED);
    let (heads, kv_heads, dim) = (4, 2, 64);
    let bf16 = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect()
    };
    let widen = |x: &[u16]| -> Vec<f32> {
        x.iter()
            .map(|b| half::bf16::from_bits(*b).to_f32())
            .collect()
    };
    // Lengths around the kernel's steps of 16 and 2 keys, and a prefix-sized one.
    let lens = [1usize, 2, 3, 5, 15, 16, 17, 33, 731];
    let mut seqs = Vec::new();
    for &len in &lens {
        let q: Vec<f32> = rng.vec(heads * dim).iter().map(|x| x * 0.5).collect();
        let k: Vec<Vec<u16>> = (0..kv_heads).map(|_| bf16(&rng.vec(len * dim))).collect();
        let v: Vec<Vec<u16>> = (0..kv_heads).map(|_| bf16(&rng.vec(len * dim))).collect();
        seqs.push((q, k, v));
    }
    let mut alone = Vec::new();
    for (q, k, v) in &seqs {
        for as_f32 in [false, true] {
            let kf: Vec<Vec<f32>> = k.iter().map(|h| widen(h)).collect();
            let vf: Vec<Vec<f32>> = v.iter().map(|h| widen(h)).collect();
            fn rows<'a>(b: &'a [Vec<u16>], f: &'a [Vec<f32>], as_f32: bool) -> Vec<KvRows<'a>> {
                if as_f32 {
                    f.iter().map(|h| KvRows::F32(h)).collect()
                } else {
                    b.iter().map(|h| KvRows::Bf16(h)).collect()
                }
            }
            let (kr, vr) = (rows(k, &kf, as_f32), rows(v, &vf, as_f32));
            let mut out = vec![0f32; heads * dim];
            attend_one(q, &kr, &vr, dim, &mut out);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let want = attention_reference(&q[h * dim..(h + 1) * dim], &kf[g], &vf[g], dim);
                for (got, want) in out[h * dim..(h + 1) * dim].iter().zip(&want) {
                    assert!(
                        (f64::from(*got) - want).abs() < 1e-5,
                        "len {} f32 rows {as_f32}: {got} vs {want}",
                        k[0].len() / dim
                    );
                }
            }
            if !as_f32 {
                alone.push(out);
            }
        }
    }
    // All sequences in one pass give each exactly what it gets alone.
    let q_all: Vec<f32> = seqs.iter().flat_map(|(q, ..)| q.clone()).collect();
    let rows: Vec<(Vec<KvRows<'_>>, Vec<KvRows<'_>>)> = seqs
        .iter()
        .map(|(_, k, v)| {
            (
                k.iter().map(|h| KvRows::Bf16(h)).collect(),
                v.iter().map(|h| KvRows::Bf16(h)).collect(),
            )
        })
        .collect();
    let pairs: Vec<(&[KvRows<'_>], &[KvRows<'_>])> =
        rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut out = vec![0f32; q_all.len()];
    attend_each(&q_all, &pairs, dim, &mut out);
    assert_eq!(out, alone.concat());
}
