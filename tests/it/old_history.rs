//! Issue #19's defects found from outside, through the real binary: old history, older Unitalk
//! records, short client numbers.

use chrono::{Duration, NaiveDate, NaiveDateTime};
use ubsync::sim::scenario::{CrmKind, Scenario};

use crate::cli_sync::yesterday;
use crate::harness::text;

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn at(day: NaiveDate, hms: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(&format!("{day} {hms}"), "%Y-%m-%d %H:%M:%S").unwrap()
}

use crate::cli_sync::env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_a_day_two_years_back_delivers_its_calls() {
    let old = yesterday() - Duration::days(730);
    let mut s = Scenario::empty(KYIV).with_operator(10, "101").with_client(
        CrmKind::Contact,
        797,
        "+380501112233",
        10,
    );
    s.add_call(
        at(old, "10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    s.add_call(
        at(old, "11:00:00"),
        "IN",
        "380671234567",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = env(s).await;
    let day = old.to_string();
    let out = env
        .ubsync(&["backfill", "--from", &day, "--to", &day])
        .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(!t.contains("broken date"), "{t}");
    assert_eq!(env.sims.bitrix24.stats().len(), 2, "{t}");
    assert_eq!(env.sims.bitrix24.tasks().len(), 1, "the missed call's task");
    let status = env.ubsync(&["status"]).await;
    assert!(
        !text(&status).contains("quarantined 1"),
        "{}",
        text(&status)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_records_without_state_take_the_outcome_from_cause_and_a_missed_call_gets_its_task() {
    let day = yesterday();
    let mut s = Scenario::empty(KYIV).with_operator(10, "101");
    let older = |s: &mut Scenario, hms: &str, from: &str, state: &str, talk, cause| {
        let id = s.add_call(at(day, hms), "IN", from, &["101"], state, talk, None);
        let c = s.calls.iter_mut().find(|c| c.id == id).unwrap();
        c.older_format = true;
        c.cause = cause;
        id
    };
    let missed = older(&mut s, "10:00:00", "380671234567", "NOANSWER", 0, Some(19));
    let busy = older(&mut s, "10:10:00", "380671234568", "BUSY", 0, Some(17));
    let talked = older(&mut s, "10:20:00", "380671234569", "ANSWER", 40, Some(16));
    // A normal clearing without talk time: it may have been a conversation.
    let unknown = older(&mut s, "10:30:00", "380671234570", "ANSWER", 0, Some(16));
    let env = env(s).await;
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let stats = env.sims.bitrix24.stats();
    let code = |id: u64| {
        stats
            .iter()
            .find(|r| {
                r.external_call_id
                    .as_deref()
                    .is_some_and(|e| e.ends_with(&id.to_string()))
            })
            .map(|r| r.status_code.clone())
    };
    assert_eq!(code(missed).as_deref(), Some("304"), "{stats:?}");
    assert_eq!(code(busy).as_deref(), Some("486"), "{stats:?}");
    assert_eq!(code(talked).as_deref(), Some("200"), "{stats:?}");
    assert_eq!(code(unknown), None, "an unknown outcome is not pushed");
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        2,
        "the missed and the busy call get their tasks"
    );
    let show = env.ubsync(&["show", &unknown.to_string()]).await;
    assert!(text(&show).contains("quarantined"), "{}", text(&show));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_digit_service_number_is_a_client_and_a_skipped_internal_call_says_why() {
    let day = yesterday();
    let mut s = Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102");
    let service = s.add_call(
        at(day, "10:00:00"),
        "IN",
        "74321",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let internal = s.add_call(
        at(day, "10:10:00"),
        "OUT",
        "101",
        &["102"],
        "ANSWER",
        20,
        None,
    );
    let env = env(s).await;
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].call_type, 2, "incoming");
    assert!(stats[0].phone.ends_with("74321"), "{}", stats[0].phone);
    assert_eq!(env.sims.bitrix24.tasks().len(), 1, "the missed call's task");
    let show = env.ubsync(&["show", &internal.to_string()]).await;
    let t = text(&show);
    assert!(
        t.contains("internal call") && t.contains("101 to 102"),
        "{t}"
    );
    let show = env.ubsync(&["show", &service.to_string()]).await;
    assert!(!text(&show).contains("internal"), "{}", text(&show));
}
