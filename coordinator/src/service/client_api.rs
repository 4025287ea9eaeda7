//! The client API (`Coordinator` service): submissions, status, cancel,
//! watch and metrics, each checked for its caller's token and role.

use super::*;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Coordinator {
    #[tracing::instrument(name = "submit_job", skip_all, fields(job = tracing::field::Empty))]
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        let req = request.into_inner();
        if req.spec_toml.len() > MAX_SPEC_BYTES {
            return Err(Status::resource_exhausted(format!(
                "spec_toml: {} bytes, at most {MAX_SPEC_BYTES}",
                req.spec_toml.len()
            )));
        }
        let mut spec = JobSpec::parse(&req.spec_toml, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cluster_max = self.inner.config.max_workers;
        if spec.max_workers() > cluster_max {
            let key = if spec.max_workers > spec.workers {
                "max_workers"
            } else {
                "workers"
            };
            return Err(Status::invalid_argument(format!(
                "job spec: {key} must be at most this cluster's max_workers ({cluster_max}) (got {})",
                spec.max_workers()
            )));
        }
        let id = JobId::random();
        tracing::Span::current().record("job", tracing::field::display(id));
        // Checked before anything reads a path, the dry run included.
        let default_dir = self
            .inner
            .config
            .data_dir
            .join(id.to_string())
            .join("checkpoint");
        let roots = self.inner.roots.clone();
        let (spec, confined) = tokio::task::spawn_blocking(move || {
            confine::submission(&mut spec, &req.resume_from, default_dir, &roots).map(|c| (spec, c))
        })
        .await
        .map_err(|_| Status::unavailable("the path check stopped"))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let worker = self.read(|st, _| Ok(st.dry_run_target()))?;
        models::check_submission(
            &self.inner.blobs,
            &spec,
            worker,
            &self.inner.security.transport,
        )
        .await?;
        let (resume_from, checkpoint_dir) = (confined.resume_from, confined.checkpoint_dir);
        let submitted = SystemTime::now();
        self.change(|st, now| {
            let fx = st.submit(
                now,
                id,
                spec,
                resume_from,
                checkpoint_dir,
                submitted,
                who.name,
            );
            Ok(((), fx))
        })
        .await?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn upload_model(
        &self,
        request: Request<tonic::Streaming<pb::FileChunk>>,
    ) -> Result<Response<pb::UploadModelResponse>, Status> {
        self.inner.security.client(&request)?;
        let reply = models::upload(&self.inner.blobs, request.into_inner()).await?;
        Ok(Response::new(reply))
    }

    async fn get_job_metrics(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobMetrics>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let owner = self.read(|st, _| st.snapshot(id))?.owner;
        access::require_owner(&who, &owner, &id.to_string())?;
        let (mut rows, on_disk) = self.read(|st, _| st.history(id))?;
        // A job that ended before this coordinator started: its metrics.csv.
        if let Some(dir) = on_disk {
            rows = tokio::task::spawn_blocking(move || curve::read_report(Path::new(&dir)))
                .await
                .unwrap_or_default();
        }
        let rows = rows.iter().map(pb::MetricRow::from).collect();
        Ok(Response::new(pb::JobMetrics { rows }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let job = self.read(|st, _| st.snapshot(id))?;
        access::require_owner(&who, &job.owner, &id.to_string())?;
        Ok(Response::new(convert::job_status(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let req = request.into_inner();
        let size = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(
                parse_job(token)
                    .map_err(|e| Status::invalid_argument(format!("page_token: {}", e.problem)))?,
            ),
        };
        let (page, workers) = self.read(|st, now| {
            let page = st.snapshots_page(after, size)?;
            // Workers are few (bounded by max_workers): on the first page.
            let workers = after.is_none().then(|| st.worker_views(now));
            Ok((page, workers))
        })?;
        let jobs = page
            .jobs
            .iter()
            .map(|j| {
                let status = convert::job_status(j);
                if who.owns(&j.owner) {
                    status
                } else {
                    access::redact(status)
                }
            })
            .collect();
        // Which worker trains which job, and how fast, is for admins.
        let workers = match workers {
            Some(workers) if who.is_admin() => workers.iter().map(convert::worker_status).collect(),
            _ => Vec::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            workers,
            next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        // A job's owner never changes: checked before the change, it holds.
        let owner = self.read(|st, _| st.snapshot(id))?.owner;
        access::require_owner(&who, &owner, &id.to_string())?;
        let job = self.change(|st, now| st.cancel(now, id)).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(convert::job_status(&job)),
        }))
    }

    type WatchJobStream = crate::watch::EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = self.inner.security.client(&request)?;
        small(&request)?;
        let key = client_key(&request);
        let id = parse_job(&request.into_inner().job_id).map_err(bad_request)?;
        let slot = {
            let most = self.inner.config.max_watch_streams_per_client;
            let mut w = lock(&self.inner.watchers);
            let open = w.entry(key.clone()).or_insert(0);
            if *open >= most {
                return Err(Status::resource_exhausted(format!(
                    "{most} watch streams are open from this client already (max_watch_streams_per_client)"
                )));
            }
            *open += 1;
            WatchSlot {
                watchers: self.inner.watchers.clone(),
                key,
            }
        };
        let (first, rx) = {
            let st = lock(&self.inner.state);
            let job = st.snapshot(id).map_err(refused)?;
            access::require_owner(&who, &job.owner, &id.to_string())?;
            // Subscribed while the state is locked: no event is missed or
            // seen twice around the snapshot (see `outbox`).
            let rx = (!job.state.is_terminal()).then(|| lock(&self.inner.outbox).subscribe(id));
            let first = JobEvent {
                kind: EventKind::Snapshot,
                message: String::new(),
                job,
            };
            (first, rx)
        };
        let this = self.clone();
        let snapshot = move || lock(&this.inner.state).snapshot(id).ok();
        let closing = self.inner.closing.subscribe();
        let stream = crate::watch::events(first, rx, closing, snapshot);
        // The slot is held for as long as the stream is.
        let stream = futures::StreamExt::map(stream, move |event| {
            let _held = &slot;
            event
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
