//! Unitalk paging against servers that do not behave like ours: lying, missing and non-numeric
//! counts, pages capped below `limit`, an ignored `offset`, a count that keeps growing. Every
//! call of the window must be read (or the pass must fail without moving the cursor).

use chrono::{Duration, NaiveDateTime};
use ubsync::sim::scenario::Scenario;
use ubsync::sim::unitalk::{CountMode, Paging};

use crate::harness::{pass, TestEnv};

fn twenty_calls() -> Scenario {
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    let first = NaiveDateTime::parse_from_str("2026-11-22 12:00:00", "%Y-%m-%d %H:%M:%S").unwrap();
    for i in 0..20 {
        s.add_call(
            first + Duration::minutes(3 * i),
            "OUT",
            "101",
            &["380501112233"],
            "ANSWER",
            20,
            None,
        );
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_read_whatever_count_and_page_size_say() {
    let cases: Vec<(&str, Paging)> = vec![
        (
            "count 5 too small",
            Paging {
                count: CountMode::Less(15),
                ..Default::default()
            },
        ),
        (
            "count missing",
            Paging {
                count: CountMode::Missing,
                ..Default::default()
            },
        ),
        (
            "count not a number",
            Paging {
                count: CountMode::NonNumeric,
                ..Default::default()
            },
        ),
        (
            "pages capped at 5",
            Paging {
                page_cap: Some(5),
                ..Default::default()
            },
        ),
        (
            "capped pages and a lying count",
            Paging {
                page_cap: Some(5),
                count: CountMode::Less(15),
                ..Default::default()
            },
        ),
        (
            "count keeps growing",
            Paging {
                count: CountMode::Growing,
                ..Default::default()
            },
        ),
        (
            "offset ignored",
            Paging {
                ignore_offset: true,
                page_cap: Some(4),
                ..Default::default()
            },
        ),
    ];
    for (what, paging) in cases {
        let env = TestEnv::start(twenty_calls()).await;
        env.sims.unitalk.set_paging(paging);
        env.write_config(
            "telephony",
            "[sync]\nstart = \"2026-11-22 11:00:00\"\nmax_window = \"2h\"\n",
        );
        let ctx = env.ctx().await;
        let summary = pass(&ctx).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(summary.pushed, 20, "{what}: {summary:?}");
        assert_eq!(env.sims.bitrix24.calls().len(), 20, "{what}");
        // Bounded: no endless paging.
        assert!(summary.unitalk_requests < 200, "{what}: {summary:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_cannot_be_read_completely_fails_the_pass_and_keeps_the_cursor() {
    // Six calls in the same minute, a server that ignores offset and serves two per page: no
    // split can make the window readable.
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    let at = NaiveDateTime::parse_from_str("2026-11-22 12:00:10", "%Y-%m-%d %H:%M:%S").unwrap();
    for i in 0..6 {
        s.add_call(
            at + Duration::seconds(i),
            "OUT",
            "101",
            &["380501112233"],
            "ANSWER",
            20,
            None,
        );
    }
    let env = TestEnv::start(s).await;
    env.sims.unitalk.set_paging(Paging {
        ignore_offset: true,
        page_cap: Some(2),
        ..Default::default()
    });
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 11:00:00\"\n");
    let ctx = env.ctx().await;
    let err = pass(&ctx).await.unwrap_err();
    assert!(
        err.to_string().contains("cannot be read completely"),
        "{err}"
    );
    let cursor = ctx
        .store
        .lock()
        .cursor(ubsync::sync::HISTORY_STREAM)
        .unwrap();
    let noon = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 11, 22, 10, 0, 10).unwrap();
    assert!(
        cursor.is_none_or(|c| c <= noon),
        "the cursor never passes unread records: {cursor:?}"
    );
}
