//! What a worker holds for one job: built from the spec once (data set,
//! model, optimizer), kept across ring generations, and checked by the dry
//! run before a job is accepted.

use std::path::Path;

use ringtrain_common::data_plan::ShardCursor;
use ringtrain_common::jobspec::JobSpec;
use ringtrain_common::{JobId, ParamVersion};

use super::TrainError;
use crate::checkpoint;
use crate::data::{self, Dataset};
use crate::model::{self, DataShape, Model};
use crate::optim::Optimizer;

/// A worker's training state for one job, kept between ring generations.
pub struct TrainingState {
    pub job: JobId,
    pub(super) model: Model,
    pub(super) data: Dataset,
    /// The trained parameters, flat (the model holds the same values).
    pub(super) params: Vec<f32>,
    pub(super) optimizer: Optimizer,
    pub(super) version: ParamVersion,
    pub(super) cursor: ShardCursor,
    /// False until the first sync: `params` is only this worker's own init.
    pub(super) agreed: bool,
}

impl TrainingState {
    pub fn version(&self) -> ParamVersion {
        self.version
    }
}

/// The data and model a job trains, as its spec says, with the bytes of its
/// TorchScript file if it has one (blocking: reads files).
pub fn prepare(spec: &JobSpec, script: Option<&[u8]>) -> Result<(Model, Dataset), TrainError> {
    let device = model::device(&spec.device)?;
    let data = data::load(&spec.dataset)?;
    let shape = DataShape {
        sample: data.train.sample_shape(),
        // Both splits' classes: a filter may leave the top class in one only.
        classes: data
            .train
            .num_classes()
            .max(data.test.num_classes())
            .filter(|_| data.train.num_classes().is_some()),
    };
    let weights = if spec.init_from.is_empty() {
        None
    } else {
        let file = checkpoint::weights_file(Path::new(&spec.init_from));
        Some((
            format!("init_from {}", file.display()),
            checkpoint::read_safetensors(&file)?,
        ))
    };
    let init = weights.as_ref().map(|(origin, t)| (origin.as_str(), t));
    let model = Model::build(spec, &shape, script, init, device)?;
    Ok((model, data))
}

/// What a dry run checks before a job is accepted: the model builds on the
/// job's data and one forward on a few training samples gives what the loss
/// needs.
pub fn dry_run(spec: &JobSpec, script: Option<&[u8]>) -> Result<(), TrainError> {
    let (mut model, data) = prepare(spec, script)?;
    let n = data.train.len().min(spec.batch_size).min(8) as i64;
    let indices: Vec<i64> = (0..n).collect();
    let (x, y) = data.train.batch(&indices);
    model.check(&x, &y)?;
    Ok(())
}

/// A member's state before its first sync: its own model and data, the
/// optimizer without state, version 0.
pub fn fresh(
    job: JobId,
    spec: &JobSpec,
    script: Option<&[u8]>,
) -> Result<TrainingState, TrainError> {
    let (model, data) = prepare(spec, script)?;
    let mut params = vec![0f32; model.num_params()];
    model.params_to_flat(&mut params);
    let optimizer = Optimizer::new(&spec.optimizer, params.len());
    Ok(TrainingState {
        job,
        model,
        data,
        params,
        optimizer,
        version: ParamVersion(0),
        cursor: ShardCursor::default(),
        agreed: false,
    })
}
