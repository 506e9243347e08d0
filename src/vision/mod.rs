//! The model side of captiond: image input, the Moondream2 port, and [`Moondream`],
//! which runs the skills on text and images. Knows nothing of the queue.

pub mod engine;
pub mod image;
pub mod moondream2;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use self::engine::{DecodeEngine, EngineStats};
use self::image::{DecodeLimits, ImageInputError, decode_rgb};
use self::moondream2::KvFormat;
use self::moondream2::generate::{BoundingBox, Point};
use self::moondream2::loader::{
    LoadError, LoadReport, ModelFiles, ModelSource, files_from_hub, files_in_dir, load_model_with,
};
use self::moondream2::precision::{LoadPlan, Precision};
use self::moondream2::vision::VisionModel;
use self::moondream2::{GenerateOptions, Moondream2, Sampling, StopReason};

/// Caption length, selecting one of the three caption prompts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CaptionLength {
    /// One short line.
    Short,
    /// A few sentences (the default).
    #[default]
    Normal,
    /// A detailed paragraph.
    Long,
}

/// What to ask of the model about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum Skill {
    /// Describe the image.
    Caption {
        /// Caption length.
        #[serde(default)]
        length: CaptionLength,
    },
    /// Answer a question about the image.
    Query {
        /// The question.
        question: String,
        /// Run the reasoning phase first.
        #[serde(default)]
        reasoning: bool,
    },
    /// Boxes around each instance of an object.
    Detect {
        /// What to find.
        object: String,
    },
    /// Points at each instance of an object.
    Point {
        /// What to find.
        object: String,
    },
}

/// Generation settings of one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SkillSettings {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass for sampling.
    pub top_p: f64,
    /// Seed for sampling.
    pub seed: u64,
    /// Most objects for detect/point.
    pub max_objects: usize,
}

impl Default for SkillSettings {
    fn default() -> Self {
        Self {
            max_tokens: 768,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_objects: 50,
        }
    }
}

/// What a skill produced; serialises flat (`{"caption": ...}`, `{"objects": [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SkillOutput {
    /// A caption.
    Caption {
        /// The caption text.
        caption: String,
    },
    /// An answer, with the reasoning trace when asked for.
    Answer {
        /// The answer text.
        answer: String,
        /// Reasoning text, when reasoning was requested.
        #[serde(skip_serializing_if = "Option::is_none")]
        reasoning: Option<String>,
    },
    /// Detected boxes.
    Objects {
        /// Boxes as fractions of the image size.
        objects: Vec<BoxOut>,
    },
    /// Pointed locations.
    Points {
        /// Points as fractions of the image size.
        points: Vec<PointOut>,
    },
}

/// A box in the JSON the API returns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoxOut {
    /// Left edge.
    pub x_min: f64,
    /// Top edge.
    pub y_min: f64,
    /// Right edge.
    pub x_max: f64,
    /// Bottom edge.
    pub y_max: f64,
}

/// A point in the JSON the API returns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PointOut {
    /// Horizontal position.
    pub x: f64,
    /// Vertical position.
    pub y: f64,
}

/// Token counts and timings of one skill run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (image prefix excluded).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Seconds decoding the image and running the vision encoder and prefix.
    pub encode_seconds: f64,
    /// Seconds generating.
    pub generate_seconds: f64,
}

/// A finished skill run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkillResult {
    /// The output.
    #[serde(flatten)]
    pub output: SkillOutput,
    /// Counts and timings.
    pub usage: Usage,
    /// Whether generation stopped at the token cap.
    pub truncated: bool,
}

/// Why a skill could not run; the worker turns the kind into a retry decision.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// The image is unusable (a permanent failure).
    #[error(transparent)]
    Image(#[from] ImageInputError),
    /// The request is invalid (a permanent failure).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Cancelled between tokens.
    #[error("cancelled")]
    Cancelled,
    /// The device ran out of memory (retry later without counting an attempt).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device is in an unrecoverable state (restart the process).
    #[error("device fault: {0}")]
    DeviceFault(String),
    /// Any other model error (may be transient).
    #[error("model error: {0}")]
    Model(String),
}

impl SkillError {
    /// Classifies a candle error: CUDA out-of-memory and fatal device errors apart
    /// from the rest, also when wrapped with a backtrace.
    pub fn from_candle(e: candle_core::Error) -> Self {
        let text = format!("{e:?}");
        if says_out_of_memory(&text) {
            Self::OutOfMemory(e.to_string())
        } else if [
            "CUDA_ERROR_ILLEGAL_ADDRESS",
            "CUDA_ERROR_LAUNCH_FAILED",
            "CUDA_ERROR_ECC_UNCORRECTABLE",
        ]
        .iter()
        .any(|k| text.contains(k))
        {
            Self::DeviceFault(e.to_string())
        } else {
            Self::Model(e.to_string())
        }
    }
}

/// Whether a model error's text (its `Debug` form, with any backtrace or context)
/// tells of a device out of memory.
fn says_out_of_memory(text: &str) -> bool {
    text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("out of memory")
}

/// Per-run controls: cancellation and an optional stream of text deltas.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Set to stop at the next token.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Receives text as it is generated.
    pub stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// Runs skills on images; implemented by [`Moondream`] and shareable across threads.
pub trait Captioner: Send + Sync + 'static {
    /// Runs `skill` on encoded image bytes. Blocking: call it off the async runtime.
    fn run(
        &self,
        image: &[u8],
        skill: &Skill,
        settings: &SkillSettings,
        ctl: &RunControl,
    ) -> Result<SkillResult, SkillError>;
    /// Model id and revision, recorded with every result.
    fn model_id(&self) -> String;
    /// What batched decoding has done, where the captioner batches.
    fn decode_stats(&self) -> Option<EngineStats> {
        None
    }
}

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when compiled in and available, else CPU.
    #[default]
    Auto,
    /// Always the CPU (f32).
    Cpu,
    /// The first CUDA device (needs the `cuda` feature).
    Cuda,
}

/// Everything needed to load the model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Files to load.
    pub source: ModelSource,
    /// Never download.
    pub offline: bool,
    /// Device.
    pub device: DeviceChoice,
    /// Weight format (`--dtype`).
    pub precision: Precision,
    /// KV cache format (`--kv-cache`).
    pub kv_cache: KvFormat,
    /// Decode limits for input images.
    pub limits: DecodeLimits,
}

/// Moondream2 with its tokenizer: the skills on text and images. Answer generations
/// (captions, queries) of concurrent callers decode together in one batch.
pub struct Moondream {
    model: Arc<Moondream2>,
    engine: DecodeEngine,
    tokenizer: Tokenizer,
    limits: DecodeLimits,
    id: String,
}

impl std::fmt::Debug for Moondream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moondream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn pick_device(choice: DeviceChoice) -> Result<Device, LoadError> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => Device::new_cuda(0)?,
        DeviceChoice::Auto => Device::cuda_if_available(0)?,
    })
}

impl Moondream {
    /// Resolves the files, loads weights and tokenizer, and logs one line with the
    /// parameter count, weight bytes and process RSS.
    pub fn load(opts: &ModelOptions) -> Result<(Self, LoadReport), LoadError> {
        let files = match &opts.source {
            ModelSource::Dir(dir) => files_in_dir(dir)?,
            ModelSource::Hub {
                repo,
                revision,
                tokenizer_repo,
            } => files_from_hub(repo, revision, tokenizer_repo, opts.offline, None)?,
        };
        let device = pick_device(opts.device)?;
        let mut plan = opts
            .precision
            .plan(&device)
            .map_err(LoadError::Unsupported)?;
        plan.formats.kv = opts.kv_cache;
        Self::from_files(&files, &device, &plan, opts.source.label(), opts.limits)
    }

    /// Loads from resolved files onto a device, in the formats `plan` names.
    pub fn from_files(
        files: &ModelFiles,
        device: &Device,
        plan: &LoadPlan,
        id: String,
        limits: DecodeLimits,
    ) -> Result<(Self, LoadReport), LoadError> {
        let tok_path: PathBuf = files.tokenizer.clone().ok_or_else(|| {
            LoadError::MissingFiles(format!(
                "no tokenizer.json beside {}; place the tokenizer of the checkpoint there",
                files.config.display()
            ))
        })?;
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            LoadError::MissingFiles(format!("cannot read tokenizer {}: {e}", tok_path.display()))
        })?;
        tracing::info!(
            model = %id,
            dtype = %plan.precision,
            kv_cache = %plan.formats.kv,
            why = %plan.why,
            "weight format"
        );
        let (model, report) = load_model_with(files, device, plan)?;
        tracing::info!(
            model = %id,
            parameters = report.parameters,
            weight_mib = report.weight_bytes / (1 << 20),
            rss_mib = report.rss_bytes.map(|b| b / (1 << 20)),
            device_used_mib = report.device_used_bytes.map(|b| b / (1 << 20)),
            device = ?device,
            dtype = %report.precision,
            seconds = format!("{:.2}", report.load_seconds),
            "model loaded; load buffers released"
        );
        Ok((Self::new(model, tokenizer, limits, id)?, report))
    }

    /// Wraps a loaded model and its tokenizer, starting the decode engine.
    pub fn new(
        model: Moondream2,
        tokenizer: Tokenizer,
        limits: DecodeLimits,
        id: String,
    ) -> Result<Self, LoadError> {
        let model = Arc::new(model);
        let (max_batch, max_encode) = batch_caps(model.device());
        let engine =
            DecodeEngine::start(model.clone(), max_batch, max_encode).map_err(LoadError::Thread)?;
        Ok(Self {
            model,
            engine,
            tokenizer,
            limits,
            id,
        })
    }

    /// The id-level model.
    pub fn model(&self) -> &Moondream2 {
        &self.model
    }

    /// The decode engine that batches concurrent answer generations.
    pub fn engine(&self) -> &DecodeEngine {
        &self.engine
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, SkillError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| SkillError::Invalid(format!("cannot tokenize: {e}")))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, SkillError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| SkillError::Model(format!("cannot detokenize: {e}")))
    }

    fn options(settings: &SkillSettings, ctl: &RunControl) -> GenerateOptions {
        let sampling = if settings.temperature > 0.0 {
            Sampling::TopP {
                temperature: settings.temperature,
                top_p: settings.top_p.clamp(0.0, 1.0),
                seed: settings.seed,
            }
        } else {
            Sampling::Greedy
        };
        GenerateOptions {
            max_tokens: settings.max_tokens,
            sampling,
            cancel: ctl.cancel.clone(),
        }
    }
}

/// Streams text deltas: decodes the ids so far and sends what is new.
struct DeltaStreamer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    sent: usize,
    tx: Option<&'a tokio::sync::mpsc::UnboundedSender<String>>,
}

impl DeltaStreamer<'_> {
    fn push(&mut self, id: u32) {
        let Some(tx) = self.tx else { return };
        self.ids.push(id);
        if let Ok(text) = self.tokenizer.decode(&self.ids, true) {
            // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
            if text.len() > self.sent
                && !text.ends_with('\u{FFFD}')
                && text.is_char_boundary(self.sent)
            {
                let _ = tx.send(text[self.sent..].to_string());
                self.sent = text.len();
            }
        }
    }
}

impl Captioner for Moondream {
    fn run(
        &self,
        image: &[u8],
        skill: &Skill,
        settings: &SkillSettings,
        ctl: &RunControl,
    ) -> Result<SkillResult, SkillError> {
        let result = self.run_skill(image, skill, settings, ctl);
        if let Err(SkillError::OutOfMemory(_)) = &result {
            // The generation's tensors are dropped by now; wait for the device to
            // release them before the worker claims again.
            let _ = self.model.device().synchronize();
        }
        result
    }

    fn model_id(&self) -> String {
        self.id.clone()
    }

    fn decode_stats(&self) -> Option<EngineStats> {
        Some(self.engine.stats())
    }
}

impl Moondream {
    fn run_skill(
        &self,
        image: &[u8],
        skill: &Skill,
        settings: &SkillSettings,
        ctl: &RunControl,
    ) -> Result<SkillResult, SkillError> {
        if settings.max_tokens == 0 {
            return Err(SkillError::Invalid("max_tokens must be at least 1".into()));
        }
        let started = Instant::now();
        let rgb = decode_rgb(image, self.limits)?;
        let crops = self.model.prepare(&rgb);
        drop(rgb);
        let encoded = VisionModel::crops_tensor(&crops, self.model.device(), self.model.dtype())
            .and_then(|t| self.engine.encode(t, crops.tiling))
            .map_err(SkillError::from_candle)?;
        let encode_seconds = started.elapsed().as_secs_f64();
        let gen_started = Instant::now();
        let opts = Self::options(settings, ctl);
        let mut streamer = DeltaStreamer {
            tokenizer: &self.tokenizer,
            ids: Vec::new(),
            sent: 0,
            tx: ctl.stream.as_ref(),
        };
        let mut on_token = |id: u32| streamer.push(id);
        let cfg = self.model.config();
        let cancel = opts.cancel.as_deref();
        let (output, prompt_tokens, completion_tokens, stop) = match skill {
            Skill::Caption { length } => {
                let t = &cfg.tokenizer.templates.caption;
                let template = match length {
                    CaptionLength::Short => &t.short,
                    CaptionLength::Normal => &t.normal,
                    CaptionLength::Long => &t.long,
                };
                let prompt = self.model.text().embed(template);
                let g = prompt
                    .and_then(|p| self.model.begin_answer(encoded.into_cache(), &p, &opts))
                    .and_then(|seq| self.engine.decode(seq, &mut on_token))
                    .map_err(SkillError::from_candle)?;
                let caption = self.decode(&g.ids)?.trim().to_string();
                (
                    SkillOutput::Caption { caption },
                    g.prompt_tokens,
                    g.ids.len(),
                    g.stop,
                )
            }
            Skill::Query {
                question,
                reasoning,
            } => {
                let q = self.encode_text(question)?;
                if *reasoning {
                    let r = self
                        .model
                        .query_reasoning_ids(&encoded, &q, &[], &opts, &mut on_token)
                        .map_err(SkillError::from_candle)?;
                    let answer = self.decode(&r.answer.ids)?.trim().to_string();
                    let reasoning = Some(self.decode(&r.reasoning.ids)?.trim().to_string());
                    let used = r.reasoning.ids.len() + r.answer.ids.len();
                    let stop = if r.reasoning.stop == StopReason::Cancelled {
                        StopReason::Cancelled
                    } else {
                        r.answer.stop
                    };
                    (
                        SkillOutput::Answer { answer, reasoning },
                        r.reasoning.prompt_tokens + 1,
                        used,
                        stop,
                    )
                } else {
                    let (ids, coords, sizes) = self.model.query_prompt(&q, &[], false);
                    let g = self
                        .model
                        .prompt_embeddings(&ids, &coords, &sizes)
                        .and_then(|p| self.model.begin_answer(encoded.into_cache(), &p, &opts))
                        .and_then(|seq| self.engine.decode(seq, &mut on_token))
                        .map_err(SkillError::from_candle)?;
                    let answer = self.decode(&g.ids)?.trim().to_string();
                    (
                        SkillOutput::Answer {
                            answer,
                            reasoning: None,
                        },
                        g.prompt_tokens,
                        g.ids.len(),
                        g.stop,
                    )
                }
            }
            Skill::Detect { object } | Skill::Point { object } => {
                let ids = self.encode_text(&format!(" {object}"))?;
                let max = settings.max_objects;
                let (output, n) = if matches!(skill, Skill::Detect { .. }) {
                    let boxes = self
                        .model
                        .detect_ids(&encoded, &ids, max, cancel)
                        .map_err(SkillError::from_candle)?;
                    let objects: Vec<BoxOut> = boxes.iter().map(box_out).collect();
                    let n = objects.len();
                    (SkillOutput::Objects { objects }, n * 3)
                } else {
                    let points = self
                        .model
                        .point_ids(&encoded, &ids, max, cancel)
                        .map_err(SkillError::from_candle)?;
                    let points: Vec<PointOut> = points.iter().map(point_out).collect();
                    let n = points.len();
                    (SkillOutput::Points { points }, n * 2)
                };
                let stop = if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                    StopReason::Cancelled
                } else {
                    StopReason::Eos
                };
                (output, ids.len(), n, stop)
            }
        };
        if stop == StopReason::Cancelled {
            return Err(SkillError::Cancelled);
        }
        Ok(SkillResult {
            output,
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                encode_seconds,
                generate_seconds: gen_started.elapsed().as_secs_f64(),
            },
            truncated: stop == StopReason::MaxTokens,
        })
    }
}

/// Most sequences one batched decode pass takes, and most images one encode pass
/// takes: on the CPU, 8 sequences (the row count up to which the vector kernels read
/// each weight once for all rows) and 4 images; on a GPU, 32 and 8.
fn batch_caps(device: &Device) -> (usize, usize) {
    if device.is_cpu() { (8, 4) } else { (32, 8) }
}

fn box_out(b: &BoundingBox) -> BoxOut {
    BoxOut {
        x_min: b.x_min,
        y_min: b.y_min,
        x_max: b.x_max,
        y_max: b.y_max,
    }
}

fn point_out(p: &Point) -> PointOut {
    PointOut { x: p.x, y: p.y }
}

#[cfg(test)]
mod tests {
    use super::SkillError;

    #[test]
    fn cuda_out_of_memory_is_told_apart_also_with_a_backtrace_or_context() {
        let oom = || {
            candle_core::Error::Msg(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
            )
        };
        assert!(matches!(
            SkillError::from_candle(oom()),
            SkillError::OutOfMemory(_)
        ));
        assert!(matches!(
            SkillError::from_candle(oom().bt()),
            SkillError::OutOfMemory(_)
        ));
        assert!(matches!(
            SkillError::from_candle(oom().context("in the vision encoder")),
            SkillError::OutOfMemory(_)
        ));
        let fault = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")".into(),
        )
        .bt();
        assert!(matches!(
            SkillError::from_candle(fault),
            SkillError::DeviceFault(_)
        ));
        let other = candle_core::Error::Msg("shape mismatch in matmul".into());
        assert!(matches!(
            SkillError::from_candle(other),
            SkillError::Model(_)
        ));
    }
}
