//! Where the master key comes from at start. Everything else in the vault sees only a loaded
//! [`MasterKey`]; an HSM would be another implementation of [`MasterKeySource`]. A sealed start
//! ([`crate::sealing`]) is not one: its key arrives after start, through the Unseal RPC.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::path::PathBuf;

use tessera_vault_core::crypto::Random;
use tessera_vault_core::keys::{MasterKey, SecretKey};
use zeroize::Zeroizing;

/// The first line of every development key file, so nobody mistakes it for a production key.
const DEVELOPMENT_BANNER: &str =
    "# TESSERA DEVELOPMENT MASTER KEY - NOT FOR PRODUCTION - anyone who reads this file can decrypt every token";

/// A master key that could not be loaded. Never contains key material.
#[derive(Debug)]
#[non_exhaustive]
pub enum MasterKeyError {
    /// The key file could not be read or created.
    Io { path: PathBuf, cause: std::io::Error },
    /// The key file does not hold a 256-bit key in hex.
    Malformed { path: PathBuf },
    /// The system random source failed.
    Random,
    /// This source is not allowed in the vault's mode.
    NotAllowed(&'static str),
}

impl fmt::Display for MasterKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, cause } => write!(f, "master key file {}: {cause}", path.display()),
            Self::Malformed { path } => {
                write!(
                    f,
                    "master key file {} does not hold a 64-hex-digit key",
                    path.display()
                )
            }
            Self::Random => f.write_str("the system random source failed"),
            Self::NotAllowed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for MasterKeyError {}

/// A place the master key can be loaded from.
pub trait MasterKeySource: fmt::Debug + Send + Sync {
    /// A short description for logs and the status RPC, e.g. "development key file".
    fn describe(&self) -> &'static str;
    /// Loads the key into vault memory.
    fn load(&self, rng: &Random) -> Result<MasterKey, MasterKeyError>;
}

/// A hex key file for development, created on first start when allowed.
#[derive(Debug, Clone)]
pub struct DevelopmentKeyFile {
    pub path: PathBuf,
    pub create_if_missing: bool,
}

impl MasterKeySource for DevelopmentKeyFile {
    fn describe(&self) -> &'static str {
        "development key file"
    }

    fn load(&self, rng: &Random) -> Result<MasterKey, MasterKeyError> {
        let io = |cause| MasterKeyError::Io {
            path: self.path.clone(),
            cause,
        };
        if !self.path.exists() && self.create_if_missing {
            self.create(rng).map_err(io)?;
        }
        let text = Zeroizing::new(std::fs::read_to_string(&self.path).map_err(io)?);
        let hex = text
            .lines()
            .find(|line| !line.starts_with('#') && !line.trim().is_empty())
            .unwrap_or("");
        let bytes = decode_hex_key(hex.trim()).ok_or_else(|| MasterKeyError::Malformed {
            path: self.path.clone(),
        })?;
        tracing::warn!(
            path = %self.path.display(),
            "USING A DEVELOPMENT MASTER KEY FROM A FILE - NOT FOR PRODUCTION"
        );
        Ok(MasterKey::new(SecretKey::from_bytes(bytes)))
    }
}

impl DevelopmentKeyFile {
    fn create(&self, rng: &Random) -> std::io::Result<()> {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill(key.as_mut_slice())
            .map_err(|_| std::io::Error::other("system random source failed"))?;
        let mut text = Zeroizing::new(String::with_capacity(256));
        text.push_str(DEVELOPMENT_BANNER);
        text.push('\n');
        for byte in key.iter() {
            // Formats straight into the zeroizing string: no intermediate copy of the key.
            write!(text, "{byte:02x}").map_err(|_| std::io::Error::other("formatting failed"))?;
        }
        text.push('\n');
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.path)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        tracing::warn!(path = %self.path.display(), "CREATED A DEVELOPMENT MASTER KEY - NOT FOR PRODUCTION");
        Ok(())
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Decodes exactly 64 hex digits into a zeroizing 32-byte key.
fn decode_hex_key(hex: &str) -> Option<Zeroizing<[u8; 32]>> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (byte, pair) in key.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let (high, low) = match pair {
            [high, low] => (hex_value(*high)?, hex_value(*low)?),
            _ => return None,
        };
        *byte = (high << 4) | low;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hex_keys() {
        assert!(decode_hex_key(&"ab".repeat(32)).is_some());
        assert!(decode_hex_key(&"ab".repeat(31)).is_none());
        assert!(decode_hex_key(&"zz".repeat(32)).is_none());
        assert_eq!(decode_hex_key(&"0f".repeat(32)).unwrap().first(), Some(&0x0f));
    }

    #[test]
    fn development_file_is_created_once_and_reloads_the_same_key() {
        let dir = std::env::temp_dir().join(format!("tessera-mk-{}", std::process::id()));
        let source = DevelopmentKeyFile {
            path: dir.join("dev-master-key"),
            create_if_missing: true,
        };
        let rng = Random::system();
        let first = source.load(&rng).unwrap().key_check_value();
        let second = source.load(&rng).unwrap().key_check_value();
        assert_eq!(first, second);
        let text = std::fs::read_to_string(&source.path).unwrap();
        assert!(text.starts_with(DEVELOPMENT_BANNER));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&source.path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_file_without_create_is_an_error() {
        let source = DevelopmentKeyFile {
            path: PathBuf::from("/nonexistent/tessera/key"),
            create_if_missing: false,
        };
        let err = source.load(&Random::system()).unwrap_err();
        assert!(matches!(err, MasterKeyError::Io { .. }));
    }
}
