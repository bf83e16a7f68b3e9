//! A recording link sent in `finish`'s `RECORD_URL` (the default) is unproven until the call
//! statistics show its file: a portal that did not download it gets the link again with
//! `attachRecord`; a listing that proves nothing changes nothing; no call is registered twice.

use chrono::{Duration, NaiveDateTime};
use ubsync::clock::Clock;
use ubsync::sim::scenario::Scenario;
use ubsync::sim::{Bitrix24SimConfig, Fault, FaultKind};
use ubsync::store::ledger::Stage;

use crate::harness::{pass, t0, TestEnv};

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

/// Three answered calls with links and one missed call, an hour before `t0`.
fn scenario() -> Scenario {
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    for i in 0..3 {
        s.add_call(
            n(&format!("2026-11-22 13:0{i}:00")),
            "IN",
            "380501112233",
            &["101"],
            "ANSWER",
            30,
            Some(&format!("https://rec.example/{i}.mp3")),
        );
    }
    s.add_call(
        n("2026-11-22 13:05:00"),
        "IN",
        "380509998877",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s
}

/// With `check_after`, the check waits that long (the default checks in the same pass).
async fn env_after(downloads: bool, check_after: Option<&str>) -> TestEnv {
    let b24 = Bitrix24SimConfig {
        finish_record_downloads: downloads,
        ..Default::default()
    };
    let env = TestEnv::with(scenario(), b24, Clock::manual(t0())).await;
    let after = check_after
        .map(|a| format!("record_check_after = \"{a}\"\n"))
        .unwrap_or_default();
    env.write_config(
        "telephony",
        &format!("[sync]\nstart = \"2026-11-22 12:00:00\"\n{after}[tasks]\nenabled = false\n"),
    );
    env
}

async fn env(downloads: bool) -> TestEnv {
    env_after(downloads, Some("10m")).await
}

/// The telephony commands the portal received since request number `from`.
fn telephony_commands(env: &TestEnv, from: usize) -> Vec<String> {
    env.sims.bitrix24.requests()[from..]
        .iter()
        .flat_map(|r| {
            if r.method == "batch" {
                r.commands.clone()
            } else {
                vec![r.method.clone()]
            }
        })
        .filter(|c| c.starts_with("telephony") || c.starts_with("voximplant"))
        .collect()
}

/// Whether every answered call's statistics row holds a recording file.
fn answered_have_files(env: &TestEnv) -> bool {
    env.sims
        .bitrix24
        .stats()
        .iter()
        .filter(|r| r.status_code == "200")
        .all(|r| r.record_file_id.is_some())
}

fn count(commands: &[String], method: &str) -> usize {
    commands.iter().filter(|c| c.as_str() == method).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_the_portal_downloaded_is_proven_and_never_sent_again() {
    let env = env(true).await;
    let ctx = env.ctx().await;
    let s = pass(&ctx).await.unwrap();
    // Sent in finish, unproven until the check: counted apart, not as recordings.
    assert_eq!(
        (s.pushed, s.recordings, s.recordings_in_finish),
        (4, 0, 3),
        "{s:?}"
    );
    let sent = telephony_commands(&env, 0);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        0,
        "{sent:?}"
    );
    assert_eq!(count(&sent, "telephony.externalcall.finish"), 4);

    // Before record_check_after, nothing is checked.
    env.clock.advance(Duration::minutes(5));
    let before = env.sims.bitrix24.requests().len();
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (0, 0), "{s:?}");
    assert_eq!(
        count(
            &telephony_commands(&env, before),
            "voximplant.statistic.get"
        ),
        0
    );

    env.clock.advance(Duration::minutes(6));
    let before = env.sims.bitrix24.requests().len();
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (3, 0), "{s:?}");
    let sent = telephony_commands(&env, before);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        0,
        "{sent:?}"
    );
    assert_eq!(
        count(&sent, "voximplant.statistic.get"),
        1,
        "one listing for the three: {sent:?}"
    );
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .filter(|r| r.record_url.is_some())
        .all(|r| r.record_attachments == 1));
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 0);

    // Proven once is proven: later passes read nothing more.
    env.clock.advance(Duration::minutes(30));
    let before = env.sims.bitrix24.requests().len();
    pass(&ctx).await.unwrap();
    assert!(telephony_commands(&env, before).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_the_portal_silently_dropped_is_sent_again_with_attach_record() {
    let env = env(false).await;
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .all(|r| r.record_file_id.is_none()));

    env.clock.advance(Duration::minutes(11));
    let before = env.sims.bitrix24.requests().len();
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (0, 3), "{s:?}");
    let sent = telephony_commands(&env, before);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        3,
        "{sent:?}"
    );
    assert_eq!(
        count(&sent, "telephony.externalcall.register"),
        0,
        "{sent:?}"
    );
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 4, "one statistics row per call");
    for r in stats.iter().filter(|r| r.status_code == "200") {
        assert!(r.record_file_id.is_some(), "{:?}", r.external_call_id);
        assert_eq!(r.record_attachments, 1);
    }
    assert_eq!(env.sims.bitrix24.calls().len(), 4, "no second registration");
    for id in ["1001", "1002", "1003"] {
        let l = ctx.store.lock().ledger_row(id).unwrap().unwrap();
        assert_eq!(l.stage, Stage::Done, "{l:?}");
        assert!(
            l.record_url.is_some() && l.record_check_at.is_none(),
            "{l:?}"
        );
    }

    // attachRecord proves itself: nothing is checked or sent again.
    env.clock.advance(Duration::minutes(30));
    let before = env.sims.bitrix24.requests().len();
    pass(&ctx).await.unwrap();
    assert!(telephony_commands(&env, before).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistics_answer_that_proves_nothing_changes_nothing() {
    let env = env(false).await;
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    env.clock.advance(Duration::minutes(11));
    // The listing runs, but its answer holds no result for the command (nor an error).
    env.sims.bitrix24.inject(Fault::once(
        Some("voximplant.statistic.get"),
        FaultKind::CommitThenAnswer {
            status: 200,
            body: r#"{"result":{"result":[],"result_error":[],"result_total":[],"result_next":[],"result_time":[]},"time":{}}"#.into(),
        },
    ));
    let before = env.sims.bitrix24.requests().len();
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (0, 0), "{s:?}");
    let sent = telephony_commands(&env, before);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        0,
        "{sent:?}"
    );
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 3);

    // The next pass reads a real listing and repairs.
    env.clock.advance(Duration::minutes(1));
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (0, 3), "{s:?}");
    assert!(answered_have_files(&env));
    assert_eq!(env.sims.bitrix24.calls().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_one_pass_ends_with_every_recording_proven() {
    let env = env_after(true, None).await;
    let ctx = env.ctx().await;
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (3, 0), "{s:?}");
    let sent = telephony_commands(&env, 0);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        0,
        "{sent:?}"
    );
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 0);
    assert_eq!(
        ctx.store
            .lock()
            .fact("bitrix24.finish_record_url")
            .unwrap()
            .as_deref(),
        Some("yes")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_that_downloads_none_of_finishs_links_gets_attach_record_from_then_on() {
    let env = env_after(false, None).await;
    let ctx = env.ctx().await;
    // One pass: the links went in finish, the check found no file, attachRecord sent them.
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.records_proven, s.records_resent), (0, 3), "{s:?}");
    let sent = telephony_commands(&env, 0);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        3,
        "{sent:?}"
    );
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .filter(|r| r.status_code == "200")
        .all(|r| r.record_file_id.is_some() && r.record_attachments == 1));
    assert_eq!(env.sims.bitrix24.calls().len(), 4, "no second registration");

    // A later call goes with attachRecord in its chain, no RECORD_URL in finish, no check.
    let mut more = scenario();
    more.add_call(
        n("2026-11-22 14:10:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        30,
        Some("https://rec.example/late.mp3"),
    );
    env.sims
        .unitalk
        .add_calls([more.calls.last().unwrap().clone()]);
    env.clock.advance(Duration::minutes(40));
    let before = env.sims.bitrix24.requests().len();
    let s = pass(&ctx).await.unwrap();
    assert_eq!(
        (s.pushed, s.recordings, s.records_resent),
        (1, 1, 0),
        "{s:?}"
    );
    let sent = telephony_commands(&env, before);
    assert_eq!(
        sent,
        vec![
            "telephony.externalcall.register",
            "telephony.externalcall.finish",
            "telephony.externalcall.attachrecord"
        ]
    );
    let late = env.sims.bitrix24.stats().into_iter().last().unwrap();
    assert!(late.record_file_id.is_some());

    // A new record_check_after tries finish's link again.
    env.edit_config(|c| c.replace("[sync]\n", "[sync]\nrecord_check_after = \"1m\"\n"));
    let ctx = env.ctx().await;
    more.add_call(
        n("2026-11-22 14:50:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        30,
        Some("https://rec.example/later.mp3"),
    );
    env.sims
        .unitalk
        .add_calls([more.calls.last().unwrap().clone()]);
    env.clock.advance(Duration::minutes(40));
    let before = env.sims.bitrix24.requests().len();
    pass(&ctx).await.unwrap();
    let sent = telephony_commands(&env, before);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        0,
        "{sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_record_url_on_finish_off_every_recording_goes_by_attach_record() {
    let env = env(false).await;
    env.edit_config(|c| c.replace("[sync]\n", "[sync]\nrecord_url_on_finish = false\n"));
    let ctx = env.ctx().await;
    let s = pass(&ctx).await.unwrap();
    assert_eq!(s.recordings, 3, "{s:?}");
    let sent = telephony_commands(&env, 0);
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        3,
        "{sent:?}"
    );
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_finish_with_its_link_is_probed_and_the_recording_still_proven() {
    // The portal runs register + finish (links kept, not downloaded) and the answer is lost.
    let env = env_after(false, None).await;
    env.sims.bitrix24.inject(Fault::once(
        Some("telephony.externalCall.finish"),
        FaultKind::CommitThenDrop,
    ));
    let ctx = env.ctx().await;
    let mut total = (0, 0);
    for _ in 0..3 {
        if let Ok(s) = pass(&ctx).await {
            total.0 += s.probed;
            total.1 += s.records_resent;
        }
        env.clock.advance(Duration::minutes(5));
    }
    assert!(total.0 > 0, "the lost batch was probed, not sent again");
    assert_eq!(
        total.1, 3,
        "the probe found URLs without files: checked, sent again"
    );
    assert_eq!(env.sims.bitrix24.calls().len(), 4, "no second registration");
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 4);
    for r in stats.iter().filter(|r| r.status_code == "200") {
        assert!(r.record_file_id.is_some(), "{:?}", r.external_call_id);
    }
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_that_cannot_be_read_never_strand_a_recording() {
    let env = env_after(false, Some("1m")).await;
    let ctx = env.ctx().await;
    let s = pass(&ctx).await.unwrap();
    assert_eq!((s.pushed, s.records_resent), (4, 0), "{s:?}");
    // Every statistics listing is answered without its result, for a long while.
    let nothing = || {
        FaultKind::CommitThenAnswer {
        status: 200,
        body: r#"{"result":{"result":[],"result_error":[],"result_total":[],"result_next":[],"result_time":[]},"time":{}}"#.into(),
    }
    };
    env.sims.bitrix24.inject(Fault::times(
        Some("voximplant.statistic.get"),
        nothing(),
        1000,
    ));
    env.clock.advance(Duration::minutes(10));
    let s = pass(&ctx).await.unwrap();
    assert_eq!(s.records_resent, 0, "not yet: {s:?}");
    env.clock.advance(Duration::minutes(25));
    let s = pass(&ctx).await.unwrap();
    assert_eq!(
        s.records_resent, 3,
        "sent again unproven after 30 minutes: {s:?}"
    );
    assert!(answered_have_files(&env));
    assert_eq!(env.sims.bitrix24.calls().len(), 4, "no second registration");
    assert_eq!(ctx.store.lock().record_checks_pending().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_push_learns_a_portal_that_does_not_download_finishs_links_from_its_first_batch() {
    // 300 answered calls with links on a portal that keeps finish's link but never downloads it.
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    for i in 0..300 {
        s.add_call(
            n("2026-11-22 13:00:00") + Duration::seconds(i * 7),
            "IN",
            &format!("38050{:07}", 1_000_000 + i),
            &["101"],
            "ANSWER",
            30,
            Some(&format!("https://rec.example/{i}.mp3")),
        );
    }
    let b24 = Bitrix24SimConfig {
        finish_record_downloads: false,
        burst: 1000.0,
        ..Default::default()
    };
    let env = TestEnv::with(s, b24, Clock::manual(t0())).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22 12:00:00\"\n[tasks]\nenabled = false\n",
    );
    let ctx = env.ctx().await;
    let p = pass(&ctx).await.unwrap();
    let sent = telephony_commands(&env, 0);
    let requests = env.sims.bitrix24.requests().len();
    assert_eq!(count(&sent, "telephony.externalcall.register"), 300, "{p}");
    // Every recording is attached (proven by attachRecord's answer) …
    assert_eq!(
        count(&sent, "telephony.externalcall.attachrecord"),
        300,
        "{p}"
    );
    assert!(answered_have_files(&env), "{p}");
    // … and only the first batch's were sent in finish before the portal was learnt.
    assert!(p.records_resent <= 25, "{p}: {requests} requests");
    // The summary counts a recording once, when proven (attachRecord's answer); links sent in
    // finish are counted apart.
    assert_eq!(p.recordings, 300, "{p}");
    assert_eq!(p.recordings_in_finish, p.records_resent, "{p}");
    assert_eq!(
        ctx.store
            .lock()
            .fact("bitrix24.finish_record_url")
            .unwrap()
            .as_deref(),
        Some("no:0")
    );
}
