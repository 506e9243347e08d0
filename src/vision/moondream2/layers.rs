//! Small building blocks shared by the vision, text and region parts: a Linear layer
//! whose weight is either a candle tensor or packed for the CPU kernels, LayerNorm
//! and the MLP.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::kernels::{self, PackedBf16, PackedQ8, PackedWeight};

/// LayerNorm epsilon used everywhere in Moondream2.
pub const LN_EPS: f64 = 1e-5;

/// How the weight of a Linear layer is stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearFormat {
    /// A candle tensor in the builder's dtype (f32 on CPU, bf16 on CUDA).
    Candle,
    /// bf16, packed for the CPU kernels (f32 activations in and out).
    Bf16,
    /// 8-bit with a scale per 32 inputs, packed for the CPU kernels.
    Q8,
}

/// A Linear layer `y = x·Wᵀ + b` with the weight `[out, in]` as PyTorch stores it.
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's own matmul.
    Candle(candle_nn::Linear),
    /// The packed CPU kernels.
    Packed(PackedLinear),
}

/// A packed weight and its f32 bias.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    weight: Arc<PackedWeight>,
    bias: Option<Arc<Vec<f32>>>,
}

/// A packed Linear as a candle op, optionally followed by GELU (tanh) in place.
struct PackedOp<'a> {
    linear: &'a PackedLinear,
    gelu: bool,
}

impl Linear {
    /// Whether the weight is packed for the CPU kernels.
    pub fn is_packed(&self) -> bool {
        matches!(self, Self::Packed(_))
    }

    /// The packed weight, if it is one.
    pub fn packed(&self) -> Option<&PackedLinear> {
        match self {
            Self::Packed(p) => Some(p),
            Self::Candle(_) => None,
        }
    }

    /// `gelu_tanh(self(x))`, fused into the packed kernels' output pass.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(l) => l.forward(xs)?.gelu(),
            Self::Packed(p) => xs.contiguous()?.apply_op1_no_bwd(&PackedOp {
                linear: p,
                gelu: true,
            }),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(l) => l.forward(xs),
            Self::Packed(p) => xs.contiguous()?.apply_op1_no_bwd(&PackedOp {
                linear: p,
                gelu: false,
            }),
        }
    }
}

impl CustomOp1 for PackedOp<'_> {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("packed linear expects f32 activations");
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("packed linear needs contiguous input".into())
        })?;
        let dims = layout.dims();
        let weight = &self.linear.weight;
        let k = weight.k();
        if dims.last() != Some(&k) {
            candle_core::bail!("packed linear: input {dims:?}, weight takes {k} features");
        }
        let m = (end - start) / k;
        let n = weight.n();
        let out = self.linear.forward_rows(&data[start..end], m, self.gelu);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

impl PackedLinear {
    /// `x · Wᵀ + b` for `m` rows of host activations `[m × in]` → `[m × out]`, with
    /// GELU (tanh) after when `gelu`; the same kernels and rounding as the candle op.
    pub fn forward_rows(&self, x: &[f32], m: usize, gelu: bool) -> Vec<f32> {
        let mut out = Vec::new();
        self.forward_into(x, m, gelu, &mut out);
        out
    }

    /// [`Self::forward_rows`] into `out`, resized to `[m × out]` (a buffer reused from
    /// call to call is only zeroed where it grows).
    pub fn forward_into(&self, x: &[f32], m: usize, gelu: bool, out: &mut Vec<f32>) {
        out.resize(m * self.weight.n(), 0.0);
        let bias = self.bias.as_deref().map(|b| &b[..]);
        if gelu {
            kernels::matmul_gelu(x, m, &self.weight, bias, out);
        } else {
            kernels::matmul(x, m, &self.weight, bias, out);
        }
    }
}

/// Loads `weight` `[out_dim, in_dim]` and `bias` `[out_dim]` in `format`.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    format: LinearFormat,
) -> Result<Linear> {
    match format {
        LinearFormat::Candle => {
            let w = vb.get((out_dim, in_dim), "weight")?;
            let b = vb.get(out_dim, "bias")?;
            Ok(Linear::Candle(candle_nn::Linear::new(w, Some(b))))
        }
        LinearFormat::Bf16 | LinearFormat::Q8 => {
            let w = vb.get_with_hints_dtype(
                (out_dim, in_dim),
                "weight",
                Default::default(),
                DType::F32,
            )?;
            let weight = {
                let (storage, layout) = w.storage_and_layout();
                let rows = match (&*storage, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
                    _ => candle_core::bail!("packed formats are for CPU f32 loading"),
                };
                match format {
                    LinearFormat::Q8 => {
                        PackedWeight::Q8(PackedQ8::from_rows(rows, out_dim, in_dim))
                    }
                    _ => PackedWeight::Bf16(PackedBf16::from_rows(rows, out_dim, in_dim)),
                }
            };
            drop(w);
            let bias = vb
                .get_with_hints_dtype(out_dim, "bias", Default::default(), DType::F32)?
                .to_vec1::<f32>()?;
            Ok(Linear::Packed(PackedLinear {
                weight: Arc::new(weight),
                bias: Some(Arc::new(bias)),
            }))
        }
    }
}

/// An affine LayerNorm with eps 1e-5.
pub fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let w = vb.get(dim, "weight")?;
    let b = vb.get(dim, "bias")?;
    Ok(LayerNorm::new(w, b, LN_EPS))
}

/// `fc2(gelu_tanh(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// Loads `fc1` (`dim → inner`) and `fc2` (`inner → out`).
    pub fn new(
        dim: usize,
        inner: usize,
        out: usize,
        vb: VarBuilder,
        format: LinearFormat,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, inner, vb.pp("fc1"), format)?,
            fc2: linear(inner, out, vb.pp("fc2"), format)?,
        })
    }
}

impl Mlp {
    /// The two Linear layers, `fc1` and `fc2`.
    pub fn layers(&self) -> (&Linear, &Linear) {
        (&self.fc1, &self.fc2)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation the reference uses.
        self.fc2.forward(&self.fc1.forward_gelu(xs)?)
    }
}
