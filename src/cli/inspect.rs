//! Seeing what happened: `status` (also served as `GET /status` by the daemon), `runs` (the run
//! log) and `show` (one call's story). Text output shows times in the account's zone with the
//! offset; `--json` output is UTC.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{json, Map, Value};

use crate::clock::Clock;
use crate::config::Config;
use crate::store::{RunRecord, Store};

/// The account's local time with its offset.
fn local(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

fn utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn run_json(r: &RunRecord) -> Value {
    json!({
        "id": r.id, "job": r.job,
        "started_at": utc(r.started_at), "finished_at": r.finished_at.map(utc),
        "outcome": r.outcome, "summary": r.summary, "error": r.error,
    })
}

/// What `status --json` prints and `GET /status` serves.
pub fn status_json(store: &Store, now: DateTime<Utc>) -> anyhow::Result<Value> {
    let cursor = store.cursor(crate::sync::HISTORY_STREAM)?;
    let last = store.last_run(Some("sync"))?;
    let mut last_runs = Map::new();
    for k in JOBS {
        if let Some(r) = store.last_run(Some(k))? {
            last_runs.insert(k.into(), run_json(&r));
        }
    }
    let watch = store.recording_watch_counts()?;
    let count = |state: &str| {
        watch
            .iter()
            .find(|(k, _)| k == state)
            .map_or(0, |(_, n)| *n)
    };
    Ok(json!({
        "now": utc(now),
        "cursor": cursor.map(utc),
        "cursor_lag_seconds": cursor.map(|c| (now - c).num_seconds()),
        "last_pass": last.as_ref().map(run_json),
        "last_success": store.last_ok_run("sync")?.map(utc),
        "last_runs": last_runs,
        "follow_ups": {
            "recordings_awaiting": count("awaiting"),
            "recordings_given_up": count("given_up"),
            "recordings_unproven": store.record_checks_pending()?,
            "recording_watch": watch.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
            "last_long_call_sweep": store.cursor(crate::sync::SWEEP_STREAM)?.map(utc),
        },
        "stages": store.stage_counts()?.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
        "quarantined": store.quarantined()?.iter().map(|q| json!({
            "entry": q.id, "source": q.source, "call_id": q.call_id, "reason": q.reason,
            "since": utc(q.created_at)})).collect::<Vec<_>>(),
        "inner_lines": store.line_statuses()?.iter().map(|(l, s, t)| json!({
            "line": l, "status": s, "observed_at": utc(*t)})).collect::<Vec<_>>(),
        "events": {
            "waiting": store.inbox_waiting()?,
            "first_seen": store.seen_counts()?.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "clicks": store.clicks()?.iter().fold(std::collections::BTreeMap::<String, u64>::new(), |mut m, c| {
                *m.entry(c.state.clone()).or_default() += 1;
                m
            }),
            "uninstalled": store.fact(crate::sync::FACT_UNINSTALLED)?,
        },
    }))
}

/// The jobs the run log records.
pub const JOBS: [&str; 5] = ["sync", "backfill", "reconcile", "retry", "events"];

/// What a run did: its summary line, else its stored summary, else its error.
fn what_happened(r: &RunRecord) -> String {
    let reconcile = r
        .summary
        .as_ref()
        .filter(|_| r.job == "reconcile")
        .and_then(|s| serde_json::from_value::<crate::sync::runlog::ReconcileRun>(s.clone()).ok());
    reconcile
        .map(|run| run.to_string())
        .or_else(|| {
            r.summary
                .as_ref()
                .and_then(|s| serde_json::from_value::<crate::sync::PassSummary>(s.clone()).ok())
                .map(|s| s.to_string())
        })
        .or_else(|| r.summary.as_ref().map(Value::to_string))
        .map(|done| match &r.error {
            Some(e) => format!("{e}; done before that: {done}"),
            None => done,
        })
        .or(r.error.clone())
        .unwrap_or_default()
}

fn run_line(r: &RunRecord, tz: Tz) -> String {
    let what = what_happened(r);
    format!(
        "{} {}: {what}",
        local(r.started_at, tz),
        r.outcome.as_deref().unwrap_or("running (or killed)")
    )
}

pub fn status(cfg: &Config, json: bool) -> anyhow::Result<u8> {
    let store = super::open_existing(cfg)?;
    let now = Clock::system().now();
    if json {
        let mut v = status_json(&store, now)?;
        v["state_file"] = Value::String(cfg.state.path.display().to_string());
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let tz = cfg.unitalk.timezone;
    crate::say!("state file  {}", cfg.state.path.display());
    match store.cursor(crate::sync::HISTORY_STREAM)? {
        Some(c) => crate::say!(
            "cursor      {} ({} behind now)",
            local(c, tz),
            humantime::format_duration(std::time::Duration::from_secs(
                (now - c).num_seconds().max(0) as u64
            ))
        ),
        None => crate::say!("cursor      none yet (no pass has completed a window)"),
    }
    for k in JOBS {
        // The sync job is "the last pass" (scripts and the systemd live test read that line).
        let label = if k == "sync" {
            "last pass  ".to_string()
        } else {
            format!("last {k:<6}")
        };
        match store.last_run(Some(k))? {
            Some(r) => crate::say!("{label} {}", run_line(&r, tz)),
            None if k == "sync" => crate::say!("{label} none"),
            None => {}
        }
    }
    let stages = store.stage_counts()?;
    let stage_text: Vec<String> = stages.iter().map(|(k, v)| format!("{k} {v}")).collect();
    crate::say!(
        "calls       {}",
        if stage_text.is_empty() {
            "none".into()
        } else {
            stage_text.join(", ")
        }
    );
    let watch = store.recording_watch_counts()?;
    let count = |state: &str| {
        watch
            .iter()
            .find(|(k, _)| k == state)
            .map_or(0, |(_, n)| *n)
    };
    crate::say!(
        "follow-ups  {} calls awaiting a recording, {} given up, {} sent with finish and not yet proven; last long-call sweep {}",
        count("awaiting"),
        count("given_up"),
        store.record_checks_pending()?,
        store
            .cursor(crate::sync::SWEEP_STREAM)?
            .map(|t| local(t, tz))
            .unwrap_or_else(|| "never".into())
    );
    let clicks = store.clicks()?;
    let seen = store.seen_counts()?;
    if !clicks.is_empty() || !seen.is_empty() || store.inbox_waiting()? > 0 {
        let n = |st: &str| clicks.iter().filter(|c| c.state == st).count();
        crate::say!(
            "events      {} waiting; first seen by webhook {}, by poll {}; clicks: {} matched, {} dialing, {} cancelled",
            store.inbox_waiting()?,
            seen.iter().find(|(p, _)| p == "webhook").map_or(0, |(_, n)| *n),
            seen.iter().find(|(p, _)| p == "poll").map_or(0, |(_, n)| *n),
            n("claimed"),
            n("dialing"),
            n("cancelled")
        );
    }
    if let Some(at) = store.fact(crate::sync::FACT_UNINSTALLED)? {
        crate::say!(
            "bitrix24    the application was uninstalled from the portal ({at}): sync is stopped"
        );
    }
    let quarantined = store.quarantined()?;
    crate::say!("quarantine  {} open", quarantined.len());
    if !quarantined.is_empty() {
        let mut t = crate::table::plain();
        for q in &quarantined {
            t.add_row(vec![
                format!("  call {}", q.call_id.as_deref().unwrap_or("(no id)")),
                q.source.clone(),
                local(q.created_at, tz),
                q.reason.clone(),
            ]);
        }
        crate::say!("{}", crate::table::render(&t));
    }
    let lines = store.line_statuses()?;
    if !lines.is_empty() {
        crate::say!("inner lines");
        let mut t = crate::table::plain();
        for (l, s, at) in &lines {
            t.add_row(vec![
                format!("  {l}"),
                s.clone(),
                format!("since {}", local(*at, tz)),
            ]);
        }
        crate::say!("{}", crate::table::render(&t));
    }
    Ok(0)
}

/// `ubsync runs`: the run log, newest first.
pub fn runs(cfg: &Config, job: Option<&str>, limit: usize, json: bool) -> anyhow::Result<u8> {
    let store = super::open_existing(cfg)?;
    let runs = store.runs(job, limit)?;
    if json {
        let v: Vec<Value> = runs.iter().map(run_json).collect();
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if runs.is_empty() {
        crate::say!("no runs recorded yet");
        return Ok(0);
    }
    let tz = cfg.unitalk.timezone;
    let mut t = crate::table::plain();
    t.set_header(vec![
        "id",
        "job",
        "started",
        "took",
        "outcome",
        "what happened",
    ]);
    for r in &runs {
        let took = r
            .finished_at
            .map(|f| {
                format!(
                    "{:.1}s",
                    (f - r.started_at).num_milliseconds() as f64 / 1000.0
                )
            })
            .unwrap_or_else(|| "-".into());
        let what = what_happened(r);
        t.add_row(vec![
            r.id.to_string(),
            r.job.clone(),
            local(r.started_at, tz),
            took,
            r.outcome
                .clone()
                .unwrap_or_else(|| "running (or killed)".into()),
            what,
        ]);
    }
    crate::say!("{}", crate::table::render(&t));
    Ok(0)
}

/// `ubsync show`: one call's story.
pub fn show(cfg: &Config, what: &str, json: bool) -> anyhow::Result<u8> {
    let store = super::open_existing(cfg)?;
    let ids = store.find_calls(what, 20)?;
    if ids.is_empty() {
        crate::redact::complain(&format!(
            "ubsync: no call matches {what:?} in the state file (give a Unitalk call id, an EXTERNAL_CALL_ID like unitalk-123, or a phone number; calls older than the first pass were never pulled — `ubsync backfill` pulls them)"
        ));
        return Ok(1);
    }
    let tz = cfg.unitalk.timezone;
    let mut stories = Vec::new();
    for id in &ids {
        if let Some(s) = store.call_story(id)? {
            stories.push(s);
        }
    }
    if json {
        let v: Vec<Value> = stories
            .iter()
            .map(|s| {
                let l = s.ledger.as_ref();
                json!({
                    "call_id": s.call_id,
                    "external_call_id": format!("unitalk-{}", s.call_id),
                    "started_at": utc(s.started_at),
                    "unitalk_record": serde_json::from_str::<Value>(&s.raw).unwrap_or(Value::String(s.raw.clone())),
                    "observed_at": utc(s.observed_at),
                    "first_seen_at": utc(s.first_seen_at),
                    "stage": l.map(|l| l.stage.as_str()),
                    "reason": l.and_then(|l| l.reason.clone()),
                    "bitrix24": l.map(|l| json!({
                        "call_id": l.b24_call_id, "statistic_id": l.b24_stat_id,
                        "activity_id": l.b24_activity_id, "task_id": l.task_id, "lead_id": l.lead_id,
                        "crm_entity_type": l.crm_entity_type, "crm_entity_id": l.crm_entity_id,
                        "responsible_id": l.responsible_id, "record_url_acknowledged": l.record_url.is_some(),
                    })),
                    "attempts": l.map(|l| l.attempts),
                    "last_error": l.and_then(|l| l.last_error.clone()),
                    "next_attempt_at": l.and_then(|l| l.next_attempt_at).map(utc),
                    "in_flight_since": l.and_then(|l| l.in_flight_since).map(utc),
                    "quarantine": s.quarantine.iter().map(|(q, released)| json!({
                        "entry": q.id, "source": q.source, "reason": q.reason,
                        "since": utc(q.created_at), "released_at": released.map(utc)})).collect::<Vec<_>>(),
                    "recording": s.recording.as_ref().map(|(state, until, checks)| json!({
                        "state": state, "until": utc(*until), "checks": checks})),
                    "verified_at": s.verified_at.map(utc),
                })
            })
            .collect();
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for (n, s) in stories.iter().enumerate() {
        if n > 0 {
            crate::say!("");
        }
        let raw: Value = serde_json::from_str(&s.raw).unwrap_or_default();
        let field = |k: &str| match raw.get(k) {
            None | Some(Value::Null) => "-".to_string(),
            Some(Value::String(v)) => v.clone(),
            Some(v) => v.to_string(),
        };
        let mut t = crate::table::plain();
        let mut row = |k: &str, v: String| {
            t.add_row(vec![k.to_string(), v]);
        };
        row(
            "call",
            format!("{} (EXTERNAL_CALL_ID unitalk-{})", s.call_id, s.call_id),
        );
        row("started", local(s.started_at, tz));
        row(
            "unitalk",
            format!(
                "{} from {} to {}, state {}, talk {} s of {} s, line {}, group {}",
                field("direction"),
                field("from"),
                field("to"),
                field("state"),
                field("secondsTalk"),
                field("secondsFullTime"),
                field("outerNumber"),
                field("lastGroupName")
            ),
        );
        row(
            "recording",
            match raw.get("link").and_then(Value::as_str) {
                Some(_) => "a link is known".into(),
                None => "no link yet".into(),
            },
        );
        row(
            "observed",
            format!(
                "first {}, last {}",
                local(s.first_seen_at, tz),
                local(s.observed_at, tz)
            ),
        );
        match &s.ledger {
            None => row("ledger", "no row".into()),
            Some(l) => {
                row(
                    "stage",
                    format!(
                        "{}{}",
                        l.stage.as_str(),
                        l.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                );
                let ids: Vec<String> = [
                    l.b24_call_id.as_ref().map(|c| format!("CALL_ID {c}")),
                    l.b24_stat_id.map(|i| format!("statistic {i}")),
                    l.b24_activity_id.map(|i| format!("activity {i}")),
                    l.task_id.map(|i| format!("task {i}")),
                    l.lead_id.map(|i| format!("lead {i}")),
                    l.crm_entity_type
                        .as_ref()
                        .zip(l.crm_entity_id)
                        .map(|(k, i)| format!("{k} {i}")),
                    l.responsible_id.map(|u| format!("responsible user {u}")),
                ]
                .into_iter()
                .flatten()
                .collect();
                row(
                    "bitrix24",
                    if ids.is_empty() {
                        "nothing acknowledged yet".into()
                    } else {
                        ids.join(", ")
                    },
                );
                row(
                    "attempts",
                    format!(
                        "{}{}{}",
                        l.attempts,
                        l.last_error
                            .as_ref()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default(),
                        l.next_attempt_at
                            .map(|t| format!(", next attempt {}", local(t, tz)))
                            .unwrap_or_default()
                    ),
                );
                if let Some(t) = l.in_flight_since {
                    row(
                        "in flight",
                        format!(
                            "since {} (looked up in Bitrix24 before anything is sent again)",
                            local(t, tz)
                        ),
                    );
                }
            }
        }
        if let Some((state, until, checks)) = &s.recording {
            row(
                "rec. watch",
                format!("{state}, {checks} re-checks, until {}", local(*until, tz)),
            );
        }
        for (q, released) in &s.quarantine {
            row(
                "quarantine",
                format!(
                    "{} {}: {}{}",
                    local(q.created_at, tz),
                    q.source,
                    q.reason,
                    released
                        .map(|r| format!(" (released {})", local(r, tz)))
                        .unwrap_or_default()
                ),
            );
        }
        if let Some(v) = s.verified_at {
            row(
                "verified",
                format!("looked up in Bitrix24 at {}", local(v, tz)),
            );
        }
        crate::say!("{}", crate::table::render(&t));
    }
    Ok(0)
}
