//! The vault's tamper-evident audit log: one line per operation on card data or keys, hash
//! chained and signed in blocks with an Ed25519 key derived from the master key. The format
//! and its verification live in `tessera_api::audit_format`, shared with `tessera audit verify`.
//!
//! Cost and durability: a call builds its lines outside the lock, then under the lock chains
//! them (one SHA-256 per line) and hands them to the kernel in a single `write` before the call
//! answers, so a crash of the vault process loses nothing that was acknowledged. Lines reach
//! the disk itself (fsync) once per `seal_interval_ms`, together with a block seal (one Ed25519
//! signature) if anything is unsigned; a block is also sealed in line once `block_lines` lines
//! are unsigned. A power failure can therefore lose up to one interval of lines, which the
//! verifier then reports as a truncated log; `sync_every_batch = true` trades one fsync per
//! call for losing nothing.
//!
//! Fail closed: when the log cannot be opened or a write or flush fails, the log turns
//! unavailable for the life of the process, the reason goes to the vault's log and to Status,
//! and every card-data operation is refused until the cause is fixed and the vault restarted.
//!
//! While the vault is sealed there is no signing key; lines (start, unseal attempts) are
//! chained and written as usual and the first block seal after unseal signs them.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tessera_api::audit_format::{hex, line_hash, push_hex, push_value, rfc3339_millis, seal_message, Entry};
pub use tessera_vault_core::audit::{AuditBatch, AuditSink, AuditUnavailable};
pub use tessera_vault_core::audit_key::AuditSigner;

use crate::config::AuditConfig;

/// How far from the end `open` looks for the last line.
const TAIL_WINDOW: u64 = 64 * 1024;

/// What Status reports about the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditStatus {
    /// "ok", "disabled" or "unavailable".
    pub state: &'static str,
    pub error: String,
    pub path: String,
    pub lines: u64,
    pub head: String,
    pub unsigned: u64,
    pub public_key: String,
}

struct Writer {
    file: File,
    next_seq: u64,
    head: [u8; 32],
    unsigned: u64,
    dirty: bool,
    signer: Option<Arc<AuditSigner>>,
}

enum State {
    Disabled,
    Open(Writer),
    Failed {
        reason: String,
        lines: u64,
        head: [u8; 32],
    },
}

/// The audit log of one vault process.
pub struct AuditLog {
    path: Option<PathBuf>,
    block_lines: u64,
    sync_every_batch: bool,
    available: AtomicBool,
    state: Mutex<State>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How the previous run left the log, for the start record.
fn describe_tail(entry: Option<&Entry<'_>>) -> &'static str {
    match entry {
        None => "empty",
        Some(entry) if entry.kind == "seal" && entry.field("final").as_deref() == Some("1") => "clean",
        Some(entry) if entry.kind == "seal" => "sealed-block",
        Some(_) => "unsigned",
    }
}

impl AuditLog {
    /// A log that records nothing (development mode without `[audit]`).
    pub fn disabled() -> AuditLog {
        AuditLog {
            path: None,
            block_lines: 1,
            sync_every_batch: false,
            available: AtomicBool::new(true),
            state: Mutex::new(State::Disabled),
        }
    }

    /// Opens (or creates) the log and finds the chain head. Never fails: a log that cannot be
    /// used is returned unavailable, which refuses card-data operations and shows in Status.
    /// Returns how the previous run left the log ("empty", "clean", "sealed-block", "unsigned").
    pub fn open(config: &AuditConfig) -> (AuditLog, &'static str) {
        let (state, tail) = match open_writer(&config.path) {
            Ok((writer, tail)) => (State::Open(writer), tail),
            Err(reason) => {
                tracing::error!(path = %config.path.display(), %reason, "AUDIT LOG UNAVAILABLE: card-data operations are refused");
                (
                    State::Failed {
                        reason,
                        lines: 0,
                        head: [0; 32],
                    },
                    "unreadable",
                )
            }
        };
        let available = matches!(state, State::Open(_));
        let log = AuditLog {
            path: Some(config.path.clone()),
            block_lines: config.block_lines,
            sync_every_batch: config.sync_every_batch,
            available: AtomicBool::new(available),
            state: Mutex::new(state),
        };
        (log, tail)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is completed before the guard drops; a panic elsewhere
        // cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether card-data operations may proceed (cheap; checked before any work is done).
    pub fn check(&self) -> Result<(), AuditUnavailable> {
        if self.available.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(AuditUnavailable)
        }
    }

    /// Starts the records of one call made by `caller`.
    pub fn batch(&self, caller: &str) -> AuditBatch {
        let enabled = self.path.is_some();
        let mut prefix = String::new();
        if enabled {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            prefix.push_str("record time=");
            prefix.push_str(&rfc3339_millis(millis));
            prefix.push_str(" caller=");
            push_value(&mut prefix, caller);
        }
        AuditBatch::new(enabled, prefix)
    }

    /// Chains and writes a call's records in one write. An error means the records are not
    /// in the log: the caller must not hand out the operation's result.
    pub fn append(&self, batch: &AuditBatch) -> Result<(), AuditUnavailable> {
        if !batch.is_enabled() || batch.is_empty() {
            return self.check();
        }
        let mut state = self.lock();
        let State::Open(writer) = &mut *state else {
            return match &*state {
                State::Disabled => Ok(()),
                _ => Err(AuditUnavailable),
            };
        };
        let mut out = String::with_capacity(batch.text_len() + batch.len() * 90 + 256);
        for body in batch.lines() {
            writer.push_line(&mut out, body);
        }
        if writer.unsigned >= self.block_lines {
            writer.push_seal(&mut out, false);
        }
        let written = writer.file.write_all(out.as_bytes()).and_then(|()| {
            writer.dirty = true;
            if self.sync_every_batch {
                writer.dirty = false;
                writer.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => Ok(()),
            Err(err) => {
                self.fail(&mut state, format!("write failed: {err}"));
                Err(AuditUnavailable)
            }
        }
    }

    fn fail(&self, state: &mut State, reason: String) {
        let (lines, head) = match &*state {
            State::Open(writer) => (writer.next_seq - 1, writer.head),
            State::Failed { lines, head, .. } => (*lines, *head),
            State::Disabled => return,
        };
        let path = self.path.as_deref().map(Path::display);
        tracing::error!(path = ?path, %reason, "AUDIT LOG UNAVAILABLE: card-data operations are refused until it is fixed and the vault restarted");
        self.available.store(false, Ordering::Release);
        *state = State::Failed { reason, lines, head };
    }

    /// Installs the signing key (at unseal), replaces it (at rekey) or removes it (at seal).
    /// What is unsigned is first signed with the key going away, so records written under
    /// one key (a rekey's record naming the next key, a seal's record) are vouched for by it.
    pub fn set_signer(&self, signer: Option<Arc<AuditSigner>>) {
        self.seal_block(false);
        if let State::Open(writer) = &mut *self.lock() {
            writer.signer = signer;
        }
    }

    /// Seals a block if anything is unsigned and flushes to disk: called every
    /// `seal_interval_ms` from a blocking thread.
    pub fn tick(&self) {
        self.seal_block(false);
    }

    /// The shutdown seal: signs everything (`final=1`) and flushes to disk.
    pub fn finish(&self) {
        self.seal_block(true);
    }

    fn seal_block(&self, final_seal: bool) {
        let file = {
            let mut state = self.lock();
            let State::Open(writer) = &mut *state else { return };
            if (writer.unsigned > 0 || final_seal) && writer.signer.is_some() {
                let mut out = String::with_capacity(256);
                writer.push_seal(&mut out, final_seal);
                if let Err(err) = writer.file.write_all(out.as_bytes()) {
                    self.fail(&mut state, format!("write failed: {err}"));
                    return;
                }
                writer.dirty = true;
            }
            if !writer.dirty {
                return;
            }
            writer.dirty = false;
            match writer.file.try_clone() {
                Ok(file) => file,
                Err(err) => {
                    self.fail(&mut state, format!("cannot flush: {err}"));
                    return;
                }
            }
        };
        // The flush runs outside the lock so calls keep writing meanwhile.
        if let Err(err) = file.sync_data() {
            self.fail(&mut self.lock(), format!("flush to disk failed: {err}"));
        }
    }

    pub fn status(&self) -> AuditStatus {
        let path = self
            .path
            .as_deref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        match &*self.lock() {
            State::Disabled => AuditStatus {
                state: "disabled",
                ..AuditStatus::default()
            },
            State::Open(writer) => AuditStatus {
                state: "ok",
                error: String::new(),
                path,
                lines: writer.next_seq - 1,
                head: hex(&writer.head),
                unsigned: writer.unsigned,
                public_key: writer
                    .signer
                    .as_ref()
                    .map(|signer| signer.public_key_hex().to_owned())
                    .unwrap_or_default(),
            },
            State::Failed { reason, lines, head } => AuditStatus {
                state: "unavailable",
                error: reason.clone(),
                path,
                lines: *lines,
                head: hex(head),
                ..AuditStatus::default()
            },
        }
    }
}

impl Writer {
    /// Appends `<seq> <prev> <body>\n` to `out` and moves the chain head.
    fn push_line(&mut self, out: &mut String, body: &str) {
        let start = out.len();
        // Writing to a String cannot fail.
        let _ = write!(out, "{} ", self.next_seq);
        push_hex(out, &self.head);
        out.push(' ');
        out.push_str(body);
        self.head = line_hash(out.get(start..).unwrap_or_default().as_bytes());
        out.push('\n');
        self.next_seq += 1;
        self.unsigned += 1;
    }

    /// Appends a signed block seal covering everything before it (no-op without a key).
    fn push_seal(&mut self, out: &mut String, final_seal: bool) {
        let Some(signer) = self.signer.clone() else { return };
        let start = out.len();
        let _ = write!(
            out,
            "{} {} seal key={} final={}",
            self.next_seq,
            hex(&self.head),
            signer.key_id(),
            u8::from(final_seal)
        );
        let signature = signer.sign(&seal_message(out.get(start..).unwrap_or_default()));
        out.push_str(" sig=");
        push_hex(out, &signature);
        self.head = line_hash(out.get(start..).unwrap_or_default().as_bytes());
        out.push('\n');
        self.next_seq += 1;
        self.unsigned = 0;
    }
}

/// The core's audit records go to this file.
impl AuditSink for AuditLog {
    fn check(&self) -> Result<(), AuditUnavailable> {
        AuditLog::check(self)
    }

    fn batch(&self, caller: &str) -> AuditBatch {
        AuditLog::batch(self, caller)
    }

    fn append(&self, batch: &AuditBatch) -> Result<(), AuditUnavailable> {
        AuditLog::append(self, batch)
    }
}

/// Opens the file for appending and reads the chain head from its last line.
fn open_writer(path: &Path) -> Result<(Writer, &'static str), String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|err| format!("cannot open: {err}"))?;
    let meta = file.metadata().map_err(|err| format!("cannot inspect: {err}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let len = meta.len();
    let window_start = len.saturating_sub(TAIL_WINDOW);
    let mut tail = vec![0u8; usize::try_from(len - window_start).map_err(|_| "too large".to_owned())?];
    file.read_exact_at(&mut tail, window_start)
        .map_err(|err| format!("cannot read: {err}"))?;
    let (next_seq, head, description) = match tail.split_last() {
        None => (1, [0u8; 32], describe_tail(None)),
        Some((b'\n', body)) => {
            let line = match body.iter().rposition(|&b| b == b'\n') {
                Some(newline) => body.get(newline + 1..).unwrap_or_default(),
                None if window_start == 0 => body,
                None => return Err("the last line is longer than 64 KiB: not an audit log".into()),
            };
            let text = std::str::from_utf8(line).map_err(|_| "the last line is not text".to_owned())?;
            let entry = Entry::parse(text).ok_or("the last line is not an audit entry")?;
            (entry.seq + 1, line_hash(line), describe_tail(Some(&entry)))
        }
        Some(_) => {
            return Err("the file ends in the middle of a line (a torn write); \
                 move it aside so a new log starts, and keep it for investigation"
                .into())
        }
    };
    Ok((
        Writer {
            file,
            next_seq,
            head,
            unsigned: 0,
            dirty: false,
            signer: None,
        },
        description,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use tessera_api::audit_format::{decode_hex, verify, VerifyOptions};
    use tessera_vault_core::keys::{MasterKey, SecretKey};
    use zeroize::Zeroizing;

    fn signer() -> Arc<AuditSigner> {
        let master = MasterKey::new(SecretKey::from_bytes(Zeroizing::new([9u8; 32])));
        Arc::new(AuditSigner::from_master(&master).unwrap())
    }

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit.log"),
            block_lines: 3,
            seal_interval_ms: 1000,
            sync_every_batch: false,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn public(signer: &AuditSigner) -> [u8; 32] {
        decode_hex(signer.public_key_hex()).unwrap()
    }

    #[test]
    fn the_same_master_key_gives_the_same_audit_key() {
        assert_eq!(signer().public_key_hex(), signer().public_key_hex());
        assert!(!format!("{:?}", signer()).contains(signer().public_key_hex()));
    }

    #[test]
    fn a_log_written_across_restarts_verifies() {
        let dir = scratch("restarts");
        let signer = signer();
        for run in 0..3 {
            let (log, tail) = AuditLog::open(&config(&dir));
            assert_eq!(tail, if run == 0 { "empty" } else { "clean" });
            let mut batch = log.batch("spiffe://tessera/gateway");
            batch.record("vault-start", "ok", &[]);
            log.append(&batch).unwrap();
            log.set_signer(Some(Arc::clone(&signer)));
            for item in 0..5 {
                let mut batch = log.batch("spiffe://tessera/gateway");
                batch.record(
                    "protect",
                    "ok",
                    &[("merchant", "m 1"), ("token", &format!("tok_{run}_{item}"))],
                );
                batch.record("reveal", "INVALID", &[("merchant", "m1"), ("purpose", "")]);
                log.append(&batch).unwrap();
            }
            log.tick();
            assert_eq!(log.status().unsigned, 0);
            log.finish();
        }
        let text = std::fs::read(dir.join("audit.log")).unwrap();
        let report = verify(&text, &public(&signer), VerifyOptions::default()).unwrap();
        assert!(report.clean_end && report.warnings.is_empty(), "{report:?}");
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("merchant=m%201"));
        assert!(!text.contains("purpose="));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_that_cannot_be_opened_is_unavailable() {
        let dir = scratch("unopenable");
        std::fs::write(dir.join("file"), b"x").unwrap();
        let mut config = config(&dir);
        config.path = dir.join("file").join("audit.log");
        let (log, _) = AuditLog::open(&config);
        assert_eq!(log.check(), Err(AuditUnavailable));
        let mut batch = log.batch("g");
        batch.record("protect", "ok", &[]);
        assert_eq!(log.append(&batch), Err(AuditUnavailable));
        let status = log.status();
        assert_eq!(status.state, "unavailable");
        assert!(status.error.contains("cannot open"), "{status:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_makes_the_log_unavailable() {
        let log = AuditLog {
            path: Some(PathBuf::from("/dev/full")),
            block_lines: 10,
            sync_every_batch: false,
            available: AtomicBool::new(true),
            state: Mutex::new(State::Open(Writer {
                file: std::fs::OpenOptions::new()
                    .append(true)
                    .open("/dev/full")
                    .unwrap(),
                next_seq: 1,
                head: [0; 32],
                unsigned: 0,
                dirty: false,
                signer: None,
            })),
        };
        let mut batch = log.batch("g");
        batch.record("protect", "ok", &[]);
        assert_eq!(log.append(&batch), Err(AuditUnavailable));
        assert_eq!(log.check(), Err(AuditUnavailable));
        assert!(log.status().error.contains("write failed"));
    }

    #[test]
    fn a_torn_tail_is_refused() {
        let dir = scratch("torn");
        std::fs::write(dir.join("audit.log"), b"1 00 record time=x").unwrap();
        let (log, _) = AuditLog::open(&config(&dir));
        assert!(log.status().error.contains("torn"), "{:?}", log.status());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn disabled_logs_record_nothing() {
        let log = AuditLog::disabled();
        let mut batch = log.batch("g");
        batch.record("protect", "ok", &[]);
        assert!(batch.is_empty());
        assert_eq!(log.append(&batch), Ok(()));
        assert_eq!(log.status().state, "disabled");
    }
}
