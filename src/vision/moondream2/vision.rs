//! The SigLIP-style vision encoder, crop stitching and the projection into the text
//! model's embedding space (`vision.py`, `image_crops.py` in the reference).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::VisionConfig;
use super::layers::{Linear, LinearFormat, Mlp, layer_norm, linear};
use crate::vision::image::{Crops, Tiling};

#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    mlp: Mlp,
    n_heads: usize,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder, format: LinearFormat) -> Result<Self> {
        let d = cfg.enc_dim;
        Ok(Self {
            ln1: layer_norm(d, vb.pp("ln1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"), format)?,
            proj: linear(d, d, vb.pp("attn.proj"), format)?,
            ln2: layer_norm(d, vb.pp("ln2"))?,
            mlp: Mlp::new(d, cfg.enc_ff_dim, d, vb.pp("mlp"), format)?,
            n_heads: cfg.enc_n_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.n_heads;
        let qkv = self.qkv.forward(x)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, n, self.n_heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(0)? * (1.0 / (hd as f64).sqrt()))?;
        let (k, v) = (split(1)?, split(2)?);
        if self.qkv.is_packed() {
            let out = super::text::attend_packed(&q, &k, &v, self.n_heads, self.n_heads)?;
            return self.proj.forward(&out.transpose(1, 2)?.reshape((b, n, d))?);
        }
        // One crop at a time: the score matrices of all crops at once would be
        // heads × 729² floats per crop (34 MB each at full size).
        let per_crop = (0..b)
            .map(|i| {
                let (q, k, v) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
                let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
                probs.matmul(&v)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::cat(&per_crop, 0)?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.ln1.forward(x)?)?)?;
        &x + self.mlp.forward(&self.ln2.forward(&x)?)?
    }
}

/// Vision encoder plus projection MLP.
#[derive(Debug, Clone)]
pub struct VisionModel {
    patch_emb: Linear,
    pos_emb: Tensor,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
    proj_mlp: Mlp,
    cfg: VisionConfig,
}

impl VisionModel {
    /// Loads `vision.*` tensors.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, format: LinearFormat) -> Result<Self> {
        let p = cfg.enc_patch_size;
        let grid = cfg.grid();
        let blocks = (0..cfg.enc_n_layers)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}")), format))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_emb: linear(
                cfg.in_channels * p * p,
                cfg.enc_dim,
                vb.pp("patch_emb"),
                format,
            )?,
            pos_emb: vb.get((1, grid * grid, cfg.enc_dim), "pos_emb")?,
            blocks,
            post_ln: layer_norm(cfg.enc_dim, vb.pp("post_ln"))?,
            proj_mlp: Mlp::new(
                2 * cfg.enc_dim,
                cfg.proj_inner_dim,
                cfg.proj_out_dim,
                vb.pp("proj_mlp"),
                format,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// Turns host crops into a `[n_crops, 3, side, side]` tensor on `device`.
    pub fn crops_tensor(crops: &Crops, device: &Device, dtype: DType) -> Result<Tensor> {
        Tensor::from_slice(
            &crops.data,
            (crops.n_crops, 3, crops.side, crops.side),
            device,
        )?
        .to_dtype(dtype)
    }

    /// Runs the encoder on all crops → `[n_crops, grid², enc_dim]`: on candle's matmul
    /// in batches of at most one image's worth of crops (`max_crops + 1`, bounding the
    /// activations whatever the count); one crop at a time on the packed kernels (729
    /// rows per product keep a crop's activations in cache, and hold a thirteenth of
    /// the memory).
    pub fn encode(&self, crops: &Tensor) -> Result<Tensor> {
        let b = crops.dim(0)?;
        let step = match self.patch_emb.is_packed() {
            true => 1,
            false => self.cfg.max_crops + 1,
        };
        if b > step {
            let each = (0..b)
                .step_by(step)
                .map(|i| self.encode_batch(&crops.narrow(0, i, step.min(b - i))?))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&each, 0);
        }
        self.encode_batch(crops)
    }

    fn encode_batch(&self, crops: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = crops.dims4()?;
        let p = self.cfg.enc_patch_size;
        let g = self.cfg.grid();
        let patches = crops
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, c * p * p))?;
        let mut x = self
            .patch_emb
            .forward(&patches)?
            .broadcast_add(&self.pos_emb)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.post_ln.forward(&x)
    }

    /// Stitches the local crops' features into one grid, dropping the overlap margins
    /// → `[19*rows + 8, 19*cols + 8, enc_dim]` for the real geometry.
    pub fn reconstruct(&self, local: &Tensor, tiling: Tiling) -> Result<Tensor> {
        let g = self.cfg.grid();
        let m = self.cfg.overlap_margin;
        let c = self.cfg.enc_dim;
        let local = local.reshape((tiling.rows * tiling.cols, g, g, c))?;
        let keep = |i: usize, n: usize| -> (usize, usize) {
            let lo = if i == 0 { 0 } else { m };
            let hi = if i + 1 == n { g } else { g - m };
            (lo, hi - lo)
        };
        let mut rows = Vec::with_capacity(tiling.rows);
        for ty in 0..tiling.rows {
            let (y0, ny) = keep(ty, tiling.rows);
            let mut cols = Vec::with_capacity(tiling.cols);
            for tx in 0..tiling.cols {
                let (x0, nx) = keep(tx, tiling.cols);
                cols.push(
                    local
                        .get(ty * tiling.cols + tx)?
                        .narrow(0, y0, ny)?
                        .narrow(1, x0, nx)?,
                );
            }
            rows.push(Tensor::cat(&cols, 1)?);
        }
        Tensor::cat(&rows, 0)
    }

    /// `adaptive_avg_pool2d` of a `[H, W, C]` grid to `[grid, grid, C]`, as two
    /// averaging matrix products.
    pub fn pool(&self, grid_features: &Tensor) -> Result<Tensor> {
        let (h, w, c) = grid_features.dims3()?;
        let g = self.cfg.grid();
        let dev = grid_features.device();
        let dtype = grid_features.dtype();
        let ph = pool_matrix(h, g, dev)?.to_dtype(dtype)?;
        let pw = pool_matrix(w, g, dev)?.to_dtype(dtype)?;
        let rows = ph.matmul(&grid_features.reshape((h, w * c))?)?; // [g, w*c]
        let rows = rows.reshape((g, w, c))?.transpose(1, 2)?.contiguous()?; // [g, c, w]
        let pooled = rows.broadcast_matmul(&pw.t()?)?; // [g, c, g]
        pooled.transpose(1, 2)?.contiguous()
    }

    /// Projects `[global | pooled local]` features to text embeddings `[grid², dim]`.
    pub fn project(&self, global: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        self.proj_mlp.forward(&self.joined(global, pooled)?)
    }

    /// The projection's input: global features beside the pooled local grid,
    /// `[grid², 2·enc_dim]`.
    fn joined(&self, global: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let g2 = self.cfg.grid() * self.cfg.grid();
        let pooled = pooled.reshape((g2, self.cfg.enc_dim))?;
        Tensor::cat(&[global, &pooled], D::Minus1)
    }

    /// Full image path: encoder, stitching, pooling and projection → `[grid², dim]`.
    /// With a 1 × 1 tiling the local crop equals the global one, so it is encoded once.
    pub fn embed(&self, crops: &Tensor, tiling: Tiling) -> Result<Tensor> {
        let mut out = self.embed_many(&[(crops.clone(), tiling)])?;
        out.pop()
            .ok_or_else(|| candle_core::Error::Msg("no image embedded".into()))
    }

    /// [`Self::embed`] of several images at once: the encoder runs over all their
    /// crops together and the projection over all their features, so each weight is
    /// read once per batch of crops rather than once per image. Each result equals
    /// [`Self::embed`] of that image alone.
    pub fn embed_many(&self, images: &[(Tensor, Tiling)]) -> Result<Vec<Tensor>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let once = |crops: &Tensor, tiling: Tiling| -> Result<bool> {
            Ok(tiling.rows * tiling.cols == 1 && crops.dim(0)? == 2)
        };
        let mut own = Vec::with_capacity(images.len());
        for (crops, tiling) in images {
            own.push(match once(crops, *tiling)? {
                true => crops.narrow(0, 0, 1)?,
                false => crops.clone(),
            });
        }
        let features = self.encode(&Tensor::cat(&own, 0)?)?;
        let mut joined = Vec::with_capacity(images.len());
        let mut at = 0;
        for ((crops, tiling), mine) in images.iter().zip(&own) {
            let n = mine.dim(0)?;
            let out = features.narrow(0, at, n)?;
            at += n;
            let out = match once(crops, *tiling)? {
                true => Tensor::cat(&[&out, &out], 0)?,
                false => out,
            };
            let n = out.dim(0)?;
            let global = out.get(0)?;
            let grid = self.reconstruct(&out.narrow(0, 1, n - 1)?, *tiling)?;
            joined.push(self.joined(&global, &self.pool(&grid)?)?);
        }
        let rows = joined[0].dim(0)?;
        let projected = self.proj_mlp.forward(&Tensor::cat(&joined, 0)?)?;
        (0..images.len())
            .map(|i| projected.narrow(0, i * rows, rows))
            .collect()
    }
}

/// Row `i` averages inputs `floor(i*n/g) .. ceil((i+1)*n/g)`.
fn pool_matrix(n: usize, g: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; g * n];
    for i in 0..g {
        let lo = i * n / g;
        let hi = ((i + 1) * n).div_ceil(g);
        let weight = 1.0 / (hi - lo) as f32;
        for j in lo..hi {
            m[i * n + j] = weight;
        }
    }
    Tensor::from_vec(m, (g, n), device)
}
