//! Unitalk simulator fidelity, per `unitalk-api.md`.

use chrono::{Duration, NaiveDateTime};
use serde_json::json;
use ubsync::sim::unitalk::DEFAULT_API_KEY;
use ubsync::sim::{Scenario, UnitalkFault};

use crate::harness::{t0, TestEnv};

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

/// Three calls on 2026-11-22 (Kyiv, UTC+2): 10:00, 11:00 and 13:50 local; t0 is 14:00 local.
fn scenario() -> Scenario {
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    s.add_call(
        n("2026-11-22 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/1"),
    );
    s.add_call(
        n("2026-11-22 11:00:00"),
        "OUT",
        "101",
        &["380501112244"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        n("2026-11-22 13:59:30"),
        "IN",
        "380501112255",
        &["101"],
        "ANSWER",
        100,
        Some("https://rec/3"),
    );
    s
}

fn window() -> serde_json::Value {
    json!({"dateFrom": "2026-11-22 00:00:00", "dateTo": "2026-11-22 23:59:59", "limit": 1000, "offset": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_2_both_authorization_forms_work_and_a_wrong_key_is_refused() {
    let env = TestEnv::start(scenario()).await;
    let raw = env
        .unitalk("history/get", Some(DEFAULT_API_KEY), window())
        .await;
    let bearer = env
        .unitalk(
            "history/get",
            Some(&format!("Bearer {DEFAULT_API_KEY}")),
            window(),
        )
        .await;
    assert_eq!(raw["count"], 2);
    assert_eq!(raw, bearer);
    let wrong = env.unitalk("history/get", Some("nope"), window()).await;
    assert_eq!(
        wrong,
        json!({"status": "Error", "message": "Authorization invalid"})
    );
    let missing = env.unitalk("users/list", None, json!({})).await;
    assert_eq!(missing["message"], "Authorization invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_2_history_is_newest_first_with_count_as_the_total_and_limit_capped_at_1000() {
    let env = TestEnv::start(scenario()).await;
    let key = Some(DEFAULT_API_KEY);
    let mut body = window();
    body["limit"] = json!(1);
    let first = env.unitalk("history/get", key, body.clone()).await;
    assert_eq!(first["count"], 2, "count is the total, not the page size");
    assert_eq!(
        first["calls"][0]["date"], "2026-11-22 11:00:00",
        "newest first"
    );
    body["offset"] = json!(1);
    let second = env.unitalk("history/get", key, body.clone()).await;
    assert_eq!(second["calls"][0]["date"], "2026-11-22 10:00:00");
    body["limit"] = json!(1001);
    let err = env.unitalk("history/get", key, body).await;
    assert_eq!(err["status"], "Error");
    let bad_date = env
        .unitalk(
            "history/get",
            key,
            json!({"dateFrom": "2026-11-22", "dateTo": "x", "limit": 10, "offset": 0}),
        )
        .await;
    assert_eq!(bad_date["status"], "Error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_3_records_carry_the_documented_fields() {
    let env = TestEnv::start(scenario()).await;
    let page = env
        .unitalk("history/get", Some(DEFAULT_API_KEY), window())
        .await;
    let c = &page["calls"][1];
    for field in [
        "id",
        "date",
        "direction",
        "from",
        "to",
        "outerNumber",
        "secondsFullTime",
        "secondsTalk",
        "state",
        "link",
    ] {
        assert!(c.get(field).is_some(), "missing {field}: {c}");
    }
    assert!(c["to"].is_array());
    assert!(
        page["calls"][0].get("link").is_none(),
        "an unanswered call has no recording"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_appear_only_after_they_end_and_recordings_may_come_a_poll_later() {
    let env = TestEnv::start(scenario()).await;
    let key = Some(DEFAULT_API_KEY);
    env.sims
        .unitalk
        .update_call(1003, |c| c.link_delay = Duration::minutes(5));
    // 13:59:30 + 110 s ends at 14:01:20 local; t0 is 14:00.
    assert_eq!(env.unitalk("history/get", key, window()).await["count"], 2);
    env.clock.advance(Duration::minutes(2));
    let page = env.unitalk("history/get", key, window()).await;
    assert_eq!(page["count"], 3);
    assert!(
        page["calls"][0].get("link").is_none(),
        "recording not ready yet"
    );
    env.clock.advance(Duration::minutes(5));
    let page = env.unitalk("history/get", key, window()).await;
    assert_eq!(page["calls"][0]["link"], "https://rec/3");
    assert_eq!(env.clock.now(), t0() + Duration::minutes(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_s4_users_and_inner_lines_are_listed_with_statuses() {
    let env = TestEnv::start(scenario()).await;
    let users = env
        .unitalk("users/list", Some(DEFAULT_API_KEY), json!({}))
        .await;
    assert_eq!(
        users["items"][0]["line"], 101,
        "line comes as a number, as live data has it"
    );
    env.sims.unitalk.set_line_status("101", "BUSY");
    let lines = env
        .unitalk("phones/inner", Some(DEFAULT_API_KEY), json!({}))
        .await;
    assert_eq!(lines["items"][0]["number"], "101");
    assert_eq!(lines["items"][0]["status"], "BUSY");
    let parsed = ubsync::unitalk::wire::parse_lines(&lines).unwrap();
    assert_eq!(parsed[0].status, "BUSY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_3_injected_faults_look_like_unitalk_errors() {
    let env = TestEnv::start(scenario()).await;
    env.sims
        .unitalk
        .inject(Some("/history/get"), UnitalkFault::InternalError);
    let r = env
        .unitalk("history/get", Some(DEFAULT_API_KEY), window())
        .await;
    assert_eq!(r, json!({"status": "Error", "message": "Internal error"}));
    assert_eq!(
        env.unitalk("history/get", Some(DEFAULT_API_KEY), window())
            .await["count"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_1_methods_answer_under_the_api_base_and_at_the_root() {
    let env = TestEnv::start(scenario()).await;
    let root = env.sims.unitalk_served.base_url();
    let r: serde_json::Value = env
        .http
        .post(format!("{root}/history/get"))
        .header("Authorization", DEFAULT_API_KEY)
        .json(&window())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["count"], 2);
    // A JSON body without a Content-Type header is read all the same.
    let bare: serde_json::Value = env
        .http
        .post(format!("{root}/history/get"))
        .header("Authorization", DEFAULT_API_KEY)
        .body(window().to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bare["count"], 2);
}
