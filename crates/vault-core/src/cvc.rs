//! Card verification codes, held only in vault memory: under a token, for a limited time,
//! returned at most once. They are never sealed into a record, so they never reach the
//! gateway's database, a log or a journal (PCI DSS 3.3.1.2: no storage after authorisation).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// (merchant, token) a CVC is held under.
type CvcAddress = (String, String);

/// The in-memory CVC store; bounded in count and time.
pub struct CvcStore {
    held: Mutex<HashMap<CvcAddress, (Zeroizing<String>, Instant)>>,
    ttl: Duration,
    capacity: usize,
}

impl fmt::Debug for CvcStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CvcStore")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Why a CVC could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CvcError {
    /// The store holds as many CVCs as it may.
    Full,
}

impl fmt::Display for CvcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the vault holds as many CVCs as it may; retry later")
    }
}

impl std::error::Error for CvcError {}

impl CvcStore {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CvcAddress, (Zeroizing<String>, Instant)>> {
        // A poisoned lock means a panic mid-update of a map of independent entries; the map
        // is still consistent, so keep serving rather than fail every CVC.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `cvc` under (merchant, token) until it is taken or its time runs out.
    pub fn put(
        &self,
        merchant_id: &str,
        token: &str,
        cvc: Zeroizing<String>,
        now: Instant,
    ) -> Result<(), CvcError> {
        let mut held = self.lock();
        if held.len() >= self.capacity {
            held.retain(|_, (_, expires)| *expires > now);
            if held.len() >= self.capacity {
                return Err(CvcError::Full);
            }
        }
        held.insert((merchant_id.to_owned(), token.to_owned()), (cvc, now + self.ttl));
        Ok(())
    }

    /// Removes and returns the CVC held under (merchant, token), if it is still in time.
    pub fn take(&self, merchant_id: &str, token: &str, now: Instant) -> Option<Zeroizing<String>> {
        let (cvc, expires) = self.lock().remove(&(merchant_id.to_owned(), token.to_owned()))?;
        (expires > now).then_some(cvc)
    }

    /// Drops every CVC whose time has run out (each is wiped as it is dropped).
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut held = self.lock();
        let before = held.len();
        held.retain(|_, (_, expires)| *expires > now);
        before - held.len()
    }

    /// How many CVCs are held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_cvc_is_returned_once_and_only_in_time() {
        let store = CvcStore::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        store
            .put("m1", "tok_a", Zeroizing::new("737".into()), now)
            .unwrap();
        assert_eq!(store.take("m2", "tok_a", now), None, "another merchant's CVC");
        assert_eq!(
            store.take("m1", "tok_a", now).as_deref().map(String::as_str),
            Some("737")
        );
        assert_eq!(
            store.take("m1", "tok_a", now),
            None,
            "a CVC is returned at most once"
        );
        store
            .put("m1", "tok_b", Zeroizing::new("123".into()), now)
            .unwrap();
        assert_eq!(
            store.take("m1", "tok_b", now + Duration::from_secs(61)),
            None,
            "expired"
        );
        store
            .put("m1", "tok_c", Zeroizing::new("123".into()), now)
            .unwrap();
        assert_eq!(store.purge_expired(now + Duration::from_secs(61)), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn the_store_is_bounded() {
        let store = CvcStore::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        store.put("m", "1", Zeroizing::new("111".into()), now).unwrap();
        store.put("m", "2", Zeroizing::new("222".into()), now).unwrap();
        assert_eq!(
            store.put("m", "3", Zeroizing::new("333".into()), now),
            Err(CvcError::Full)
        );
        assert!(store
            .put(
                "m",
                "3",
                Zeroizing::new("333".into()),
                now + Duration::from_secs(61)
            )
            .is_ok());
    }

    #[test]
    fn debug_prints_no_cvc() {
        let store = CvcStore::new(Duration::from_secs(60), 2);
        store
            .put("m", "1", Zeroizing::new("987".into()), Instant::now())
            .unwrap();
        assert!(!format!("{store:?}").contains("987"));
    }
}
