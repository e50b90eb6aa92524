//! SQLite WAL checkpoints that keep the WAL short under sustained writes.
//!
//! A background task copies committed pages from the WAL into the database with passive
//! checkpoints, on its own connection, so the copying never runs on the single writer. But a
//! passive checkpoint only copies the frames that existed when it started, and SQLite starts
//! the WAL over from its beginning only when a write finds every frame copied. Under a steady
//! stream of commits that never happens: the WAL grew by 120 MB a second during a tokenize
//! benchmark (3 GB in 25 s), and a quarter of the gateway's CPU went to the kernel zeroing the
//! file's new blocks on the writer's thread. So once the WAL is past [`RESTART_AFTER_FRAMES`],
//! the group-commit writer, between two of its transactions, copies the few frames left with a
//! `RESTART` checkpoint; its next write then starts the WAL over, in blocks the file already
//! has.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::Mutex;

/// How long a connection waits out another's lock; the writer's WAL restart shortens it for
/// one statement and puts this back.
pub(crate) const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000";

/// WAL frames (4 KiB pages) after which the writer restarts the WAL: 32 MiB, half of
/// `journal_size_limit`, so the file is reused rather than truncated and grown again.
pub const RESTART_AFTER_FRAMES: i64 = 8192;
/// How often the background task copies pages; short enough that the writer's restart finds
/// little left to copy.
const PASSIVE_EVERY: Duration = Duration::from_millis(200);
/// How long the writer's restart waits for readers still on the old WAL before giving up
/// until the next round (SQLite's `busy_timeout` for that one statement).
const RESTART_WAIT_MS: u32 = 50;

/// Shared by the background checkpointer and the writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct WalCheckpoints {
    /// Frames in the WAL as the last checkpoint saw them.
    frames: Arc<AtomicI64>,
    /// Held while a checkpoint runs, so the two never wait on SQLite's checkpointer lock.
    running: Arc<Mutex<()>>,
    restart_after_frames: i64,
}

impl Default for WalCheckpoints {
    fn default() -> Self {
        Self::restarting_after(RESTART_AFTER_FRAMES)
    }
}

/// What one `PRAGMA wal_checkpoint` answered.
struct Outcome {
    /// SQLite could not finish (readers or another checkpointer in the way).
    busy: bool,
    /// Frames in the WAL.
    frames: i64,
}

impl WalCheckpoints {
    /// Restarts the WAL once it holds `frames` frames.
    pub fn restarting_after(frames: i64) -> Self {
        Self {
            frames: Arc::default(),
            running: Arc::default(),
            restart_after_frames: frames,
        }
    }

    /// Runs passive checkpoints until the pool closes.
    pub fn spawn_background(&self, pool: AnyPool) {
        let checkpoints = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PASSIVE_EVERY);
            loop {
                tick.tick().await;
                if pool.is_closed() {
                    return;
                }
                let outcome = match pool.acquire().await {
                    Ok(mut conn) => checkpoints.copy_pages(&mut conn).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = outcome {
                    tracing::debug!(error = %err, "WAL checkpoint failed; will retry");
                }
            }
        });
    }

    /// One passive checkpoint on `conn`: copies what readers allow, notes the WAL's length.
    pub async fn copy_pages(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let _running = self.running.lock().await;
        let outcome = checkpoint(conn, "PASSIVE").await?;
        self.frames.store(outcome.frames, Ordering::Relaxed);
        Ok(())
    }

    /// Called by the writer between transactions: when the WAL has grown past its limit
    /// ([`RESTART_AFTER_FRAMES`]), copies what is left and waits briefly for readers, so that
    /// the writer's next transaction starts the WAL over. Does nothing while the background
    /// checkpoint runs; its result decides the next attempt.
    pub async fn restart_if_long(&self, conn: &mut AnyConnection) {
        if self.frames.load(Ordering::Relaxed) < self.restart_after_frames {
            return;
        }
        let Ok(_running) = self.running.try_lock() else {
            return;
        };
        let started = std::time::Instant::now();
        match restart(conn).await {
            Ok(outcome) => {
                // A busy restart is retried after the next background pass, not after every
                // batch, so readers that hold on cannot stall the writer batch after batch.
                self.frames.store(0, Ordering::Relaxed);
                tracing::debug!(
                    busy = outcome.busy,
                    frames = outcome.frames,
                    micros = started.elapsed().as_micros(),
                    "WAL restart checkpoint"
                );
            }
            Err(err) => tracing::warn!(error = %err, "WAL restart checkpoint failed"),
        }
    }
}

/// A `RESTART` checkpoint that waits at most [`RESTART_WAIT_MS`] for readers.
async fn restart(conn: &mut AnyConnection) -> Result<Outcome, sqlx::Error> {
    sqlx::query(&format!("PRAGMA busy_timeout = {RESTART_WAIT_MS}"))
        .execute(&mut *conn)
        .await?;
    let outcome = checkpoint(conn, "RESTART").await;
    // Restored even when the checkpoint failed: the writer's own writes must keep waiting out
    // a second process's lock as long as every other connection does.
    sqlx::query(SQLITE_BUSY_TIMEOUT).execute(&mut *conn).await?;
    outcome
}

async fn checkpoint(conn: &mut AnyConnection, mode: &str) -> Result<Outcome, sqlx::Error> {
    let row = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
        .fetch_one(&mut *conn)
        .await?;
    Ok(Outcome {
        busy: row.try_get::<i64, _>(0)? != 0,
        frames: row.try_get::<i64, _>(1)?,
    })
}

#[cfg(test)]
mod tests {
    // A failed setup step should stop the test where it happened.
    #![allow(clippy::unwrap_used)]

    use sqlx::any::AnyPoolOptions;
    use sqlx::pool::PoolConnection;
    use sqlx::Any;

    use super::*;

    const LIMIT: i64 = 16;

    async fn pool(dir: &tempfile::TempDir) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("wal.db").display());
        let pool = AnyPoolOptions::new()
            .max_connections(3)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in ["PRAGMA journal_mode = WAL", "PRAGMA wal_autocheckpoint = 0"] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE pages (filler BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    /// Each row fills about one page, so each insert adds a frame or two.
    async fn write_pages(conn: &mut PoolConnection<Any>, rows: usize) {
        for _ in 0..rows {
            sqlx::query("INSERT INTO pages VALUES (randomblob(4000))")
                .execute(&mut **conn)
                .await
                .unwrap();
        }
    }

    async fn wal_frames(conn: &mut PoolConnection<Any>) -> i64 {
        checkpoint(conn, "PASSIVE").await.unwrap().frames
    }

    /// The state a steady write load leaves: the last passive checkpoint could not copy every
    /// frame (here because a reader was still on an older snapshot; under load, because the
    /// writer kept appending), so no write finds the WAL fully copied and it keeps growing.
    async fn partly_copied_wal(pool: &AnyPool, wal: &WalCheckpoints) -> PoolConnection<Any> {
        let mut writer = pool.acquire().await.unwrap();
        let mut reader = pool.acquire().await.unwrap();
        let mut checkpointer = pool.acquire().await.unwrap();
        write_pages(&mut writer, 40).await;
        let mut snapshot = sqlx::Connection::begin(&mut *reader).await.unwrap();
        sqlx::query("SELECT count(*) FROM pages")
            .execute(&mut *snapshot)
            .await
            .unwrap();
        write_pages(&mut writer, 40).await;
        wal.copy_pages(&mut checkpointer).await.unwrap();
        snapshot.rollback().await.unwrap();
        writer
    }

    /// Frames in the WAL after one more write on a partly copied WAL of 80-odd frames that
    /// restarts past `limit`, with or without the writer's check in between.
    async fn frames_after_a_write(limit: i64, writer_checks: bool) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let wal = WalCheckpoints::restarting_after(limit);
        let mut writer = partly_copied_wal(&pool, &wal).await;
        if writer_checks {
            wal.restart_if_long(&mut writer).await;
        }
        write_pages(&mut writer, 1).await;
        wal_frames(&mut writer).await
    }

    #[tokio::test]
    async fn the_writer_starts_a_long_wal_over() {
        let frames = frames_after_a_write(LIMIT, true).await;
        assert!(frames < LIMIT, "the WAL did not start over: {frames} frames");
    }

    #[tokio::test]
    async fn without_the_restart_the_wal_keeps_growing() {
        let frames = frames_after_a_write(LIMIT, false).await;
        assert!(
            frames > 80,
            "expected the WAL to keep its 80-odd frames, found {frames}"
        );
    }

    #[tokio::test]
    async fn a_short_wal_is_left_alone() {
        assert!(frames_after_a_write(1_000, true).await > 80);
    }
}
