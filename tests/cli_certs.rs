//! `tessera certs init` and `tessera certs client`, run as the real binary through the test
//! harness: the files they write, their modes, their identities, and that rustls accepts each
//! certificate for exactly the role it is meant for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tessera_api::identity::uri_san;
use tessera_api::pem::load_certs;

use common::{binaries, run_tessera, Pki};

/// (file stem, URI SAN, DNS names a server certificate must be valid for; empty for clients).
const EXPECTED: [(&str, &str, &[&str]); 5] = [
    (
        "vault",
        "spiffe://tessera/vault",
        &["tessera-vault", "localhost", "127.0.0.1"],
    ),
    (
        "gateway",
        "spiffe://tessera/gateway-server",
        &["tessera-gateway", "localhost", "127.0.0.1"],
    ),
    ("gateway-client", "spiffe://tessera/gateway", &[]),
    ("operator", "spiffe://tessera/operator", &[]),
    ("dev-client", "spiffe://tessera/dev-client", &[]),
];

fn all_files() -> Vec<String> {
    let mut files = vec!["ca.pem".to_owned(), "ca-key.pem".to_owned()];
    for (name, _, _) in EXPECTED {
        files.push(format!("{name}.pem"));
        files.push(format!("{name}-key.pem"));
    }
    files
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    all_files()
        .into_iter()
        .map(|file| (file.clone(), fs::read(dir.join(&file)).unwrap()))
        .collect()
}

fn leaf(path: &Path) -> CertificateDer<'static> {
    let mut certs = load_certs(path).unwrap();
    assert_eq!(certs.len(), 1, "{} holds one certificate", path.display());
    certs.remove(0)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pki: &Pki) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&pki.ca()).unwrap() {
        roots.add(ca).unwrap();
    }
    Arc::new(roots)
}

/// Whether rustls, trusting only this PKI's CA, accepts `cert` as a client certificate.
fn accepted_as_client(pki: &Pki, cert: &Path) -> bool {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(pki), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&leaf(cert), &[], UnixTime::now())
        .is_ok()
}

/// Whether rustls, trusting only this PKI's CA, accepts `cert` as the server `name`.
fn accepted_as_server(pki: &Pki, cert: &Path, name: &str) -> bool {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(pki), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(&leaf(cert), &[], &name, &[], UnixTime::now())
        .is_ok()
}

#[test]
fn init_creates_the_development_pki() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let output = run_tessera([
        "certs".as_ref(),
        "init".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("development only"),
        "warning missing from:\n{stdout}"
    );
    assert!(
        stdout.contains("certs/README.md"),
        "README pointer missing from:\n{stdout}"
    );

    let mut present: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    present.sort();
    let mut expected = all_files();
    expected.sort();
    assert_eq!(present, expected, "exactly the 12 files, nothing left over");

    for file in all_files() {
        let mode = fs::metadata(dir.join(&file)).unwrap().permissions().mode() & 0o777;
        if file.ends_with("-key.pem") {
            assert_eq!(mode, 0o600, "{file} must be readable by its owner only");
        } else {
            assert_eq!(mode & 0o022, 0, "{file} must not be writable by group or others");
        }
    }
}

#[test]
fn every_certificate_carries_its_identity_and_is_valid_for_its_role_only() {
    let pki = Pki::new();

    let ca = leaf(&pki.ca());
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca).unwrap();
    assert!(parsed.is_ca());
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(common_name, "Tessera Development CA");

    for (name, identity, server_names) in EXPECTED {
        let cert = pki.cert(name);
        assert_eq!(uri_san(&leaf(&cert)).as_deref(), Some(identity), "{name}.pem");
        // Whether the key matches the certificate is checked when a server or client loads the
        // pair; here it is enough that the key parses.
        tessera_api::pem::load_private_key(&pki.key(name)).unwrap();

        if server_names.is_empty() {
            assert!(
                accepted_as_client(&pki, &cert),
                "{name} is a valid client certificate"
            );
            assert!(
                !accepted_as_server(&pki, &cert, "localhost"),
                "{name} must not serve TLS"
            );
        } else {
            for server_name in server_names {
                assert!(
                    accepted_as_server(&pki, &cert, server_name),
                    "{name} is valid for {server_name}"
                );
            }
            assert!(
                !accepted_as_client(&pki, &cert),
                "{name} must not authenticate as a client"
            );
        }
    }
    assert!(!accepted_as_server(&pki, &pki.cert("vault"), "tessera-gateway"));
    assert!(!accepted_as_server(&pki, &pki.cert("gateway"), "tessera-vault"));

    // Another run's CA trusts none of these certificates.
    let other = Pki::new();
    assert!(!accepted_as_client(&other, &pki.cert("dev-client")));
    assert!(!accepted_as_server(
        &other,
        &pki.cert("gateway"),
        "tessera-gateway"
    ));
}

#[test]
fn init_without_force_changes_nothing_and_force_replaces_everything() {
    let pki = Pki::new();
    let before = snapshot(pki.dir());

    let output = run_tessera([
        "certs".as_ref(),
        "init".as_ref(),
        "--dir".as_ref(),
        pki.dir().as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("already exists"), "unexpected output:\n{stdout}");
    assert_eq!(
        snapshot(pki.dir()),
        before,
        "re-running without --force must not touch any file"
    );

    run_tessera([
        "certs".as_ref(),
        "init".as_ref(),
        "--dir".as_ref(),
        pki.dir().as_os_str(),
        "--force".as_ref(),
    ]);
    let after = snapshot(pki.dir());
    for ((file, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "--force must replace {file}");
    }
    let key_mode = fs::metadata(pki.key("vault")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "replaced keys stay owner-only");
}

#[test]
fn client_issues_a_certificate_with_the_requested_identity() {
    let pki = Pki::new();
    pki.client("checkout", "spiffe://tessera/checkout");

    let cert = pki.cert("checkout");
    assert_eq!(
        uri_san(&leaf(&cert)).as_deref(),
        Some("spiffe://tessera/checkout")
    );
    let mode = fs::metadata(pki.key("checkout")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    tessera_api::pem::load_private_key(&pki.key("checkout")).unwrap();
    assert!(accepted_as_client(&pki, &cert), "issued by the PKI's own CA");
    assert!(!accepted_as_server(&pki, &cert, "localhost"));
}

#[test]
fn client_refuses_to_overwrite_or_escape_the_directory() {
    let pki = Pki::new();
    let tessera = binaries().tessera;
    let before = snapshot(pki.dir());
    for (name, identity) in [
        ("vault", "spiffe://tessera/evil"),
        ("../outside", "spiffe://tessera/evil"),
        ("fine", "not a uri"),
    ] {
        let output = Command::new(&tessera)
            .args(["certs", "client", "--dir"])
            .arg(pki.dir())
            .args(["--name", name, "--identity", identity])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name} / {identity} must be refused");
        assert!(!output.stderr.is_empty(), "a refusal says why");
    }
    assert_eq!(snapshot(pki.dir()), before);
    assert!(!pki.dir().join("../outside.pem").exists());
}

#[test]
fn harness_helpers_work() {
    let port = common::free_port();
    assert_ne!(port, 0);
    // The grpcurl helpers agree with each other: when grpcurl is on PATH it runs.
    if common::grpcurl_path().is_some() {
        let output = common::run_grpcurl(["-version"]).unwrap();
        assert!(output.status.success(), "grpcurl -version failed: {output:?}");
    }
}
