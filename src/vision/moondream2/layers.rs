//! Small building blocks shared by the vision, text and region parts.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

/// LayerNorm epsilon used everywhere in Moondream2.
pub const LN_EPS: f64 = 1e-5;

/// A `Linear` with bias whose weight is `[out, in]`, as PyTorch stores it.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Ok(Linear::new(w, Some(b)))
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
    pub fn new(dim: usize, inner: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, inner, vb.pp("fc1"))?,
            fc2: linear(inner, out, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation the reference uses.
        self.fc2.forward(&self.fc1.forward(xs)?.gelu()?)
    }
}
