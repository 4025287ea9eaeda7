//! Sampling text from a checkpoint of the built-in transformer
//! (`ringtrain generate CKPT --prompt ... --tokens N`).

use std::collections::HashMap;
use std::path::Path;

use ringtrain_common::jobspec::{JobSpec, ModelKind};
use tch::Device;

use crate::checkpoint;
use crate::model::{gpt, DataShape, Model};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("checkpoint {dir}: {problem}")]
    Unusable { dir: String, problem: String },
    #[error("{0}")]
    Model(#[from] crate::model::ModelError),
}

/// `tokens` bytes sampled after `prompt` from the transformer saved in `dir`.
pub fn from_checkpoint(
    dir: &Path,
    prompt: &[u8],
    tokens: usize,
    temperature: f64,
    seed: u64,
) -> Result<Vec<u8>, GenerateError> {
    let unusable = |problem: String| GenerateError::Unusable {
        dir: dir.display().to_string(),
        problem,
    };
    let meta = checkpoint::read_meta(dir)?;
    let mut spec = JobSpec::parse(&meta.spec, &[])
        .map_err(|e| unusable(format!("its job spec does not parse: {e}")))?;
    // The checkpoint holds every tensor as trained: nothing to re-initialise.
    spec.reinit.clear();
    spec.freeze.clear();
    spec.strict = true;
    if spec.model.builtin() != Some(ModelKind::Gpt) {
        return Err(unusable(format!(
            "model {} is not the built-in transformer (gpt)",
            spec.model
        )));
    }
    let shape = DataShape {
        sample: vec![spec.dataset.context as i64],
        classes: None,
    };
    let weights: HashMap<_, _> = checkpoint::read_safetensors(&dir.join(checkpoint::MODEL_FILE))?;
    let origin = dir.join(checkpoint::MODEL_FILE).display().to_string();
    let model = Model::build(&spec, &shape, None, Some((&origin, &weights)), Device::Cpu)?;
    let net = model
        .gpt()
        .ok_or_else(|| unusable("no transformer in it".into()))?;
    let context = net.config().context;
    Ok(gpt::generate(
        net,
        context,
        prompt,
        tokens,
        temperature,
        seed,
    ))
}
