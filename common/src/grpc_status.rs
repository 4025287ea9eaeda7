//! tonic refuses a message over a service's size limit with OUT_OF_RANGE;
//! gRPC's own implementations (and its status-code guide) say
//! RESOURCE_EXHAUSTED, which is what clients check for. Servers rewrite it
//! with [`oversize_layer`].

use tonic::codegen::http;

/// gRPC status codes as they travel in the `grpc-status` header.
const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// Rewrites an OUT_OF_RANGE answer (a trailers-only response, which is how
/// a request refused before its handler runs is answered) to
/// RESOURCE_EXHAUSTED. No handler of ours answers OUT_OF_RANGE itself.
pub fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == OUT_OF_RANGE.as_bytes())
    {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
    }
    response
}

/// The layer for `Server::builder().layer(...)`.
pub type OversizeLayer = tower::util::MapResponseLayer<
    fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
>;

pub fn oversize_layer() -> OversizeLayer {
    tower::util::MapResponseLayer::new(oversize_is_resource_exhausted::<tonic::body::Body>)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_status(code: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from_str(code).expect("code"),
        );
        r
    }

    #[test]
    fn only_out_of_range_becomes_resource_exhausted() {
        let r = oversize_is_resource_exhausted(with_status("11"));
        assert_eq!(r.headers()["grpc-status"], "8");
        for other in ["0", "3", "5", "13"] {
            let r = oversize_is_resource_exhausted(with_status(other));
            assert_eq!(r.headers()["grpc-status"], other);
        }
        let r = oversize_is_resource_exhausted(http::Response::new(()));
        assert!(r.headers().get("grpc-status").is_none());
    }
}
