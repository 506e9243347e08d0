//! Native candle port of Moondream2 (2025 releases): configuration, vision encoder,
//! text decoder, region heads and the generation loops of the four skills.
//!
//! Works on token ids; [`crate::vision::Moondream`] adds the tokenizer and text.

pub mod batch;
pub mod config;
pub mod generate;
pub mod kernels;
mod layers;
pub mod loader;
pub mod precision;
pub mod region;
pub mod text;
pub mod vision;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

pub use batch::{BatchEvent, DecodeBatch};
pub use config::Config;
pub use generate::{AnswerSequence, GenerateOptions, Generation, Sampling, StopReason};
pub use layers::LinearFormat;
use region::RegionModel;
pub use text::KvFormat;
use text::{KvCache, TextModel};
use vision::VisionModel;

use crate::vision::image::{CropGeometry, Crops, Tiling, prepare_crops};

/// Moondream2 weights, loaded once and shared by all generations (no mutable state).
#[derive(Debug, Clone)]
pub struct Moondream2 {
    cfg: Config,
    vision: VisionModel,
    text: TextModel,
    region: RegionModel,
    device: Device,
    dtype: DType,
}

/// How the Linear weights of each part, and the text model's KV cache, are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Formats {
    /// The vision encoder and projection.
    pub vision: LinearFormat,
    /// The text decoder (with its output head) and the region heads.
    pub text: LinearFormat,
    /// The host KV cache of the text decoder.
    pub kv: KvFormat,
}

impl Formats {
    /// Every weight a candle tensor (and an f32 KV cache on the CPU).
    pub const CANDLE: Self = Self {
        vision: LinearFormat::Candle,
        text: LinearFormat::Candle,
        kv: KvFormat::Auto,
    };
}

/// An image encoded into the text model's KV cache: BOS plus one token per patch.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    cache: KvCache,
}

impl EncodedImage {
    /// A copy of the prefix cache for one generation to extend (room for 256 more
    /// positions before its buffers grow).
    pub fn cache(&self) -> KvCache {
        self.cache.with_room(256)
    }

    /// The prefix cache itself, for the one generation that uses this image (no copy;
    /// room for 256 more positions is reserved).
    pub fn into_cache(self) -> KvCache {
        let mut cache = self.cache;
        cache.reserve(256);
        cache
    }
}

impl Moondream2 {
    /// Builds the model from tensors named as in the checkpoint, without `model.`,
    /// every weight a candle tensor in the builder's dtype.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_formats(cfg, vb, Formats::CANDLE)
    }

    /// Builds the model with the Linear weights of each part stored as `formats` says.
    pub fn with_formats(cfg: &Config, vb: VarBuilder, formats: Formats) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            vision: VisionModel::new(&cfg.vision, vb.pp("vision"), formats.vision)?,
            text: TextModel::new(&cfg.text, vb.pp("text"), formats.text, formats.kv)?,
            region: RegionModel::new(&cfg.region, vb.pp("region"), formats.text)?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration the weights were built for.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The vision encoder and projection.
    pub fn vision(&self) -> &VisionModel {
        &self.vision
    }

    /// The text decoder.
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// The region heads.
    pub fn region(&self) -> &RegionModel {
        &self.region
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Crop geometry from the vision config.
    pub fn crop_geometry(&self) -> CropGeometry {
        let v = &self.cfg.vision;
        CropGeometry {
            crop_size: v.crop_size,
            margin_px: v.overlap_margin * v.enc_patch_size,
            max_crops: v.max_crops,
        }
    }

    /// Preprocesses an (already oriented) RGB image into crops.
    pub fn prepare(&self, img: &RgbImage) -> Crops {
        prepare_crops(img, &self.crop_geometry())
    }

    /// Runs vision and the bidirectional text prefill for an RGB image.
    pub fn encode_image(&self, img: &RgbImage) -> Result<EncodedImage> {
        let crops = self.prepare(img);
        let t = VisionModel::crops_tensor(&crops, &self.device, self.dtype)?;
        self.encode_crops(&t, crops.tiling)
    }

    /// Same as [`Self::encode_image`] from a crops tensor `[n, 3, side, side]`.
    pub fn encode_crops(&self, crops: &Tensor, tiling: Tiling) -> Result<EncodedImage> {
        let img_emb = self.vision.embed(crops, tiling)?;
        self.encode_embeddings(&img_emb)
    }

    /// Prefills BOS and projected image embeddings `[grid², dim]` into a fresh cache.
    pub fn encode_embeddings(&self, img_emb: &Tensor) -> Result<EncodedImage> {
        let prefix = self.image_prefix(img_emb)?;
        let mut cache = KvCache::new(self.cfg.text.n_layers);
        self.text.feed(&prefix, &mut cache, self.cfg.prefix_len())?;
        Ok(EncodedImage { cache })
    }

    /// BOS and projected image embeddings `[grid², dim]` as one `[1 + grid², dim]` prefix.
    fn image_prefix(&self, img_emb: &Tensor) -> Result<Tensor> {
        let bos = self.text.embed(&[self.cfg.tokenizer.bos_id])?;
        Tensor::cat(&[&bos, &img_emb.to_dtype(self.dtype)?], 0)
    }

    /// [`Self::encode_crops`] of several images in one pass: the vision encoder over
    /// all their crops together, then one batched prefill of their prefixes (every
    /// prefix has the same length). Each result equals encoding that image alone.
    pub fn encode_many(&self, images: &[(Tensor, Tiling)]) -> Result<Vec<EncodedImage>> {
        let prefixes = self
            .vision
            .embed_many(images)?
            .iter()
            .map(|e| self.image_prefix(e))
            .collect::<Result<Vec<_>>>()?;
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let n_layers = self.cfg.text.n_layers;
        let mut caches: Vec<KvCache> = prefixes.iter().map(|_| KvCache::new(n_layers)).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        self.text.feed_many(
            &Tensor::stack(&prefixes, 0)?,
            &mut refs,
            self.cfg.prefix_len(),
        )?;
        Ok(caches
            .into_iter()
            .map(|cache| EncodedImage { cache })
            .collect())
    }
}
