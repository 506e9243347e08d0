//! The weight format chosen at load (`--dtype`): what `auto` picks on this machine and
//! why, and how each precision maps onto the storage of each part of the model.

use candle_core::{DType, Device};

use super::Formats;
use super::kernels::isa;
use super::layers::LinearFormat;
use super::text::KvFormat;

/// Weight format asked for with `--dtype` / `CAPTIOND_DTYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The fastest this device supports: q8 on CPUs with native bf16 arithmetic
    /// (AMX or AVX512-BF16), f32 on other CPUs, bf16 on CUDA.
    #[default]
    Auto,
    /// 32-bit floats everywhere (the mode the golden parity tests run in).
    F32,
    /// bf16 weights (on CPU: packed for the bf16 kernels, f32 activations).
    Bf16,
    /// CPU: 8-bit text and region weights (a scale per 32 inputs), bf16 vision weights.
    Q8,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "q8" | "q8_0" | "int8" => Ok(Self::Q8),
            other => Err(format!(
                "unknown dtype {other:?}; use auto, f32, bf16 or q8"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        })
    }
}

/// A resolved precision: the builder's dtype, each part's storage, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoadPlan {
    /// The precision in effect (never `auto`).
    pub precision: Precision,
    /// dtype of activations and of every tensor that is not a packed Linear weight.
    #[serde(skip)]
    pub dtype: DType,
    /// Storage of the Linear weights of each part.
    pub formats: Formats,
    /// Why this precision (for the load log line).
    pub why: String,
}

impl LoadPlan {
    /// Every weight a candle tensor in `dtype` (what the parity tests load).
    pub fn candle(dtype: DType) -> Self {
        let precision = if dtype == DType::F32 {
            Precision::F32
        } else {
            Precision::Bf16
        };
        Self {
            precision,
            dtype,
            formats: Formats::CANDLE,
            why: format!("{dtype:?} tensors asked for directly"),
        }
    }
}

impl Precision {
    /// Resolves this choice for `device`; an error names a precision the device lacks.
    pub fn plan(self, device: &Device) -> Result<LoadPlan, String> {
        let packed = |precision, vision, text, why: String| LoadPlan {
            precision,
            dtype: DType::F32,
            formats: Formats {
                vision,
                text,
                kv: KvFormat::Auto,
            },
            why,
        };
        if !device.is_cpu() {
            return match self {
                Self::Auto | Self::Bf16 => Ok(LoadPlan {
                    why: "bf16 is the GPU default".into(),
                    ..LoadPlan::candle(DType::BF16)
                }),
                Self::F32 => Ok(LoadPlan::candle(DType::F32)),
                Self::Q8 => {
                    Err("--dtype q8 is a CPU format; use bf16 (the default) on CUDA".into())
                }
            };
        }
        let cpu = isa();
        let kernels = cpu.best();
        Ok(match self {
            Self::F32 => LoadPlan {
                why: "asked for".into(),
                ..LoadPlan::candle(DType::F32)
            },
            Self::Bf16 => packed(
                Self::Bf16,
                LinearFormat::Bf16,
                LinearFormat::Bf16,
                format!("asked for; kernels: {kernels}"),
            ),
            Self::Q8 => packed(
                Self::Q8,
                LinearFormat::Bf16,
                LinearFormat::Q8,
                format!("asked for; kernels: {kernels}"),
            ),
            Self::Auto if cpu.fast_bf16() => packed(
                Self::Q8,
                LinearFormat::Bf16,
                LinearFormat::Q8,
                format!(
                    "auto: this CPU multiplies bf16 natively ({kernels}{}), so 8-bit text weights \
                     (half the bytes per decoded token of bf16) with bf16 vision weights",
                    if cpu.avx512vnni {
                        ", avx512-vnni for 8-bit"
                    } else {
                        ""
                    }
                ),
            ),
            Self::Auto if cpu.vector_packed() => packed(
                Self::Q8,
                LinearFormat::Bf16,
                LinearFormat::Q8,
                format!(
                    "auto: this CPU has vector kernels for packed weights ({kernels}: widened to \
                     f32), so 8-bit text weights (a quarter of the bytes per decoded token of \
                     f32) with bf16 vision weights"
                ),
            ),
            Self::Auto => LoadPlan {
                why: "auto: no AVX2 or AVX512 on this CPU, so bf16/q8 would run on scalar \
                      kernels; f32 uses candle's matmul"
                    .into(),
                ..LoadPlan::candle(DType::F32)
            },
        })
    }
}
