//! Encoding of `google.rpc.Status` with an `ErrorInfo`, the error model both Tessera
//! processes put in the `grpc-status-details-bin` trailer.

use std::collections::HashMap;

use prost::Message;

use crate::rpc::{ErrorInfo, Status};
use crate::ERROR_DOMAIN;

const ERROR_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// Encodes a `google.rpc.Status` carrying one `ErrorInfo` with `reason` and `metadata`.
///
/// The message must already be free of card data; callers build it from fixed strings.
pub fn encode_status_details(code: i32, message: &str, reason: &str, metadata: &[(&str, &str)]) -> Vec<u8> {
    let info = ErrorInfo {
        reason: reason.to_owned(),
        domain: ERROR_DOMAIN.to_owned(),
        metadata: metadata
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect::<HashMap<_, _>>(),
    };
    Status {
        code,
        message: message.to_owned(),
        details: vec![prost_types::Any {
            type_url: ERROR_INFO_TYPE_URL.to_owned(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// Decodes the `ErrorInfo` from an encoded `google.rpc.Status`, if it has one.
pub fn decode_error_info(details: &[u8]) -> Option<ErrorInfo> {
    let status = Status::decode(details).ok()?;
    status
        .details
        .iter()
        .find(|any| any.type_url == ERROR_INFO_TYPE_URL)
        .and_then(|any| ErrorInfo::decode(any.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn error_info_round_trips() {
        let bytes = encode_status_details(3, "bad card", "INVALID_CARD_NUMBER", &[("field", "card.number")]);
        let info = decode_error_info(&bytes).unwrap();
        assert_eq!(info.reason, "INVALID_CARD_NUMBER");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("card.number")
        );
    }

    #[test]
    fn garbage_has_no_error_info() {
        assert!(decode_error_info(b"\xff\xff\xff").is_none());
    }
}
