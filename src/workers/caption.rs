//! Where the queue meets the model: turns a stored job into a skill run on its image
//! and maps model errors onto retry decisions.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{HandlerOutput, JobControl, JobFailure, JobHandler};
use crate::blobs::{BlobError, BlobStore};
use crate::queue::{ImageSource, Job, JobErrorInfo, TaskKind};
use crate::vision::{CaptionLength, Captioner, RunControl, Skill, SkillError, SkillSettings};

/// Task parameters as stored in a job's `params` column.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskParams {
    /// Caption length (caption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<CaptionLength>,
    /// The question (query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// Run the reasoning phase (query).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reasoning: bool,
    /// What to find (detect, point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Token cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Object cap (detect, point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_objects: Option<usize>,
}

/// Largest token cap a request may ask for.
pub const MAX_TOKENS_LIMIT: usize = 2048;

impl TaskParams {
    /// Checks the parameters against the task and builds the skill and its settings.
    pub fn to_skill(
        &self,
        task: TaskKind,
        defaults: &SkillSettings,
    ) -> Result<(Skill, SkillSettings), String> {
        let text = |v: &Option<String>, name: &str| -> Result<String, String> {
            match v.as_deref().map(str::trim) {
                Some(s) if !s.is_empty() && s.len() <= 4096 => Ok(s.to_string()),
                Some(s) if s.len() > 4096 => Err(format!("{name} is longer than 4096 bytes")),
                _ => Err(format!("{} needs a non-empty {name}", task.as_str())),
            }
        };
        let skill = match task {
            TaskKind::Caption => Skill::Caption {
                length: self.length.unwrap_or_default(),
            },
            TaskKind::Query => Skill::Query {
                question: text(&self.question, "question")?,
                reasoning: self.reasoning,
            },
            TaskKind::Detect => Skill::Detect {
                object: text(&self.object, "object")?,
            },
            TaskKind::Point => Skill::Point {
                object: text(&self.object, "object")?,
            },
        };
        let mut s = *defaults;
        if let Some(m) = self.max_tokens {
            if m == 0 || m > MAX_TOKENS_LIMIT {
                return Err(format!(
                    "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"
                ));
            }
            s.max_tokens = m;
        }
        if let Some(t) = self.temperature {
            if !(0.0..=5.0).contains(&t) {
                return Err("temperature must be between 0 and 5".into());
            }
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err("top_p must be in (0, 1]".into());
            }
            s.top_p = p;
        }
        if let Some(seed) = self.seed {
            s.seed = seed;
        }
        if let Some(m) = self.max_objects {
            if m == 0 || m > 500 {
                return Err("max_objects must be between 1 and 500".into());
            }
            s.max_objects = m;
        }
        Ok((skill, s))
    }
}

/// Runs caption/query/detect/point jobs on a [`Captioner`].
pub struct CaptionHandler {
    captioner: Arc<dyn Captioner>,
    blobs: BlobStore,
    defaults: SkillSettings,
}

impl CaptionHandler {
    /// Wraps a loaded model.
    pub fn new(captioner: Arc<dyn Captioner>, blobs: BlobStore, defaults: SkillSettings) -> Self {
        Self {
            captioner,
            blobs,
            defaults,
        }
    }
}

fn err(code: &str, message: impl Into<String>) -> JobErrorInfo {
    JobErrorInfo {
        code: code.into(),
        message: message.into(),
    }
}

fn read_image(blobs: &BlobStore, source: &ImageSource) -> Result<Vec<u8>, JobFailure> {
    match source {
        ImageSource::Path(p) => std::fs::read(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                JobFailure::Permanent(err("image_missing", format!("{p}: file not found")))
            }
            std::io::ErrorKind::PermissionDenied => {
                JobFailure::Permanent(err("image_unreadable", format!("{p}: permission denied")))
            }
            _ => JobFailure::Transient(err("io_error", format!("{p}: {e}"))),
        }),
        ImageSource::Blob(id) => blobs.get(id).map_err(|e| match e {
            BlobError::Missing(_) | BlobError::InvalidId(_) => {
                JobFailure::Permanent(err("image_missing", e.to_string()))
            }
            other => JobFailure::Transient(err("io_error", other.to_string())),
        }),
    }
}

impl JobHandler for CaptionHandler {
    fn handle(&self, job: &Job, ctl: &JobControl) -> Result<HandlerOutput, JobFailure> {
        let params: TaskParams = serde_json::from_value(job.params.clone())
            .map_err(|e| JobFailure::Permanent(err("invalid_params", e.to_string())))?;
        let (skill, settings) = params
            .to_skill(job.task, &self.defaults)
            .map_err(|m| JobFailure::Permanent(err("invalid_params", m)))?;
        let bytes = read_image(&self.blobs, &job.source)?;
        let run = RunControl {
            cancel: Some(ctl.cancel.clone()),
            stream: ctl.stream.clone(),
        };
        let result = self
            .captioner
            .run(&bytes, &skill, &settings, &run)
            .map_err(|e| match e {
                SkillError::Image(e) => {
                    JobFailure::Permanent(err("image_unreadable", e.to_string()))
                }
                SkillError::Invalid(m) => JobFailure::Permanent(err("invalid_params", m)),
                SkillError::Cancelled => JobFailure::Cancelled,
                SkillError::OutOfMemory(m) => JobFailure::OutOfMemory(err("out_of_memory", m)),
                SkillError::DeviceFault(m) => JobFailure::DeviceFault(err("device_fault", m)),
                SkillError::Model(m) => JobFailure::Transient(err("model_error", m)),
            })?;
        let output = serde_json::to_value(&result)
            .map_err(|e| JobFailure::Transient(err("internal", e.to_string())))?;
        Ok(HandlerOutput {
            model: self.captioner.model_id(),
            output,
        })
    }
}
