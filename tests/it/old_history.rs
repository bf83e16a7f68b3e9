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
    let mut s = Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_client(CrmKind::Contact, 797, "+380501112233", 10);
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
    assert!(!text(&status).contains("quarantined 1"), "{}", text(&status));
}
