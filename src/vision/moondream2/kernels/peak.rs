//! The CPU's bf16 multiply-add ceiling, measured with every operand in registers (no
//! memory traffic): an upper bound no bf16 matrix product here can pass. Benchmarks
//! state their stages as fractions of it.

use std::time::{Duration, Instant};

use super::Isa;

/// bf16 GFLOP/s over all CPU threads with the best matrix instructions in `isa` (AMX
/// tiles, else `vdpbf16ps`), or `None` without either.
pub fn instruction_peak_gflops(isa: &Isa, run_for: Duration) -> Option<f64> {
    use rayon::prelude::*;
    if !isa.fast_bf16() {
        return None;
    }
    let threads = rayon::current_num_threads();
    let per_thread: Vec<f64> = (0..threads)
        .into_par_iter()
        .map(|_| {
            let started = Instant::now();
            let mut flops = 0f64;
            while started.elapsed() < run_for {
                flops += burst(isa);
            }
            flops / started.elapsed().as_secs_f64()
        })
        .collect();
    Some(per_thread.iter().sum::<f64>() / 1e9)
}

/// Runs a fixed burst of multiply-adds; returns the floating-point operations done.
fn burst(isa: &Isa) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the instruction sets were detected (and AMX enabled) by `isa`.
        if isa.amx {
            return unsafe { x86::amx_burst() };
        }
        return unsafe { x86::avx512_burst() };
    }
    #[allow(unreachable_code)]
    {
        let _ = isa;
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::super::x86::TileConfig;

    const STEPS: usize = 100_000;

    /// `STEPS` × 4 `tdpbf16ps` on tiles loaded once.
    pub(super) unsafe fn amx_burst() -> f64 {
        let cfg = TileConfig::full();
        let data = vec![0x3f80u16; 16 * 32];
        // SAFETY: AMX is enabled; the tile loads read `data` (16 rows of 64 bytes).
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                p = in(reg) data.as_ptr(), s = in(reg) 64usize, options(nostack, readonly),
            );
            for _ in 0..STEPS {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem),
                );
            }
            asm!("tilerelease", options(nostack, nomem));
        }
        (STEPS * 4 * 16 * 16 * 32 * 2) as f64
    }

    /// `STEPS` × 12 independent `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn avx512_burst() -> f64 {
        // SAFETY: both are plain 512-bit vectors.
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..STEPS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, a);
            }
        }
        let total = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
        std::hint::black_box(total);
        (STEPS * 12 * 16 * 2 * 2) as f64
    }
}
