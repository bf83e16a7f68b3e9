//! The sync pipeline end to end: the library's pass over real HTTP against both simulators, with
//! a manual clock.

use chrono::{Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::json;
use ubsync::clock::Clock;
use ubsync::sim::scenario::{CrmKind, Scenario};
use ubsync::sim::{Bitrix24SimConfig, Fault, FaultKind};
use ubsync::store::ledger::Stage;

use crate::harness::{pass, t0, TestEnv, ONE_TASK_EACH};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()
}

/// Two operators (users 10 and 11 on lines 101 and 102), a contact whose responsible is 11, and a
/// lead whose responsible is 10.
fn small() -> Scenario {
    Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102")
        .with_client(CrmKind::Contact, 797, "+380501112233", 11)
        .with_client(CrmKind::Lead, 798, "+380501112244", 10)
}

fn start(date: &str) -> String {
    format!("[sync]\nstart = \"{date}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_telephony_pass_puts_every_call_in_bitrix24_once_and_a_second_pass_sends_nothing() {
    let scenario = Scenario::call_centre_day(KYIV, day(), 8, 80, 3);
    let env = TestEnv::start(scenario.clone()).await;
    env.write_config("telephony", &start("2026-11-21"));
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    let second = pass(&ctx).await.unwrap();
    let (lines, ok) = ubsync::demo::check(&scenario, &env.sims, &first, &second);
    assert!(ok, "{}", lines.join("\n"));
    assert_eq!(second.bitrix24_requests, 0);
    // Every command travelled in a batch, and every batch used non-numeric keys.
    assert!(env
        .sims
        .bitrix24
        .requests()
        .iter()
        .all(|r| r.method == "batch" || r.method == "user.current"));
    assert!(ctx
        .store
        .lock()
        .ledger_rows()
        .unwrap()
        .iter()
        .all(|l| matches!(l.stage, Stage::Done | Stage::Skipped)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_activity_pass_writes_one_activity_per_call_and_one_lead_per_unknown_number() {
    let mut s = small();
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/1.mp3"),
    );
    s.add_call(
        n("2026-11-21 10:05:00"),
        "IN",
        "380671111111",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        n("2026-11-21 10:07:00"),
        "IN",
        "380671111111",
        &["102"],
        "BUSY",
        0,
        None,
    );
    s.add_call(
        n("2026-11-21 11:00:00"),
        "OUT",
        "101",
        &["0501112244"],
        "ANSWER",
        30,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "activity",
        &format!("{}{ONE_TASK_EACH}", start("2026-11-21")),
    );
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert_eq!(first.pushed, 4, "{first:?}");
    assert_eq!(
        first.leads, 1,
        "two calls from one unknown number make one lead"
    );
    let acts = env.sims.bitrix24.activities();
    assert_eq!(acts.len(), 4);
    for id in 1001..=1004 {
        let origin = format!("unitalk-{id}");
        assert_eq!(
            acts.iter()
                .filter(|a| a.origin_id.as_deref() == Some(origin.as_str()))
                .count(),
            1,
            "{origin}"
        );
    }
    let a1 = acts
        .iter()
        .find(|a| a.origin_id.as_deref() == Some("unitalk-1001"))
        .unwrap();
    assert_eq!(
        (a1.owner_type_id, a1.owner_id, a1.direction, a1.type_id),
        (3, 797, 1, 2)
    );
    assert_eq!(a1.originator_id.as_deref(), Some("ubsync"));
    assert!(
        a1.description.contains("https://rec/1.mp3"),
        "the recording link is in the description"
    );
    assert_eq!(a1.start_time.as_deref(), Some("2026-11-21T10:00:00+02:00"));
    assert!(a1.completed);
    assert_eq!(a1.responsible_id, 10, "the operator who answered");
    let out = acts
        .iter()
        .find(|a| a.origin_id.as_deref() == Some("unitalk-1004"))
        .unwrap();
    assert_eq!(
        (out.owner_type_id, out.owner_id, out.direction),
        (1, 798, 2)
    );
    // Two missed calls from the unknown number: two tasks, both for the operator (the new lead's
    // responsible), bound to the lead.
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 2);
    let lead = &env.sims.bitrix24.created_leads()[0];
    assert!(
        tasks
            .iter()
            .all(|t| t.responsible_id == 11 && t.uf_crm_task == vec![format!("L_{}", lead.id)]),
        "{tasks:?}"
    );
    let again = pass(&ctx).await.unwrap();
    assert_eq!(again.bitrix24_requests, 0, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_killed_after_the_send_and_before_the_record_is_finished_by_the_next_pass_without_duplicates(
) {
    let scenario = Scenario::call_centre_day(KYIV, day(), 4, 30, 5);
    let env = TestEnv::start(scenario.clone()).await;
    // A pass that stops at the first failure stands for one killed there.
    env.write_config(
        "telephony",
        &format!("{}max_consecutive_failures = 0\n", start("2026-11-21")),
    );
    let ctx = env.ctx().await;
    // The portal commits the first register batch, then the connection dies.
    env.sims.bitrix24.inject(Fault::once(
        Some("telephony.externalCall.register"),
        FaultKind::CommitThenDrop,
    ));
    let err = pass(&ctx).await.unwrap_err();
    assert!(err.to_string().contains("temporarily unavailable"), "{err}");
    let in_flight = ctx
        .store
        .lock()
        .ledger_rows()
        .unwrap()
        .iter()
        .filter(|l| l.stage == Stage::InFlight)
        .count();
    assert!(in_flight > 0, "the calls of the lost batch stay in flight");
    let committed = env.sims.bitrix24.stats().len();
    assert!(committed > 0, "the portal did execute the batch");

    let first = pass(&ctx).await.unwrap();
    assert!(first.probed >= in_flight as u64, "{first:?}");
    let second = pass(&ctx).await.unwrap();
    let (lines, ok) = ubsync::demo::check(&scenario, &env.sims, &first, &second);
    assert!(ok, "{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_batch_lost_in_flight_is_found_again_not_added_twice() {
    let mut s = small();
    for i in 0..5 {
        s.add_call(
            n(&format!("2026-11-21 10:0{i}:00")),
            "IN",
            "380501112233",
            &["101"],
            "NOANSWER",
            0,
            None,
        );
    }
    let env = TestEnv::start(s).await;
    // A pass that stops at the first failure stands for one killed there.
    env.write_config(
        "telephony",
        &format!(
            "{}max_consecutive_failures = 0\n{ONE_TASK_EACH}",
            start("2026-11-21")
        ),
    );
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("tasks.task.add"),
        FaultKind::CommitThenDrop,
    ));
    assert!(pass(&ctx).await.is_err());
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        5,
        "committed before the drop"
    );
    pass(&ctx).await.unwrap();
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        5,
        "found by probing, not added again"
    );
    let rows = ctx.store.lock().ledger_rows().unwrap();
    assert!(
        rows.iter()
            .all(|l| l.task_id.is_some() && l.stage == Stage::Done),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_first_paging_while_calls_arrive_loses_and_duplicates_nothing() {
    let mut s = small();
    for i in 0..12 {
        s.add_call(
            n(&format!("2026-11-21 10:{:02}:00", i * 3)),
            "IN",
            "380501112233",
            &["101"],
            "ANSWER",
            20,
            None,
        );
    }
    let env = TestEnv::start(s.clone()).await;
    // The first window is 10:00–11:00, so the first history request is its first page.
    env.write_config("telephony", &start("2026-11-21 10:00:00"));
    env.edit_config(|t| {
        t.replace(
            "timezone = \"Europe/Kyiv\"",
            "timezone = \"Europe/Kyiv\"\npage_size = 5",
        )
    });
    // Three calls land in the window after the first page was served, newer and older than it.
    let mut extra = s.clone();
    let ids: Vec<u64> = ["10:59:00", "10:01:00", "10:20:30"]
        .iter()
        .map(|t| {
            extra.add_call(
                n(&format!("2026-11-21 {t}")),
                "IN",
                "380501112233",
                &["102"],
                "ANSWER",
                15,
                None,
            )
        })
        .collect();
    let arriving: Vec<_> = extra
        .calls
        .iter()
        .filter(|c| ids.contains(&c.id))
        .cloned()
        .collect();
    env.sims
        .unitalk
        .add_calls_after_history_request(1, arriving);
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.pushed, 15, "{summary:?}");
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 15);
    let mut ext: Vec<_> = stats
        .iter()
        .map(|r| r.external_call_id.clone().unwrap())
        .collect();
    ext.sort();
    ext.dedup();
    assert_eq!(ext.len(), 15, "no call twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_that_appears_a_pass_late_is_attached_without_a_second_registration() {
    let mut s = small();
    let id = s.add_call(
        n("2026-11-22 13:50:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/late.mp3"),
    );
    s.calls[0].link_delay = Duration::minutes(15);
    let env = TestEnv::start(s).await;
    env.write_config("telephony", &start("2026-11-22 13:00:00"));
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert_eq!((first.pushed, first.recordings), (1, 0));
    assert_eq!(env.sims.bitrix24.stats()[0].record_url, None);
    env.clock.advance(Duration::minutes(20));
    let before = env.sims.bitrix24.requests().len();
    let second = pass(&ctx).await.unwrap();
    assert_eq!(
        (second.changed, second.pushed, second.recordings),
        (1, 0, 1),
        "{second:?}"
    );
    let sent: Vec<_> = env.sims.bitrix24.requests()[before..]
        .iter()
        .flat_map(|r| r.commands.clone())
        .collect();
    assert_eq!(
        sent,
        vec!["telephony.externalcall.attachrecord"],
        "only the follow-up is sent"
    );
    assert_eq!(
        env.sims.bitrix24.calls().len(),
        1,
        "never a second registration"
    );
    assert_eq!(
        env.sims.bitrix24.stats()[0].record_url.as_deref(),
        Some("https://rec/late.mp3")
    );
    let l = ctx
        .store
        .lock()
        .ledger_row(&id.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(l.stage, Stage::Done);
}

/// Pushes one incoming call at each local `time` of `date` and returns the `CALL_START_DATE`s
/// Bitrix24 received, sorted, with how many statistics rows were written.
async fn starts_sent_for(date: &str, times: &[&str]) -> (Vec<String>, usize) {
    let mut s = small();
    for t in times {
        s.add_call(
            n(&format!("{date} {t}")),
            "IN",
            "380501112233",
            &["101"],
            "ANSWER",
            10,
            None,
        );
    }
    let noon = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc();
    let env = TestEnv::with(s, Bitrix24SimConfig::default(), Clock::manual(noon)).await;
    env.write_config("telephony", &start(date));
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let mut starts: Vec<String> = env
        .sims
        .bitrix24
        .calls()
        .iter()
        .map(|c| c.start_raw.clone().unwrap())
        .collect();
    starts.sort();
    (starts, env.sims.bitrix24.stats().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dst_gap_and_overlap_times_reach_bitrix24_with_the_documented_offsets() {
    // Spring: 2026-03-29, 03:00 EET jumps to 04:00 EEST; 03:30 does not exist and is read with
    // the offset before the gap.
    let (starts, _) = starts_sent_for("2026-03-29", &["02:30:00", "03:30:00", "04:10:00"]).await;
    assert_eq!(
        starts,
        vec![
            "2026-03-29T02:30:00+02:00",
            "2026-03-29T04:10:00+03:00",
            "2026-03-29T04:30:00+03:00"
        ]
    );

    // Autumn: 2026-10-25, 04:00 EEST falls back to 03:00 EET; an ambiguous 03:10 is the earlier
    // instant, and each call lands once although two windows ask for the repeated hour.
    let (starts, rows) = starts_sent_for("2026-10-25", &["02:50:00", "03:10:00", "04:10:00"]).await;
    assert_eq!(
        starts,
        vec![
            "2026-10-25T02:50:00+03:00",
            "2026-10-25T03:10:00+03:00",
            "2026-10-25T04:10:00+02:00"
        ]
    );
    assert_eq!(rows, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unitalk_state_gets_its_status_code_and_dialing_waits_for_a_later_pass() {
    let table = [
        ("ANSWER", "200"),
        ("NOANSWER", "304"),
        ("BUSY", "486"),
        ("BUSYOUT", "486"),
        ("FAIL", "603"),
        ("CHANUNAVAIL", "480"),
        ("UNREACHABLE", "480"),
        ("NOMONEY", "402"),
        ("WRONGDIR", "484"),
        ("BLOCKED", "423"),
        ("NOT_EXIST", "404"),
        ("TELEPORTED", "OTHER"),
    ];
    let mut s = small();
    let mut ids = Vec::new();
    for (i, (state, _)) in table.iter().enumerate() {
        ids.push(s.add_call(
            n(&format!("2026-11-21 10:{:02}:00", i)),
            "OUT",
            "101",
            &[&format!("38050{:07}", 2000000 + i)],
            state,
            if *state == "ANSWER" { 30 } else { 0 },
            None,
        ));
    }
    let dialing = s.add_call(
        n("2026-11-22 13:40:00"),
        "IN",
        "380501112233",
        &["101"],
        "DIALING",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", &start("2026-11-21"));
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let stats = env.sims.bitrix24.stats();
    for (id, (state, code)) in ids.iter().zip(table) {
        let row = stats
            .iter()
            .find(|r| r.external_call_id == Some(format!("unitalk-{id}")))
            .unwrap_or_else(|| panic!("{state} missing"));
        assert_eq!(row.status_code, code, "{state}");
        assert_eq!(row.call_type, 1, "outgoing");
    }
    assert!(
        !stats
            .iter()
            .any(|r| r.external_call_id == Some(format!("unitalk-{dialing}"))),
        "DIALING is not final"
    );
    let cursor = ctx.store.lock().cursor("history").unwrap().unwrap();
    assert!(
        cursor
            <= KYIV
                .from_local_datetime(&n("2026-11-22 13:40:00"))
                .unwrap()
                .with_timezone(&Utc),
        "the cursor waits for the dialing call"
    );
    env.sims.unitalk.update_call(dialing, |c| {
        c.state = "NOANSWER".into();
    });
    env.clock.advance(Duration::minutes(5));
    pass(&ctx).await.unwrap();
    let row = env
        .sims
        .bitrix24
        .stats()
        .into_iter()
        .find(|r| r.external_call_id == Some(format!("unitalk-{dialing}")))
        .expect("pushed once final");
    assert_eq!(row.status_code, "304");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_call_tasks_go_to_the_crm_responsible_else_the_operator_else_the_default_user() {
    let mut s = small();
    let known = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let via_line = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380679990001",
        &["102"],
        "BUSY",
        0,
        None,
    );
    let nobody = s.add_call(
        n("2026-11-21 10:20:00"),
        "IN",
        "380679990002",
        &[],
        "NOANSWER",
        0,
        None,
    );
    let answered = s.add_call(
        n("2026-11-21 10:30:00"),
        "IN",
        "380679990003",
        &["101"],
        "ANSWER",
        40,
        None,
    );
    let outgoing = s.add_call(
        n("2026-11-21 10:40:00"),
        "OUT",
        "101",
        &["380679990004"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        &format!(
            "{}crm_create = false\n[tasks]\ndeadline_minutes = 45\n",
            start("2026-11-21")
        ),
    );
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.tasks, 3, "{summary:?}");
    let tasks = env.sims.bitrix24.tasks();
    let task = |id: u64| {
        tasks
            .iter()
            .find(|t| t.xml_id == Some(format!("unitalk-{id}")))
            .cloned()
    };
    let t = task(known).unwrap();
    assert_eq!(
        (t.responsible_id, t.uf_crm_task.clone()),
        (11, vec!["C_797".to_string()]),
        "the contact's responsible, bound to the contact"
    );
    assert_eq!(t.title, "Missed call from +380501112233");
    assert_eq!(t.deadline.as_deref(), Some("2026-11-21T10:45:00+02:00"));
    assert!(
        t.description.contains("2026-11-21 10:00:00")
            && t.description.contains(&format!("Unitalk call {known}")),
        "{}",
        t.description
    );
    assert_eq!(
        task(via_line).unwrap().responsible_id,
        11,
        "the operator of the line that rang"
    );
    assert!(task(via_line).unwrap().uf_crm_task.is_empty());
    assert_eq!(
        task(nobody).unwrap().responsible_id,
        1,
        "bitrix24.default_user_id"
    );
    assert!(
        task(answered).is_none() && task(outgoing).is_none(),
        "only missed incoming calls get tasks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpushable_calls_are_quarantined_with_their_reason_without_blocking_the_rest() {
    let mut s = small();
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "anonymous",
        &["101"],
        "ANSWER",
        10,
        None,
    );
    let no_user = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380501112233",
        &["109"],
        "ANSWER",
        10,
        None,
    );
    let good = s.add_call(
        n("2026-11-21 10:20:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        10,
        None,
    );
    let mut broken = s.calls[0].clone();
    broken.id = 9999;
    broken.date = n("2026-11-21 10:30:00");
    broken.raw_override = Some(json!({"id": 9999, "date": "21/11/2026", "direction": "IN"}));
    s.calls.push(broken);
    let env = TestEnv::start(s).await;
    // No default user: a call to an unknown line has nobody to belong to.
    env.write_config("telephony", &start("2026-11-21"));
    env.edit_config(|t| t.replace("default_user_id = 1\n", ""));
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.pushed, 1);
    assert_eq!(summary.quarantined, 3, "{summary:?}");
    let q = ctx.store.lock().quarantined().unwrap();
    let reasons: Vec<_> = q.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"anonymous\" is not a phone number")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("inner line 109") && r.contains("default_user_id")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("21/11/2026")),
        "{reasons:?}"
    );
    assert!(
        ctx.store.lock().cursor("history").unwrap().is_some(),
        "quarantine never blocks the cursor"
    );
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .any(|r| r.external_call_id == Some(format!("unitalk-{good}"))));

    // Give line 109 a user, release the call, and it goes through.
    env.sims
        .bitrix24
        .add_user(ubsync::sim::bitrix24::PortalUser {
            id: 12,
            name: "New".into(),
            last_name: "Operator".into(),
            email: "n@example.com".into(),
            inner: Some("109".into()),
            active: true,
        });
    let entry = q
        .iter()
        .find(|e| e.call_id == Some(no_user.to_string()))
        .unwrap()
        .id;
    ctx.store.lock().release(entry, env.clock.now()).unwrap();
    ctx.store.lock().forget_unmatched_operators().unwrap();
    let again = pass(&ctx).await.unwrap();
    assert_eq!(again.pushed, 1, "{again:?}");
    let row = env
        .sims
        .bitrix24
        .stats()
        .into_iter()
        .find(|r| r.external_call_id == Some(format!("unitalk-{no_user}")))
        .unwrap();
    assert_eq!(row.portal_user_id, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_bitrix24_rejection_is_quarantined_with_the_portal_text_and_retry_does_not_re_register(
) {
    let mut s = small();
    let id = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        10,
        Some("https://rec/x.mp3"),
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", &start("2026-11-21"));
    let ctx = env.ctx().await;
    // The operator's user is deactivated between lookup and push: register fails permanently.
    env.sims
        .bitrix24
        .add_user(ubsync::sim::bitrix24::PortalUser {
            id: 10,
            name: "Gone".into(),
            last_name: "".into(),
            email: "".into(),
            inner: Some("101".into()),
            active: false,
        });
    ctx.store
        .lock()
        .set_operator_user("101", Some(10), env.clock.now())
        .unwrap();
    pass(&ctx).await.unwrap();
    let q = ctx.store.lock().quarantined().unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].reason.contains("User is not found or is not active"),
        "{}",
        q[0].reason
    );
    assert_eq!(
        ctx.store
            .lock()
            .ledger_row(&id.to_string())
            .unwrap()
            .unwrap()
            .stage,
        Stage::Quarantined
    );
    env.sims
        .bitrix24
        .add_user(ubsync::sim::bitrix24::PortalUser {
            id: 10,
            name: "Back".into(),
            last_name: "".into(),
            email: "".into(),
            inner: Some("101".into()),
            active: true,
        });
    ctx.store.lock().release(q[0].id, env.clock.now()).unwrap();
    pass(&ctx).await.unwrap();
    assert_eq!(env.sims.bitrix24.stats().len(), 1);
    assert_eq!(
        env.sims.bitrix24.stats()[0].record_url.as_deref(),
        Some("https://rec/x.mp3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_line_statuses_are_stored_and_only_newer_observations_replace_them() {
    let env = TestEnv::start(small()).await;
    env.write_config("telephony", &start("2026-11-22 13:00:00"));
    let ctx = env.ctx().await;
    env.sims.unitalk.set_line_status("101", "BUSY");
    let s = pass(&ctx).await.unwrap();
    assert_eq!(s.lines, 2);
    let lines = ctx.store.lock().line_statuses().unwrap();
    assert_eq!(lines.iter().find(|l| l.0 == "101").unwrap().1, "BUSY");
    // A late observation (older timestamp) is ignored.
    let old = env.clock.now() - Duration::hours(1);
    assert!(!ctx
        .store
        .lock()
        .observe_line_status("101", "OFFLINE", old, None)
        .unwrap());
    assert_eq!(
        ctx.store
            .lock()
            .line_statuses()
            .unwrap()
            .iter()
            .find(|l| l.0 == "101")
            .unwrap()
            .1,
        "BUSY"
    );
    let _ = t0();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_interrupted_mid_way_resumes_from_its_last_window_without_duplicates() {
    let scenario = Scenario::call_centre_day(KYIV, day(), 6, 60, 21);
    let env = TestEnv::start(scenario.clone()).await;
    env.write_config("telephony", "[sync]\nmax_window = \"2h\"\n");
    let ctx = env.ctx().await;
    let start = KYIV
        .from_local_datetime(&n("2026-11-21 00:00:00"))
        .unwrap()
        .with_timezone(&Utc);
    let end = start + Duration::days(1);
    let cancel = ctx.cancel.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let opts = |stop_after: Option<u64>| {
        let cancel = cancel.clone();
        let seen = seen.clone();
        ubsync::sync::PassOptions {
            stream: "backfill:test".into(),
            range: Some((start, end)),
            progress: Some(ubsync::sync::ProgressFn(std::sync::Arc::new(
                move |p: &ubsync::sync::Progress| {
                    seen.lock().unwrap().push((p.windows_done, p.windows_total));
                    if Some(p.windows_done) == stop_after {
                        cancel.cancel();
                    }
                },
            ))),
            ..Default::default()
        }
    };
    // Stopped after 6 of 12 two-hour windows (the day's calls run 08:00–20:00).
    let err = ubsync::sync::run_pass(&ctx, &opts(Some(6)))
        .await
        .unwrap_err();
    assert!(matches!(err, ubsync::sync::SyncError::Cancelled));
    let checkpoint = ctx.store.lock().cursor("backfill:test").unwrap().unwrap();
    assert_eq!(checkpoint, start + Duration::hours(12));
    assert!(
        ctx.store.lock().cursor("history").unwrap().is_none(),
        "a backfill keeps its own cursor"
    );

    let ctx = env.ctx().await;
    seen.lock().unwrap().clear();
    let first = ubsync::sync::run_pass(&ctx, &opts(None)).await.unwrap();
    assert_eq!(first.windows, 6, "resumed at the checkpoint");
    assert_eq!(seen.lock().unwrap().last(), Some(&(6, 6)));
    let again = ubsync::sync::run_pass(&ctx, &opts(None)).await.unwrap();
    assert_eq!(again.windows, 0);
    let (lines, ok) = ubsync::demo::check(&scenario, &env.sims, &first, &again);
    assert!(ok, "{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_activity_mode_a_corrected_call_updates_its_activity_and_never_adds_a_second() {
    let mut s = small();
    let id = s.add_call(
        n("2026-11-22 13:50:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("activity", &start("2026-11-22 13:00:00"));
    let ctx = env.ctx().await;
    assert_eq!(pass(&ctx).await.unwrap().pushed, 1);
    let before = env.sims.bitrix24.activities()[0].clone();
    assert_eq!(
        before.end_time.as_deref(),
        Some("2026-11-22T13:51:10+02:00")
    );
    // Unitalk corrects the talk time and the recording shows up.
    env.sims.unitalk.update_call(id, |c| {
        c.seconds_talk = 90;
        c.seconds_full = 100;
        c.link = Some("https://rec/fixed.mp3".into());
    });
    env.clock.advance(Duration::minutes(5));
    let n_before = env.sims.bitrix24.requests().len();
    let second = pass(&ctx).await.unwrap();
    assert_eq!(
        (second.changed, second.pushed, second.recordings),
        (1, 0, 1),
        "{second:?}"
    );
    let sent: Vec<_> = env.sims.bitrix24.requests()[n_before..]
        .iter()
        .flat_map(|r| r.commands.clone())
        .collect();
    assert_eq!(sent, vec!["crm.activity.update"]);
    let acts = env.sims.bitrix24.activities();
    assert_eq!(acts.len(), 1);
    assert_eq!(
        acts[0].end_time.as_deref(),
        Some("2026-11-22T13:51:40+02:00")
    );
    assert!(
        acts[0].description.contains("https://rec/fixed.mp3")
            && acts[0].description.contains("talk 90 s")
    );
    assert_eq!(
        pass(&ctx).await.unwrap().bitrix24_requests,
        0,
        "then nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_probe_reads_every_page_when_the_responsible_has_many_tasks() {
    let mut s = small();
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let roomy = Bitrix24SimConfig {
        burst: 1000.0,
        ..Default::default()
    };
    let env = TestEnv::with(s, roomy, Clock::manual(t0())).await;
    // A pass that stops at the first failure stands for one killed there.
    env.write_config(
        "telephony",
        &format!("{}max_consecutive_failures = 0\n", start("2026-11-21")),
    );
    let ctx = env.ctx().await;
    // The contact's responsible (user 11) already has 60 tasks created just now, so the one
    // ubsync adds is the 61st: past the first page of 50.
    for i in 0..60 {
        let (code, body) = env
            .hook(
                "tasks.task.add",
                json!({"fields": {"TITLE": format!("other work {i}"), "RESPONSIBLE_ID": 11}}),
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }
    env.sims.bitrix24.inject(Fault::once(
        Some("tasks.task.add"),
        FaultKind::CommitThenDrop,
    ));
    assert!(pass(&ctx).await.is_err());
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        61,
        "committed before the drop"
    );
    pass(&ctx).await.unwrap();
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        61,
        "found on the probe's second page, not added again"
    );
    let rows = ctx.store.lock().ledger_rows().unwrap();
    assert!(rows.iter().all(|l| l.task_id.is_some()), "{rows:?}");
}
