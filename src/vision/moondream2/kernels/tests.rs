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
        avx2: false,
    };
    let mut out = vec![scalar];
    if best.avx2 {
        out.push(Isa {
            avx2: true,
            ..scalar
        });
    }
    if best.avx512() {
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
fn the_fused_gelu_is_the_product_then_gelu() {
    let mut rng = Rng(0x0bad_cafe_dead_beef);
    let (n, k) = (96, 130);
    let w = rng.vec(n * k);
    let bias = rng.vec(n);
    for packed in [
        PackedWeight::Bf16(PackedBf16::from_rows(&w, n, k)),
        PackedWeight::Q8(PackedQ8::from_rows(&w, n, k)),
    ] {
        for m in [1, 4, 40] {
            let a = rng.vec(m * k);
            let mut want = vec![0f32; m * n];
            matmul(&a, m, &packed, Some(&bias), &mut want);
            math::gelu_tanh_in_place(&mut want);
            let mut got = vec![0f32; m * n];
            matmul_gelu(&a, m, &packed, Some(&bias), &mut got);
            assert_eq!(got, want, "m={m}");
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

/// 8-bit rows of `dim` values with one scale per row, rounded as the KV cache does.
fn quantize_rows(x: &[f32], dim: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::new();
    let mut scale = Vec::new();
    for row in x.chunks_exact(dim) {
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        q.extend(row.iter().map(|v| (v * inv).round_ties_even() as i8));
        scale.push(s);
    }
    (q, scale)
}

#[test]
fn kv_rows_are_stored_rounded_to_nearest_even() {
    let mut rng = Rng(0xCAC4E);
    let mut x = rng.vec(64 * 37);
    // A zero row, and a row of exact halves once scaled (max 127 → scale 1).
    x[64..128].fill(0.0);
    for (i, v) in x[128..192].iter_mut().enumerate() {
        *v = if i == 0 { 127.0 } else { (i % 9) as f32 - 4.5 };
    }
    // A row whose largest magnitude is negative, and one of tiny values.
    x[192 + 9] = -40.0;
    for v in &mut x[256..320] {
        *v *= 1e-30;
    }
    let want = quantize_rows(&x, 64);
    type Store = dyn Fn(&[f32], &mut [i8], &mut [f32]);
    let mut paths: Vec<(&str, Box<Store>)> = vec![
        ("dispatched", Box::new(|r, q, s| store_q8(r, 64, q, s))),
        (
            "portable",
            Box::new(|r, q, s| super::attention::store_q8_portable(r, 64, q, s)),
        ),
    ];
    #[cfg(target_arch = "x86_64")]
    if isa().avx2 {
        // SAFETY: AVX2 and FMA are present (checked).
        paths.push((
            "AVX2",
            Box::new(|r, q, s| unsafe { avx2::quantize_rows_64(r, q, s) }),
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if isa().avx512() {
        // SAFETY: AVX512-F is present whenever either AVX512 family is.
        paths.push((
            "AVX512",
            Box::new(|r, q, s| unsafe { x86::quantize_rows_64(r, q, s) }),
        ));
    }
    for (name, f) in &paths {
        let (mut q, mut scale) = (vec![3i8; 1 + x.len()], vec![0.5f32; 1 + x.len() / 64]);
        f(&x, &mut q[1..], &mut scale[1..]);
        assert_eq!((&q[1..], &scale[1..]), (&want.0[..], &want.1[..]), "{name}");
        assert_eq!((q[0], scale[0]), (3, 0.5), "{name}: writes only where told");
        assert_eq!(&q[1 + 128..1 + 134], &[127, -4, -2, -2, 0, 0], "{name}");
    }
    let mut b = vec![7u16; 1 + x.len()];
    store_bf16(&x, &mut b[1..]);
    let want: Vec<u16> = x
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect();
    assert_eq!(&b[1..], &want[..]);
}

#[test]
fn bf16_conversion_equals_the_half_crate_bit_for_bit_on_every_path() {
    let mut rng = Rng(0xB16);
    let mut x: Vec<f32> = rng.vec(1000).iter().map(|v| v * 3e4).collect();
    // Exact ties (even and odd below), signed zeros, infinities, NaNs, subnormals,
    // values that round up into the next exponent or to infinity.
    x.extend([
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0xbf81_8000),
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fff_ffff),
        f32::from_bits(0xffc0_0001),
        f32::from_bits(0x0000_8001),
        f32::from_bits(0x3fff_ffff),
        f32::MAX,
    ]);
    let want: Vec<u16> = x
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect();
    for isa in paths() {
        let mut got = vec![0u16; x.len()];
        pack::to_bf16(&isa, &x, &mut got);
        for ((g, w), v) in got.iter().zip(&want).zip(&x) {
            assert_eq!(g, w, "{isa:?}: {v:e} ({:#x})", v.to_bits());
        }
    }
    // The AVX2 many-row path's rounding kept in f32: the same bf16 values, widened.
    #[cfg(target_arch = "x86_64")]
    if isa().avx2 {
        let mut got = vec![0f32; x.len()];
        // SAFETY: AVX2 is present; the slices are as long.
        unsafe { super::avx2::round_to_bf16(&x, &mut got) };
        for ((g, w), v) in got.iter().zip(&want).zip(&x) {
            assert_eq!(
                g.to_bits(),
                u32::from(*w) << 16,
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }
}

#[test]
fn decode_attention_over_bf16_f32_and_q8_rows_matches_f64_and_batches_exactly() {
    let mut rng = Rng(0x5EED);
    let (heads, kv_heads, dim) = (4, 2, 64);
    let bf16 = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect()
    };
    // Lengths around the kernels' steps of 16 and 2 keys, and a prefix-sized one.
    let lens = [1usize, 2, 3, 5, 15, 16, 17, 33, 731];
    let mut seqs = Vec::new();
    for &len in &lens {
        let q: Vec<f32> = rng.vec(heads * dim).iter().map(|x| x * 0.5).collect();
        let k: Vec<Vec<f32>> = (0..kv_heads).map(|_| rng.vec(len * dim)).collect();
        let v: Vec<Vec<f32>> = (0..kv_heads).map(|_| rng.vec(len * dim)).collect();
        seqs.push((q, k, v));
    }
    // Each head's rows in every format, and the f32 values those rows stand for.
    struct Stored {
        bf16: Vec<u16>,
        f32: Vec<f32>,
        q8: (Vec<i8>, Vec<f32>),
    }
    let store = |h: &Vec<f32>| Stored {
        bf16: bf16(h),
        f32: h.clone(),
        q8: quantize_rows(h, dim),
    };
    let stored: Vec<(Vec<Stored>, Vec<Stored>)> = seqs
        .iter()
        .map(|(_, k, v)| (k.iter().map(store).collect(), v.iter().map(store).collect()))
        .collect();
    fn rows(heads: &[Stored], format: usize) -> Vec<KvRows<'_>> {
        heads
            .iter()
            .map(|h| match format {
                0 => KvRows::Bf16(&h.bf16),
                1 => KvRows::F32(&h.f32),
                _ => KvRows::Q8 {
                    q: &h.q8.0,
                    scale: &h.q8.1,
                },
            })
            .collect()
    }
    // bf16 and f32 rows: f32 arithmetic. 8-bit rows: the query and the weights are
    // rounded to 16 bits (2⁻¹⁶ of the largest, relative) for integer products.
    for (format, tolerance) in [1e-5, 1e-5, 1e-4].into_iter().enumerate() {
        let mut alone = Vec::new();
        for ((q, ..), (ks, vs)) in seqs.iter().zip(&stored) {
            let (kr, vr) = (rows(ks, format), rows(vs, format));
            let mut out = vec![0f32; heads * dim];
            attend_one(q, &kr, &vr, dim, &mut out);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let (kf, vf) = (kr[g].to_f32(), vr[g].to_f32());
                let want = attention_reference(&q[h * dim..(h + 1) * dim], &kf, &vf, dim);
                for (got, want) in out[h * dim..(h + 1) * dim].iter().zip(&want) {
                    assert!(
                        (f64::from(*got) - want).abs() < tolerance,
                        "len {} format {format}: {got} vs {want}",
                        kf.len() / dim
                    );
                }
            }
            alone.push(out);
        }
        // All sequences in one pass give each exactly what it gets alone.
        let q_all: Vec<f32> = seqs.iter().flat_map(|(q, ..)| q.clone()).collect();
        let all: Vec<(Vec<KvRows<'_>>, Vec<KvRows<'_>>)> = stored
            .iter()
            .map(|(k, v)| (rows(k, format), rows(v, format)))
            .collect();
        let pairs: Vec<(&[KvRows<'_>], &[KvRows<'_>])> =
            all.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let mut out = vec![0f32; q_all.len()];
        attend_each(&q_all, &pairs, dim, &mut out);
        assert_eq!(out, alone.concat(), "format {format}");
    }
}

/// The AVX2 decode-attention kernels (run wherever the CPU has AVX2, also beside the
/// AVX512 ones) against the f64 reference, around their steps of 8 keys and 2 value
/// rows; the last length with a zero query (flat attention: the 8-bit kernel's
/// weights are capped so that their sums fit 32 bits).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_decode_attention_matches_f64_over_bf16_and_q8_rows() {
    if !isa().avx2 {
        return;
    }
    let mut rng = Rng(0xA772);
    let dim = 64;
    for len in [1usize, 2, 7, 8, 9, 17, 731, 2048] {
        let gain = if len == 2048 { 0.0 } else { 0.5 };
        let q: Vec<f32> = rng.vec(dim).iter().map(|x| x * gain).collect();
        let (k, v) = (rng.vec(len * dim), rng.vec(len * dim));
        let bf16 = |x: &[f32]| -> Vec<u16> {
            x.iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect()
        };
        let (kb, vb) = (bf16(&k), bf16(&v));
        let mut out = vec![0f32; dim];
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { super::avx2::attend_head_bf16_64(&q, &kb, &vb, &mut out) };
        let widen = |b: &[u16]| KvRows::Bf16(b).to_f32();
        let want = attention_reference(&q, &widen(&kb), &widen(&vb), dim);
        for (got, want) in out.iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-5,
                "bf16 len {len}: {got} vs {want}"
            );
        }
        let (kq, vq) = (quantize_rows(&k, dim), quantize_rows(&v, dim));
        // SAFETY: as above.
        unsafe {
            super::avx2::attend_head_q8_64(
                &q,
                (&kq.0, &kq.1),
                (&vq.0, &vq.1),
                std::ptr::null(),
                &mut out,
            )
        };
        let widen = |r: &(Vec<i8>, Vec<f32>)| {
            KvRows::Q8 {
                q: &r.0,
                scale: &r.1,
            }
            .to_f32()
        };
        let want = attention_reference(&q, &widen(&kq), &widen(&vq), dim);
        // The query and the weights rounded to 16 bits for integer products.
        for (got, want) in out.iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-4,
                "q8 len {len}: {got} vs {want}"
            );
        }
    }
}

/// The vector quantizations of activations give the portable loop's values exactly:
/// ties rounded to even, a zero group, a group whose largest value is negative, and
/// values near the ±127 ends.
#[cfg(target_arch = "x86_64")]
#[test]
fn activation_quantization_is_the_portable_one_on_every_path() {
    type Quantize = dyn Fn(&[f32], &mut [i8], &mut [f32], &mut [i32]);
    let mut rng = Rng(0x0A11);
    let groups = 9;
    let mut row: Vec<f32> = rng.vec(groups * BLOCK_K).iter().map(|x| x * 3.0).collect();
    // Group 1 all zero; group 2 with exact halves of its step (127 / 127 = 1 a step).
    row[BLOCK_K..2 * BLOCK_K].fill(0.0);
    for (i, x) in row[2 * BLOCK_K..3 * BLOCK_K].iter_mut().enumerate() {
        *x = if i == 0 { 127.0 } else { i as f32 - 15.5 };
    }
    // Group 3's largest magnitude is negative; group 4 tiny values.
    row[3 * BLOCK_K + 7] = -50.0;
    for x in &mut row[4 * BLOCK_K..5 * BLOCK_K] {
        *x *= 1e-30;
    }
    let run = |f: &Quantize| {
        let (mut q, mut scale, mut start) =
            (vec![0i8; row.len()], vec![0f32; groups], vec![0i32; groups]);
        f(&row, &mut q, &mut scale, &mut start);
        (q, scale, start)
    };
    let want = run(&|r, q, s, t| pack::quantize_groups_portable(r, q, s, t));
    assert_eq!(&want.0[2 * BLOCK_K..2 * BLOCK_K + 4], &[127, -14, -14, -12]);
    if isa().avx2 {
        // SAFETY: AVX2 and FMA are present (checked).
        let got = run(&|r, q, s, t| unsafe { avx2::quantize_groups(r, q, s, t) });
        assert_eq!(got, want, "AVX2");
    }
    if isa().avx512() {
        // SAFETY: AVX512-F is present whenever either AVX512 family is.
        let got = run(&|r, q, s, t| unsafe { x86::quantize_groups(r, q, s, t) });
        assert_eq!(got, want, "AVX512");
    }
}

/// The vector kernels' weight steps of the 8-bit attention are the portable
/// `weights_step`'s bit for bit (step, inverse and the weights left in place), over
/// lengths around whole vectors, zero weights and ties for the largest.
#[cfg(target_arch = "x86_64")]
#[test]
fn q8_attention_weight_steps_are_the_portable_ones_bit_for_bit() {
    use super::attention::q8_rounding::weights_step;
    let mut rng = Rng(0x05ee_d0f5_ca1e);
    // Peaked weights (the largest sets the step), then flat ones past 516 positions
    // (the total does).
    let peaked = [1, 5, 8, 15, 16, 17, 31, 32, 33, 100, 730, 931].map(|n| (n, false));
    for (len, flat) in peaked
        .into_iter()
        .chain([(600, true), (931, true), (2047, true)])
    {
        let mut scores: Vec<f32> = rng.vec(len).iter().map(|x| x.abs()).collect();
        let mut scales: Vec<f32> = rng.vec(len).iter().map(|x| x.abs() * 0.02).collect();
        if flat {
            scores.iter_mut().for_each(|x| *x = 0.9 + 0.1 * *x);
            scales.iter_mut().for_each(|x| *x = 0.019 + 0.05 * *x);
        }
        scores[len / 2] = 0.0;
        scores[len - 1] = 1.0;
        scores[0] = 1.0;
        let want = {
            let mut s = scores.clone();
            let step = weights_step(&mut s, &scales);
            (step.0.to_bits(), step.1.to_bits(), s)
        };
        let bits = |f: &dyn Fn(&mut [f32]) -> (f32, f32)| {
            let mut s = scores.clone();
            let step = f(&mut s);
            (step.0.to_bits(), step.1.to_bits(), s)
        };
        if isa().avx2 {
            // SAFETY: AVX2 is present (checked).
            let got = bits(&|s| unsafe { avx2::weights_step(s, &scales) });
            assert_eq!(got, want, "AVX2 len {len}");
        }
        if isa().avx512() {
            // SAFETY: AVX512-F is present whenever either AVX512 family is.
            let got = bits(&|s| unsafe { x86::weights_step(s, &scales) });
            assert_eq!(got, want, "AVX512 len {len}");
        }
    }
}
