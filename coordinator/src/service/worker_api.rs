//! The worker API (`WorkerControl` service): registrations, heartbeats and
//! reports, each from a worker certificate and fenced by ring membership.

use super::*;

#[tonic::async_trait]
impl pb::worker_control_server::WorkerControl for Coordinator {
    #[tracing::instrument(name = "register_worker", skip_all)]
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.inner.security.worker(&request)?;
        let registration = ringtrain_common::worker_api::Registration::from(request.into_inner());
        if registration.grpc_addr.is_empty() || registration.ring_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a worker must advertise grpc_addr and ring_addr",
            ));
        }
        for (field, value) in [
            ("grpc_addr", &registration.grpc_addr),
            ("ring_addr", &registration.ring_addr),
            ("hostname", &registration.hostname),
        ] {
            if value.len() > MAX_ADDRESS_BYTES {
                return Err(Status::invalid_argument(format!(
                    "{field}: '{}' is longer than {MAX_ADDRESS_BYTES} bytes",
                    ringtrain_common::quote(value)
                )));
            }
        }
        let id = self
            .change(|st, now| st.register_worker(now, registration))
            .await?;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms as u32,
        }))
    }

    type FetchModelStream = models::ChunkStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        self.inner.security.worker(&request)?;
        let model = request.into_inner().model;
        Ok(Response::new(
            models::fetch(&self.inner.blobs, &model).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.inner.security.worker(&request)?;
        let worker = parse_worker(&request.into_inner().worker_id).map_err(bad_request)?;
        let reply = self.change(|st, now| Ok(st.heartbeat(now, worker))).await?;
        Ok(Response::new(match reply {
            HeartbeatReply::Assignment(a) => pb::HeartbeatResponse {
                assignment: a.as_deref().map(pb::Assignment::from),
                unknown_worker: false,
            },
            HeartbeatReply::Unknown => pb::HeartbeatResponse {
                assignment: None,
                unknown_worker: true,
            },
        }))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.inner.security.worker(&request)?;
        let r = parse(request)?;
        let verdict = self.change(|st, now| st.report_step(now, &r)).await?;
        Ok(Response::new(pb::StepReply {
            continue_job: verdict == StepVerdict::Continue,
        }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_eval).await
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::CheckpointReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        let mut r: CheckpointReport = parse(request)?;
        // Fenced first: a non-member learns nothing about the file system.
        self.read(|st, _| st.check_member(r.job, r.worker, r.generation))?;
        // The coordinator writes the job's report into this directory: it
        // must resolve (symlinks followed) inside the checkpoint roots.
        let roots = self.inner.roots.checkpoints.clone();
        let dir = r.dir.to_string_lossy().into_owned();
        r.dir = tokio::task::spawn_blocking(move || {
            ringtrain_common::paths::confine("dir", &dir, &roots)
        })
        .await
        .map_err(|_| Status::unavailable("the path check stopped"))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.change(|st, now| Ok(((), st.report_checkpoint(now, &r)?)))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_finish(
        &self,
        request: Request<pb::FinishReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_finish).await
    }

    async fn report_ring_failure(
        &self,
        request: Request<pb::RingFailureReport>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.inner.security.worker(&request)?;
        self.report(request, State::report_ring_failure).await
    }
}
