//! `tessera audit verify FILE --public-key KEY`: checks a vault audit log offline with the
//! verifier in `tessera_api::audit_format` (the CLI never links the vault).

use std::fmt;
use std::path::{Path, PathBuf};

use tessera_api::audit_format::{decode_hex, verify, Break, VerifyOptions, PUBLIC_KEY_LEN};

/// Why verification could not run or failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum VerifyError {
    /// The log or key file could not be read.
    Io { path: PathBuf, cause: std::io::Error },
    /// The public key is neither 64 hex digits nor a file holding them.
    Key(String),
    /// The log is broken; the first break.
    Broken(Break),
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, cause } => write!(f, "{}: {cause}", path.display()),
            Self::Key(why) => f.write_str(why),
            Self::Broken(at) => write!(f, "AUDIT LOG BROKEN at {at}"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// The key as 64 hex digits, or the path of a file whose first 64-hex-digit word is the key
/// (so the output of `tessera vault init` or `status` can be saved and passed as is).
fn public_key(argument: &str) -> Result<[u8; PUBLIC_KEY_LEN], VerifyError> {
    if let Some(key) = decode_hex::<PUBLIC_KEY_LEN>(argument.trim()) {
        return Ok(key);
    }
    let path = Path::new(argument);
    let text = std::fs::read_to_string(path).map_err(|cause| VerifyError::Io {
        path: path.to_owned(),
        cause,
    })?;
    text.split_whitespace()
        .find_map(decode_hex::<PUBLIC_KEY_LEN>)
        .ok_or_else(|| VerifyError::Key(format!("{argument} holds no 64-hex-digit public key")))
}

/// Verifies `file` and prints a summary; an error names the first break.
pub fn run(file: &Path, key: &str, allow_open_tail: bool) -> Result<(), VerifyError> {
    let key = public_key(key)?;
    let log = std::fs::read(file).map_err(|cause| VerifyError::Io {
        path: file.to_owned(),
        cause,
    })?;
    let report = verify(&log, &key, VerifyOptions { allow_open_tail }).map_err(VerifyError::Broken)?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "OK: {} lines, {} signed blocks, chain head {}",
        report.lines, report.seals, report.head
    );
    if let Some((_, handed_over)) = report.audit_keys.split_first() {
        for key in handed_over {
            println!("audit key rolled over (signed rekey record) to {key}");
        }
    }
    if report.clean_end {
        println!("the log ends with the vault's shutdown seal");
    } else if report.unsigned_tail > 0 {
        println!(
            "the last {} lines are not signed yet (open log: the vault is running or did not shut down cleanly)",
            report.unsigned_tail
        );
    } else {
        println!("the log ends with a block seal, not the shutdown seal (open log)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_come_inline_or_from_a_file() {
        let hex = "ab".repeat(32);
        assert_eq!(public_key(&hex).unwrap(), [0xab; 32]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        std::fs::write(&path, format!("audit public key: {hex}\n")).unwrap();
        assert_eq!(public_key(path.to_str().unwrap()).unwrap(), [0xab; 32]);
        std::fs::write(&path, "nothing").unwrap();
        assert!(matches!(
            public_key(path.to_str().unwrap()),
            Err(VerifyError::Key(_))
        ));
    }
}
