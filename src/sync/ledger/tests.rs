//! The transitions' table tests: every outcome of every command against the row it leaves.

use super::*;
use crate::sync::call::{classify, Disposition};
use serde_json::{json, Value};
use std::collections::HashSet;

const PORTAL: Portal = Portal {
    attach_in_batch: true,
    finish_takes_link: true,
};

fn cfg() -> Config {
    crate::config::Config::parse(
        "[unitalk]\napi_key=\"k\"\n[bitrix24]\nmode=\"activity\"\nwebhook_url=\"https://p/rest/1/x/\"\ndefault_user_id = 1\n",
        std::path::Path::new("/x.toml"),
        &Default::default(),
    )
    .unwrap()
}

fn facts(state: &str, link: Option<&str>) -> CallFacts {
    let mut v = json!({"id": 7, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": state, "secondsTalk": if state == "ANSWER" { 30 } else { 0 }});
    if let Some(l) = link {
        v["link"] = json!(l);
    }
    let call = crate::unitalk::wire::parse_call(&v, chrono_tz::Europe::Kyiv).unwrap();
    let lines: HashSet<String> = ["101".to_string()].into();
    match classify(&call, &lines, &cfg().sync, &Default::default()) {
        Disposition::Push(f) => *f,
        other => panic!("{other:?}"),
    }
}

fn err(code: &str, text: &str) -> ErrorBody {
    ErrorBody {
        code: code.into(),
        description: text.into(),
    }
}

fn outcome(results: &[(&str, Value)], errors: &[(&str, ErrorBody)]) -> BatchOutcome {
    BatchOutcome {
        results: results
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        errors: errors
            .iter()
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect(),
        ..Default::default()
    }
}

/// (what came back, the row before, the stage after, whether a recording is recorded, attempts)
#[test]
fn every_chain_outcome_moves_the_row_to_its_stage() {
    let mut cfg = cfg();
    cfg.sync.record_url_on_finish = false;
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let missed = facts("NOANSWER", None);
    let answered = facts("ANSWER", Some("https://rec/7.mp3"));
    let registered = LedgerRow {
        stage: Stage::Registered,
        b24_call_id: Some("externalCall.1".into()),
        ..LedgerRow::pending("7")
    };
    let cases: Vec<(&str, &CallFacts, LedgerRow, BatchOutcome, Stage, bool, i64)> = vec![
        (
            "register + finish: a missed call waits for its task",
            &missed,
            LedgerRow::pending("7"),
            outcome(
                &[
                    ("r_7", json!({"CALL_ID": "externalCall.1"})),
                    ("f_7", json!({"ID": 5})),
                ],
                &[],
            ),
            Stage::Finished,
            false,
            0,
        ),
        (
            "register + finish + attachRecord: nothing left",
            &answered,
            LedgerRow::pending("7"),
            outcome(
                &[
                    ("r_7", json!({"CALL_ID": "externalCall.1"})),
                    ("f_7", json!({"ID": 5})),
                    ("a_7", json!({"FILE_ID": 9})),
                ],
                &[],
            ),
            Stage::Done,
            true,
            0,
        ),
        (
            "register refused for a retryable reason: pending, one attempt counted",
            &missed,
            LedgerRow::pending("7"),
            outcome(
                &[],
                &[("r_7", err("INTERNAL_SERVER_ERROR", "Internal error"))],
            ),
            Stage::Pending,
            false,
            1,
        ),
        (
            "register refused for good: quarantined",
            &missed,
            LedgerRow::pending("7"),
            outcome(
                &[],
                &[("r_7", err("ERROR_CORE", "Unsupported phone number format"))],
            ),
            Stage::Quarantined,
            false,
            1,
        ),
        (
            "finish only, after an earlier register",
            &answered,
            registered.clone(),
            outcome(&[("f_7", json!({"ID": 5}))], &[]),
            Stage::Finished,
            false,
            0,
        ),
        (
            "no answer for any command: the row stays as it was",
            &missed,
            registered.clone(),
            outcome(&[], &[]),
            Stage::Registered,
            false,
            0,
        ),
        (
            "attachRecord answered without a file: finished, retried",
            &answered,
            registered,
            outcome(
                &[
                    ("f_7", json!({"ID": 5})),
                    ("a_7", json!({"uploadUrl": "https://p/u"})),
                ],
                &[],
            ),
            Stage::Finished,
            false,
            1,
        ),
    ];
    for (what, f, before, out, stage, recorded, attempts) in cases {
        let (row, _) = record_chain(&cfg, PORTAL, f, before, &out, "h", now);
        assert_eq!(row.stage, stage, "{what}: {row:?}");
        assert_eq!(row.record_url.is_some(), recorded, "{what}");
        assert_eq!(row.attempts, attempts, "{what}");
        assert!(
            row.in_flight_since.is_none(),
            "{what}: never left in flight by an answer"
        );
        assert!(
            row.record_check_at.is_none(),
            "{what}: attachRecord proves itself"
        );
    }
}

#[test]
fn a_link_sent_in_finish_is_recorded_but_unproven() {
    let cfg = cfg();
    assert!(cfg.sync.record_url_on_finish, "the default");
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let answered = facts("ANSWER", Some("https://rec/7.mp3"));
    let out = outcome(
        &[
            ("r_7", json!({"CALL_ID": "externalCall.1"})),
            ("f_7", json!({"ID": 5})),
        ],
        &[],
    );
    let (row, reason) = record_chain(
        &cfg,
        PORTAL,
        &answered,
        LedgerRow::pending("7"),
        &out,
        "h",
        now,
    );
    assert_eq!(reason, None);
    assert_eq!(row.stage, Stage::Done);
    assert_eq!(row.record_url.as_deref(), Some("https://rec/7.mp3"));
    assert_eq!(
        row.record_check_at,
        Some(now),
        "checked in the same pass by default"
    );
    // A finish that failed leaves nothing to check.
    let out = outcome(
        &[("r_7", json!({"CALL_ID": "externalCall.1"}))],
        &[("f_7", err("INTERNAL_SERVER_ERROR", "Internal error"))],
    );
    let (row, _) = record_chain(
        &cfg,
        PORTAL,
        &answered,
        LedgerRow::pending("7"),
        &out,
        "h",
        now,
    );
    assert_eq!(row.record_url, None);
    assert_eq!(row.record_check_at, None);
}

#[test]
fn a_task_outcome_is_recorded_found_again_or_retried_never_added_twice() {
    let cfg = cfg();
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let f = facts("NOANSWER", None);
    let sent = LedgerRow {
        stage: Stage::Finished,
        task_in_flight_since: Some(now),
        ..LedgerRow::pending("7")
    };
    let (row, _) = record_task(
        &cfg,
        &f,
        sent.clone(),
        &outcome(&[("t_7", json!({"task": {"id": "31"}}))], &[]),
        "h",
        now,
    );
    assert_eq!((row.task_id, row.stage), (Some(31), Stage::Done));
    assert!(row.task_in_flight_since.is_none());
    let (row, _) = record_task(
        &cfg,
        &f,
        sent.clone(),
        &outcome(&[("t_7", json!({"task": {}}))], &[]),
        "h",
        now,
    );
    assert!(
        row.task_id.is_none() && row.task_in_flight_since.is_some(),
        "a task without its id is looked up"
    );
    let (row, _) = record_task(
        &cfg,
        &f,
        sent.clone(),
        &outcome(&[], &[("t_7", err("INTERNAL_SERVER_ERROR", "x"))]),
        "h",
        now,
    );
    assert!(
        row.task_in_flight_since.is_some() && row.attempts == 1,
        "an internal error is looked up first"
    );
    // (A batch answer without this task's key never reaches `record_task`: `send_plans`
    // keeps the row in flight for the probe.)
    let _ = sent;
}

#[test]
fn a_call_found_in_the_statistics_keeps_its_recording_only_as_proven_as_it_is() {
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let link = Some("https://rec/7.mp3".to_string());
    let row = |file: bool, url: bool| CallRecord {
        call_id: Some("externalCall.1".into()),
        stat_id: Some(5),
        activity_id: Some(9),
        entity: Some(super::super::plan::Entity {
            kind: "CONTACT".into(),
            id: 797,
        }),
        record_file: file,
        record_url: url,
        ..Default::default()
    };
    // (what the row shows → recording kept, check due)
    for (file, url, kept, check) in [
        (true, true, true, false),
        (false, true, true, true),
        (false, false, false, false),
    ] {
        let l = found_in_statistics(LedgerRow::pending("7"), &row(file, url), link.clone(), now);
        assert_eq!(l.stage, Stage::Finished);
        assert_eq!(
            (l.b24_call_id.as_deref(), l.b24_stat_id, l.b24_activity_id),
            (Some("externalCall.1"), Some(5), Some(9))
        );
        assert_eq!(l.crm_entity_id, Some(797));
        assert_eq!(l.record_url.is_some(), kept, "file {file}, url {url}");
        assert_eq!(l.record_check_at.is_some(), check, "file {file}, url {url}");
    }
    // A call whose link is unknown here keeps nothing to check.
    let l = found_in_statistics(LedgerRow::pending("7"), &row(false, true), None, now);
    assert_eq!((l.record_url, l.record_check_at), (None, None));
}
