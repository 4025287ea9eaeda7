//! What tools see of a cluster's gRPC servers: reflection lists every
//! service (what `grpcurl list` asks), and the plaintext health port answers
//! grpc.health.v1 (what Kubernetes' gRPC probes ask) and nothing else.

use ringtrain_common::security::{CertRole, Transport};
use ringtrain_tests::*;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// The services a server lists through reflection v1.
async fn services(channel: Channel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection call")
        .into_inner();
    let reply = replies
        .next()
        .await
        .expect("one reply")
        .expect("reflection reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("not a service list: {other:?}"),
    }
}

async fn tls_channel(cluster: &Cluster, addr: &str, role: CertRole, server: CertRole) -> Channel {
    Transport::from_flags(Some(cluster.tls_dir()), false)
        .expect("tls dir")
        .endpoint(addr, role, Some(server))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

fn plain(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

#[test]
fn reflection_lists_every_service_and_the_health_port_answers_only_health() {
    let cluster = Cluster::start(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let coordinator = services(cluster.channel(CertRole::Client).await).await;
        for service in [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "ringtrain.v1.Coordinator",
            "ringtrain.v1.WorkerControl",
        ] {
            assert!(
                coordinator.iter().any(|s| s == service),
                "coordinator lists {coordinator:?}"
            );
        }
        let worker_addr = cluster.ready("worker-0")["grpc"]
            .as_str()
            .expect("worker address")
            .to_string();
        let worker = services(
            tls_channel(
                &cluster,
                &worker_addr,
                CertRole::Coordinator,
                CertRole::Worker,
            )
            .await,
        )
        .await;
        for service in [
            "grpc.health.v1.Health",
            "ringtrain.v1.Ring",
            "ringtrain.v1.WorkerAgent",
        ] {
            assert!(
                worker.iter().any(|s| s == service),
                "worker lists {worker:?}"
            );
        }

        for name in ["coordinator", "worker-0"] {
            let health = cluster.ready(name)["health"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no health address in its ready file"))
                .to_string();
            let status = HealthClient::new(plain(&health))
                .check(HealthCheckRequest::default())
                .await
                .unwrap_or_else(|e| panic!("{name}: plaintext health check: {e}"))
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{name}");
            // Nothing but health there: not the API, not reflection.
            let err = ServerReflectionClient::new(plain(&health))
                .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                }))
                .await
                .expect_err("reflection on the health port");
            assert_eq!(err.code(), tonic::Code::Unimplemented, "{name}: {err}");
        }
        // The main port still speaks only TLS.
        let coordinator_addr = cluster
            .coordinator
            .trim_start_matches("https://")
            .to_string();
        let refused = HealthClient::new(plain(&coordinator_addr))
            .check(HealthCheckRequest::default())
            .await;
        assert!(refused.is_err(), "plaintext accepted on the TLS port");
    });
}
