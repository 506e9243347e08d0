//! Region heads (`region.py`): Fourier-feature encoders that turn a coordinate or a
//! size into a text embedding, and MLP decoders that read them back as bins.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::RegionConfig;
use super::layers::{Linear, LinearFormat, Mlp, linear};

/// Coordinate and size encoders/decoders.
#[derive(Debug, Clone)]
pub struct RegionModel {
    coord_features: Tensor,
    coord_encoder: Linear,
    coord_decoder: Mlp,
    size_features: Tensor,
    size_encoder: Linear,
    size_decoder: Mlp,
    cfg: RegionConfig,
}

impl RegionModel {
    /// Loads `region.*` tensors.
    pub fn new(cfg: &RegionConfig, vb: VarBuilder, format: LinearFormat) -> Result<Self> {
        Ok(Self {
            coord_features: vb.get((1, cfg.coord_feat_dim / 2), "coord_features")?,
            coord_encoder: linear(cfg.coord_feat_dim, cfg.dim, vb.pp("coord_encoder"), format)?,
            coord_decoder: Mlp::new(
                cfg.dim,
                cfg.inner_dim,
                cfg.coord_out_dim,
                vb.pp("coord_decoder"),
                format,
            )?,
            size_features: vb.get((2, cfg.size_feat_dim / 2), "size_features")?,
            size_encoder: linear(cfg.size_feat_dim, cfg.dim, vb.pp("size_encoder"), format)?,
            size_decoder: Mlp::new(
                cfg.dim,
                cfg.inner_dim,
                cfg.size_out_dim,
                vb.pp("size_decoder"),
                format,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// `concat(cos(f), sin(f))` with `f = (2π·x) @ w`.
    fn fourier(&self, x: &[f32], w: &Tensor) -> Result<Tensor> {
        let scaled: Vec<f32> = x.iter().map(|v| 2.0 * std::f32::consts::PI * v).collect();
        let x = Tensor::from_vec(scaled, (1, x.len()), w.device())?.to_dtype(w.dtype())?;
        let f = x.matmul(w)?;
        Tensor::cat(&[f.cos()?, f.sin()?], D::Minus1)
    }

    /// Embedding `[1, dim]` of a coordinate in 0..1.
    pub fn encode_coordinate(&self, c: f32) -> Result<Tensor> {
        self.coord_encoder
            .forward(&self.fourier(&[c], &self.coord_features)?)
    }

    /// Embedding `[1, dim]` of a (width, height) size in 0..1.
    pub fn encode_size(&self, w: f32, h: f32) -> Result<Tensor> {
        self.size_encoder
            .forward(&self.fourier(&[w, h], &self.size_features)?)
    }

    /// Coordinate logits `[coord_out_dim]` (f32) from a pre-`post_ln` hidden state `[dim]`.
    pub fn decode_coordinate(&self, hidden: &Tensor) -> Result<Tensor> {
        self.coord_decoder
            .forward(&hidden.unsqueeze(0)?)?
            .get(0)?
            .to_dtype(DType::F32)
    }

    /// Size logits `[2, size_out_dim/2]` (f32): row 0 width, row 1 height.
    pub fn decode_size(&self, hidden: &Tensor) -> Result<Tensor> {
        let bins = self.cfg.size_out_dim / 2;
        self.size_decoder
            .forward(&hidden.unsqueeze(0)?)?
            .reshape((2, bins))?
            .to_dtype(DType::F32)
    }

    /// Value of a coordinate bin: `bin / coord_out_dim`.
    pub fn coordinate_value(&self, bin: usize) -> f32 {
        bin as f32 / self.cfg.coord_out_dim as f32
    }

    /// Value of a size bin: `2^(10·bin/(bins−1) − 10)`, computed in f32.
    pub fn size_value(&self, bin: usize) -> f32 {
        let last = (self.cfg.size_out_dim / 2 - 1) as f32;
        2f32.powf(bin as f32 / last * 10.0 - 10.0)
    }
}
