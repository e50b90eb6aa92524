//! The vault process's side of the operations: sealed start (init, unseal, seal, rekey, retire)
//! with its state file, the status report and the start, stop and refusal records. The data
//! operations (keys, protect, reveal, re-encryption, re-wrapping) are the core's
//! (`tessera_vault_core::vault`); the gRPC layer ([`crate::grpc`]) authenticates the caller and
//! hands each decoded request here.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tessera_api::vault::{
    CreateKeysRequest, CreateKeysResponse, EchoRequest, EchoResponse, InitRequest, InitResponse,
    ProtectRequest, ProtectResponse, ReencryptRequest, ReencryptResponse, RekeyRequest, RekeyResponse,
    RetireMasterKeysResponse, RevealRequest, RevealResponse, RewrapKeysRequest, RewrapKeysResponse,
    SealResponse, StatusResponse, UnsealRequest, UnsealResponse,
};
use tessera_vault_core::audit::AuditBatch;
use tessera_vault_core::audit_key::AuditSigner;
pub use tessera_vault_core::error::VaultError;
use tessera_vault_core::keys::MasterKey;
use tessera_vault_core::vault::{Clock, Vault};
pub use tessera_vault_core::vault::{VaultLimits, MAX_BATCH_ITEMS};

use crate::audit::AuditLog;
use crate::config::Mode;
use crate::hardening::{is_debug_build, HardeningReport};
use crate::sealing::{SealError, SealedStart, Submitted};

/// The audit log's caller for what the vault does on its own (start, stop). Client identities
/// are URIs, so this name cannot be confused with one.
const SELF: &str = "vault";

/// What the vault knows about itself, fixed at start.
#[derive(Debug, Clone)]
pub struct VaultFacts {
    pub mode: Mode,
    pub master_key_source: &'static str,
    pub hardening: HardeningReport,
}

/// Where the master key comes from at start.
#[derive(Debug)]
pub enum KeySource {
    /// Already loaded (the development key file), with any previous master keys a KEK
    /// rotation is retiring (unwrap only).
    Loaded {
        master: MasterKey,
        previous: Vec<MasterKey>,
    },
    /// Sealed start: nothing is loaded until custodians unseal with key shares.
    Sealed(SealedStart),
}

/// The system clock, for the core.
#[derive(Debug, Clone, Copy)]
struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_seconds(&self) -> u64 {
        // A clock set before 1970 is broken beyond what expiry checks can help with; treating it
        // as 1970 accepts any unexpired-looking date rather than refusing every card.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0)
    }
}

/// The running vault: the core, sealed start, the audit log and what the vault knows about
/// itself.
pub struct VaultService {
    core: Vault,
    sealed_start: Option<SealedStart>,
    facts: VaultFacts,
    audit: Arc<AuditLog>,
}

impl fmt::Debug for VaultService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultService")
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

/// The audit public key (hex) that `master` derives, for the seal state file.
fn audit_public_key_of(master: &MasterKey) -> Result<String, SealError> {
    signer_for(master)
        .map(|signer| signer.public_key_hex().to_owned())
        .map_err(|_| SealError::Random)
}

fn signer_for(master: &MasterKey) -> Result<Arc<AuditSigner>, VaultError> {
    AuditSigner::from_master(master)
        .map(Arc::new)
        .map_err(|_| VaultError::AuditKeyFailed)
}

impl VaultService {
    pub fn new(
        source: KeySource,
        audit: AuditLog,
        limits: VaultLimits,
        facts: VaultFacts,
    ) -> Result<Self, VaultError> {
        let audit = Arc::new(audit);
        let core = Vault::new(audit.clone(), Arc::new(SystemClock), limits)?;
        let sealed_start = match source {
            KeySource::Loaded { master, previous } => {
                audit.set_signer(Some(signer_for(&master)?));
                core.install(Arc::new(master), previous.into_iter().map(Arc::new).collect());
                None
            }
            KeySource::Sealed(sealed) => Some(sealed),
        };
        Ok(Self {
            core,
            sealed_start,
            facts,
            audit,
        })
    }

    /// Writes a call's audit records; on failure the call's result must not be handed out.
    fn commit(&self, batch: &AuditBatch) -> Result<(), VaultError> {
        self.core.commit(batch)
    }

    /// The first audit record of a run: how the vault started and how the last run left the log.
    pub fn record_start(&self, prior_log: &str) {
        let mut batch = self.audit.batch(SELF);
        batch.record(
            "vault-start",
            "ok",
            &[
                ("mode", self.facts.mode.as_str()),
                ("master_key_source", self.facts.master_key_source),
                ("version", env!("CARGO_PKG_VERSION")),
                ("prior_log", prior_log),
            ],
        );
        let _ = self.audit.append(&batch);
    }

    /// The last audit record of a run, and the shutdown seal.
    pub fn record_stop(&self) {
        let mut batch = self.audit.batch(SELF);
        batch.record("vault-stop", "ok", &[]);
        let _ = self.audit.append(&batch);
        self.audit.finish();
    }

    /// A call refused before it reached an operation (identity or role not allowed).
    pub fn record_refusal(&self, caller: &str, method: &str, reason: &str) {
        let mut batch = self.audit.batch(caller);
        batch.record("refused", reason, &[("method", method)]);
        let _ = self.audit.append(&batch);
    }

    /// Seals a block if anything is unsigned and flushes the audit log to disk.
    pub fn audit_tick(&self) {
        self.audit.tick();
    }

    /// Wipes CVCs whose time ran out; the server calls this periodically.
    pub fn purge_expired_cvcs(&self) -> usize {
        self.core.purge_expired_cvcs()
    }

    /// See [`Vault::create_keys`].
    pub fn create_keys(
        &self,
        caller: &str,
        request: &CreateKeysRequest,
    ) -> Result<CreateKeysResponse, VaultError> {
        self.core.create_keys(caller, request)
    }

    /// See [`Vault::protect`].
    pub fn protect(&self, caller: &str, request: &ProtectRequest) -> Result<ProtectResponse, VaultError> {
        self.core.protect(caller, request)
    }

    /// See [`Vault::reveal`].
    pub fn reveal(&self, caller: &str, request: &RevealRequest) -> Result<RevealResponse, VaultError> {
        self.core.reveal(caller, request)
    }

    /// See [`Vault::reencrypt`].
    pub fn reencrypt(
        &self,
        caller: &str,
        request: &ReencryptRequest,
    ) -> Result<ReencryptResponse, VaultError> {
        self.core.reencrypt(caller, request)
    }

    /// See [`Vault::rewrap_keys`].
    pub fn rewrap_keys(
        &self,
        caller: &str,
        request: &RewrapKeysRequest,
    ) -> Result<RewrapKeysResponse, VaultError> {
        self.core.rewrap_keys(caller, request)
    }

    /// See [`Vault::echo`].
    pub fn echo(&self, request: &EchoRequest) -> Result<EchoResponse, VaultError> {
        self.core.echo(request)
    }

    fn sealed_start(&self) -> Result<&SealedStart, VaultError> {
        self.sealed_start.as_ref().ok_or(VaultError::NotASealedVault)
    }

    /// Creates the master key of a sealed vault and returns its shares, once. The vault stays
    /// sealed: custodians unseal it with their shares, proving they work before any data is
    /// encrypted under the key.
    pub fn init(&self, caller: &str, request: &InitRequest) -> Result<InitResponse, VaultError> {
        let sealed = self.sealed_start()?;
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        let outcome = sealed.initialize(
            request.shares,
            request.threshold,
            self.core.rng(),
            audit_public_key_of,
        );
        let mut batch = self.audit.batch(caller);
        let shares = request.shares.to_string();
        let threshold = request.threshold.to_string();
        match outcome {
            Ok(initialized) => {
                batch.record(
                    "init",
                    "ok",
                    &[
                        ("shares", &shares),
                        ("threshold", &threshold),
                        ("kcv", &initialized.state.key_check_value),
                    ],
                );
                // The key now exists only in these shares: hand them out even if the audit log
                // failed just now (it is then unavailable and refuses every card-data call).
                if self.commit(&batch).is_err() {
                    tracing::error!("the init record could not be written to the audit log");
                }
                tracing::info!(
                    key_check_value = %initialized.state.key_check_value,
                    shares = request.shares,
                    threshold = request.threshold,
                    "sealed vault initialised; shares handed out once, master key wiped"
                );
                Ok(InitResponse {
                    shares: initialized
                        .shares
                        .iter()
                        .map(|share| share.as_str().to_owned())
                        .collect(),
                    key_check_value: initialized.state.key_check_value.clone(),
                    threshold: initialized.state.threshold,
                    audit_public_key: initialized.state.audit_public_key.clone(),
                })
            }
            Err(err) => {
                if let SealError::State(why) = &err {
                    tracing::error!(%why, "sealed vault init failed");
                }
                batch.record(
                    "init",
                    err.reason(),
                    &[("shares", &shares), ("threshold", &threshold)],
                );
                let _ = self.commit(&batch);
                Err(VaultError::Seal(err))
            }
        }
    }

    /// Takes one custodian's share; unseals when the threshold is reached.
    pub fn unseal(&self, caller: &str, request: &UnsealRequest) -> Result<UnsealResponse, VaultError> {
        let sealed = self.sealed_start()?;
        if self.core.unsealed().is_ok() {
            return Err(VaultError::Seal(SealError::AlreadyUnsealed));
        }
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        let mut batch = self.audit.batch(caller);
        let outcome = sealed.submit(caller, &request.share);
        let status = sealed.status();
        match outcome {
            Ok(Submitted::Progress {
                have,
                threshold,
                index,
            }) => {
                let progress = format!("{have}/{threshold}");
                batch.record(
                    "unseal-share",
                    "accepted",
                    &[("share", &index.to_string()), ("progress", &progress)],
                );
                self.commit(&batch)?;
                tracing::info!(
                    caller,
                    share = index,
                    progress,
                    "key share accepted; still sealed"
                );
                Ok(UnsealResponse {
                    sealed: true,
                    progress: have,
                    threshold,
                    key_check_value: status.key_check_value,
                })
            }
            Ok(Submitted::Unsealed {
                key,
                previous,
                threshold,
                index,
            }) => {
                let signer = signer_for(&key)?;
                let kcv = key.key_check_value();
                self.core
                    .install(Arc::new(key), previous.into_iter().map(Arc::new).collect());
                let progress = format!("{threshold}/{threshold}");
                batch.record(
                    "unseal-share",
                    "accepted",
                    &[("share", &index.to_string()), ("progress", &progress)],
                );
                batch.record("unseal", "ok", &[("kcv", &kcv)]);
                let committed = self.commit(&batch);
                self.audit.set_signer(Some(signer));
                // Sign what was recorded while sealed (start, unseal attempts) right away.
                self.audit.tick();
                committed?;
                tracing::info!(key_check_value = %kcv, "vault unsealed");
                Ok(UnsealResponse {
                    sealed: false,
                    progress: 0,
                    threshold,
                    key_check_value: kcv,
                })
            }
            Err(err) => {
                batch.record(
                    "unseal-share",
                    err.reason(),
                    &[("progress", &status.progress.to_string())],
                );
                let _ = self.commit(&batch);
                tracing::warn!(
                    caller,
                    reason = err.reason(),
                    progress = status.progress,
                    "key share refused"
                );
                Err(VaultError::Seal(err))
            }
        }
    }

    /// Wipes the master key, the key cache and held CVCs; the vault is sealed until unsealed
    /// again with the threshold of shares. Allowed even when the audit log is down: it only
    /// reduces what the vault can do.
    pub fn seal(&self, caller: &str) -> Result<SealResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let previous = self.core.take_keys();
        sealed.reset();
        let wiped = self.core.wipe_cvcs();
        let mut batch = self.audit.batch(caller);
        let outcome = if previous.is_some() {
            "ok"
        } else {
            "already-sealed"
        };
        batch.record("seal", outcome, &[("cvcs_wiped", &wiped.to_string())]);
        let _ = self.commit(&batch);
        // Signs the block (including the seal record) with the key that is going away.
        self.audit.set_signer(None);
        // Calls already in flight finish with their own reference; the master key and the
        // cached keys are wiped when the last of them ends.
        drop(previous);
        tracing::warn!(caller, cvcs_wiped = wiped, "vault sealed by an operator");
        Ok(SealResponse {})
    }

    /// KEK rotation of a sealed vault (see [`SealedStart::rekey`]): a new master key and new
    /// shares; the replaced key joins the retiring keys, and the audit key rolls over with a
    /// record the old audit key signs.
    pub fn rekey(&self, caller: &str, request: &RekeyRequest) -> Result<RekeyResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let current = self.core.ready()?;
        let mut batch = self.audit.batch(caller);
        let from_kcv = current.master().key_check_value();
        let shares = request.shares.to_string();
        let threshold = request.threshold.to_string();
        let outcome = sealed.rekey(
            current.master(),
            &current.previous().iter().map(Arc::as_ref).collect::<Vec<_>>(),
            request.shares,
            request.threshold,
            self.core.rng(),
            audit_public_key_of,
        );
        let (initialized, master) = match outcome {
            Ok(done) => done,
            Err(err) => {
                if let SealError::State(why) = &err {
                    tracing::error!(%why, "rekey failed");
                }
                batch.record(
                    "rekey",
                    err.reason(),
                    &[
                        ("from_kcv", &from_kcv),
                        ("shares", &shares),
                        ("threshold", &threshold),
                    ],
                );
                let _ = self.commit(&batch);
                return Err(VaultError::Seal(err));
            }
        };
        let signer = signer_for(&master)?;
        let state = &initialized.state;
        batch.record(
            "rekey",
            "ok",
            &[
                ("from_kcv", &from_kcv),
                ("to_kcv", &state.key_check_value),
                ("shares", &shares),
                ("threshold", &threshold),
                ("next_audit_key", signer.public_key_hex()),
            ],
        );
        // The new key now exists only in these shares and this process: install it and hand
        // the shares out even if the audit write failed (the log then refuses card data).
        if self.commit(&batch).is_err() {
            tracing::error!("the rekey record could not be written to the audit log");
        }
        let mut previous = vec![Arc::clone(current.master())];
        previous.extend(current.previous().iter().cloned());
        self.core.install(Arc::new(master), previous);
        // The old audit key signs the block holding the rekey record (which names the new audit
        // key) before the new one takes over: a verifier follows the chain of keys.
        self.audit.set_signer(Some(signer));
        tracing::warn!(
            caller,
            from_key_check_value = %from_kcv,
            key_check_value = %state.key_check_value,
            "sealed vault rekeyed: new shares handed out once; run `tessera keys rewrap-all`, then `tessera vault retire-keys`"
        );
        Ok(RekeyResponse {
            shares: initialized
                .shares
                .iter()
                .map(|share| share.as_str().to_owned())
                .collect(),
            key_check_value: state.key_check_value.clone(),
            retiring_key_check_values: state
                .retiring
                .iter()
                .map(|key| key.key_check_value.clone())
                .collect(),
            threshold: state.threshold,
            audit_public_key: state.audit_public_key.clone(),
        })
    }

    /// Ends a KEK rotation of a sealed vault: the retiring master keys are forgotten (state
    /// file and memory). Merchant keys still wrapped by one of them stop working, so this runs
    /// after `RewrapKeys` has moved every one.
    pub fn retire_master_keys(&self, caller: &str) -> Result<RetireMasterKeysResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let current = self.core.ready()?;
        let mut batch = self.audit.batch(caller);
        let kcv = current.master().key_check_value();
        match sealed.retire(current.master()) {
            Ok(retired) => {
                self.core.install(Arc::clone(current.master()), Vec::new());
                batch.record(
                    "retire-master-keys",
                    "ok",
                    &[("kcv", &kcv), ("retired_kcvs", &retired.join(","))],
                );
                self.commit(&batch)?;
                tracing::warn!(caller, retired = %retired.join(","), "retiring master keys forgotten");
                Ok(RetireMasterKeysResponse {
                    retired_key_check_values: retired,
                })
            }
            Err(err) => {
                batch.record("retire-master-keys", err.reason(), &[("kcv", &kcv)]);
                let _ = self.commit(&batch);
                Err(VaultError::Seal(err))
            }
        }
    }

    /// The vault's key, seal, audit and hardening state, for operators.
    pub fn status(&self) -> StatusResponse {
        let hardening = &self.facts.hardening;
        let keys = self.core.unsealed().ok();
        let seal = self
            .sealed_start
            .as_ref()
            .map(SealedStart::status)
            .unwrap_or_default();
        let audit = self.audit.status();
        StatusResponse {
            mode: self.facts.mode.as_str().to_owned(),
            master_key_source: self.facts.master_key_source.to_owned(),
            master_key_loaded: keys.is_some(),
            core_dumps_disabled: hardening.core_dumps_disabled,
            ptrace_attach_blocked: hardening.ptrace_attach_blocked,
            memory_locked: hardening.memory_locked,
            memory_lock_error: hardening.memory_lock_error.clone(),
            debug_build: is_debug_build(),
            cached_keys: keys
                .as_ref()
                .map_or(0, |keys| u32::try_from(keys.cached_keys()).unwrap_or(u32::MAX)),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            master_key_check_value: keys
                .as_ref()
                .map_or(seal.key_check_value, |keys| keys.master().key_check_value()),
            held_cvcs: u32::try_from(self.core.held_cvcs()).unwrap_or(u32::MAX),
            sealed: keys.is_none(),
            initialized: seal.initialized || self.sealed_start.is_none(),
            unseal_progress: seal.progress,
            unseal_threshold: seal.threshold,
            unseal_shares: seal.shares,
            audit_state: audit.state.to_owned(),
            audit_error: audit.error,
            audit_path: audit.path,
            audit_lines: audit.lines,
            audit_head: audit.head,
            audit_unsigned: audit.unsigned,
            audit_public_key: if audit.public_key.is_empty() {
                seal.audit_public_key
            } else {
                audit.public_key
            },
            retiring_key_check_values: keys.as_ref().map_or_else(Vec::new, |keys| {
                keys.previous().iter().map(|key| key.key_check_value()).collect()
            }),
        }
    }
}

/// Shared handle used by the server.
pub type SharedVault = Arc<VaultService>;
