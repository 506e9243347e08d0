//! Moondream2 (2025) configuration: the full-size defaults from the reference
//! `config.py`, overridable by a `text`/`vision`/`region`/`tokenizer` JSON layout.

use serde::Deserialize;

/// Text decoder hyper-parameters.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct TextConfig {
    /// Width of the residual stream.
    pub dim: usize,
    /// Hidden width of the MLP.
    pub ff_dim: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Vocabulary size of `wte` and `lm_head`.
    pub vocab_size: usize,
    /// Longest sequence (prefix + prompt + answer) the model handles.
    pub max_context: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (fewer than `n_heads` means grouped-query attention).
    pub n_kv_heads: usize,
    /// Unused by the reference (the prefix length is computed); kept for round trips.
    pub prefix_attn: usize,
    /// int4 group size; set only by quantized checkpoints, which are not supported.
    pub group_size: Option<usize>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            dim: 2048,
            ff_dim: 8192,
            n_layers: 24,
            vocab_size: 51200,
            max_context: 2048,
            n_heads: 32,
            n_kv_heads: 32,
            prefix_attn: 730,
            group_size: None,
        }
    }
}

/// Vision encoder and projection hyper-parameters.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of the vision transformer.
    pub enc_dim: usize,
    /// Side of a square patch in pixels.
    pub enc_patch_size: usize,
    /// Number of vision blocks.
    pub enc_n_layers: usize,
    /// Hidden width of the vision MLP.
    pub enc_ff_dim: usize,
    /// Vision attention heads.
    pub enc_n_heads: usize,
    /// Output width of the projection (the text `dim`).
    pub proj_out_dim: usize,
    /// Side of a square crop in pixels.
    pub crop_size: usize,
    /// Colour channels of a crop.
    pub in_channels: usize,
    /// Most local crops an image is cut into.
    pub max_crops: usize,
    /// Overlap between neighbouring crops, in patches per side.
    pub overlap_margin: usize,
    /// Hidden width of the projection MLP.
    pub proj_inner_dim: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            enc_dim: 1152,
            enc_patch_size: 14,
            enc_n_layers: 27,
            enc_ff_dim: 4304,
            enc_n_heads: 16,
            proj_out_dim: 2048,
            crop_size: 378,
            in_channels: 3,
            max_crops: 12,
            overlap_margin: 4,
            proj_inner_dim: 8192,
        }
    }
}

impl VisionConfig {
    /// Patches per crop side (27 for 378-px crops of 14-px patches).
    pub fn grid(&self) -> usize {
        self.crop_size / self.enc_patch_size
    }
}

/// Region (coordinate and size) encoder/decoder hyper-parameters.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegionConfig {
    /// Width of the text hidden state the region heads read and write.
    pub dim: usize,
    /// Width of the Fourier features of one coordinate.
    pub coord_feat_dim: usize,
    /// Bins of the coordinate decoder.
    pub coord_out_dim: usize,
    /// Width of the Fourier features of a (width, height) pair.
    pub size_feat_dim: usize,
    /// Bins of the size decoder (two heads of `size_out_dim / 2`).
    pub size_out_dim: usize,
    /// Hidden width of the decoder MLPs.
    pub inner_dim: usize,
    /// int4 group size; set only by quantized checkpoints, which are not supported.
    pub group_size: Option<usize>,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            dim: 2048,
            coord_feat_dim: 256,
            coord_out_dim: 1024,
            size_feat_dim: 512,
            size_out_dim: 2048,
            inner_dim: 8192,
            group_size: None,
        }
    }
}

/// Prompt templates as token ids, so any tokenizer generation works.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct Templates {
    /// Caption prompts by length.
    pub caption: CaptionTemplates,
    /// Question answering: prefix, question ids, suffix.
    pub query: PrefixSuffix,
    /// Object detection: prefix, `" " + object` ids, suffix.
    pub detect: PrefixSuffix,
    /// Pointing: prefix, `" " + object` ids, suffix.
    pub point: PrefixSuffix,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            caption: CaptionTemplates::default(),
            query: PrefixSuffix {
                prefix: vec![1, 15381, 2],
                suffix: vec![3],
            },
            detect: PrefixSuffix {
                prefix: vec![1, 7235, 476, 2],
                suffix: vec![3],
            },
            point: PrefixSuffix {
                prefix: vec![1, 2581, 2],
                suffix: vec![3],
            },
        }
    }
}

/// The three caption prompts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct CaptionTemplates {
    /// Prompt for a one-line caption.
    pub short: Vec<u32>,
    /// Prompt for a normal caption.
    pub normal: Vec<u32>,
    /// Prompt for a detailed caption.
    pub long: Vec<u32>,
}

impl Default for CaptionTemplates {
    fn default() -> Self {
        Self {
            short: vec![1, 32708, 2, 12492, 3],
            normal: vec![1, 32708, 2, 6382, 3],
            long: vec![1, 32708, 2, 4059, 3],
        }
    }
}

/// Token ids placed before and after the variable part of a prompt.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct PrefixSuffix {
    /// Ids before the question or object.
    pub prefix: Vec<u32>,
    /// Ids after it.
    pub suffix: Vec<u32>,
}

/// Special token ids and prompt templates.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct TokenizerConfig {
    /// Beginning-of-sequence id (position 0 of every sequence).
    pub bos_id: u32,
    /// End-of-sequence id (stops generation, never emitted).
    pub eos_id: u32,
    /// Marks the start of an answer (masked after the first generated token).
    pub answer_id: u32,
    /// Starts a reasoning trace.
    pub thinking_id: u32,
    /// Placeholder whose embedding is an encoded coordinate.
    pub coord_id: u32,
    /// Placeholder whose embedding is an encoded size.
    pub size_id: u32,
    /// Opens a grounded span in reasoning text.
    pub start_ground_points_id: u32,
    /// Closes a grounded span in reasoning text.
    pub end_ground_id: u32,
    /// Prompt templates.
    pub templates: Templates,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            bos_id: 0,
            eos_id: 0,
            answer_id: 3,
            thinking_id: 4,
            coord_id: 5,
            size_id: 6,
            start_ground_points_id: 7,
            end_ground_id: 9,
            templates: Templates::default(),
        }
    }
}

/// The whole model configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// Text decoder.
    pub text: TextConfig,
    /// Vision encoder and projection.
    pub vision: VisionConfig,
    /// Region heads.
    pub region: RegionConfig,
    /// Token ids and templates.
    pub tokenizer: TokenizerConfig,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON could not be parsed.
    #[error("invalid model config JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The values are inconsistent or unsupported.
    #[error("unsupported model config: {0}")]
    Unsupported(String),
}

impl Config {
    /// Parses a checkpoint's `config.json`: either the Moondream layout itself, or a
    /// Hugging Face wrapper whose `config` key holds it (an empty object means defaults).
    pub fn from_checkpoint_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let sections = ["text", "vision", "region", "tokenizer"];
        let has_sections = |v: &serde_json::Value| sections.iter().any(|s| v.get(s).is_some());
        let inner = if has_sections(&value) {
            value
        } else {
            match value.get("config") {
                Some(c) if c.is_object() => c.clone(),
                _ => serde_json::json!({}),
            }
        };
        let cfg: Config = serde_json::from_value(inner)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the constraints the architecture relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.text;
        let v = &self.vision;
        let bad = |m: String| Err(ConfigError::Unsupported(m));
        if t.group_size.is_some() || self.region.group_size.is_some() {
            return bad("int4-quantized checkpoints (group_size set) are not supported; use the 16-bit release".into());
        }
        if t.n_heads == 0
            || t.n_kv_heads == 0
            || !t.dim.is_multiple_of(t.n_heads)
            || t.dim / t.n_heads != 64
        {
            return bad(format!(
                "text dim {} / n_heads {} must give head_dim 64",
                t.dim, t.n_heads
            ));
        }
        if !t.n_heads.is_multiple_of(t.n_kv_heads) {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                t.n_heads, t.n_kv_heads
            ));
        }
        if v.enc_patch_size == 0 || !v.crop_size.is_multiple_of(v.enc_patch_size) {
            return bad(format!(
                "crop_size {} is not a multiple of patch size {}",
                v.crop_size, v.enc_patch_size
            ));
        }
        if v.enc_n_heads == 0 || !v.enc_dim.is_multiple_of(v.enc_n_heads) {
            return bad(format!(
                "enc_dim {} not divisible by enc_n_heads {}",
                v.enc_dim, v.enc_n_heads
            ));
        }
        if 2 * v.overlap_margin >= v.grid() || v.max_crops == 0 {
            return bad("overlap_margin too large for the crop grid, or max_crops is 0".into());
        }
        if v.proj_out_dim != t.dim || self.region.dim != t.dim {
            return bad(format!(
                "projection ({}) and region ({}) widths must equal text dim {}",
                v.proj_out_dim, self.region.dim, t.dim
            ));
        }
        if !self.region.size_out_dim.is_multiple_of(2)
            || !self.region.coord_feat_dim.is_multiple_of(2)
            || !self.region.size_feat_dim.is_multiple_of(2)
        {
            return bad("region feature and size widths must be even".into());
        }
        if t.max_context < self.prefix_len() + 2 {
            return bad(format!(
                "max_context {} leaves no room after the image prefix",
                t.max_context
            ));
        }
        Ok(())
    }

    /// Length of the bidirectional prefix: BOS plus one token per image patch.
    pub fn prefix_len(&self) -> usize {
        1 + self.vision.grid() * self.vision.grid()
    }
}
