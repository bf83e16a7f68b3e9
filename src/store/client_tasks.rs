//! One open missed-call task per client: the task a client's missed calls are folded into, and
//! the answered call that completes it. Everything is read from the ledger (`client`, `reached`,
//! `task_comment`, `task_closed_*`), written with the call rows it belongs to.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::ledger::{ledger_from, LedgerRow, LEDGER_COLUMNS};
use super::{parse_ts, ts, Result, Store};

/// A client's open task and the calls folded into it.
#[derive(Debug, Clone)]
pub struct ClientTask {
    /// The row of the call that created the task.
    pub owner: LedgerRow,
    pub task_id: i64,
    /// Every call in the task (the owner first, then the follow-ups), with its stored record.
    pub calls: Vec<(String, String, DateTime<Utc>)>,
}

impl ClientTask {
    /// When the latest missed call folded into the task started.
    pub fn last_missed(&self) -> DateTime<Utc> {
        self.calls
            .iter()
            .map(|(_, _, t)| *t)
            .max()
            .unwrap_or_default()
    }
}

fn prefixed() -> String {
    LEDGER_COLUMNS
        .split(',')
        .map(|c| format!("l.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    fn task_calls(&self, task_id: i64) -> Result<Vec<(String, String, DateTime<Utc>)>> {
        let mut st = self.conn.prepare(
            "SELECT l.call_id, c.raw, c.started_at FROM ledger l JOIN calls c ON c.call_id = l.call_id
             WHERE l.task_id = ?1 ORDER BY l.task_comment, c.started_at, l.call_id",
        )?;
        let rows = st.query_map([task_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                parse_ts(&r.get::<_, String>(2)?).unwrap_or_default(),
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn open_tasks_where(&self, extra: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<ClientTask>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {} FROM ledger l JOIN calls c ON c.call_id = l.call_id
             WHERE l.task_id IS NOT NULL AND l.task_comment = 0 AND l.task_closed_at IS NULL
               AND l.client IS NOT NULL {extra}
             ORDER BY c.started_at DESC, l.call_id DESC",
            prefixed()
        ))?;
        let owners: Vec<LedgerRow> = st
            .query_map(p, ledger_from)?
            .collect::<rusqlite::Result<_>>()?;
        owners
            .into_iter()
            .map(|owner| {
                let task_id = owner.task_id.expect("selected with a task");
                Ok(ClientTask {
                    calls: self.task_calls(task_id)?,
                    owner,
                    task_id,
                })
            })
            .collect()
    }

    /// The client's newest open task.
    pub fn open_task_for(&self, client: &str) -> Result<Option<ClientTask>> {
        Ok(self
            .open_tasks_where("AND l.client = ?1", params![client])?
            .into_iter()
            .next())
    }

    /// Every open task whose call ubsync first saw at or after `since` (a backfilled call of
    /// last year counts from when it was pulled), newest first.
    pub fn open_client_tasks(&self, since: DateTime<Utc>) -> Result<Vec<ClientTask>> {
        self.open_tasks_where("AND c.first_seen_at >= ?1", params![ts(since)])
    }

    /// The first call in Bitrix24 that reached `client` after `after`: its id and record.
    pub fn reached_after(
        &self,
        client: &str,
        after: DateTime<Utc>,
    ) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT l.call_id, c.raw FROM ledger l JOIN calls c ON c.call_id = l.call_id
                 WHERE l.client = ?1 AND l.reached = 1 AND c.started_at > ?2
                   AND l.stage IN ('finished', 'done')
                 ORDER BY c.started_at, l.call_id LIMIT 1",
                params![client, ts(after)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Whether a call in Bitrix24 reached `client` after `after` and before `before`: a task
    /// open at `after` was completed by then, in passes that ran as the calls came.
    pub fn reached_between(
        &self,
        client: &str,
        after: DateTime<Utc>,
        before: DateTime<Utc>,
    ) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM ledger l JOIN calls c ON c.call_id = l.call_id
               WHERE l.client = ?1 AND l.reached = 1 AND c.started_at > ?2 AND c.started_at < ?3
                 AND l.stage IN ('finished', 'done'))",
            params![client, ts(after), ts(before)],
            |r| r.get(0),
        )?)
    }

    /// Whether another call of `client` has a task being created (its outcome not recorded yet).
    pub fn task_in_flight_for(&self, client: &str, except: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM ledger WHERE client = ?1 AND call_id != ?2
                             AND task_in_flight_since IS NOT NULL)",
            params![client, except],
            |r| r.get(0),
        )?)
    }
}

/// A missed call with a task whose notification is not decided yet.
#[derive(Debug, Clone)]
pub struct ToNotify {
    pub ledger: LedgerRow,
    pub raw: String,
}

impl Store {
    /// Missed calls that got a task (their own or their client's) since `since` and whose
    /// notification was not decided, oldest first.
    pub fn to_notify(&self, since: DateTime<Utc>) -> Result<Vec<ToNotify>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {}, c.raw FROM ledger l JOIN calls c ON c.call_id = l.call_id
             LEFT JOIN notified n ON n.call_id = l.call_id
             WHERE n.call_id IS NULL AND l.task_id IS NOT NULL AND l.client IS NOT NULL
               AND c.started_at >= ?1
             ORDER BY c.started_at, l.call_id",
            prefixed()
        ))?;
        let rows = st.query_map([ts(since)], |r| {
            Ok(ToNotify {
                ledger: ledger_from(r)?,
                raw: r.get(super::ledger::LEDGER_WIDTH)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When `client` last caused a notification.
    pub fn last_notified(&self, client: &str) -> Result<Option<DateTime<Utc>>> {
        let t: Option<String> = self
            .conn
            .query_row(
                "SELECT last_at FROM notify_client WHERE client = ?1",
                [client],
                |r| r.get(0),
            )
            .optional()?;
        Ok(t.as_deref().and_then(parse_ts))
    }

    /// Records notification decisions (call, sent) and the clients notified, in one transaction.
    pub fn mark_notified(
        &mut self,
        decided: &[(String, bool)],
        clients: &[String],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (call, sent) in decided {
            tx.execute(
                "INSERT OR REPLACE INTO notified (call_id, sent, notified_at) VALUES (?1, ?2, ?3)",
                params![call, sent, ts(now)],
            )?;
        }
        for c in clients {
            tx.execute(
                "INSERT OR REPLACE INTO notify_client (client, last_at) VALUES (?1, ?2)",
                params![c, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
