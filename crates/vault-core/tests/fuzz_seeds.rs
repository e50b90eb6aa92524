//! Replays the fuzz targets' committed seeds (`fuzz/seeds/TARGET/`) through the same checks
//! libFuzzer runs, on every `cargo test` and without libFuzzer or a nightly toolchain. It also
//! pins what each seed is for, so a change to the blob or record format that leaves the seeds
//! stale (and the fuzzer starting from nothing but garbage) fails here instead of going unseen.
//!
//! After such a change, rewrite the seeds with
//! `cargo test -p tessera-vault-core --test fuzz_seeds -- --ignored write_` and commit them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

// The fuzz crate has a workspace of its own (so the main build never compiles libFuzzer); its
// checks are plain functions over the vault's public API, included here by path.
#[path = "../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};

use tessera_api::vault::{secret_data, BankAccount, Card, Contact, SecretData};
use tessera_vault_core::card::ValidCard;
use tessera_vault_core::crypto::Random;
use tessera_vault_core::keys::{DataKey, KeyId, KeyPurpose, MasterKey, SecretKey};
use tessera_vault_core::record::{seal_card, seal_data, NonceSequence, RecordError};
use zeroize::Zeroizing;

fn seed_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

/// Every seed of `target`, by file name, in name order. A target without seeds is an error.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seed_dir(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `check` on every seed and compares with `expected` for the seeds it names; a seed it
/// does not name is only required not to panic.
fn replay<T: PartialEq + std::fmt::Debug>(target: &str, check: fn(&[u8]) -> T, expected: &[(&str, T)]) {
    let seeds = seeds(target);
    for (name, _) in expected {
        assert!(
            seeds.iter().any(|(seed, _)| seed == name),
            "seed {target}/{name} is missing"
        );
    }
    for (name, bytes) in &seeds {
        let got = check(bytes);
        if let Some((_, want)) = expected.iter().find(|(seed, _)| seed == name) {
            assert_eq!(&got, want, "seed {target}/{name}");
        }
    }
}

#[test]
fn unwrap_blob_seeds() {
    replay(
        "unwrap_blob",
        fuzz_checks::unwrap_blob,
        &[
            ("empty", None),
            ("truncated", None),
            ("unknown_format", None),
            ("valid_data_key", Some(KeyPurpose::Data)),
            ("valid_fingerprint_key", Some(KeyPurpose::Fingerprint)),
            ("other_merchant", None),
            ("other_version", None),
        ],
    );
}

#[test]
fn open_record_seeds() {
    replay(
        "open_record",
        fuzz_checks::open_record,
        &[
            ("tampered", Err(RecordError::Integrity)),
            ("truncated", Err(RecordError::Truncated)),
            ("unknown_format", Err(RecordError::Format)),
            ("valid_bank_account", Ok("bank_account")),
            ("valid_card", Ok("card")),
            ("valid_contact", Ok("contact")),
            ("valid_empty", Ok("empty")),
            ("valid_not_a_record", Ok("undecodable")),
        ],
    );
}

#[test]
fn parse_card_number_seeds() {
    replay(
        "parse_card_number",
        fuzz_checks::parse_card_number,
        &[
            ("amex_dashed", true),
            ("diners_14", true),
            ("letters", false),
            ("luhn_fail", false),
            ("mastercard_2series", true),
            ("too_long", false),
            ("unicode_digits", false),
            ("visa_spaced", true),
        ],
    );
}

fn write_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = seed_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(Path::new(&dir).join(name), bytes).unwrap();
    }
}

fn with_first_byte(bytes: &[u8], first: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[0] = first;
    out
}

/// Rewrites the `unwrap_blob` seeds: blobs wrapped under the fuzz master key for the fuzz
/// merchant (and, to be refused, for another merchant and version), plus damaged ones.
#[test]
#[ignore = "writes seed files; run by hand after a blob format change"]
fn write_unwrap_blob_seeds() {
    let rng = Random::system();
    let master = MasterKey::new(SecretKey::from_bytes(Zeroizing::new(fuzz_checks::MASTER_KEY)));
    let id = |merchant: &str, purpose, version| KeyId {
        merchant_id: merchant.into(),
        purpose,
        version,
    };
    let merchant = fuzz_checks::MERCHANT;
    let data = master
        .create_key(&id(merchant, KeyPurpose::Data, 1), &rng)
        .unwrap();
    let fingerprint = master
        .create_key(&id(merchant, KeyPurpose::Fingerprint, 1), &rng)
        .unwrap();
    let other_merchant = master
        .create_key(&id("other-merchant", KeyPurpose::Data, 1), &rng)
        .unwrap();
    let other_version = master
        .create_key(&id(merchant, KeyPurpose::Data, 2), &rng)
        .unwrap();
    write_seeds(
        "unwrap_blob",
        &[
            ("empty", Vec::new()),
            ("truncated", data[..20].to_vec()),
            ("unknown_format", with_first_byte(&data, 0x02)),
            ("other_merchant", other_merchant),
            ("other_version", other_version),
            ("valid_fingerprint_key", fingerprint),
            ("valid_data_key", data),
        ],
    );
}

/// Rewrites the `open_record` seeds: records sealed under the fuzz data key and binding as
/// Protect seals them (one per kind of data), plus damaged ones.
#[test]
#[ignore = "writes seed files; run by hand after a record format change"]
fn write_open_record_seeds() {
    let key = DataKey::new(SecretKey::from_bytes(Zeroizing::new(fuzz_checks::DATA_KEY))).unwrap();
    let nonces = NonceSequence::new(&Random::system()).unwrap();
    let aad = &fuzz_checks::AAD;
    let seal =
        |data: secret_data::Data| seal_data(&key, &nonces, aad, &SecretData { data: Some(data) }).unwrap();
    let card = ValidCard::from_proto(
        &Card {
            number: "5555 5555 5555 4444".into(),
            expiry_month: 4,
            expiry_year: 2031,
            holder_name: "Grace Hopper".into(),
        },
        (2025, 1),
    )
    .unwrap();
    let valid_card = seal_card(&key, &nonces, aad, &card).unwrap();
    let mut tampered = valid_card.clone();
    *tampered.last_mut().unwrap() ^= 1;
    write_seeds(
        "open_record",
        &[
            ("truncated", valid_card[..28].to_vec()),
            ("unknown_format", with_first_byte(&valid_card, 0x02)),
            ("tampered", tampered),
            (
                "valid_bank_account",
                seal(secret_data::Data::BankAccount(BankAccount {
                    iban: "GB82WEST12345698765432".into(),
                    bic: "NWBKGB2L".into(),
                    holder_name: "Ada Lovelace".into(),
                })),
            ),
            (
                "valid_contact",
                seal(secret_data::Data::Contact(Contact {
                    email: "ada@example.com".into(),
                    phone: String::new(),
                })),
            ),
            ("valid_empty", key.seal(&nonces, aad, b"").unwrap()),
            ("valid_not_a_record", key.seal(&nonces, aad, &[0xff; 3]).unwrap()),
            ("valid_card", valid_card),
        ],
    );
}
