//! Public API errors: a gRPC code, a machine-readable `ErrorInfo` reason and a message that
//! never contains card data (every message is built from fixed text and non-sensitive ids).

use std::borrow::Cow;
use std::fmt;

use tessera_api::error_details::encode_status_details;
use tonic::Code;

/// An error returned to a caller of the public API.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    /// UPPER_SNAKE_CASE reason for `google.rpc.ErrorInfo`.
    pub reason: Cow<'static, str>,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<&'static str>,
    /// More non-sensitive `ErrorInfo` metadata, e.g. when a block ends.
    pub metadata: Vec<(&'static str, String)>,
}

impl fmt::Debug for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}: {}", self.code, self.reason, self.message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.reason)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: Code, reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            message: message.into(),
            field: None,
            metadata: Vec::new(),
        }
    }

    pub fn invalid(field: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(Code::InvalidArgument, reason, message)
        }
    }

    pub fn missing(field: &'static str) -> Self {
        Self::invalid(field, "MISSING_FIELD", format!("{field} is required"))
    }

    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, reason, message)
    }

    pub fn permission_denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, reason, message)
    }

    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, reason, message)
    }

    pub fn unavailable(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, reason, message)
    }

    pub fn internal(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::Internal, reason, message)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        let metadata: Vec<(&str, &str)> = err
            .field
            .map(|field| ("field", field))
            .into_iter()
            .chain(err.metadata.iter().map(|(key, value)| (*key, value.as_str())))
            .collect();
        let details = encode_status_details(err.code as i32, &err.message, &err.reason, &metadata);
        tonic::Status::with_details(err.code, err.message, details.into())
    }
}
