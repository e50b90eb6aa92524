//! Caller identity: the URI subject alternative name (e.g. `spiffe://tessera/gateway`) of a
//! client certificate that rustls has already verified against the configured client CA.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Returns the first URI subject alternative name of a DER certificate.
///
/// `None` for a certificate that does not parse or carries no URI name; such a caller has no
/// identity and is refused.
pub fn uri_san(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}

/// The identity of a peer from its verified certificate chain (end-entity certificate first).
pub fn peer_identity<'a>(chain: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    chain.into_iter().next().and_then(uri_san)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_no_identity() {
        assert_eq!(uri_san(b""), None);
        assert_eq!(uri_san(&[0x30, 0x82, 0xff]), None);
    }
}
