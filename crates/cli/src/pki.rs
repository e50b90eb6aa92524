//! The development PKI behind `tessera certs init` and `tessera certs client`: one CA and the
//! leaf certificates the local stack needs, each carrying the SPIFFE-style URI SAN that the
//! vault's allow-list and the gateway's caller policy are keyed by.
//!
//! Everything here is for development. Production certificates come from the operator's own
//! CA (see `certs/README.md`); nothing in Tessera depends on them having been made here.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use zeroize::Zeroizing;

/// The CA certificate; its presence means the directory already holds a complete PKI.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca-key.pem";
/// Common name of the development CA, so nobody mistakes it for a real one.
pub const CA_COMMON_NAME: &str = "Tessera Development CA";

/// The CA is valid for two years, leaves for one: long enough not to bother a developer,
/// short enough that a leaked development key does not live forever.
const CA_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 60 * 60);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start an hour in the past so a peer whose clock is slightly behind accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);

/// Which side of a TLS handshake a leaf certificate is for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (serverAuth).
    Server,
    /// TLS client (clientAuth).
    Client,
}

/// One leaf certificate of the development PKI.
#[derive(Clone, Copy, Debug)]
pub struct LeafSpec {
    /// File stem: the certificate is `NAME.pem`, its key `NAME-key.pem`.
    pub name: &'static str,
    /// The URI SAN: the identity that policy is keyed by.
    pub identity: &'static str,
    /// DNS SANs a client verifies the server by (servers only).
    pub dns_names: &'static [&'static str],
    /// Whether the certificate also names 127.0.0.1 (servers only).
    pub loopback_ip: bool,
    pub usage: Usage,
}

/// The leaves `tessera certs init` creates, in the order they are printed.
pub const DEV_LEAVES: [LeafSpec; 5] = [
    LeafSpec {
        name: "vault",
        identity: "spiffe://tessera/vault",
        dns_names: &["tessera-vault", "localhost"],
        loopback_ip: true,
        usage: Usage::Server,
    },
    LeafSpec {
        name: "gateway",
        identity: "spiffe://tessera/gateway-server",
        dns_names: &["tessera-gateway", "localhost"],
        loopback_ip: true,
        usage: Usage::Server,
    },
    LeafSpec {
        name: "gateway-client",
        identity: "spiffe://tessera/gateway",
        dns_names: &[],
        loopback_ip: false,
        usage: Usage::Client,
    },
    LeafSpec {
        name: "operator",
        identity: "spiffe://tessera/operator",
        dns_names: &[],
        loopback_ip: false,
        usage: Usage::Client,
    },
    LeafSpec {
        name: "dev-client",
        identity: "spiffe://tessera/dev-client",
        dns_names: &[],
        loopback_ip: false,
        usage: Usage::Client,
    },
];

/// The certificate file of a leaf named `name`.
pub fn cert_file(name: &str) -> String {
    format!("{name}.pem")
}

/// The private key file of a leaf named `name`.
pub fn key_file(name: &str) -> String {
    format!("{name}-key.pem")
}

/// Every file `tessera certs init` writes, relative to the PKI directory.
pub fn dev_files() -> Vec<String> {
    let mut files = vec![CA_CERT.to_owned(), CA_KEY.to_owned()];
    for leaf in &DEV_LEAVES {
        files.push(cert_file(leaf.name));
        files.push(key_file(leaf.name));
    }
    files
}

/// Why a PKI operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read or written.
    Io { path: PathBuf, source: io::Error },
    /// rcgen refused to build a key or certificate.
    Generate { what: String, source: rcgen::Error },
    /// The existing CA in the directory could not be used to issue a certificate.
    UnusableCa { path: PathBuf, reason: String },
    /// A client name that is not a plain file stem.
    InvalidName(String),
    /// A client identity that is not an ASCII URI.
    InvalidIdentity(String),
    /// Issuing would overwrite an existing file.
    AlreadyExists(PathBuf),
}

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Generate { what, source } => write!(f, "cannot generate {what}: {source}"),
            Self::UnusableCa { path, reason } => {
                write!(f, "cannot issue from the CA in {}: {reason}", path.display())
            }
            Self::InvalidName(name) => write!(
                f,
                "invalid certificate name {name:?}: use letters, digits, '-' and '_' only (it becomes a file name)"
            ),
            Self::InvalidIdentity(identity) => write!(
                f,
                "invalid identity {identity:?}: expected an ASCII URI such as spiffe://tessera/checkout"
            ),
            Self::AlreadyExists(path) => {
                write!(f, "{} already exists; remove it first or pick another name", path.display())
            }
        }
    }
}

impl std::error::Error for PkiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Generate { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn generate_error(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

/// What `init` did.
#[derive(Debug)]
#[non_exhaustive]
pub enum InitOutcome {
    /// A new PKI was written; the files, in the order they were created.
    Created(Vec<PathBuf>),
    /// `ca.pem` already existed and nothing was written; `missing` lists expected files that
    /// are not there (someone deleted them), so the caller can say how to repair.
    AlreadyPresent { missing: Vec<PathBuf> },
}

/// Creates the development PKI in `dir`, unless `ca.pem` already exists and `force` is false.
///
/// Files are written with the CA last, so an interrupted run leaves no `ca.pem` and the next
/// run starts over instead of mistaking a half-written directory for a complete one.
pub fn init(dir: &Path, force: bool) -> Result<InitOutcome, PkiError> {
    let ca_path = dir.join(CA_CERT);
    if !force && ca_path.exists() {
        let missing = dev_files()
            .into_iter()
            .map(|file| dir.join(file))
            .filter(|path| !path.exists())
            .collect();
        return Ok(InitOutcome::AlreadyPresent { missing });
    }
    fs::create_dir_all(dir).map_err(io_error(dir))?;

    let ca_key = new_key("the CA key")?;
    let ca_params = ca_params();
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate_error("the CA certificate"))?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let mut created = Vec::new();
    for leaf in &DEV_LEAVES {
        let (cert, key_pem) = issue_leaf(
            &issuer,
            leaf.name,
            leaf.identity,
            leaf.dns_names,
            leaf.loopback_ip,
            leaf.usage,
        )?;
        created.push(write_public(&dir.join(cert_file(leaf.name)), &cert.pem())?);
        created.push(write_secret(&dir.join(key_file(leaf.name)), &key_pem)?);
    }
    created.push(write_secret(
        &dir.join(CA_KEY),
        &Zeroizing::new(ca_key.serialize_pem()),
    )?);
    created.push(write_public(&ca_path, &ca_cert.pem())?);
    Ok(InitOutcome::Created(created))
}

/// Issues one more client certificate (`NAME.pem`, `NAME-key.pem`) with URI SAN `identity`
/// from the CA already in `dir`. Refuses to overwrite existing files.
pub fn issue_client(dir: &Path, name: &str, identity: &str) -> Result<Vec<PathBuf>, PkiError> {
    if !is_valid_name(name) {
        return Err(PkiError::InvalidName(name.to_owned()));
    }
    if !is_valid_identity(identity) {
        return Err(PkiError::InvalidIdentity(identity.to_owned()));
    }
    let cert_path = dir.join(cert_file(name));
    let key_path = dir.join(key_file(name));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::AlreadyExists(path.clone()));
        }
    }

    let ca_key_path = dir.join(CA_KEY);
    let ca_key_pem = Zeroizing::new(fs::read_to_string(&ca_key_path).map_err(io_error(&ca_key_path))?);
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|err| PkiError::UnusableCa {
        path: ca_key_path.clone(),
        reason: format!("the key does not parse: {err}"),
    })?;
    let ca_path = dir.join(CA_CERT);
    let (ca_params, ca_subject) = existing_ca_params(&ca_path, &ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let (cert, key_pem) = issue_leaf(&issuer, name, identity, &[], false, Usage::Client)?;
    // Chain building matches a certificate's issuer to its CA's subject byte for byte; a CA
    // whose name rcgen cannot reproduce exactly (repeated or multi-valued attributes) would
    // yield certificates that every peer rejects, so refuse rather than write them.
    let issued_issuer = X509Certificate::from_der(cert.der())
        .map(|(_, issued)| issued.issuer().as_raw().to_vec())
        .unwrap_or_default();
    if issued_issuer != ca_subject {
        return Err(PkiError::UnusableCa {
            path: ca_path,
            reason: "its subject name cannot be reproduced exactly".to_owned(),
        });
    }
    // Key first: a certificate without its key is useless, a key without a certificate is
    // merely an orphan, and `AlreadyExists` above then points at it.
    let key_written = write_secret(&key_path, &key_pem)?;
    let cert_written = write_public(&cert_path, &cert.pem())?;
    Ok(vec![cert_written, key_written])
}

/// A client name becomes a file name: no separators, no dots, nothing a shell would expand.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name != "ca"
}

/// A URI SAN must be IA5 (ASCII) and, to be a URI at all, have a scheme.
fn is_valid_identity(identity: &str) -> bool {
    let Some((scheme, rest)) = identity.split_once(':') else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && identity.chars().all(|c| c.is_ascii_graphic())
}

fn new_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error(what))
}

/// Validity window starting (slightly before) now. rcgen speaks `time::OffsetDateTime`;
/// rather than depend on `time` for one conversion, the Unix epoch from rcgen's own
/// constructor plus the elapsed `std` duration gives the same instant.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(CLOCK_SKEW);
    params.not_after = epoch + since_epoch.saturating_add(lifetime);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, "Tessera (development only)");
    params.distinguished_name = name;
    // Path length 0: the development CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_VALIDITY);
    params
}

/// Issuer parameters for a CA certificate read from disk, and the CA's encoded subject name,
/// which certificates it issues must repeat exactly.
fn existing_ca_params(ca_path: &Path, ca_key: &KeyPair) -> Result<(CertificateParams, Vec<u8>), PkiError> {
    let unusable = |reason: String| PkiError::UnusableCa {
        path: ca_path.to_owned(),
        reason,
    };
    let ca_der = tessera_api::pem::load_certs(ca_path)
        .map_err(|err| unusable(err.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| unusable("no certificate".to_owned()))?;
    let (_, ca) =
        X509Certificate::from_der(&ca_der).map_err(|err| unusable(format!("does not parse: {err}")))?;

    use rcgen::PublicKeyData as _;
    if ca.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        return Err(unusable(format!("{CA_KEY} is not the key of {CA_CERT}")));
    }
    if !ca.is_ca() {
        return Err(unusable("the certificate is not a CA".to_owned()));
    }

    let mut name = DistinguishedName::new();
    for attribute in ca.subject().iter_attributes() {
        let oid: Vec<u64> = attribute
            .attr_type()
            .iter()
            .ok_or_else(|| unusable("subject attribute OID out of range".to_owned()))?
            .collect();
        let text = attribute
            .as_str()
            .map_err(|_| unusable("subject has a non-string attribute".to_owned()))?
            .to_owned();
        // Keep the ASN.1 string type the CA used, or the issuer name would not match.
        let value = match attribute.attr_value().header.tag() {
            x509_parser::der_parser::asn1_rs::Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| unusable("bad PrintableString in subject".to_owned()))?,
            ),
            _ => DnValue::Utf8String(text),
        };
        name.push(DnType::from_oid(&oid), value);
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Point the authority key identifier at the CA's own subject key identifier when it has one.
    for extension in ca.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(ski) = extension.parsed_extension() {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski.0.to_vec());
        }
    }
    Ok((params, ca.subject().as_raw().to_vec()))
}

/// Generates a key and a certificate for it signed by `issuer`; returns the certificate and
/// the key's PEM.
fn issue_leaf(
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    name: &str,
    identity: &str,
    dns_names: &[&str],
    loopback_ip: bool,
    usage: Usage,
) -> Result<(Certificate, Zeroizing<String>), PkiError> {
    let key = new_key(&format!("the key for {name}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Tessera (development only)");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let ia5 = |text: &str| {
        rcgen::string::Ia5String::try_from(text).map_err(|source| PkiError::Generate {
            what: format!("the subjectAltName {text:?} for {name}"),
            source,
        })
    };
    for dns in dns_names {
        params.subject_alt_names.push(SanType::DnsName(ia5(dns)?));
    }
    if loopback_ip {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
    params.subject_alt_names.push(SanType::URI(ia5(identity)?));
    set_validity(&mut params, LEAF_VALIDITY);

    let cert = params
        .signed_by(&key, issuer)
        .map_err(generate_error(&format!("the certificate for {name}")))?;
    Ok((cert, Zeroizing::new(key.serialize_pem())))
}

/// Writes a certificate (public) readable by everyone, replacing any old file atomically.
fn write_public(path: &Path, contents: &str) -> Result<PathBuf, PkiError> {
    write_atomically(path, contents.as_bytes(), 0o644)
}

/// Writes a private key readable by its owner only, replacing any old file atomically.
fn write_secret(path: &Path, contents: &Zeroizing<String>) -> Result<PathBuf, PkiError> {
    write_atomically(path, contents.as_bytes(), 0o600)
}

/// Writes to a fresh temporary file created with `mode` and renames it into place: the mode
/// only applies to newly created files, so overwriting in place (`--force`) could leave a key
/// behind an old, looser mode; and a crash never leaves a half-written file under the real name.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, PkiError> {
    let mut tmp_name = path
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A leftover from an interrupted run would make `create_new` fail.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error(&tmp)(err)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_error(path))?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_every_file_with_private_keys_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let InitOutcome::Created(created) = init(dir.path(), false).unwrap() else {
            panic!("expected a new PKI");
        };
        assert_eq!(created.len(), 12);
        for file in dev_files() {
            let path = dir.path().join(&file);
            let expected = if file.ends_with("-key.pem") { 0o600 } else { 0o644 };
            assert_eq!(mode(&path), expected, "{file}");
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 12);
    }

    #[test]
    fn init_without_force_keeps_an_existing_pki_and_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        let before = fs::read(dir.path().join(CA_CERT)).unwrap();
        fs::remove_file(dir.path().join("operator.pem")).unwrap();
        let InitOutcome::AlreadyPresent { missing } = init(dir.path(), false).unwrap() else {
            panic!("expected the PKI to be kept");
        };
        assert_eq!(missing, vec![dir.path().join("operator.pem")]);
        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), before);

        assert!(matches!(init(dir.path(), true).unwrap(), InitOutcome::Created(_)));
        assert_ne!(fs::read(dir.path().join(CA_CERT)).unwrap(), before);
        assert!(dir.path().join("operator.pem").exists());
    }

    #[test]
    fn leaves_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        for leaf in &DEV_LEAVES {
            let der = tessera_api::pem::load_certs(&dir.path().join(cert_file(leaf.name))).unwrap();
            assert_eq!(
                tessera_api::identity::uri_san(&der[0]).as_deref(),
                Some(leaf.identity)
            );
        }
    }

    #[test]
    fn client_is_issued_by_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        let written = issue_client(dir.path(), "checkout", "spiffe://tessera/checkout").unwrap();
        assert_eq!(
            written,
            vec![
                dir.path().join("checkout.pem"),
                dir.path().join("checkout-key.pem")
            ]
        );
        assert_eq!(mode(&dir.path().join("checkout-key.pem")), 0o600);

        let ca_der = &tessera_api::pem::load_certs(&dir.path().join(CA_CERT)).unwrap()[0];
        let leaf_der = &tessera_api::pem::load_certs(&dir.path().join("checkout.pem")).unwrap()[0];
        let (_, ca) = X509Certificate::from_der(ca_der).unwrap();
        let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        assert_eq!(
            tessera_api::identity::uri_san(leaf_der).as_deref(),
            Some("spiffe://tessera/checkout")
        );
    }

    #[test]
    fn client_refuses_bad_names_identities_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        for name in ["", "../evil", "a/b", "ca", "x.y", "with space"] {
            assert!(matches!(
                issue_client(dir.path(), name, "spiffe://tessera/x"),
                Err(PkiError::InvalidName(_))
            ));
        }
        for identity in ["", "no-scheme", "spiffe:", "spiffe://tessera/ü", "spiffe://a b"] {
            assert!(matches!(
                issue_client(dir.path(), "x", identity),
                Err(PkiError::InvalidIdentity(_))
            ));
        }
        assert!(matches!(
            issue_client(dir.path(), "vault", "spiffe://tessera/x"),
            Err(PkiError::AlreadyExists(_))
        ));
    }

    #[test]
    fn client_refuses_a_key_that_is_not_the_cas() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        fs::copy(dir.path().join("operator-key.pem"), dir.path().join(CA_KEY)).unwrap();
        assert!(matches!(
            issue_client(dir.path(), "x", "spiffe://tessera/x"),
            Err(PkiError::UnusableCa { .. })
        ));
    }

    #[test]
    fn validity_starts_before_now() {
        let mut params = CertificateParams::default();
        set_validity(&mut params, LEAF_VALIDITY);
        let now = rcgen::date_time_ymd(1970, 1, 1) + SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(params.not_before < now && now < params.not_after);
    }
}
