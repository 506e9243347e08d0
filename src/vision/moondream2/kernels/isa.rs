//! Which matrix instructions this CPU (and OS) offers, detected once.

use std::sync::OnceLock;

/// The instruction sets the kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Isa {
    /// AMX tiles with bf16 products, enabled for this process by the kernel.
    pub amx: bool,
    /// AVX512-F with AVX512-BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`).
    pub avx512bf16: bool,
    /// AVX512-F with AVX512-VNNI (`vpdpbusd`) and F16C.
    pub avx512vnni: bool,
    /// AVX2 with FMA and F16C: the vector kernels of CPUs without AVX512 (most
    /// desktop and laptop CPUs), which widen bf16 and 8-bit values to f32.
    pub avx2: bool,
}

impl Isa {
    /// A short name of the best kernel family in use, for logs and benchmarks.
    pub fn best(&self) -> &'static str {
        if self.amx {
            "amx-bf16"
        } else if self.avx512bf16 {
            "avx512-bf16"
        } else if self.avx2 {
            "avx2"
        } else {
            "scalar"
        }
    }

    /// Whether the AVX512 kernels run (either family; each comes with AVX512-F).
    pub fn avx512(&self) -> bool {
        self.avx512bf16 || self.avx512vnni
    }

    /// Whether bf16 arithmetic is native (then bf16 and q8 beat f32 on this CPU).
    pub fn fast_bf16(&self) -> bool {
        self.amx || self.avx512bf16
    }

    /// Whether the packed bf16 and 8-bit formats run on vector kernels here (natively,
    /// or widened to f32 on AVX2), so that they beat candle's f32 weights, which read
    /// two to four times the bytes per decoded token.
    pub fn vector_packed(&self) -> bool {
        self.fast_bf16() || self.avx512vnni || self.avx2
    }
}

/// The detected instruction sets. `CAPTIOND_KERNELS=avx512` skips AMX,
/// `CAPTIOND_KERNELS=avx2` skips AMX and AVX512, and `CAPTIOND_KERNELS=scalar` skips
/// every vector kernel (to test or compare them).
pub fn isa() -> &'static Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    ISA.get_or_init(|| {
        let limit = std::env::var("CAPTIOND_KERNELS").unwrap_or_default();
        let mut found = detect();
        if matches!(limit.as_str(), "avx512" | "avx2" | "scalar") {
            found.amx = false;
        }
        if matches!(limit.as_str(), "avx2" | "scalar") {
            found.avx512bf16 = false;
            found.avx512vnni = false;
        }
        if limit == "scalar" {
            found.avx2 = false;
        }
        found
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    let avx512 = has!("avx512f") && has!("avx512bw");
    Isa {
        amx: avx512 && has!("avx512bf16") && amx_enabled(),
        avx512bf16: avx512 && has!("avx512bf16"),
        avx512vnni: avx512 && has!("avx512vnni") && has!("f16c"),
        avx2: has!("avx2") && has!("fma") && has!("f16c"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa {
        amx: false,
        avx512bf16: false,
        avx512vnni: false,
        avx2: false,
    }
}

/// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission to use the tile data
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which is per process.
#[cfg(target_arch = "x86_64")]
fn amx_enabled() -> bool {
    // cpuid leaf 7 exists on every CPU that has AVX512 (checked by the caller).
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}
