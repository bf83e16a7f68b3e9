//! Business rules found wrong from outside (#19): a missed call always gets its task, the CRM
//! order decides the binding, backlogs give the tasks real time would.

use chrono::NaiveDateTime;
use ubsync::sim::scenario::{CrmKind, Scenario};
use ubsync::store::ledger::Stage;

use crate::harness::{pass, text, TestEnv};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

fn start(date: &str) -> String {
    format!("[sync]\nstart = \"{date}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_activity_mode_a_missed_call_from_an_unknown_number_without_a_lead_still_gets_its_task()
{
    let mut s = Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102");
    let missed = s.add_call(
        n("2026-11-21 10:05:00"),
        "IN",
        "380671111111",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    let answered = s.add_call(
        n("2026-11-21 10:30:00"),
        "IN",
        "380671111112",
        &["101"],
        "ANSWER",
        20,
        None,
    );
    let env = TestEnv::start(s).await;
    env.write_config(
        "activity",
        &format!("{}[rules.leads]\ncreate = \"none\"\n", start("2026-11-21")),
    );
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert!(
        env.sims.bitrix24.activities().is_empty(),
        "no entity, no lead: no activity"
    );
    let tasks = env.sims.bitrix24.tasks();
    assert_eq!(tasks.len(), 1, "{first:?}");
    assert_eq!(
        tasks[0].responsible_id, 11,
        "the operator of the line that rang"
    );
    assert!(tasks[0].uf_crm_task.is_empty(), "bound to no entity");
    assert_eq!(
        tasks[0].xml_id.as_deref(),
        Some(&*format!("unitalk-{missed}"))
    );
    let rows = ctx.store.lock().ledger_rows().unwrap();
    let row = |id: u64| rows.iter().find(|l| l.call_id == id.to_string()).unwrap();
    assert_eq!(row(missed).stage, Stage::Done);
    assert!(row(missed).activity_left_out(), "{:?}", row(missed));
    assert_eq!(row(answered).stage, Stage::Skipped);
    // Nothing more to do, and nothing is sent again.
    let before = env.sims.bitrix24.requests().len();
    pass(&ctx).await.unwrap();
    assert_eq!(env.sims.bitrix24.requests().len(), before);
    assert_eq!(env.sims.bitrix24.tasks().len(), 1);
    let show = env.ubsync(&["show", &missed.to_string()]).await;
    let t = text(&show);
    assert!(
        t.contains("no activity") && t.contains("rules.leads.create"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_telephony_mode_rules_crm_order_decides_the_calls_binding_and_its_tasks_responsible() {
    for (order, kind, id, responsible, uf) in [
        (
            "[\"lead\", \"contact\", \"company\"]",
            CrmKind::Lead,
            702,
            18,
            "L_702",
        ),
        (
            "[\"company\", \"lead\"]",
            CrmKind::Company,
            701,
            17,
            "CO_701",
        ),
        (
            "[\"contact\", \"company\", \"lead\"]",
            CrmKind::Contact,
            700,
            16,
            "C_700",
        ),
    ] {
        let mut s = Scenario::empty(KYIV)
            .with_operator(10, "101")
            .with_operator(16, "116")
            .with_operator(17, "117")
            .with_operator(18, "118")
            .with_client(CrmKind::Contact, 700, "+380501112233", 16)
            .with_client(CrmKind::Company, 701, "+380501112233", 17)
            .with_client(CrmKind::Lead, 702, "+380501112233", 18);
        s.add_call(
            n("2026-11-21 10:05:00"),
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
            &format!("{}[rules]\ncrm_order = {order}\n", start("2026-11-21")),
        );
        let ctx = env.ctx().await;
        pass(&ctx).await.unwrap();
        let stats = env.sims.bitrix24.stats();
        assert_eq!(stats.len(), 1, "{order}");
        assert_eq!(
            stats[0].crm_entity,
            Some((kind, id)),
            "{order}: the call's binding"
        );
        let tasks = env.sims.bitrix24.tasks();
        assert_eq!(tasks.len(), 1, "{order}");
        assert_eq!(
            tasks[0].responsible_id, responsible,
            "{order}: the task's responsible"
        );
        assert_eq!(tasks[0].uf_crm_task, vec![uf.to_string()], "{order}");
    }
}

/// A client's calls: missed, called back (answered), missed twice more, and another client's
/// missed call between them.
fn backlog() -> Scenario {
    let mut s = Scenario::empty(KYIV).with_operator(10, "101").with_client(
        CrmKind::Contact,
        797,
        "+380501112233",
        10,
    );
    for (hms, from, state, talk) in [
        ("13:05:00", "380501112233", "NOANSWER", 0),
        ("13:12:00", "380671111111", "NOANSWER", 0),
        ("13:15:00", "380501112233", "ANSWER", 40),
        ("13:25:00", "380501112233", "NOANSWER", 0),
        ("13:31:00", "380501112233", "BUSY", 0),
    ] {
        s.add_call(
            n(&format!("2026-11-22 {hms}")),
            "IN",
            from,
            &["101"],
            state,
            talk,
            None,
        );
    }
    s
}

/// The tasks a portal ends with: (call key, completed, number of missed calls it names).
fn tasks_of(env: &TestEnv) -> Vec<(Option<String>, i64, usize)> {
    let mut t: Vec<_> = env
        .sims
        .bitrix24
        .tasks()
        .into_iter()
        .map(|t| {
            let named = t.description.matches("unitalk-").count();
            (t.xml_id, t.status, named)
        })
        .collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_pushed_in_one_pass_ends_with_the_tasks_passes_run_in_real_time_give() {
    use chrono::{Duration, TimeZone, Utc};
    use ubsync::clock::Clock;
    let start = Utc.with_ymd_and_hms(2026, 11, 22, 11, 0, 0).unwrap();
    let end = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    let config = "[sync]\nstart = \"2026-11-22\"\n";

    let live = TestEnv::with(backlog(), Default::default(), Clock::manual(start)).await;
    live.write_config("telephony", config);
    let ctx = live.ctx().await;
    while live.clock.now() < end {
        live.clock.advance(Duration::minutes(1));
        pass(&ctx).await.unwrap();
    }

    let backlog_env = TestEnv::with(backlog(), Default::default(), Clock::manual(end)).await;
    backlog_env.write_config("telephony", config);
    let ctx = backlog_env.ctx().await;
    pass(&ctx).await.unwrap();
    pass(&ctx).await.unwrap();

    let (live_tasks, backlog_tasks) = (tasks_of(&live), tasks_of(&backlog_env));
    assert_eq!(live_tasks.len(), 3, "{live_tasks:?}");
    assert_eq!(
        backlog_tasks, live_tasks,
        "one pass over the backlog, or passes as calls came"
    );
}
