//! Sealed start: split knowledge and dual control over the master key.
//!
//! `Init` creates the master key in this process, splits it with Shamir secret sharing
//! (`blahaj`, GF(256), one polynomial per key byte) into `shares` shares of which any
//! `threshold` rebuild it, and hands each share out once. The vault keeps only public values in
//! a small state file: the master key's check value, the counts, and a SHA-256 digest of each
//! share. The master key itself is never written anywhere and is wiped right after Init: the
//! vault stays sealed until custodians prove their shares work by unsealing it.
//!
//! `Unseal` checks every share on arrival against its digest, so a wrong, corrupted or
//! foreign share is refused at once and never mixed with the honest custodians' shares: it
//! cannot wipe or poison their progress. A repeated share (same index) is refused the same way.
//! When `threshold` valid shares are held they are combined, the result is checked against the
//! key check value, and the shares are wiped. Shares live only in zeroizing memory; a restart
//! (or `Seal`) starts over.
//!
//! The split, the combination, the share format and the digests are in
//! `tessera_vault_core::shares`; this module holds the state machine and the state file.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tessera_api::audit_format::{decode_hex, hex};
use tessera_vault_core::crypto::Random;
use tessera_vault_core::keys::{MasterKey, WRAPPED_LEN};
use tessera_vault_core::shares::{combine, deal, ShareValue};
pub use tessera_vault_core::shares::{SealError, MAX_SHARES, SHARE_PREFIX};
use zeroize::Zeroizing;

/// The state file's format number.
const STATE_FORMAT: u32 = 1;

/// The public state of an initialised sealed vault, as stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealState {
    pub format: u32,
    /// The master key's check value (`MasterKey::key_check_value`).
    pub key_check_value: String,
    pub threshold: u32,
    pub shares: u32,
    /// SHA-256 (hex) of each share, labelled and bound to the key check value; index i-1 holds
    /// share i's digest.
    pub share_digests: Vec<String>,
    /// The Ed25519 public key that signs the audit log (hex), for operators to publish.
    pub audit_public_key: String,
    /// Master keys replaced by a rekey whose merchant keys may not all be re-wrapped yet, each
    /// wrapped by the current master key. Empty outside a KEK rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringKey>,
}

/// A master key being retired: public check value, and the key wrapped by its successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiringKey {
    pub key_check_value: String,
    /// `MasterKey::wrap_retired` output, hex.
    pub wrapped: String,
}

impl SealState {
    fn load(path: &Path) -> Result<Option<SealState>, SealError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(SealError::State(format!("cannot read {}: {err}", path.display()))),
        };
        let state: SealState = toml::from_str(&text)
            .map_err(|err| SealError::State(format!("{} does not parse: {err}", path.display())))?;
        let share_count = usize::try_from(state.shares).unwrap_or(usize::MAX);
        if state.format != STATE_FORMAT
            || !(2..=state.shares).contains(&state.threshold)
            || state.shares > MAX_SHARES
            || state.share_digests.len() != share_count
        {
            return Err(SealError::State(format!("{} is inconsistent", path.display())));
        }
        Ok(Some(state))
    }

    /// Writes the state file. A temporary file is completed and flushed, then either
    /// hard-linked to its name (`Write::Create`, which fails if the name exists, so a second
    /// Init can never replace it) or renamed over it (`Write::Replace`, atomic: a crash leaves
    /// the old state or the new, never a mix).
    fn store(&self, path: &Path, how: Write) -> Result<(), SealError> {
        let io =
            |what: &str, err: std::io::Error| SealError::State(format!("{what} {}: {err}", path.display()));
        let text = toml::to_string(self).map_err(|err| SealError::State(err.to_string()))?;
        let text = format!(
            "# Tessera sealed-vault state. PUBLIC values only: no key, no share.\n\
             # Written by `tessera vault init` and replaced by `tessera vault rekey`; delete it only\n\
             # to re-initialise (a new master key, after which nothing encrypted under the old one\n\
             # can be read).\n{text}"
        );
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|err| io("cannot create the directory of", err))?;
        let temporary = path.with_extension("tmp");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .map_err(|err| io("cannot write next to", err))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|err| io("cannot write next to", err))?;
        match how {
            Write::Create => {
                let linked = std::fs::hard_link(&temporary, path);
                let _ = std::fs::remove_file(&temporary);
                linked.map_err(|err| io("cannot create", err))?;
            }
            Write::Replace => {
                std::fs::rename(&temporary, path).map_err(|err| io("cannot replace", err))?;
            }
        }
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// How [`SealState::store`] puts the file in place.
#[derive(Debug, Clone, Copy)]
enum Write {
    Create,
    Replace,
}

/// What Init hands out, once.
pub struct Initialized {
    /// One share line per custodian.
    pub shares: Vec<Zeroizing<String>>,
    pub state: SealState,
}

impl fmt::Debug for Initialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initialized")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The result of one accepted share.
#[derive(Debug)]
pub enum Submitted {
    /// More shares are needed.
    Progress { have: u32, threshold: u32, index: u8 },
    /// The threshold was reached: the rebuilt master key, and the master keys a rekey is
    /// retiring (see [`SealedStart::rekey`]).
    Unsealed {
        key: MasterKey,
        previous: Vec<MasterKey>,
        threshold: u32,
        index: u8,
    },
}

/// Shares received so far, by index, and who sent each.
#[derive(Default)]
struct Progress {
    shares: BTreeMap<u8, ShareValue>,
    custodians: BTreeMap<u8, String>,
}

struct Inner {
    state: Option<SealState>,
    progress: Progress,
}

/// The sealed-start state machine of one vault process.
pub struct SealedStart {
    state_file: PathBuf,
    distinct_custodians: bool,
    inner: Mutex<Inner>,
}

impl fmt::Debug for SealedStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedStart")
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

/// Public facts for the Status RPC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealStatus {
    pub initialized: bool,
    pub progress: u32,
    pub threshold: u32,
    pub shares: u32,
    pub key_check_value: String,
    pub audit_public_key: String,
}

impl SealedStart {
    /// Reads the public state file, if Init already ran.
    pub fn open(state_file: PathBuf, distinct_custodians: bool) -> Result<SealedStart, SealError> {
        let state = SealState::load(&state_file)?;
        Ok(SealedStart {
            state_file,
            distinct_custodians,
            inner: Mutex::new(Inner {
                state,
                progress: Progress::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The guarded data stays consistent across a panic (every update is one assignment).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn status(&self) -> SealStatus {
        let inner = self.lock();
        match &inner.state {
            None => SealStatus::default(),
            Some(state) => SealStatus {
                initialized: true,
                progress: u32::try_from(inner.progress.shares.len()).unwrap_or(u32::MAX),
                threshold: state.threshold,
                shares: state.shares,
                key_check_value: state.key_check_value.clone(),
                audit_public_key: state.audit_public_key.clone(),
            },
        }
    }

    /// Creates the master key, splits it, writes the public state file and returns the shares.
    /// `audit_public_key` computes the audit key's public half from the new master key.
    pub fn initialize(
        &self,
        shares: u32,
        threshold: u32,
        rng: &Random,
        audit_public_key: impl FnOnce(&MasterKey) -> Result<String, SealError>,
    ) -> Result<Initialized, SealError> {
        let mut inner = self.lock();
        // A state file that appeared behind our back (another process) counts too.
        if inner.state.is_some() || self.state_file.exists() {
            return Err(SealError::AlreadyInitialized);
        }
        let (master, values) = deal(shares, threshold, rng)?;
        let state = sealed_state(
            &master,
            &values,
            threshold,
            audit_public_key(&master)?,
            Vec::new(),
        );
        drop(master);
        state.store(&self.state_file, Write::Create)?;
        inner.state = Some(state.clone());
        Ok(initialized(&values, state))
    }

    /// KEK rotation for a sealed vault (the rekey ceremony): creates a new master key inside
    /// the vault, splits it into new shares and replaces the state file, in which `current` and
    /// the `previous` keys it still holds are kept wrapped by the new key until
    /// [`SealedStart::retire`]. The old shares stop working at once. Returns the new shares and
    /// the new master key; the caller installs it.
    pub fn rekey(
        &self,
        current: &MasterKey,
        previous: &[&MasterKey],
        shares: u32,
        threshold: u32,
        rng: &Random,
        audit_public_key: impl FnOnce(&MasterKey) -> Result<String, SealError>,
    ) -> Result<(Initialized, MasterKey), SealError> {
        let mut inner = self.lock();
        let old = inner.state.as_ref().ok_or(SealError::NotInitialized)?;
        if old.key_check_value != current.key_check_value() {
            return Err(SealError::NotCurrentKey);
        }
        let (master, values) = deal(shares, threshold, rng)?;
        // The new key is fresh, so `current` and the `previous` keys (the state's own retiring
        // list) are all distinct.
        let retiring = std::iter::once(current)
            .chain(previous.iter().copied())
            .map(|retired| {
                let wrapped = master.wrap_retired(retired, rng).map_err(|_| SealError::Random)?;
                Ok(RetiringKey {
                    key_check_value: retired.key_check_value(),
                    wrapped: hex(&wrapped),
                })
            })
            .collect::<Result<Vec<_>, SealError>>()?;
        let state = sealed_state(&master, &values, threshold, audit_public_key(&master)?, retiring);
        state.store(&self.state_file, Write::Replace)?;
        inner.state = Some(state.clone());
        inner.progress = Progress::default();
        Ok((initialized(&values, state), master))
    }

    /// Ends a KEK rotation: forgets the retiring master keys (once every merchant key is
    /// re-wrapped by the current one). Returns their check values.
    pub fn retire(&self, current: &MasterKey) -> Result<Vec<String>, SealError> {
        let mut inner = self.lock();
        let state = inner.state.as_ref().ok_or(SealError::NotInitialized)?;
        if state.key_check_value != current.key_check_value() {
            return Err(SealError::NotCurrentKey);
        }
        let mut next = state.clone();
        let retired = std::mem::take(&mut next.retiring)
            .into_iter()
            .map(|key| key.key_check_value)
            .collect();
        next.store(&self.state_file, Write::Replace)?;
        inner.state = Some(next);
        Ok(retired)
    }

    /// Takes one share from `custodian`. Refused shares leave the progress untouched.
    pub fn submit(&self, custodian: &str, text: &str) -> Result<Submitted, SealError> {
        let mut inner = self.lock();
        let Inner { state, progress } = &mut *inner;
        let state = state.as_ref().ok_or(SealError::NotInitialized)?;
        let (share, kcv) = ShareValue::parse(text)?;
        if kcv != state.key_check_value {
            return Err(SealError::WrongVault);
        }
        let expected = state
            .share_digests
            .get(usize::from(share.index) - 1)
            .ok_or(SealError::InvalidShare)?;
        // A plain comparison: timing can at most reveal how much of a public digest matched.
        if share.digest(kcv) != *expected {
            return Err(SealError::InvalidShare);
        }
        if progress.shares.contains_key(&share.index) {
            return Err(SealError::DuplicateShare);
        }
        if self.distinct_custodians && progress.custodians.values().any(|who| who == custodian) {
            return Err(SealError::SameCustodian);
        }
        let index = share.index;
        progress.custodians.insert(index, custodian.to_owned());
        progress.shares.insert(index, share);
        let have = u32::try_from(progress.shares.len()).unwrap_or(u32::MAX);
        if have < state.threshold {
            return Ok(Submitted::Progress {
                have,
                threshold: state.threshold,
                index,
            });
        }
        let key = combine(progress.shares.values(), state.threshold, &state.key_check_value);
        // Whatever the outcome, the shares have done their work: wipe them. (Every one was
        // checked on arrival, so a failure here means the state file itself was altered.)
        *progress = Progress::default();
        let key = key?;
        let previous = state
            .retiring
            .iter()
            .map(|retired| {
                let blob = decode_hex::<WRAPPED_LEN>(&retired.wrapped).ok_or(SealError::Inconsistent)?;
                key.unwrap_retired(&retired.key_check_value, &blob)
                    .map_err(|_| SealError::Inconsistent)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Submitted::Unsealed {
            key,
            previous,
            threshold: state.threshold,
            index,
        })
    }

    /// Forgets every share received so far (on Seal, or when the vault unsealed another way).
    pub fn reset(&self) {
        self.lock().progress = Progress::default();
    }
}

/// The public state of `master` split into `values`.
fn sealed_state(
    master: &MasterKey,
    values: &[ShareValue],
    threshold: u32,
    audit_public_key: String,
    retiring: Vec<RetiringKey>,
) -> SealState {
    let kcv = master.key_check_value();
    SealState {
        format: STATE_FORMAT,
        threshold,
        shares: u32::try_from(values.len()).unwrap_or(u32::MAX),
        share_digests: values.iter().map(|share| share.digest(&kcv)).collect(),
        audit_public_key,
        retiring,
        key_check_value: kcv,
    }
}

fn initialized(values: &[ShareValue], state: SealState) -> Initialized {
    Initialized {
        shares: values
            .iter()
            .map(|share| share.line(&state.key_check_value))
            .collect(),
        state,
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]
    use super::*;
    use tessera_vault_core::keys::SecretKey;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-seal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("seal.toml")
    }

    fn init(name: &str, shares: u32, threshold: u32) -> (SealedStart, Initialized) {
        let sealed = SealedStart::open(scratch(name), false).unwrap();
        let initialized = sealed
            .initialize(shares, threshold, &Random::system(), |_| Ok("pk".into()))
            .unwrap();
        (sealed, initialized)
    }

    fn kcv_of(submitted: Submitted) -> String {
        match submitted {
            Submitted::Unsealed { key, .. } => key.key_check_value(),
            Submitted::Progress { .. } => panic!("still sealed"),
        }
    }

    #[test]
    fn any_threshold_shares_unseal_and_fewer_do_not() {
        let (sealed, init) = init("any", 5, 3);
        let kcv = init.state.key_check_value.clone();
        for combination in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            for (n, i) in combination.iter().enumerate() {
                let outcome = sealed.submit("op", &init.shares[*i]).unwrap();
                if n < 2 {
                    assert!(
                        matches!(outcome, Submitted::Progress { have, threshold: 3, .. } if have == n as u32 + 1)
                    );
                } else {
                    assert_eq!(kcv_of(outcome), kcv);
                }
            }
        }
        // Restarting reads the public state back; no share or key is in it.
        let reopened = SealedStart::open(sealed.state_file.clone(), false).unwrap();
        assert_eq!(reopened.status().threshold, 3);
        let text = std::fs::read_to_string(&sealed.state_file).unwrap();
        for share in &init.shares {
            let value = share.split_whitespace().last().unwrap();
            assert!(!text.contains(value));
        }
        std::fs::remove_dir_all(sealed.state_file.parent().unwrap()).unwrap();
    }

    /// Submits shares until the vault unseals; returns the key and the retiring keys.
    fn unseal_with(sealed: &SealedStart, shares: &[&str]) -> (MasterKey, Vec<MasterKey>) {
        for share in shares {
            if let Submitted::Unsealed { key, previous, .. } = sealed.submit("op", share).unwrap() {
                return (key, previous);
            }
        }
        panic!("still sealed");
    }

    #[test]
    fn rekey_replaces_the_shares_and_keeps_the_old_key_until_retired() {
        let rng = Random::system();
        let (sealed, first) = init("rekey", 3, 2);
        let (key1, previous) = unseal_with(&sealed, &[&first.shares[0], &first.shares[2]]);
        assert!(previous.is_empty());
        let stranger = MasterKey::new(SecretKey::generate(&rng).unwrap());
        assert_eq!(
            sealed
                .rekey(&stranger, &[], 3, 2, &rng, |_| Ok("pk2".into()))
                .unwrap_err(),
            SealError::NotCurrentKey
        );
        let (second, key2) = sealed
            .rekey(&key1, &[], 4, 3, &rng, |_| Ok("pk2".into()))
            .unwrap();
        assert_eq!(second.state.key_check_value, key2.key_check_value());
        assert_ne!(key2.key_check_value(), key1.key_check_value());
        assert_eq!(second.shares.len(), 4);
        assert_eq!(second.state.retiring.len(), 1);

        // After a restart the old shares are refused and the new ones bring back both keys.
        let restarted = SealedStart::open(sealed.state_file.clone(), false).unwrap();
        assert_eq!(
            restarted.submit("op", &first.shares[1]).err(),
            Some(SealError::WrongVault)
        );
        let (key, previous) = unseal_with(
            &restarted,
            &[&second.shares[3], &second.shares[0], &second.shares[1]],
        );
        assert_eq!(key.key_check_value(), key2.key_check_value());
        assert_eq!(previous.len(), 1);
        assert_eq!(previous[0].key_check_value(), key1.key_check_value());
        let text = std::fs::read_to_string(&sealed.state_file).unwrap();
        assert!(!text.contains(&first.state.share_digests[0]));

        // Retiring forgets the old key for good.
        assert_eq!(restarted.retire(&key).unwrap(), vec![key1.key_check_value()]);
        let after = SealedStart::open(sealed.state_file.clone(), false).unwrap();
        let (_, previous) = unseal_with(&after, &[&second.shares[0], &second.shares[1], &second.shares[2]]);
        assert!(previous.is_empty());
        std::fs::remove_dir_all(sealed.state_file.parent().unwrap()).unwrap();
    }

    #[test]
    fn bad_and_repeated_shares_keep_progress() {
        let (sealed, init) = init("bad", 5, 3);
        sealed.submit("a", &init.shares[0]).unwrap();
        // One flipped digit: refused, progress kept.
        let mut wrong = init.shares[1].to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(sealed.submit("b", &wrong).unwrap_err(), SealError::InvalidShare);
        assert_eq!(
            sealed.submit("a", &init.shares[0]).unwrap_err(),
            SealError::DuplicateShare
        );
        assert_eq!(sealed.submit("a", "hello").unwrap_err(), SealError::Malformed);
        let foreign = init.shares[2].replace(&init.state.key_check_value, "0000000000000000");
        assert_eq!(sealed.submit("c", &foreign).unwrap_err(), SealError::WrongVault);
        assert_eq!(sealed.status().progress, 1);
        sealed.submit("b", &init.shares[1]).unwrap();
        let kcv = kcv_of(sealed.submit("c", &init.shares[2]).unwrap());
        assert_eq!(kcv, init.state.key_check_value);
        std::fs::remove_dir_all(sealed.state_file.parent().unwrap()).unwrap();
    }

    #[test]
    fn init_runs_once_and_checks_parameters() {
        let (sealed, _) = init("once", 3, 2);
        let rng = Random::system();
        let again = sealed.initialize(3, 2, &rng, |_| Ok(String::new()));
        assert_eq!(again.unwrap_err(), SealError::AlreadyInitialized);
        let other = SealedStart::open(scratch("params"), false).unwrap();
        for (shares, threshold) in [(3, 1), (2, 3), (256, 2)] {
            let result = other.initialize(shares, threshold, &rng, |_| Ok(String::new()));
            assert_eq!(result.unwrap_err(), SealError::BadParameters);
        }
        std::fs::remove_dir_all(sealed.state_file.parent().unwrap()).unwrap();
    }

    #[test]
    fn distinct_custodians_are_enforced_when_configured() {
        let path = scratch("custodians");
        let sealed = SealedStart::open(path.clone(), true).unwrap();
        let init = sealed
            .initialize(3, 2, &Random::system(), |_| Ok(String::new()))
            .unwrap();
        sealed.submit("alice", &init.shares[0]).unwrap();
        assert_eq!(
            sealed.submit("alice", &init.shares[1]).unwrap_err(),
            SealError::SameCustodian
        );
        kcv_of(sealed.submit("bob", &init.shares[1]).unwrap());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn debug_prints_no_share() {
        let (sealed, init) = init("debug", 2, 2);
        let printed = format!("{init:?} {sealed:?}");
        assert!(!printed.contains(SHARE_PREFIX), "{printed}");
        std::fs::remove_dir_all(sealed.state_file.parent().unwrap()).unwrap();
    }
}
