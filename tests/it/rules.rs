//! Business rules end to end (#12): skip filters, task filters, working hours, one open task per
//! client folded and completed by the call-back, and `ubsync rules test`.

use chrono::{Duration, NaiveDateTime};
use ubsync::sim::scenario::{CrmKind, Scenario};
use ubsync::sim::{Fault, FaultKind};
use ubsync::store::ledger::Stage;

use crate::harness::{pass, text, TestEnv};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

fn scenario() -> Scenario {
    Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102")
        .with_client(CrmKind::Contact, 797, "+380501112233", 11)
}

/// Every command the portal received that names `unitalk-<id>`, by method.
fn writes_for(env: &TestEnv, id: u64) -> usize {
    let ext = format!("unitalk-{id}");
    env.sims
        .bitrix24
        .calls()
        .iter()
        .filter(|c| c.external_call_id.as_deref() == Some(ext.as_str()))
        .count()
        + env
            .sims
            .bitrix24
            .tasks()
            .iter()
            .filter(|t| t.xml_id.as_deref() == Some(ext.as_str()))
            .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_call_never_reaches_the_portal_and_is_recorded_as_skipped_by_its_rule() {
    let mut s = scenario();
    let spam = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380931234567",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let short = s.add_call(
        n("2026-11-21 10:05:00"),
        "IN",
        "380671112200",
        &["101"],
        "ANSWER",
        2,
        None,
    );
    let queue = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380671112201",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().group = Some("Robocalls".into());
    let kept = s.add_call(
        n("2026-11-21 10:15:00"),
        "IN",
        "380671112202",
        &["101"],
        "ANSWER",
        30,
        None,
    );
    let no_task = s.add_call(
        n("2026-11-21 10:20:00"),
        "IN",
        "380671112203",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    std::fs::write(
        env.dir.path().join("blocked.txt"),
        "# spam\n+380 93 123 45 67\n",
    )
    .unwrap();
    env.write_config(
        "telephony",
        r#"[sync]
start = "2026-11-21"
[[rules.skip]]
name = "blocklist"
client_file = "blocked.txt"
[[rules.skip]]
name = "too short"
state = ["ANSWER"]
talk_below = 5
[[rules.skip]]
name = "robot queue"
match = "any"
group = ["robocalls"]
client = ["prefix:+7"]
[[rules.skip_task]]
name = "line 102 calls back itself"
inner_line = ["102"]
"#,
    );
    // The dry run shows each rule's decision and sends nothing.
    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let out = env.ubsync(&["auth", "set-refresh-token", &refresh]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.ubsync(&["sync", "--dry-run"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("call {spam}: not pushed (rule \"blocklist\"")),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "call {no_task}: no task (rule \"line 102 calls back itself\""
        )),
        "{t}"
    );
    assert!(env.sims.bitrix24.calls().is_empty());
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.skipped, 3, "{summary}");
    for (id, rule) in [
        (spam, "blocklist"),
        (short, "too short"),
        (queue, "robot queue"),
    ] {
        assert_eq!(writes_for(&env, id), 0, "call {id} reached the portal");
        let row = ctx
            .store
            .lock()
            .ledger_row(&id.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(row.stage, Stage::Skipped);
        assert!(row.reason.as_deref().unwrap().contains(rule), "{row:?}");
    }
    assert_eq!(writes_for(&env, kept), 1);
    // Pushed, but the task filter holds its task back.
    let ext = format!("unitalk-{no_task}");
    assert!(env
        .sims
        .bitrix24
        .calls()
        .iter()
        .any(|c| c.external_call_id.as_deref() == Some(ext.as_str())));
    assert!(env.sims.bitrix24.tasks().is_empty());
    assert_eq!(pass(&ctx).await.unwrap().bitrix24_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_missed_calls_make_one_task_and_the_call_back_completes_it() {
    let mut s = scenario();
    let first = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let second = s.add_call(
        n("2026-11-21 10:20:00"),
        "IN",
        "380501112233",
        &["101"],
        "BUSY",
        0,
        None,
    );
    let third = s.add_call(
        n("2026-11-21 10:40:00"),
        "IN",
        "380501112233",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1, "{summary}");
    let t = &tasks[0];
    assert_eq!(
        t.xml_id.as_deref(),
        Some(format!("unitalk-{first}").as_str())
    );
    assert_eq!(t.responsible_id, 11, "the contact's responsible");
    assert!(
        t.description.contains("The client called again:"),
        "{}",
        t.description
    );
    for id in [second, third] {
        assert_eq!(
            t.description.matches(&format!("unitalk-{id})")).count(),
            1,
            "{}",
            t.description
        );
    }
    assert_eq!(t.status, 2, "open");
    assert_eq!((summary.tasks, summary.tasks_folded), (1, 2), "{summary}");

    // The operator calls the client back.
    let mut later = Scenario::empty(KYIV);
    later.add_call(
        n("2026-11-22 13:00:00"),
        "OUT",
        "101",
        &["0501112233"],
        "ANSWER",
        60,
        None,
    );
    let mut back = later.calls.pop().unwrap();
    back.id = 9001;
    env.sims.unitalk.add_calls([back]);
    env.clock.advance(Duration::hours(2));
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.tasks_closed, 1, "{summary}");
    let t = &env.sims.bitrix24.tasks()[0];
    assert_eq!(t.status, 5, "completed");
    assert!(
        t.description.contains("Client reached: outgoing call"),
        "{}",
        t.description
    );
    assert!(t.description.contains("unitalk-9001"));

    // A new missed call after the call-back opens a new task.
    let mut again = Scenario::empty(KYIV);
    again.add_call(
        n("2026-11-22 14:30:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let mut c = again.calls.pop().unwrap();
    c.id = 9002;
    env.sims.unitalk.add_calls([c]);
    env.clock.advance(Duration::hours(1));
    pass(&ctx).await.unwrap();
    assert_eq!(env.sims.bitrix24.tasks().len(), 2);
    assert_eq!(
        pass(&ctx).await.unwrap().bitrix24_requests,
        0,
        "nothing left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_call_answered_back_before_its_task_gets_it_completed_at_once() {
    let mut s = scenario();
    let missed = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380671110000",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        n("2026-11-21 10:05:00"),
        "OUT",
        "101",
        &["380671110000"],
        "ANSWER",
        30,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1, "{summary}");
    assert_eq!(tasks[0].status, 5, "completed: the client was called back");
    assert!(
        tasks[0]
            .description
            .contains("Client reached: outgoing call"),
        "{}",
        tasks[0].description
    );
    assert_eq!((summary.tasks, summary.tasks_closed), (1, 1), "{summary}");
    let row = ctx
        .store
        .lock()
        .ledger_row(&missed.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(row.stage, Stage::Done);
    assert!(row.task_closed_by.is_some());
    assert_eq!(pass(&ctx).await.unwrap().bitrix24_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_to_the_task_update_and_completion_change_nothing_twice() {
    let mut s = scenario();
    for (i, t) in ["10:00:00", "10:20:00"].iter().enumerate() {
        s.add_call(
            n(&format!("2026-11-21 {t}")),
            "IN",
            "380501112233",
            &["101"],
            "NOANSWER",
            0,
            None,
        );
        let _ = i;
    }
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("tasks.task.update"),
        FaultKind::CommitThenDrop,
    ));
    let summary = pass(&ctx).await.unwrap();
    assert!(summary.faults_survived >= 1, "{summary}");
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0]
            .description
            .matches("The client called again:")
            .count(),
        1
    );
    // The call-back, with the completion's answer lost.
    let mut later = Scenario::empty(KYIV);
    later.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        None,
    );
    let mut back = later.calls.pop().unwrap();
    back.id = 9100;
    env.sims.unitalk.add_calls([back]);
    env.clock.advance(Duration::hours(2));
    env.sims.bitrix24.inject(Fault::once(
        Some("tasks.task.complete"),
        FaultKind::CommitThenDrop,
    ));
    pass(&ctx).await.unwrap();
    pass(&ctx).await.unwrap();
    let t = &env.sims.bitrix24.tasks()[0];
    assert_eq!(t.status, 5);
    assert_eq!(
        t.description.matches("Client reached").count(),
        1,
        "{}",
        t.description
    );
    assert_eq!(env.sims.bitrix24.tasks().len(), 1);
    assert_eq!(pass(&ctx).await.unwrap().bitrix24_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_after_hours_missed_call_gets_its_deadline_from_the_next_opening() {
    let mut s = scenario();
    // Friday 2026-11-20, 20:00 in Kyiv: the office (Mon–Fri 09–18) opens Monday.
    s.add_call(
        n("2026-11-20 20:00:00"),
        "IN",
        "380671113333",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    // Friday 11:00: inside the hours.
    s.add_call(
        n("2026-11-20 11:00:00"),
        "IN",
        "380671114444",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-20\"\n[tasks]\ndeadline_minutes = 60\n[rules.hours]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\nopen = \"09:00\"\nclose = \"18:00\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    let deadline = |phone: &str| {
        tasks
            .iter()
            .find(|t| t.description.contains(phone))
            .and_then(|t| t.deadline.clone())
            .unwrap()
    };
    assert!(
        deadline("+380671113333").starts_with("2026-11-23T10:00:00"),
        "{}",
        deadline("+380671113333")
    );
    assert!(
        deadline("+380671114444").starts_with("2026-11-20T12:00:00"),
        "{}",
        deadline("+380671114444")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_after_hours_wait_the_task_is_created_when_the_office_opens() {
    let mut s = scenario();
    s.add_call(
        n("2026-11-21 03:00:00"),
        "IN",
        "380671115555",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[rules.hours]\nafter_hours = \"wait\"\n",
    );
    let ctx = env.ctx().await;
    // Sunday 14:00 in Kyiv: closed (the call came on Saturday night).
    let summary = pass(&ctx).await.unwrap();
    assert!(env.sims.bitrix24.tasks().is_empty(), "{summary}");
    // Monday 09:30 in Kyiv.
    env.clock
        .advance(Duration::hours(19) + Duration::minutes(30));
    pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1);
    assert!(
        tasks[0]
            .deadline
            .as_deref()
            .unwrap()
            .starts_with("2026-11-23T09:30:00"),
        "{:?}",
        tasks[0].deadline
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_an_unknown_placeholder_or_bad_rule_is_refused_with_every_problem() {
    let env = TestEnv::start(scenario()).await;
    env.write_config(
        "telephony",
        "[tasks]\ntitle = \"Missed {clinet}\"\n[[rules.skip]]\nname = \"empty\"\n[[rules.skip]]\nclient = [\"regex:([\"]\n[rules.hours]\nopen = \"9am\"\n",
    );
    let out = env.ubsync(&["check", "--offline"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    for want in [
        "tasks.title",
        "unknown placeholder {clinet}",
        "rules.skip[0]",
        "no condition",
        "rules.skip[1].client",
        "rules.hours.open",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_test_shows_each_calls_decisions_and_sends_nothing() {
    let mut s = scenario();
    let spam = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380931234567",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let missed = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "80671112200",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    // The admin drafts rules and tries them on what is stored.
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[tasks]\ntitle = \"Call back {client} ({line})\"\n[[rules.skip]]\nname = \"spam\"\nclient = [\"+380931234567\"]\n[[rules.rewrite]]\npattern = \"^8(0\\\\d{9})$\"\nreplace = \"+38$1\"\n",
    );
    let before_rows = ctx.store.lock().ledger_rows().unwrap();
    let before = env.sims.bitrix24.requests().len();
    let out = env.ubsync(&["rules", "test", "--from", "2026-11-21"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("call {spam}")) && t.contains("skipped: rule \"spam\""),
        "{t}"
    );
    assert!(t.contains(&format!("call {missed}")), "{t}");
    assert!(
        t.contains("\"80671112200\" → +380671112200"),
        "the rewrite shows:\n{t}"
    );
    assert!(t.contains("\"Call back +380671112200 (101)\""), "{t}");
    assert!(
        t.contains("2 calls between 2026-11-21 00:00 and 2026-11-22 00:00 (Europe/Kyiv): 1 pushed, 1 skipped"),
        "{t}"
    );
    let out = env
        .ubsync(&["rules", "test", "--call", &missed.to_string(), "--json"])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["task"]["decision"], "create", "{v}");
    assert_eq!(env.sims.bitrix24.requests().len(), before, "nothing sent");
    assert!(
        ctx.store.lock().ledger_rows().unwrap() == before_rows,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_follow_the_per_direction_policy_with_their_source_and_title() {
    let mut s = scenario();
    let out = s.add_call(
        n("2026-11-21 10:00:00"),
        "OUT",
        "101",
        &["380671117777"],
        "ANSWER",
        20,
        None,
    );
    let inc = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380671118888",
        &["101"],
        "ANSWER",
        20,
        None,
    );
    s.calls.last_mut().unwrap().outer_number = "380443334455".into();
    let env = TestEnv::start(s).await;
    env.write_config(
        "activity",
        "[sync]\nstart = \"2026-11-21\"\n[rules.leads]\ncreate = \"incoming\"\nsource = \"WEB\"\ntitle = \"Caller {client} on {outer}\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let leads = env.sims.bitrix24.created_leads();
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert_eq!(leads[0].title, "Caller +380671118888 on 380443334455");
    assert_eq!(leads[0].source.as_deref(), Some("WEB"));
    let row = ctx
        .store
        .lock()
        .ledger_row(&out.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(row.stage, Stage::Skipped);
    assert!(row
        .reason
        .unwrap()
        .contains("outgoing calls (rules.leads.create)"));
    let row = ctx
        .store
        .lock()
        .ledger_row(&inc.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(row.stage, Stage::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responsible_order_can_put_the_company_lines_user_before_the_operator() {
    let mut s = scenario();
    // Rang line 101 (user 10) on the company line that belongs to user 11.
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380671119999",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().outer_number = "+380 44 333 44 55".into();
    // Another company line: the operator's.
    s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380671110001",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().outer_number = "380445550000".into();
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\ncrm_create = false\n[rules.responsible]\norder = [\"crm\", \"line\", \"operator\", \"default\"]\n[rules.responsible.lines]\n\"380443334455\" = 11\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    let of = |phone: &str| {
        tasks
            .iter()
            .find(|t| t.description.contains(phone))
            .unwrap()
            .responsible_id
    };
    assert_eq!(of("+380671119999"), 11, "the line's user");
    assert_eq!(of("+380671110001"), 10, "the operator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_fields_are_written_and_checked_against_the_portals_field_list() {
    let mut s = scenario();
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().group = Some("Sales".into());
    let env = TestEnv::start(s).await;
    let cfg = "[sync]\nstart = \"2026-11-21\"\n[rules.fields.task]\nUF_CRM_CALL_LINE = \"{outer}\"\nUF_CRM_CALL_SOURCE = \"queue {group}\"\n[rules.fields.activity]\nUF_CRM_CALL_SOURCE = \"{group}\"\n";
    env.write_config("activity", cfg);
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("3 mapped fields exist in the portal"), "{t}");
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let task = &env.sims.bitrix24.tasks()[0];
    assert_eq!(
        task.user_fields
            .get("UF_CRM_CALL_SOURCE")
            .map(String::as_str),
        Some("queue Sales")
    );
    assert!(task.user_fields.contains_key("UF_CRM_CALL_LINE"));
    let act = &env.sims.bitrix24.activities()[0];
    assert_eq!(
        act.user_fields
            .get("UF_CRM_CALL_SOURCE")
            .map(String::as_str),
        Some("Sales")
    );
    // A field the portal lacks is an error an admin must fix; one ubsync sets itself is refused.
    env.write_config(
        "activity",
        &format!("{cfg}[rules.fields.lead]\nUF_CRM_NOPE = \"x\"\n"),
    );
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("the portal has no field rules.fields.lead.UF_CRM_NOPE"),
        "{t}"
    );
    env.write_config("activity", "[rules.fields.task]\nTITLE = \"x\"\n");
    let out = env.ubsync(&["check", "--offline"]).await;
    assert!(
        text(&out).contains("is a field ubsync sets itself"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_calls_notify_the_responsible_and_supervisors_at_most_once_per_client_in_the_limit()
{
    let mut s = scenario();
    // Two missed calls from the contact (responsible 11) ten minutes apart, one from another client.
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        n("2026-11-22 13:10:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        n("2026-11-22 13:20:00"),
        "IN",
        "380671234000",
        &["102"],
        "BUSY",
        0,
        None,
    );
    // Yesterday's: too old to notify.
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380671234001",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[rules.notify]\nsupervisors = [1]\nmessage = \"Missed {client} on line {line}\"\nper_client = \"30m\"\n",
    );
    let ctx = env.ctx().await;
    env.clock.advance(Duration::minutes(30));
    let summary = pass(&ctx).await.unwrap();
    let notes = env.sims.bitrix24.notifications();
    let to = |user: i64, text: &str| {
        notes
            .iter()
            .filter(|n| {
                n["USER_ID"].as_str() == Some(user.to_string().as_str())
                    && n["MESSAGE"].as_str().is_some_and(|m| m.contains(text))
            })
            .count()
    };
    assert_eq!(to(11, "Missed +380501112233 on line 101"), 1, "{notes:?}");
    assert_eq!(to(1, "+380501112233"), 1, "the supervisor, once");
    assert_eq!(to(11, "+380671234000"), 1, "the operator of line 102");
    assert_eq!(to(1, "+380671234000"), 1);
    assert_eq!(to(1, "+380671234001"), 0, "too old");
    assert_eq!(summary.notifications as usize, notes.len(), "{summary}");
    // Nothing is notified again.
    assert_eq!(pass(&ctx).await.unwrap().notifications, 0);
    assert_eq!(env.sims.bitrix24.notifications().len(), notes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_whose_answer_was_lost_is_never_sent_twice() {
    let mut s = scenario();
    s.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[rules.notify]\n",
    );
    let ctx = env.ctx().await;
    env.clock.advance(Duration::minutes(30));
    env.sims.bitrix24.inject(Fault::once(
        Some("im.notify.personal.add"),
        FaultKind::CommitThenDrop,
    ));
    let first = pass(&ctx).await.unwrap();
    assert!(first.faults_survived >= 1, "{first}");
    for _ in 0..2 {
        env.clock.advance(Duration::minutes(5));
        pass(&ctx).await.unwrap();
    }
    assert_eq!(env.sims.bitrix24.notifications().len(), 1);
    assert_eq!(env.sims.bitrix24.tasks().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_script_filters_rewrites_and_shapes_and_a_failing_script_quarantines_only_its_call()
{
    let mut s = scenario();
    let spam = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380931234567",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().group = Some("Robots".into());
    let short = s.add_call(
        n("2026-11-21 10:05:00"),
        "IN",
        "0XX501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let broken = s.add_call(
        n("2026-11-21 10:10:00"),
        "IN",
        "380671110666",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let fine = s.add_call(
        n("2026-11-21 10:15:00"),
        "IN",
        "380671110777",
        &["102"],
        "ANSWER",
        30,
        None,
    );
    let env = TestEnv::start(s).await;
    std::fs::write(
        env.dir.path().join("rules.rhai"),
        r#"
        // Robot queues never reach the CRM.
        fn filter(c) { if c.group == "Robots" { return "robot queue"; } true }
        // Numbers typed with an XX placeholder prefix.
        fn client_number(c, n) { if n.starts_with("0XX") { "+380" + n.sub_string(3) } else { n } }
        // Shape the task; one client's calls make the script fail.
        fn task(c, f) {
            if c.client == "+380671110666" { throw "no task rules for this client"; }
            f.TITLE = "Script: call back " + c.client + " (" + c.raw.state + ")";
            f
        }
        "#,
    )
    .unwrap();
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[rules]\nscript = \"rules.rhai\"\n",
    );
    let ctx = env.ctx().await;
    let summary = pass(&ctx).await.unwrap();
    assert_eq!(summary.skipped, 1, "{summary}");
    assert_eq!(writes_for(&env, spam), 0);
    let row = ctx
        .store
        .lock()
        .ledger_row(&spam.to_string())
        .unwrap()
        .unwrap();
    assert!(row.reason.unwrap().contains("robot queue"));
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].title, "Script: call back +380501112233 (NOANSWER)");
    assert_eq!(
        tasks[0].xml_id.as_deref(),
        Some(format!("unitalk-{short}").as_str())
    );
    let row = ctx
        .store
        .lock()
        .ledger_row(&broken.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(row.stage, Stage::Quarantined);
    assert!(row
        .reason
        .unwrap()
        .contains("no task rules for this client"));
    assert_eq!(writes_for(&env, fine), 1, "the pass went on");
    assert_eq!(summary.quarantined, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_that_does_not_compile_is_a_config_error_naming_the_line() {
    let env = TestEnv::start(scenario()).await;
    std::fs::write(
        env.dir.path().join("rules.rhai"),
        "fn filter(c) {\n  if c.group == \n}\n",
    )
    .unwrap();
    env.write_config("telephony", "[rules]\nscript = \"rules.rhai\"\n");
    let out = env.ubsync(&["check", "--offline"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("rules.script") && t.contains("rules.rhai") && t.contains("line"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_shows_statuses_operators_and_users_and_flags_the_mismatches() {
    let env = TestEnv::start(scenario()).await;
    env.sims.unitalk.set_line_status("103", "OFFLINE");
    env.sims
        .bitrix24
        .add_user(ubsync::sim::bitrix24::PortalUser {
            id: 40,
            name: "Olha".into(),
            last_name: "Stray".into(),
            email: "o@example.com".into(),
            inner: Some("109".into()),
            active: true,
        });
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    let ctx = env.ctx().await;
    // A missed call on 101 resolves its user; 102 and 103 are not looked up yet.
    let mut more = Scenario::empty(KYIV);
    more.add_call(
        n("2026-11-22 13:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        10,
        None,
    );
    env.sims.unitalk.add_calls(more.calls);
    env.clock.advance(Duration::hours(2));
    pass(&ctx).await.unwrap();
    let out = env.ubsync(&["lines"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let row = |line: &str| {
        t.lines()
            .find(|l| l.trim_start().starts_with(line))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        row("101").contains("ONLINE") && row("101").split_whitespace().any(|w| w == "10"),
        "{t}"
    );
    assert!(
        row("103").contains("OFFLINE") && row("103").contains("offline"),
        "{t}"
    );
    assert!(row("102").contains("not looked up yet"), "{t}");
    assert!(
        t.contains("Bitrix24 user 40 (Olha Stray) has UF_PHONE_INNER \"109\""),
        "{t}"
    );
    let out = env.ubsync(&["lines", "--json", "--offline"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let l101 = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["line"] == "101")
        .unwrap();
    assert_eq!(l101["bitrix24_user_id"], 10);
    assert!(v["users_without_a_line"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_offline_past_the_limit_alerts_supervisors_once_and_again_when_back_never_on_flapping(
) {
    let env = TestEnv::start(scenario()).await;
    env.write_config(
        "activity",
        "[sync]\nstart = \"2026-11-22\"\n[rules.lines]\nalert_after = \"10m\"\nsupervisors = [1]\n",
    );
    let ctx = env.ctx().await;
    let alerts = |env: &TestEnv| {
        env.sims
            .bitrix24
            .notifications()
            .iter()
            .filter_map(|n| n["MESSAGE"].as_str().map(String::from))
            .filter(|m| m.starts_with("Inner line"))
            .collect::<Vec<_>>()
    };
    // Flapping: offline for 5 minutes at a time never alerts.
    for _ in 0..3 {
        env.sims.unitalk.set_line_status("101", "OFFLINE");
        pass(&ctx).await.unwrap();
        env.clock.advance(Duration::minutes(5));
        pass(&ctx).await.unwrap();
        env.sims.unitalk.set_line_status("101", "ONLINE");
        pass(&ctx).await.unwrap();
        env.clock.advance(Duration::minutes(1));
    }
    assert!(alerts(&env).is_empty(), "{:?}", alerts(&env));
    // Offline for good: one alert after ten minutes, however many passes.
    env.sims.unitalk.set_line_status("102", "UNREGISTERED");
    pass(&ctx).await.unwrap();
    for _ in 0..4 {
        env.clock.advance(Duration::minutes(4));
        pass(&ctx).await.unwrap();
    }
    let a = alerts(&env);
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(
        a[0].starts_with("Inner line 102") && a[0].contains("unregistered"),
        "{a:?}"
    );
    env.sims.unitalk.set_line_status("102", "ONLINE");
    pass(&ctx).await.unwrap();
    pass(&ctx).await.unwrap();
    let a = alerts(&env);
    assert_eq!(a.len(), 2, "{a:?}");
    assert!(a[1].contains("is back"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_whose_line_is_offline_can_be_passed_over_for_the_task() {
    let mut s = scenario();
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380671112345",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.sims.unitalk.set_line_status("101", "OFFLINE");
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\ncrm_create = false\n[rules.lines]\nskip_offline_operator = true\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0].responsible_id, 1,
        "the default user, not the offline operator 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_group_can_keep_its_own_hours() {
    let mut s = scenario();
    // Saturday 03:00 in Kyiv, both: the night desk works, the office does not.
    s.add_call(
        n("2026-11-21 03:00:00"),
        "IN",
        "380671116001",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s.calls.last_mut().unwrap().group = Some("Night desk".into());
    s.add_call(
        n("2026-11-21 03:00:00"),
        "IN",
        "380671116002",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[tasks]\ndeadline_minutes = 30\n[rules.hours]\nopen = \"09:00\"\nclose = \"18:00\"\n[rules.hours.groups.\"night desk\"]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nopen = \"00:00\"\nclose = \"23:59\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let tasks = env.sims.bitrix24.tasks();
    let deadline = |phone: &str| {
        tasks
            .iter()
            .find(|t| t.description.contains(phone))
            .and_then(|t| t.deadline.clone())
            .unwrap()
    };
    assert!(
        deadline("+380671116001").starts_with("2026-11-21T03:30:00"),
        "{}",
        deadline("+380671116001")
    );
    assert!(
        deadline("+380671116002").starts_with("2026-11-23T09:30:00"),
        "{}",
        deadline("+380671116002")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_order_inner_line_rewrites_and_crm_links_shape_what_is_written() {
    let mut s = scenario().with_client(CrmKind::Lead, 900, "+380501112233", 10);
    // The PBX reports the line with a site prefix: 8101 is line 101.
    s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["8101"],
        "NOANSWER",
        0,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "activity",
        "[sync]\nstart = \"2026-11-21\"\n[tasks]\ntitle = \"Call back {client}: {crm_link}\"\n[rules]\ncrm_order = [\"lead\", \"contact\"]\n[[rules.rewrite_line]]\npattern = \"^8(\\\\d{3})$\"\nreplace = \"$1\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let acts = env.sims.bitrix24.activities();
    let a = acts
        .iter()
        .find(|a| a.originator_id.as_deref() == Some("ubsync"))
        .unwrap();
    assert_eq!(
        (a.owner_type_id, a.owner_id),
        (1, 900),
        "the lead comes first"
    );
    assert_eq!(a.responsible_id, 10, "line 8101 read as 101, user 10");
    let t = &env.sims.bitrix24.tasks()[0];
    assert!(t.title.ends_with("/crm/lead/details/900/"), "{}", t.title);
    assert!(
        t.title
            .starts_with("Call back +380501112233: http://127.0.0.1:"),
        "{}",
        t.title
    );
}
