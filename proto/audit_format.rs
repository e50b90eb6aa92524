//! The vault's audit log format (version 1) and its offline verification.
//!
//! The vault writes the log (signing stays in the vault); `tessera audit verify` and the tests
//! check it with [`verify`]. Both live here so the CLI never links the vault crate.
//!
//! # Format
//!
//! UTF-8 text, one entry per line, each line ending in `\n`:
//!
//! ```text
//! <seq> <prev> record time=<RFC 3339> event=<name> result=<ok|REASON> caller=<identity> [key=value ...]
//! <seq> <prev> seal key=<key id> final=<0|1> sig=<Ed25519 signature, hex>
//! ```
//!
//! - `seq` counts lines from 1 with no gaps; `prev` is the SHA-256 (hex) of the previous line's
//!   bytes without its newline, 64 zeros on line 1. Deleting, inserting, reordering or editing a
//!   line breaks the chain at or right after it.
//! - A `seal` line closes a block: its signature covers [`SEAL_LABEL`] followed by the line up
//!   to (not including) ` sig=`, i.e. its own `seq` (the number of lines before it, plus one) and
//!   `prev` (the chain head). One signature therefore vouches for every earlier line.
//! - `final=1` marks the seal written at a clean shutdown. A log whose last line is not a final
//!   seal was cut short, is still being written, or its vault stopped uncleanly; [`verify`] says
//!   which lines no signature covers.
//! - Values are percent-encoded: bytes outside `A-Z a-z 0-9 - _ . : / @ + , ~ *` become `%XX`,
//!   so a value never contains a space, `=` or a newline.
//! - Records never hold card data, CVCs, key material or key shares: only who, what, which
//!   merchant and token, why, when and with what result.

use std::fmt;

use ring::digest::{digest, SHA256};
use ring::signature::{UnparsedPublicKey, ED25519};

/// Prefix of the bytes every block seal signs, so an audit signature can never be replayed as
/// any other signature of the same key.
pub const SEAL_LABEL: &[u8] = b"tessera/audit-seal/v1\n";

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// SHA-256 of one line (without its newline): the next line's `prev`.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, line).as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends lower-case hex of `bytes` to `out` (on the audit hot path: one line per item).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = [0u8; 128];
    for chunk in bytes.chunks(buffer.len() / 2) {
        for (pair, byte) in buffer.chunks_exact_mut(2).zip(chunk) {
            if let [high, low] = pair {
                // A nibble is below 16: `get` never misses (and compiles to a plain load).
                *high = DIGITS.get(usize::from(byte >> 4)).copied().unwrap_or(b'0');
                *low = DIGITS.get(usize::from(byte & 0x0f)).copied().unwrap_or(b'0');
            }
        }
        let digits = buffer.get(..chunk.len() * 2).unwrap_or_default();
        // Hex digits are ASCII, so this never fails.
        out.push_str(std::str::from_utf8(digits).unwrap_or_default());
    }
}

/// Decodes hex (either case) of exactly `N` bytes.
pub fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let [high, low] = pair else { return None };
        *byte = (hex_digit(*high)? << 4) | hex_digit(*low)?;
    }
    Some(out)
}

fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// A short public name of an audit key: the first 8 bytes of SHA-256 of the public key, in hex.
pub fn key_id(public_key: &[u8]) -> String {
    hex(digest(&SHA256, public_key).as_ref().get(..8).unwrap_or_default())
}

fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-_.:/@+,~*".contains(&byte)
}

/// Appends `value` percent-encoded (see the module docs).
pub fn push_value(out: &mut String, value: &str) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    // Merchants, tokens and identities are nearly always plain: copy them in one go.
    if value.bytes().all(is_plain) {
        out.push_str(value);
        return;
    }
    for byte in value.bytes() {
        if is_plain(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            for nibble in [byte >> 4, byte & 0x0f] {
                out.extend(DIGITS.get(usize::from(nibble)).map(|&digit| char::from(digit)));
            }
        }
    }
}

/// Decodes a percent-encoded value; `None` when it is not valid encoding of UTF-8 text.
pub fn decode_value(value: &str) -> Option<String> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'%' => {
                let high = hex_digit(bytes.next()?)?;
                let low = hex_digit(bytes.next()?)?;
                out.push((high << 4) | low);
            }
            byte if is_plain(byte) => out.push(byte),
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `2026-11-21T22:06:01.123Z` for milliseconds since the Unix epoch (UTC, proleptic Gregorian).
pub fn rfc3339_millis(unix_millis: u64) -> String {
    crate::calendar::rfc3339_millis(i64::try_from(unix_millis).unwrap_or(i64::MAX))
}

/// The bytes a block seal signs: [`SEAL_LABEL`] and the seal line up to ` sig=`.
pub fn seal_message(unsigned_seal_line: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(SEAL_LABEL.len() + unsigned_seal_line.len());
    message.extend_from_slice(SEAL_LABEL);
    message.extend_from_slice(unsigned_seal_line.as_bytes());
    message
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The line's number in the chain, from 1.
    pub seq: u64,
    /// The previous line's hash, hex.
    pub prev: &'a str,
    /// `record` or `seal`.
    pub kind: &'a str,
    /// The `key=value` fields in order, values still encoded.
    pub fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Entry<'a> {
    /// Splits a line (without its newline) into its parts; `None` when it is not an entry.
    pub fn parse(line: &'a str) -> Option<Entry<'a>> {
        let mut parts = line.split(' ');
        let seq = parts.next()?;
        if seq.is_empty()
            || !seq.bytes().all(|b| b.is_ascii_digit())
            || (seq.len() > 1 && seq.starts_with('0'))
        {
            return None;
        }
        let seq = seq.parse().ok()?;
        let prev = parts.next()?;
        let kind = parts.next()?;
        let fields = parts
            .map(|part| part.split_once('='))
            .collect::<Option<Vec<_>>>()?;
        Some(Entry {
            seq,
            prev,
            kind,
            fields,
        })
    }

    /// The decoded value of `key`, if present.
    pub fn field(&self, key: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(name, _)| *name == key)
            .and_then(|(_, value)| decode_value(value))
    }
}

/// Where and why a log fails verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The line (= record number) at which the problem shows; 0 for the whole file.
    pub seq: u64,
    /// What is wrong, for an operator.
    pub why: String,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.seq == 0 {
            f.write_str(&self.why)
        } else {
            write!(f, "record {}: {}", self.seq, self.why)
        }
    }
}

impl std::error::Error for Break {}

/// What a successful verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Lines in the log (records and seals).
    pub lines: u64,
    /// Block seals among them.
    pub seals: u64,
    /// The hash of the last line, hex: an operator can note it to detect later truncation.
    pub head: String,
    /// Whether the log ends with the seal of a clean shutdown.
    pub clean_end: bool,
    /// Lines after the last seal, covered by no signature (accepted only with `allow_open_tail`).
    pub unsigned_tail: u64,
    /// Findings that do not break the chain but deserve a look.
    pub warnings: Vec<String>,
    /// The audit public keys (hex) that signed the log, in order: the one given, then each key
    /// a signed `rekey` record handed over to.
    pub audit_keys: Vec<String>,
}

/// How strict [`verify`] is about the end of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Accept a log that does not end with a shutdown seal (a running vault's log), reporting
    /// its unsigned tail in [`Verified::unsigned_tail`] instead of failing.
    pub allow_open_tail: bool,
}

/// Checks a whole log against the vault's audit public key and returns the first break.
pub fn verify(
    log: &[u8],
    public_key: &[u8; PUBLIC_KEY_LEN],
    options: VerifyOptions,
) -> Result<Verified, Break> {
    // The key that signs the current block. A `rekey` record names the next one; it takes
    // over only after a seal by the current key has vouched for that record.
    let mut signing_key = *public_key;
    let mut next_key: Option<[u8; PUBLIC_KEY_LEN]> = None;
    let mut report = Verified {
        audit_keys: vec![hex(public_key)],
        ..Verified::default()
    };
    let mut prev = [0u8; 32];
    let mut first_unsigned: Option<u64> = None;
    let mut last_was_final_seal = false;
    let mut rest = log;
    let mut seq = 0u64;
    while !rest.is_empty() {
        seq += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(Break {
                seq,
                why: "the last line is incomplete (no newline): the file was cut in the middle of a record"
                    .into(),
            });
        };
        let (raw, after) = rest.split_at(end);
        rest = after.get(1..).unwrap_or_default();
        let line = std::str::from_utf8(raw).map_err(|_| Break {
            seq,
            why: "the line is not UTF-8 text: it was altered".into(),
        })?;
        let entry = Entry::parse(line).ok_or_else(|| Break {
            seq,
            why: "the line is not a well-formed audit entry: it was altered".into(),
        })?;
        if entry.seq != seq {
            return Err(Break {
                seq,
                why: format!(
                    "the line carries record number {} where {seq} belongs: records were deleted, inserted or reordered",
                    entry.seq
                ),
            });
        }
        if decode_hex::<32>(entry.prev) != Some(prev) {
            let why = if seq == 1 {
                "the first record does not start the chain: records before it were removed".to_owned()
            } else {
                format!(
                    "it does not chain to record {}: record {} was altered, or records were deleted or reordered",
                    seq - 1,
                    seq - 1
                )
            };
            return Err(Break { seq, why });
        }
        match entry.kind {
            "record" => {
                if entry.field("time").is_none() || entry.field("event").is_none() {
                    return Err(Break {
                        seq,
                        why: "the record has no time or event: it was altered".into(),
                    });
                }
                if entry.field("event").as_deref() == Some("vault-start") && seq > 1 && !last_was_final_seal {
                    if let Some(first) = first_unsigned {
                        report.warnings.push(format!(
                            "records {first} to {} were written by a vault run that did not shut down cleanly; \
                             only signatures of later runs cover them",
                            seq - 1
                        ));
                    } else {
                        report.warnings.push(format!(
                            "the vault run before record {seq} did not end with a shutdown seal (crash or kill)"
                        ));
                    }
                }
                if entry.field("event").as_deref() == Some("rekey")
                    && entry.field("result").as_deref() == Some("ok")
                {
                    let named = entry.field("next_audit_key");
                    next_key = Some(
                        named
                            .as_deref()
                            .and_then(decode_hex::<PUBLIC_KEY_LEN>)
                            .ok_or_else(|| Break {
                                seq,
                                why: "the rekey record names no valid next audit key: it was altered".into(),
                            })?,
                    );
                }
                first_unsigned.get_or_insert(seq);
                last_was_final_seal = false;
            }
            "seal" => {
                let verifier = UnparsedPublicKey::new(&ED25519, &signing_key);
                check_seal(line, &entry, &key_id(&signing_key), &verifier)?;
                if let Some(next) = next_key.take() {
                    signing_key = next;
                    report.audit_keys.push(hex(&next));
                }
                report.seals += 1;
                first_unsigned = None;
                last_was_final_seal = entry.field("final").as_deref() == Some("1");
            }
            other => {
                return Err(Break {
                    seq,
                    why: format!("unknown entry kind {other:?}: the line was altered"),
                })
            }
        }
        prev = line_hash(raw);
    }
    if seq == 0 {
        return Err(Break {
            seq: 0,
            why: "the log is empty".into(),
        });
    }
    report.lines = seq;
    report.head = hex(&prev);
    report.clean_end = last_was_final_seal;
    if let Some(first) = first_unsigned {
        report.unsigned_tail = seq - first + 1;
        if !options.allow_open_tail {
            return Err(Break {
                seq: first,
                why: format!(
                    "records {first} to {seq} at the end are covered by no block signature: the log was \
                     truncated or edited at the end, its vault is still running, or it stopped without a \
                     clean shutdown"
                ),
            });
        }
    } else if !last_was_final_seal && !options.allow_open_tail {
        return Err(Break {
            seq,
            why: "the log ends with a block seal but not the shutdown seal: records after it were cut \
                  off, or its vault is still running or stopped without a clean shutdown"
                .into(),
        });
    }
    Ok(report)
}

fn check_seal(
    line: &str,
    entry: &Entry<'_>,
    expected_key_id: &str,
    verifier: &UnparsedPublicKey<&[u8; PUBLIC_KEY_LEN]>,
) -> Result<(), Break> {
    let seq = entry.seq;
    let broken = |why: &str| Break {
        seq,
        why: why.to_owned(),
    };
    let key = entry
        .field("key")
        .ok_or_else(|| broken("the block seal names no key: it was altered"))?;
    if key != expected_key_id {
        return Err(Break {
            seq,
            why: format!(
                "the block seal is by audit key {key}, not by the expected one ({expected_key_id}: the given public key, or the one a signed rekey record handed over to)"
            ),
        });
    }
    let final_flag = entry.field("final");
    if !matches!(final_flag.as_deref(), Some("0" | "1")) {
        return Err(broken("the block seal has no valid final flag: it was altered"));
    }
    let (unsigned, signature) = line
        .rsplit_once(" sig=")
        .ok_or_else(|| broken("the block seal has no signature: it was altered"))?;
    let signature = decode_hex::<64>(signature)
        .ok_or_else(|| broken("the block seal's signature is not 64 bytes of hex: it was altered"))?;
    verifier
        .verify(&seal_message(unsigned), &signature)
        .map_err(|_| broken("the block seal's signature does not verify: the seal was altered or forged"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn keypair() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap()
    }

    fn public(pair: &Ed25519KeyPair) -> [u8; 32] {
        pair.public_key().as_ref().try_into().unwrap()
    }

    /// A tiny writer mirroring the vault's, for tests of the verifier alone.
    fn write_log(pair: &Ed25519KeyPair, entries: &[&str]) -> String {
        write_log_signed_by(&[pair], entries)
    }

    /// Like `write_log`; a seal entry `seal F @N` is signed by `pairs[N]` (default 0).
    fn write_log_signed_by(pairs: &[&Ed25519KeyPair], entries: &[&str]) -> String {
        let mut out = String::new();
        let mut prev = [0u8; 32];
        for (index, body) in entries.iter().enumerate() {
            let seq = index + 1;
            let mut line = format!("{seq} {} ", hex(&prev));
            if let Some(seal) = body.strip_prefix("seal") {
                let (final_flag, signer) = seal.split_once('@').unwrap_or((seal, "0"));
                let pair = pairs[signer.trim().parse::<usize>().unwrap()];
                line.push_str(&format!(
                    "seal key={} final={}",
                    key_id(pair.public_key().as_ref()),
                    final_flag.trim()
                ));
                let sig = pair.sign(&seal_message(&line));
                line.push_str(" sig=");
                line.push_str(&hex(sig.as_ref()));
            } else {
                line.push_str("record time=2026-01-01T00:00:00.000Z ");
                line.push_str(body);
            }
            prev = line_hash(line.as_bytes());
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn sample(pair: &Ed25519KeyPair) -> String {
        write_log(
            pair,
            &[
                "event=vault-start result=ok caller=",
                "event=protect result=ok caller=spiffe://tessera/gateway merchant=m1 token=tok_a",
                "event=reveal result=ok caller=spiffe://tessera/gateway merchant=m1 token=tok_a",
                "seal 0",
                "event=protect result=ok caller=spiffe://tessera/gateway merchant=m1 token=tok_b",
                "event=vault-stop result=ok caller=",
                "seal 1",
            ],
        )
    }

    fn lines(log: &str) -> Vec<String> {
        log.lines().map(str::to_owned).collect()
    }

    fn join(lines: &[String]) -> String {
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    #[test]
    fn values_round_trip() {
        for value in ["", "plain", "a b=c\nd", "spiffe://tessera/gateway", "ü%"] {
            let mut encoded = String::new();
            push_value(&mut encoded, value);
            assert!(!encoded.contains([' ', '=', '\n']));
            assert_eq!(decode_value(&encoded).as_deref(), Some(value));
        }
        assert_eq!(decode_value("%zz"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(1_795_298_761_123), "2026-11-21T22:06:01.123Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_audit_key_rolls_over_only_through_a_rekey_record_the_old_key_signed() {
        let old = keypair();
        let new = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap();
        let rekey = format!(
            "event=rekey result=ok caller=op next_audit_key={}",
            hex(&public(&new))
        );
        let entries = [
            "event=vault-start result=ok caller=",
            rekey.as_str(),
            "seal 0 @0",
            "event=protect result=ok caller=gw merchant=m1 token=tok_a",
            "seal 1 @1",
        ];
        let log = write_log_signed_by(&[&old, &new], &entries);
        let report = verify(log.as_bytes(), &public(&old), VerifyOptions::default()).unwrap();
        assert_eq!(report.audit_keys, vec![hex(&public(&old)), hex(&public(&new))]);

        // The new key signing the block that holds its own rekey record proves nothing.
        let early = write_log_signed_by(&[&old, &new], &[entries[0], entries[1], "seal 0 @1"]);
        assert_eq!(
            verify(early.as_bytes(), &public(&old), VerifyOptions::default())
                .unwrap_err()
                .seq,
            3
        );
        // Without a rekey record the old key stays the only one accepted.
        let unannounced =
            write_log_signed_by(&[&old, &new], &[entries[0], "seal 0 @0", entries[3], "seal 1 @1"]);
        assert_eq!(
            verify(unannounced.as_bytes(), &public(&old), VerifyOptions::default())
                .unwrap_err()
                .seq,
            4
        );
    }

    #[test]
    fn a_clean_log_verifies() {
        let pair = keypair();
        let report = verify(sample(&pair).as_bytes(), &public(&pair), VerifyOptions::default()).unwrap();
        assert_eq!(report.lines, 7);
        assert_eq!(report.seals, 2);
        assert!(report.clean_end);
        assert!(report.warnings.is_empty());
    }

    #[test]
    fn another_key_is_refused() {
        let pair = keypair();
        let other = Ed25519KeyPair::from_seed_unchecked(&[8u8; 32]).unwrap();
        let err = verify(
            sample(&pair).as_bytes(),
            &public(&other),
            VerifyOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.seq, 4);
        assert!(err.why.contains("not by the expected one"), "{err}");
    }

    #[test]
    fn every_kind_of_tampering_is_found() {
        let pair = keypair();
        let key = public(&pair);
        let original = lines(&sample(&pair));
        let check = |tampered: Vec<String>, seq: u64, words: &str| {
            let err = verify(join(&tampered).as_bytes(), &key, VerifyOptions::default()).unwrap_err();
            assert_eq!(err.seq, seq, "{err}");
            assert!(err.why.contains(words), "{err}");
        };
        let mut deleted = original.clone();
        deleted.remove(1);
        check(deleted, 2, "record number 3");
        let mut edited = original.clone();
        edited[1] = edited[1].replace("tok_a", "tok_x");
        check(edited, 3, "record 2 was altered");
        let mut swapped = original.clone();
        swapped.swap(1, 2);
        check(swapped, 2, "record number 3");
        let mut truncated = original.clone();
        truncated.truncate(5);
        check(truncated, 5, "covered by no block signature");
        let mut cut_at_seal = original.clone();
        cut_at_seal.truncate(4);
        check(cut_at_seal, 4, "not the shutdown seal");
        let mut forged = original.clone();
        forged[6] = forged[6].replace("final=1", "final=0");
        check(forged, 7, "does not verify");
        let mut headless = original.clone();
        headless.remove(0);
        check(headless, 1, "record number 2");
        let torn = &sample(&pair)[..sample(&pair).len() - 3];
        let err = verify(torn.as_bytes(), &key, VerifyOptions::default()).unwrap_err();
        assert!(err.why.contains("incomplete"), "{err}");
    }

    #[test]
    fn an_open_tail_is_accepted_only_when_asked() {
        let pair = keypair();
        let mut open = lines(&sample(&pair));
        open.truncate(5);
        let report = verify(
            join(&open).as_bytes(),
            &public(&pair),
            VerifyOptions {
                allow_open_tail: true,
            },
        )
        .unwrap();
        assert_eq!(report.unsigned_tail, 1);
        assert!(!report.clean_end);
    }

    #[test]
    fn an_unclean_restart_is_a_warning() {
        let pair = keypair();
        let log = write_log(
            &pair,
            &[
                "event=vault-start result=ok caller=",
                "event=protect result=ok caller=g merchant=m1 token=tok_a",
                "event=vault-start result=ok caller=",
                "seal 1",
            ],
        );
        let report = verify(log.as_bytes(), &public(&pair), VerifyOptions::default()).unwrap();
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(report.warnings[0].contains("records 1 to 2"));
    }
}
