//! Pipeline v2: pull and push decoupled through the ledger. Batches fill across windows, late
//! recordings are caught by narrow re-pulls, long calls by the sweep. Library passes over real
//! HTTP with a manual clock.

use chrono::{Duration, NaiveDateTime};
use ubsync::sim::scenario::Scenario;
use ubsync::store::ledger::Stage;

use crate::harness::{pass, TestEnv};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

fn ops() -> Scenario {
    Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_full_across_windows() {
    // 120 answered calls without recordings, spread over ten hours: one or two calls per
    // window of 5 minutes. Each call is a two-command chain, so a full batch carries 50.
    let mut s = ops();
    for i in 0..120 {
        let at = n("2026-11-22 00:00:00") + Duration::minutes(5 * i);
        s.add_call(at, "OUT", "101", &["380501112233"], "ANSWER", 30, None);
    }
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22 00:00:00\"\nmax_window = \"5m\"\n",
    );
    let ctx = env.ctx().await;
    let before = env.sims.bitrix24.requests().len();
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.pushed, 120, "{summary:?}");
    assert!(summary.windows > 100, "{summary:?}");
    let sizes: Vec<usize> = env.sims.bitrix24.requests()[before..]
        .iter()
        .filter(|r| r.method == "batch" && r.commands.iter().any(|c| c.contains("register")))
        .map(|r| r.commands.len())
        .collect();
    assert_eq!(
        sizes,
        vec![50, 50, 50, 50, 40],
        "batches fill across windows"
    );
    assert_eq!(env.sims.bitrix24.calls().len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_appears_a_day_later_is_attached_without_a_second_registration() {
    let mut s = ops();
    let id = s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/day-late.mp3"),
    );
    // An unrelated missed call, which never awaits a recording.
    s.add_call(
        n("2026-11-22 13:10:00"),
        "IN",
        "380501112244",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    s.calls[0].link_delay = Duration::hours(20);
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert_eq!((first.pushed, first.recordings), (2, 0), "{first:?}");
    let watch = ctx.store.lock().recording_watch_counts().unwrap();
    assert_eq!(
        watch,
        vec![("awaiting".to_string(), 1), ("not_expected".to_string(), 1)]
    );
    // Passes every minute for a day: the call's window is long out of the lookback.
    let mut attached_at = None;
    for minute in 1..=(24 * 60) {
        env.clock.advance(Duration::minutes(1));
        let s = pass(&ctx).await.unwrap();
        if s.recordings > 0 {
            attached_at = Some(minute);
            break;
        }
    }
    let minute = attached_at.expect("the late link is attached within the wait");
    // The call ended at 13:01 local, the passes start at 14:00: the link appears 20 h after
    // the end, 1141 minutes in; re-checks are at most an hour apart.
    assert!(
        (1141..=1141 + 61).contains(&minute),
        "attached after {minute} minutes"
    );
    assert_eq!(
        env.sims.bitrix24.calls().len(),
        2,
        "never a second registration"
    );
    let st = env
        .sims
        .bitrix24
        .stats()
        .into_iter()
        .find(|r| r.record_url.is_some())
        .unwrap();
    assert_eq!(st.record_url.as_deref(), Some("https://rec/day-late.mp3"));
    let l = ctx
        .store
        .lock()
        .ledger_row(&id.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(l.stage, Stage::Done);
    let watch = ctx.store.lock().recording_watch_counts().unwrap();
    assert!(watch.contains(&("attached".to_string(), 1)), "{watch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awaited_recording_is_given_up_after_the_wait_and_counted() {
    let mut s = ops();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22 12:00:00\"\nrecording_wait = \"2h\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let mut given_up = 0;
    let mut unitalk_requests = 0;
    for _ in 0..(3 * 60 / 5) {
        env.clock.advance(Duration::minutes(5));
        let s = pass(&ctx).await.unwrap();
        given_up += s.recordings_given_up;
        unitalk_requests += s.recording_rechecks;
    }
    assert_eq!(given_up, 1);
    assert!(
        (3..=12).contains(&unitalk_requests),
        "re-checks are spaced out: {unitalk_requests}"
    );
    let watch = ctx.store.lock().recording_watch_counts().unwrap();
    assert_eq!(watch, vec![("given_up".to_string(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forty_minute_call_is_delivered_by_the_sweep_soon_after_it_ends() {
    let mut s = ops();
    // Starts at 13:00 local (11:00 UTC), lasts 40 minutes, appears in history at 13:40.
    let id = s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        2400,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:30:00\"\n");
    let ctx = env.ctx().await;
    // t0 is 14:00 local; rewind to 13:05 and run a pass a minute, as the timer does.
    env.clock.set(crate::harness::t0() - Duration::minutes(55));
    let mut delivered_at = None;
    for minute in 0..60 {
        let s = pass(&ctx).await.unwrap();
        if s.pushed > 0 {
            delivered_at = Some(env.clock.now());
            break;
        }
        let _ = minute;
        env.clock.advance(Duration::minutes(1));
    }
    let at = delivered_at.expect("the long call is delivered");
    let ended = crate::harness::t0() - Duration::minutes(20); // 13:40 local
    let lag = at - ended;
    // settle (2 min) + sweep_every (5 min) + one pass.
    assert!(
        lag <= Duration::minutes(8),
        "delivered {lag} after it ended"
    );
    let l = ctx
        .store
        .lock()
        .ledger_row(&id.to_string())
        .unwrap()
        .unwrap();
    assert!(matches!(l.stage, Stage::Done | Stage::Finished), "{l:?}");
    assert_eq!(env.sims.bitrix24.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_record_url_on_finish_an_answered_call_takes_two_commands() {
    let mut s = ops();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/1.mp3"),
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22 12:00:00\"\nrecord_url_on_finish = true\n",
    );
    let ctx = env.ctx().await;
    let before = env.sims.bitrix24.requests().len();
    let summary = pass(&ctx).await.unwrap();
    assert_eq!((summary.pushed, summary.recordings), (1, 1), "{summary:?}");
    let commands: Vec<String> = env.sims.bitrix24.requests()[before..]
        .iter()
        .filter(|r| r.method == "batch")
        .flat_map(|r| r.commands.clone())
        .filter(|c| c.starts_with("telephony"))
        .collect();
    assert_eq!(
        commands,
        vec![
            "telephony.externalcall.register",
            "telephony.externalcall.finish"
        ]
    );
    assert_eq!(
        env.sims.bitrix24.stats()[0].record_url.as_deref(),
        Some("https://rec/1.mp3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_are_not_calls_are_quarantined_and_never_pushed() {
    use serde_json::json;
    let mut s = ops();
    let good = s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let base = s.calls[0].clone();
    let bad = [
        json!({"id": 1.5, "date": "2026-11-22 13:01:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "NOANSWER"}),
        json!({"id": -7, "date": "2026-11-22 13:02:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "NOANSWER"}),
        json!({"id": 1e30, "date": "2026-11-22 13:03:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "NOANSWER"}),
        json!({"id": "call-x", "date": "2026-11-22 13:04:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "NOANSWER"}),
        json!({"id": 9001, "date": "2026-11-22 13:05:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "NOANSWER", "secondsFullTime": 200000}),
        json!({"id": 9002, "date": "2026-11-22 13:06:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": null, "secondsFullTime": null}),
    ];
    for (i, raw) in bad.iter().enumerate() {
        let mut c = base.clone();
        c.id = 5000 + i as u64;
        c.date = n("2026-11-22 13:01:00") + Duration::minutes(i as i64);
        c.raw_override = Some(raw.clone());
        s.calls.push(c);
    }
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!((summary.pushed, summary.tasks), (1, 1), "{summary:?}");
    assert_eq!(summary.quarantined, bad.len() as u64, "{summary:?}");
    assert_eq!(env.sims.bitrix24.calls().len(), 1);
    let q = ctx.store.lock().quarantined().unwrap();
    let reasons: Vec<&str> = q.iter().map(|q| q.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .filter(|r| r.contains("not a call id"))
            .count()
            == 4,
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("beyond a day")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no `state`")),
        "{reasons:?}"
    );
    let l = ctx
        .store
        .lock()
        .ledger_row(&good.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(l.stage, Stage::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_outside_a_year_back_and_a_day_ahead_are_quarantined() {
    use serde_json::json;
    let mut s = ops();
    let base = {
        s.add_call(
            n("2026-11-22 13:00:00"),
            "IN",
            "380501112233",
            &["101"],
            "NOANSWER",
            0,
            None,
        );
        s.calls.pop().unwrap()
    };
    // Served in the pulled window, but dated 1970 and 2099 in the record itself.
    for (i, date) in ["1970-01-01 00:00:00", "2099-01-01 00:00:00"]
        .iter()
        .enumerate()
    {
        let mut c = base.clone();
        c.id = 6000 + i as u64;
        c.raw_override = Some(json!({"id": 6000 + i, "date": date, "direction": "IN",
            "from": "380501112233", "to": ["101"], "state": "NOANSWER"}));
        s.calls.push(c);
    }
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(
        (summary.pushed, summary.tasks, summary.quarantined),
        (0, 0, 2),
        "{summary:?}"
    );
    assert!(
        env.sims.bitrix24.tasks().is_empty(),
        "no task with a 1970 or 2099 deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_two_days_ahead_never_moves_the_cursor_past_unitalk_time() {
    let mut s = ops();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let mut ctx = env.ctx().await;
    // ubsync's clock jumps two days ahead; Unitalk's (the simulators') does not.
    ctx.clock = ubsync::clock::Clock::manual(crate::harness::t0() + Duration::days(2));
    let first = pass(&ctx).await.unwrap();
    assert_eq!(first.pushed, 1, "{first:?}");
    let cursor = ctx
        .store
        .lock()
        .cursor(ubsync::sync::HISTORY_STREAM)
        .unwrap()
        .unwrap();
    assert!(
        cursor <= crate::harness::t0() + Duration::minutes(1),
        "cursor {cursor} ran ahead of Unitalk's time"
    );
    // A call that ends after that pass is still found once the clock is right again.
    let mut late = ops();
    late.add_call(
        n("2026-11-22 14:01:00"),
        "IN",
        "380501112244",
        &["101"],
        "ANSWER",
        30,
        None,
    );
    late.calls[0].id = 2001;
    env.sims.unitalk.add_calls(late.calls.clone());
    env.clock.advance(Duration::minutes(10));
    ctx.clock = env.clock.clone();
    let second = pass(&ctx).await.unwrap();
    assert_eq!(second.pushed, 1, "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_in_the_future_is_rewound_and_the_calls_behind_it_are_read() {
    let mut s = ops();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "");
    let ctx = env.ctx().await;
    // An older ubsync (or a pass without Unitalk's time) left the cursor two days ahead.
    let future = crate::harness::t0() + Duration::days(2);
    ctx.store
        .lock()
        .set_cursor(ubsync::sync::HISTORY_STREAM, future, future)
        .unwrap();
    let summary = pass(&ctx).await.unwrap();
    assert!(summary.cursor_rewound, "{summary:?}");
    assert_eq!(
        summary.pushed, 1,
        "the call behind the rewound cursor is read: {summary:?}"
    );
    let cursor = ctx
        .store
        .lock()
        .cursor(ubsync::sync::HISTORY_STREAM)
        .unwrap()
        .unwrap();
    assert!(cursor <= crate::harness::t0(), "{cursor}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_portal_refuses_is_quarantined_with_its_reason() {
    for mode in ["telephony", "activity"] {
        refused_task(mode).await;
    }
}

async fn refused_task(mode: &str) {
    use ubsync::sim::scenario::CrmKind;
    // The client's CRM responsible (user 55) does not exist in the portal: tasks.task.add is
    // refused for good.
    let mut s = ops().with_client(CrmKind::Contact, 900, "+380501119999", 55);
    let id = s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501119999",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(mode, "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(
        (summary.pushed, summary.tasks),
        (1, 0),
        "{mode}: {summary:?}"
    );
    assert_eq!(
        summary.quarantined, 1,
        "{mode}: the refusal is counted: {summary:?}"
    );
    let q = ctx.store.lock().quarantined().unwrap();
    assert_eq!(q.len(), 1, "{mode}: {q:?}");
    assert_eq!(q[0].call_id.as_deref(), Some(id.to_string().as_str()));
    assert!(
        q[0].reason.contains("tasks.task.add"),
        "{mode}: {}",
        q[0].reason
    );
    assert!(env.sims.bitrix24.tasks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_error_from_phones_inner_leaves_call_sync_running() {
    use ubsync::sim::unitalk::UnitalkFault;
    let mut s = ops();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-22 12:00:00\"\n");
    let ctx = env.ctx().await;
    for fault in [
        UnitalkFault::Error("Authorization failed".into()),
        UnitalkFault::Http(404),
        UnitalkFault::Error("Method not found".into()),
    ] {
        env.sims.unitalk.inject(Some("/phones/inner"), fault);
    }
    let first = pass(&ctx).await.unwrap();
    assert_eq!(first.pushed, 1, "{first:?}");
    env.clock.advance(Duration::minutes(1));
    pass(&ctx).await.unwrap();
    env.clock.advance(Duration::minutes(1));
    pass(&ctx).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_entities_found_are_remembered_across_passes_until_the_cache_expires() {
    let client = "+380501112233";
    let mut s = ops().with_client(ubsync::sim::scenario::CrmKind::Contact, 797, client, 11);
    s.add_call(
        n("2026-11-22 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        30,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "activity",
        "[sync]\nstart = \"2026-11-22 00:00:00\"\ncrm_cache = \"10m\"\n",
    );
    let ctx = env.ctx().await;
    let asked = |env: &TestEnv, from: usize| {
        env.sims.bitrix24.requests()[from..]
            .iter()
            .flat_map(|r| r.commands.iter().chain(std::iter::once(&r.method)))
            .filter(|c| c.as_str() == "crm.duplicate.findbycomm")
            .count()
    };
    let first = pass(&ctx).await.unwrap();
    assert_eq!(first.pushed, 1, "{first:?}");
    assert_eq!(asked(&env, 0), 1);
    // The same client calls again a few minutes later: the contact is known, not asked for.
    let later = |id: u64, at: &str| {
        let mut t = ops();
        t.add_call(n(at), "IN", "380501112233", &["102"], "ANSWER", 20, None);
        let mut c = t.calls.pop().unwrap();
        c.id = id;
        c
    };
    env.sims
        .unitalk
        .add_calls([later(5001, "2026-11-22 14:01:00")]);
    env.clock.advance(Duration::minutes(5));
    let seen = env.sims.bitrix24.requests().len();
    let second = pass(&ctx).await.unwrap();
    assert_eq!(second.pushed, 1, "{second:?}");
    assert_eq!(asked(&env, seen), 0, "remembered");
    let acts = env.sims.bitrix24.activities();
    assert!(
        acts.iter().all(|a| a.owner_id == 797),
        "both on the contact"
    );
    // Past sync.crm_cache, Bitrix24 is asked again (the CRM may have changed).
    env.sims
        .unitalk
        .add_calls([later(5002, "2026-11-22 14:10:00")]);
    env.clock.advance(Duration::minutes(11));
    let seen = env.sims.bitrix24.requests().len();
    let third = pass(&ctx).await.unwrap();
    assert_eq!(third.pushed, 1, "{third:?}");
    assert_eq!(asked(&env, seen), 1, "expired");
}
