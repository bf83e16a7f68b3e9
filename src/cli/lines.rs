//! `ubsync lines`: each Unitalk inner line, its status and since when, its operator and the
//! Bitrix24 user it maps to (`UF_PHONE_INNER`), flagging lines without a user and (unless
//! `--offline`) Bitrix24 users whose `UF_PHONE_INNER` names no Unitalk line.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::*;
use crate::store::lines::LineRow;

/// Most `user.get` pages read (50 users each).
const MAX_USER_PAGES: u64 = 40;

fn at(t: Option<chrono::DateTime<chrono::Utc>>, tz: chrono_tz::Tz) -> String {
    t.map(|t| {
        t.with_timezone(&tz)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
    })
    .unwrap_or_default()
}

fn note(cfg: &Config, l: &LineRow) -> String {
    let mut notes = Vec::new();
    match l.b24_user {
        Some(None) => notes.push("no Bitrix24 user has this UF_PHONE_INNER".to_string()),
        None => notes.push("not looked up yet (a pass does)".to_string()),
        Some(Some(_)) => {}
    }
    if l.status
        .as_deref()
        .is_some_and(|s| cfg.rules.lines.is_offline(s))
    {
        notes.push("offline".into());
    }
    if l.alerted {
        notes.push("supervisors alerted".into());
    }
    notes.join("; ")
}

/// Active Bitrix24 users with an extension: (id, name, extension).
async fn portal_extensions(cfg: &Config) -> anyhow::Result<Vec<(i64, String, String)>> {
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let b24 = Bitrix24Client::new(&cfg.bitrix24, store, Clock::system())?;
    let mut out = Vec::new();
    let mut start = 0;
    for _ in 0..MAX_USER_PAGES {
        let env = b24
            .call(
                "user.get",
                json!({"filter": {"ACTIVE": true}, "select": ["ID", "NAME", "LAST_NAME", "UF_PHONE_INNER"], "start": start}),
            )
            .await?;
        for u in env.result.as_array().cloned().unwrap_or_default() {
            let ext = u
                .get("UF_PHONE_INNER")
                .and_then(crate::bitrix24::wire::as_text)
                .unwrap_or_default();
            if ext.trim().is_empty() {
                continue;
            }
            let id = u
                .get("ID")
                .and_then(crate::bitrix24::wire::as_i64)
                .unwrap_or(0);
            let name = format!(
                "{} {}",
                u.get("NAME").and_then(Value::as_str).unwrap_or(""),
                u.get("LAST_NAME").and_then(Value::as_str).unwrap_or("")
            );
            out.push((id, name.trim().to_string(), ext.trim().to_string()));
        }
        match env.next {
            Some(n) if n > start => start = n,
            _ => break,
        }
    }
    Ok(out)
}

pub(super) async fn lines(cfg: &Config, json_out: bool, offline: bool) -> anyhow::Result<u8> {
    let store = super::open_existing(cfg)?;
    let rows = store.lines()?;
    drop(store);
    let tz = cfg.unitalk.timezone;
    let known: HashSet<&str> = rows.iter().map(|l| l.line.as_str()).collect();
    let strays: Vec<(i64, String, String)> = if offline {
        Vec::new()
    } else {
        portal_extensions(cfg)
            .await?
            .into_iter()
            .filter(|(_, _, ext)| !known.contains(ext.as_str()))
            .collect()
    };
    if json_out {
        let v = json!({
            "lines": rows.iter().map(|l| json!({
                "line": l.line,
                "status": l.status,
                "status_since": l.status_since.map(|t| t.to_rfc3339()),
                "observed_at": l.observed_at.map(|t| t.to_rfc3339()),
                "operator": l.operator,
                "bitrix24_user_id": l.b24_user.flatten(),
                "looked_up": l.b24_user.is_some(),
                "offline": l.status.as_deref().is_some_and(|s| cfg.rules.lines.is_offline(s)),
                "alerted": l.alerted,
            })).collect::<Vec<_>>(),
            "users_without_a_line": if offline { Value::Null } else {
                Value::Array(strays.iter().map(|(id, name, ext)| json!({"user_id": id, "name": name, "uf_phone_inner": ext})).collect())
            },
        });
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if rows.is_empty() {
        crate::say!("no inner lines known yet: a pass reads them from Unitalk");
    } else {
        let mut t = crate::table::plain();
        t.set_header(vec![
            "LINE",
            "STATUS",
            "SINCE",
            "OBSERVED",
            "OPERATOR",
            "BITRIX24 USER",
            "NOTE",
        ]);
        for l in &rows {
            t.add_row(vec![
                l.line.clone(),
                l.status.clone().unwrap_or_else(|| "-".into()),
                at(l.status_since, tz),
                at(l.observed_at, tz),
                l.operator.clone().unwrap_or_default(),
                l.b24_user
                    .flatten()
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| "-".into()),
                note(cfg, l),
            ]);
        }
        crate::say!("{}", crate::table::render(&t));
    }
    if !offline {
        if strays.is_empty() {
            crate::say!("every Bitrix24 user with UF_PHONE_INNER has a Unitalk line");
        } else {
            for (id, name, ext) in &strays {
                crate::say!(
                    "Bitrix24 user {id} ({name}) has UF_PHONE_INNER {ext:?}, which is no Unitalk inner line"
                );
            }
        }
    }
    Ok(0)
}
