//! Click-to-call and callback requests (`clicks`): written when the event is processed, moved
//! on by the click pipeline, claimed by the Unitalk call that came of it in the same
//! transaction as that call's ledger row.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row};

use super::ledger::LedgerRow;
use super::{parse_ts, ts, Result, Store};

/// One click or callback request.
#[derive(Debug, Clone, PartialEq)]
pub struct Click {
    pub key: String,
    pub kind: String,
    pub b24_call_id: Option<String>,
    pub user_id: Option<i64>,
    pub inner_line: Option<String>,
    /// E.164 when it could be read, else as sent.
    pub number: String,
    pub line_number: Option<String>,
    pub crm_entity_type: Option<String>,
    pub crm_entity_id: Option<i64>,
    pub requested_at: DateTime<Utc>,
    pub state: String,
    pub unitalk_call_id: Option<String>,
    pub reason: Option<String>,
}

const COLS: &str =
    "key, kind, b24_call_id, user_id, inner_line, number, line_number, crm_entity_type,
    crm_entity_id, requested_at, state, unitalk_call_id, reason";

fn click_from(r: &Row<'_>) -> rusqlite::Result<Click> {
    Ok(Click {
        key: r.get(0)?,
        kind: r.get(1)?,
        b24_call_id: r.get(2)?,
        user_id: r.get(3)?,
        inner_line: r.get(4)?,
        number: r.get(5)?,
        line_number: r.get(6)?,
        crm_entity_type: r.get(7)?,
        crm_entity_id: r.get(8)?,
        requested_at: parse_ts(&r.get::<_, String>(9)?).unwrap_or_default(),
        state: r.get(10)?,
        unitalk_call_id: r.get(11)?,
        reason: r.get(12)?,
    })
}

impl Store {
    /// Stores a click or callback request; `false` when its key is already known.
    pub fn click_add(&self, c: &Click, now: DateTime<Utc>) -> Result<bool> {
        let n = self.conn.execute(
            &format!(
                "INSERT OR IGNORE INTO clicks ({COLS}, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                c.key,
                c.kind,
                c.b24_call_id,
                c.user_id,
                c.inner_line,
                c.number,
                c.line_number,
                c.crm_entity_type,
                c.crm_entity_id,
                ts(c.requested_at),
                c.state,
                c.unitalk_call_id,
                c.reason,
                ts(now)
            ],
        )?;
        Ok(n > 0)
    }

    /// Rewrites a click's mutable fields.
    pub fn click_save(&self, c: &Click, now: DateTime<Utc>) -> Result<()> {
        self.conn.execute(
            "UPDATE clicks SET b24_call_id = ?2, user_id = ?3, inner_line = ?4, state = ?5,
                    unitalk_call_id = ?6, reason = ?7, updated_at = ?8 WHERE key = ?1",
            params![
                c.key,
                c.b24_call_id,
                c.user_id,
                c.inner_line,
                c.state,
                c.unitalk_call_id,
                c.reason,
                ts(now)
            ],
        )?;
        Ok(())
    }

    /// Clicks in `state`, oldest first.
    pub fn clicks_in(&self, state: &str) -> Result<Vec<Click>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLS} FROM clicks WHERE state = ?1 ORDER BY requested_at, key"
        ))?;
        let rows = st.query_map([state], click_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every click, newest first (for status and tests).
    pub fn clicks(&self) -> Result<Vec<Click>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLS} FROM clicks ORDER BY requested_at DESC, key"
        ))?;
        let rows = st.query_map([], click_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether the same user asked for the same number since `since` (a double click).
    pub fn click_recent(&self, user_id: i64, number: &str, since: DateTime<Utc>) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM clicks WHERE user_id = ?1 AND number = ?2 AND requested_at >= ?3
                   AND state != 'ignored' LIMIT 1",
                params![user_id, number, ts(since)],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// A Unitalk call claims a click: the call's ledger row (now carrying the click's
    /// `CALL_ID`, so it is never registered) and the click, in one transaction.
    pub fn claim_click(
        &mut self,
        click: &Click,
        row: &LedgerRow,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        super::ledger::save_ledger(&tx, row, now)?;
        tx.execute(
            "UPDATE clicks SET state = 'claimed', unitalk_call_id = ?2, updated_at = ?3 WHERE key = ?1",
            params![click.key, row.call_id, ts(now)],
        )?;
        tx.commit()?;
        Ok(())
    }
}
