//! Loading PEM certificates and keys for the TLS configuration of both hops.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum PemError {
    /// The file could not be read or parsed.
    Read { path: PathBuf, cause: String },
    /// The file holds no certificate.
    NoCertificate { path: PathBuf },
}

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, cause } => write!(f, "cannot read {}: {cause}", path.display()),
            Self::NoCertificate { path } => write!(f, "{} holds no PEM certificate", path.display()),
        }
    }
}

impl std::error::Error for PemError {}

/// Reads every certificate in a PEM file (a chain or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| PemError::Read {
            path: path.to_owned(),
            cause: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the private key in a PEM file. The error never contains key bytes.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|err| PemError::Read {
        path: path.to_owned(),
        cause: match err {
            rustls_pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "no valid PEM private key".to_owned(),
        },
    })
}
