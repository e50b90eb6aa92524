//! Time, injectable so time-dependent rules are tested without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use tessera_api::calendar::{civil_from_days, days_from_civil};

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMillis = i64;

/// A source of the current time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// When set, the clock is frozen at this offset from the real time (tests only move it).
    offset_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that runs `offset` ahead of the system clock and can be moved by tests.
    pub fn adjustable(offset: Arc<AtomicI64>) -> Self {
        Self {
            offset_ms: Some(offset),
        }
    }

    pub fn now_ms(&self) -> UnixMillis {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        real.saturating_add(self.offset_ms.as_ref().map_or(0, |o| o.load(Ordering::Relaxed)))
    }

    /// A clock offset by the milliseconds written in `path`, re-read every 50 ms by a
    /// background task: end-to-end tests move a running gateway's time this way.
    pub fn from_offset_file(path: std::path::PathBuf) -> Self {
        let offset = Arc::new(AtomicI64::new(read_offset(&path)));
        let shared = Arc::downgrade(&offset);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
            loop {
                tick.tick().await;
                let Some(offset) = shared.upgrade() else { return };
                offset.store(read_offset(&path), Ordering::Relaxed);
            }
        });
        Self::adjustable(offset)
    }

    /// Today's UTC (year, month), for card expiry checks.
    pub fn year_month(&self) -> (u32, u32) {
        let days = self.now_ms().div_euclid(86_400_000);
        let (year, month, _) = civil_from_days(days);
        (year, month)
    }
}

fn read_offset(path: &std::path::Path) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(civil_from_days(20_819), (2027, 1, 1));
    }
}

const DAY_MS: i64 = 86_400_000;

fn days_in_month(year: i64, month: u32) -> u32 {
    let next = if month == 12 {
        days_from_civil(year + 1, 1, 1)
    } else {
        days_from_civil(year, month + 1, 1)
    };
    u32::try_from(next - days_from_civil(year, month, 1)).unwrap_or(28)
}

/// `at` moved `months` calendar months later, the day clamped to the target month's length
/// (31 January + 1 month = 28 or 29 February), time of day kept.
pub fn add_months(at: UnixMillis, months: u32) -> UnixMillis {
    let days = at.div_euclid(DAY_MS);
    let time_of_day = at.rem_euclid(DAY_MS);
    let (year, month, day) = civil_from_days(days);
    let total = i64::from(year) * 12 + i64::from(month - 1) + i64::from(months);
    let (year, month) = (
        total.div_euclid(12),
        u32::try_from(total.rem_euclid(12)).unwrap_or(0) + 1,
    );
    let day = day.min(days_in_month(year, month));
    days_from_civil(year, month, day) * DAY_MS + time_of_day
}

/// The first instant after a card's expiry month: a card is valid through its last day.
pub fn end_of_month(year: u32, month: u32) -> UnixMillis {
    let (year, month) = if month >= 12 {
        (i64::from(year) + 1, 1)
    } else {
        (i64::from(year), month + 1)
    };
    days_from_civil(year, month, 1) * DAY_MS
}

#[cfg(test)]
mod calendar_tests {
    use super::*;

    #[test]
    fn month_arithmetic() {
        let jan_31 = days_from_civil(2027, 1, 31) * DAY_MS + 5;
        assert_eq!(add_months(jan_31, 1), days_from_civil(2027, 2, 28) * DAY_MS + 5);
        assert_eq!(add_months(jan_31, 13), days_from_civil(2028, 2, 29) * DAY_MS + 5);
        assert_eq!(add_months(jan_31, 14), days_from_civil(2028, 3, 31) * DAY_MS + 5);
        assert_eq!(end_of_month(2030, 12), days_from_civil(2031, 1, 1) * DAY_MS);
        assert_eq!(
            add_months(end_of_month(2030, 12), 14),
            days_from_civil(2032, 3, 1) * DAY_MS
        );
        for days in [0, 11_016, 20_818, 20_819, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(i64::from(y), m, d), days);
        }
    }
}
