//! The SQLite state store: cursors, observed calls, the Bitrix24 ledger, quarantine, inner-line
//! statuses, operators, OAuth tokens, portal facts and the run log.
//!
//! The API is synchronous on purpose. Async code holds a [`SharedStore`] and locks it only for
//! the few statements it runs, never across an `.await`. The file is opened in WAL mode with a
//! busy timeout and foreign keys on; the schema is migrated forward on open and a file from a
//! newer ubsync is refused rather than misread. Every multi-row change goes through one
//! transaction, so a crash leaves the file at a state some pass actually reached.

pub mod clicks;
pub mod client_tasks;
pub mod crm;
pub mod files;
pub mod followups;
pub mod history;
pub mod inbox;
pub mod ledger;
pub mod lines;
mod migrations;
pub mod runs;

pub(crate) use runs::run_from_row;
pub use runs::RunRecord;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, OptionalExtension};

pub use migrations::MIGRATIONS;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state database {path} has schema version {found}, newer than this ubsync knows ({known}); upgrade ubsync")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database is busy or locked by another process: {0}")]
    Busy(rusqlite::Error),
    #[error("state database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The file is not a database, or damaged.
    #[error("state database {path} is damaged ({cause}). Restore it from a backup, or move it aside (mv {path} {path}.broken) and run again: a fresh state file looks every call up in Bitrix24 before registering it (verify-first), so nothing is pushed twice. The OAuth tokens (telephony mode) go with the old file: give the fresh one a token pair before the next pass, with `ubsync auth set-refresh-token -` (or reinstall the local application); to come back instead, stop ubsync and move the .broken file back")]
    Corrupt {
        path: PathBuf,
        cause: rusqlite::Error,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy(e)
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Formats an instant the one way the store writes them.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Reads an instant written by [`ts`] (or any RFC 3339 text).
pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The OAuth pair of the local application and what came with it.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub client_endpoint: Option<String>,
    pub server_endpoint: Option<String>,
    pub member_id: Option<String>,
    pub application_token: Option<String>,
    pub scope: Option<String>,
}

impl std::fmt::Debug for OAuthTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthTokens")
            .field("access_token", &"***")
            .field("refresh_token", &"***")
            .field("expires_at", &self.expires_at)
            .field("client_endpoint", &self.client_endpoint)
            .field("member_id", &self.member_id)
            .field("scope", &self.scope)
            .finish()
    }
}

/// An open state database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A store shared by async tasks. Lock it for a few statements; never hold the guard across an
/// `.await` (clippy's `await_holding_lock` lint enforces this).
#[derive(Clone)]
pub struct SharedStore(Arc<Mutex<Store>>);

impl SharedStore {
    pub fn new(store: Store) -> Self {
        Self(Arc::new(Mutex::new(store)))
    }

    /// Locks the store. A panic while holding it poisons nothing worth protecting: SQLite's own
    /// transactions keep the file consistent, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            files::create_private_dir(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // SQLite gives its -wal and -shm files the database's mode: create it 0600 first.
        files::create_private_file(path).map_err(|source| StoreError::Dir {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
        };
        let path = path.to_path_buf();
        let corrupt = |e: StoreError| match e {
            StoreError::Sqlite(source)
                if matches!(
                    source.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                ) =>
            {
                StoreError::Corrupt {
                    path: path.clone(),
                    cause: source,
                }
            }
            other => other,
        };
        store.configure().map_err(corrupt)?;
        store.migrate_to(MIGRATIONS.len()).map_err(corrupt)?;
        Ok(store)
    }

    /// A store over an already migrated connection (an in-memory copy).
    pub(crate) fn from_connection(conn: Connection, path: PathBuf) -> Store {
        Store { conn, path }
    }

    /// Opens without migrating past `version`; for upgrade tests.
    #[doc(hidden)]
    pub fn open_at_version(path: &Path, version: usize) -> Result<Self> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store.configure()?;
        store.migrate_to(version)?;
        Ok(store)
    }

    fn configure(&mut self) -> Result<()> {
        self.conn.busy_timeout(Duration::from_secs(10))?;
        // WAL lets `ubsync status` read while a pass writes; NORMAL sync is durable across
        // process crashes (the failure ubsync must survive) and fast.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL mode; continuing");
        }
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
        Ok(())
    }

    fn migrate_to(&mut self, target: usize) -> Result<()> {
        let current = self.schema_version()?;
        if current > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: current,
                known: MIGRATIONS.len() as i64,
            });
        }
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .take(target)
            .skip(current as usize)
        {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::debug!(version = i + 1, "applied state migration");
        }
        Ok(())
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for modules that own their own statements (the pipeline's ledger code).
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    // ---- cursors ---------------------------------------------------------------------------

    pub fn cursor(&self, stream: &str) -> Result<Option<DateTime<Utc>>> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT position FROM cursors WHERE stream = ?1",
                [stream],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.as_deref().and_then(parse_ts))
    }

    pub fn set_cursor(
        &self,
        stream: &str,
        position: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        set_cursor(&self.conn, stream, position, now)
    }

    // ---- OAuth tokens ----------------------------------------------------------------------

    /// The portals OAuth tokens are stored for (host and port, as `portal_key` spells them).
    pub fn token_portals(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT portal FROM oauth_tokens ORDER BY portal")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn tokens(&self, portal: &str) -> Result<Option<OAuthTokens>> {
        Ok(self
            .conn
            .query_row(
                "SELECT access_token, refresh_token, expires_at, client_endpoint, server_endpoint,
                        member_id, application_token, scope
                 FROM oauth_tokens WHERE portal = ?1",
                [portal],
                |r| {
                    for i in [0, 1, 6] {
                        if let Some(t) = r.get::<_, Option<String>>(i)? {
                            crate::redact::register(&t);
                        }
                    }
                    Ok(OAuthTokens {
                        access_token: r.get(0)?,
                        refresh_token: r.get(1)?,
                        expires_at: r.get::<_, Option<String>>(2)?.as_deref().and_then(parse_ts),
                        client_endpoint: r.get(3)?,
                        server_endpoint: r.get(4)?,
                        member_id: r.get(5)?,
                        application_token: r.get(6)?,
                        scope: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// Replaces the stored pair in one statement: the old refresh token is forgotten in the same
    /// instant the new one is durable.
    pub fn save_tokens(&self, portal: &str, t: &OAuthTokens, now: DateTime<Utc>) -> Result<()> {
        crate::redact::register(&t.access_token);
        crate::redact::register(&t.refresh_token);
        if let Some(a) = &t.application_token {
            crate::redact::register(a);
        }
        self.conn.execute(
            "INSERT INTO oauth_tokens (portal, access_token, refresh_token, expires_at, client_endpoint,
                                       server_endpoint, member_id, application_token, scope, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(portal) DO UPDATE SET
                access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                expires_at = excluded.expires_at, client_endpoint = excluded.client_endpoint,
                server_endpoint = excluded.server_endpoint,
                member_id = COALESCE(excluded.member_id, oauth_tokens.member_id),
                application_token = COALESCE(excluded.application_token, oauth_tokens.application_token),
                scope = excluded.scope, updated_at = excluded.updated_at",
            params![
                portal,
                t.access_token,
                t.refresh_token,
                t.expires_at.map(ts),
                t.client_endpoint,
                t.server_endpoint,
                t.member_id,
                t.application_token,
                t.scope,
                ts(now)
            ],
        )?;
        Ok(())
    }

    // ---- portal facts ----------------------------------------------------------------------

    pub fn fact(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM portal_facts WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn delete_fact(&self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM portal_facts WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Deletes a portal's tokens (and its member and application token). Whether any existed.
    pub fn forget_tokens(&self, portal: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM oauth_tokens WHERE portal = ?1", [portal])?
            > 0)
    }

    pub fn set_fact(&self, key: &str, value: &str, now: DateTime<Utc>) -> Result<()> {
        self.conn.execute(
            "INSERT INTO portal_facts (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            params![key, value, ts(now)],
        )?;
        Ok(())
    }

    // ---- inner lines -----------------------------------------------------------------------

    /// Records a line status observation if it is newer than the stored one. Returns whether it
    /// was kept.
    pub fn observe_line_status(
        &self,
        line: &str,
        status: &str,
        observed_at: DateTime<Utc>,
        raw: Option<&str>,
    ) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT INTO line_status (line, status, observed_at, raw, status_since)
             VALUES (?1, ?2, ?3, ?4, ?3)
             ON CONFLICT(line) DO UPDATE SET status = excluded.status,
                 observed_at = excluded.observed_at, raw = excluded.raw,
                 status_since = CASE WHEN line_status.status = excluded.status
                                     THEN line_status.status_since ELSE excluded.observed_at END
             WHERE excluded.observed_at > line_status.observed_at",
            params![line, status, ts(observed_at), raw],
        )?;
        Ok(n > 0)
    }

    /// Every line's latest status, ordered by line.
    pub fn line_statuses(&self) -> Result<Vec<(String, String, DateTime<Utc>)>> {
        let mut st = self
            .conn
            .prepare("SELECT line, status, observed_at FROM line_status ORDER BY line")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (l, s, t) = row?;
            out.push((l, s, parse_ts(&t).unwrap_or_default()));
        }
        Ok(out)
    }
}

/// Sets a cursor inside whatever transaction `conn` is in.
pub fn set_cursor(
    conn: &Connection,
    stream: &str,
    position: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.execute(
        "INSERT INTO cursors (stream, position, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(stream) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
        params![stream, ts(position), ts(now)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, h, 0, 0).unwrap()
    }

    fn temp() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state/ubsync.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_fresh_file_is_migrated_to_the_latest_version_in_wal_mode() {
        let (_d, s) = temp();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = s
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn an_old_file_is_upgraded_without_losing_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let s = Store::open_at_version(&path, 1).unwrap();
            assert_eq!(s.schema_version().unwrap(), 1);
            s.set_cursor("history", t(5), t(6)).unwrap();
            assert!(s.fact("x").is_err(), "portal_facts must not exist at v1");
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(s.cursor("history").unwrap(), Some(t(5)));
        s.set_fact("x", "y", t(7)).unwrap();
        assert_eq!(s.fact("x").unwrap().as_deref(), Some("y"));
    }

    #[test]
    fn v3_forgets_the_stored_webhook_url_and_callback_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let s = Store::open_at_version(&path, 2).unwrap();
            s.set_fact(
                "bitrix24.moved_webhook_url",
                "https://new.example/rest/1/secretcode/",
                t(1),
            )
            .unwrap();
            s.conn
                .execute(
                    "INSERT INTO oauth_tokens (portal, access_token, refresh_token, client_endpoint,
                        server_endpoint, updated_at) VALUES ('p', 'a', 'r', 'https://evil/rest/',
                        'https://evil/', 'x')",
                    [],
                )
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.fact("bitrix24.moved_webhook_url").unwrap(), None);
        let t = s.tokens("p").unwrap().unwrap();
        assert_eq!((t.client_endpoint, t.server_endpoint), (None, None));
        assert_eq!(t.refresh_token, "r", "the tokens themselves are kept");
    }

    #[test]
    fn the_state_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/ubsync.db");
        // SAFETY: umask is process-wide; 022 is the usual default, restored below.
        let old = unsafe { libc::umask(0o022) };
        let s = Store::open(&path).unwrap();
        s.set_cursor("history", t(1), t(1)).unwrap();
        unsafe { libc::umask(old) };
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let wal = path.with_extension("db-wal");
        assert_eq!(mode(&wal), 0o600, "SQLite copies the database's mode");
        assert!(files::too_open(&path).is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(files::too_open(&path), vec![(path.clone(), 0o644)]);
    }

    #[test]
    fn a_file_from_a_newer_ubsync_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        {
            let s = Store::open(&path).unwrap();
            s.conn.pragma_update(None, "user_version", 99).unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::TooNew { found: 99, .. }) => {}
            other => panic!("expected TooNew, got {:?}", other.err()),
        }
    }

    #[test]
    fn reopening_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        Store::open(&path).unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn tokens_are_replaced_as_a_pair() {
        let (_d, s) = temp();
        assert!(s.tokens("p").unwrap().is_none());
        let mut tok = OAuthTokens {
            access_token: "a1".into(),
            refresh_token: "r1".into(),
            expires_at: Some(t(1)),
            client_endpoint: Some("https://p/rest/".into()),
            server_endpoint: None,
            member_id: Some("m".into()),
            application_token: Some("app".into()),
            scope: Some("crm".into()),
        };
        s.save_tokens("p", &tok, t(0)).unwrap();
        tok.access_token = "a2".into();
        tok.refresh_token = "r2".into();
        tok.member_id = None;
        s.save_tokens("p", &tok, t(1)).unwrap();
        let got = s.tokens("p").unwrap().unwrap();
        assert_eq!(got.refresh_token, "r2");
        assert_eq!(got.access_token, "a2");
        assert_eq!(
            got.member_id.as_deref(),
            Some("m"),
            "a refresh keeps install-time facts"
        );
        assert!(!format!("{got:?}").contains("r2"));
    }

    #[test]
    fn a_line_status_is_replaced_only_by_a_newer_observation() {
        let (_d, s) = temp();
        assert!(s.observe_line_status("101", "ONLINE", t(5), None).unwrap());
        assert!(!s.observe_line_status("101", "OFFLINE", t(4), None).unwrap());
        assert!(!s.observe_line_status("101", "OFFLINE", t(5), None).unwrap());
        assert!(s.observe_line_status("101", "BUSY", t(6), None).unwrap());
        let all = s.line_statuses().unwrap();
        assert_eq!(all, vec![("101".to_string(), "BUSY".to_string(), t(6))]);
    }

    #[test]
    fn the_run_log_keeps_the_latest_run_per_job() {
        let (_d, s) = temp();
        let a = s.begin_run("sync", t(1)).unwrap();
        s.finish_run(a, t(2), "ok", Some(&serde_json::json!({"pushed": 3})), None)
            .unwrap();
        let b = s.begin_run("lines", t(3)).unwrap();
        assert_eq!(
            s.last_run(Some("sync")).unwrap().unwrap().summary.unwrap()["pushed"],
            3
        );
        assert_eq!(s.last_run(None).unwrap().unwrap().id, b);
    }
}
