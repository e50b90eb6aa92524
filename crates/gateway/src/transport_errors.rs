//! Tessera's `ErrorInfo` on the refusals tonic makes before a handler runs (a message over the
//! size limit, bytes that are not the method's message, an unknown method) and on requests
//! that run out of time, so every error a caller sees carries a reason a program can branch on.
//!
//! Handlers' own errors already carry one (`crate::error::ApiError`); this layer only fills
//! in responses that have a gRPC error status and no details, and it never echoes what tonic
//! said, since a decoder's message is not ours to vouch for.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_api::limits::{MAX_IMPORT_MESSAGE_BYTES, MAX_REQUEST_BYTES, REQUEST_TOO_LARGE};
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::error::ApiError;

/// The one streaming method whose messages may be larger than [`MAX_REQUEST_BYTES`].
pub(crate) const IMPORT_PATH: &str = "/tessera.v1.Tokenization/ImportTokens";

/// The size limit of one message of the method at `path`.
pub fn message_limit(path: &str) -> usize {
    if path == IMPORT_PATH {
        MAX_IMPORT_MESSAGE_BYTES
    } else {
        MAX_REQUEST_BYTES
    }
}

/// The refusal of a message over `limit` bytes, wherever it is found.
pub fn too_large(limit: usize) -> ApiError {
    let mut error = ApiError::new(
        Code::InvalidArgument,
        REQUEST_TOO_LARGE,
        format!("a request message may be at most {limit} bytes"),
    );
    error.metadata = vec![("limit_bytes", limit.to_string())];
    error
}

/// Tessera's error for a status tonic produced itself, or `None` for one that already
/// carries details (a handler's) or is not an error.
pub fn explain(status: &Status, path: &str) -> Option<ApiError> {
    if status.code() == Code::Ok || !status.details().is_empty() {
        return None;
    }
    Some(match status.code() {
        // tonic's decoder: "decoded message length too large".
        Code::OutOfRange => too_large(message_limit(path)),
        // tonic's decoder: the bytes are not a protobuf message of the method's type.
        Code::Internal if status.message().contains("decode") => ApiError::new(
            Code::InvalidArgument,
            "MALFORMED_REQUEST",
            "the request is not a valid message of this method",
        ),
        Code::Unimplemented => ApiError::new(
            Code::Unimplemented,
            "UNKNOWN_METHOD",
            "this server has no such method",
        ),
        code => ApiError::new(code, "TRANSPORT_ERROR", "the request failed in transport"),
    })
}

/// Adds the error details to a response whose status tonic made, and bounds each request's
/// time to the response headers (a stream may run on after them), answering DEADLINE_EXCEEDED
/// with a reason when that runs out.
#[derive(Debug, Clone, Copy)]
pub struct TransportErrorsLayer {
    pub timeout: Duration,
}

impl<S> Layer<S> for TransportErrorsLayer {
    type Service = TransportErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportErrors {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`TransportErrorsLayer`] makes.
#[derive(Debug, Clone)]
pub struct TransportErrors<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for TransportErrors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let timeout = self.timeout;
        let response = self.inner.call(request);
        Box::pin(async move {
            let Ok(response) = tokio::time::timeout(timeout, response).await else {
                let error = ApiError::new(
                    Code::DeadlineExceeded,
                    "REQUEST_TIMEOUT",
                    format!("the request did not finish within {} s", timeout.as_secs()),
                );
                return Ok(Status::from(error).into_http());
            };
            let mut response = response?;
            let explained =
                Status::from_header_map(response.headers()).and_then(|status| explain(&status, &path));
            if let Some(error) = explained {
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                if Status::from(error).add_header(headers).is_err() {
                    // Our own message and details are plain ASCII and base64: a header value
                    // that cannot be built means a bug here, and the original status stands.
                    tracing::error!("could not attach error details to a transport refusal");
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tonic_refusals_get_a_reason_and_handler_errors_keep_theirs() {
        let too_big = Status::out_of_range("decoded message length too large: found 70000 bytes");
        let error = explain(&too_big, "/tessera.v1.Tokenization/Tokenize").map(|e| (e.code, e.reason));
        assert_eq!(error, Some((Code::InvalidArgument, REQUEST_TOO_LARGE.into())));
        let error = explain(&too_big, IMPORT_PATH).map(|e| e.metadata);
        assert_eq!(
            error,
            Some(vec![("limit_bytes", MAX_IMPORT_MESSAGE_BYTES.to_string())])
        );
        let garbage = Status::internal("failed to decode Protobuf message: invalid wire type");
        let error = explain(&garbage, "/x").map(|e| e.reason);
        assert_eq!(error.as_deref(), Some("MALFORMED_REQUEST"));
        let handlers: Status = ApiError::missing("token").into();
        assert!(explain(&handlers, "/x").is_none());
        assert!(explain(&Status::ok(""), "/x").is_none());
    }

    #[tokio::test]
    async fn a_request_out_of_time_gets_deadline_exceeded_with_a_reason() {
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        });
        let mut service = TransportErrorsLayer {
            timeout: Duration::from_millis(20),
        }
        .layer(slow);
        let response = service.call(http::Request::new(())).await.unwrap();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        let info = tessera_api::error_details::decode_error_info(status.details()).unwrap();
        assert_eq!(info.reason, "REQUEST_TIMEOUT");
    }
}
