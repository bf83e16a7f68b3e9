//! Click-to-call and CRM callbacks (#13 §1–3), through the real daemon: Bitrix24 events in,
//! Unitalk rings, the call that comes of it finishes the clicked CALL_ID, never a second
//! registration.

use ubsync::sim::bitrix24::events::SIM_APPLICATION_TOKEN;
use ubsync::sim::scenario::CrmKind;
use ubsync::sim::unitalk::DirectCallMode;
use ubsync::sim::unitalk_webhooks::WebhookOptions;

use crate::cli_sync::{env, eventually, scenario, start_daemon_on, yesterday};
use crate::harness::TestEnv;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A free loopback port for the daemon (the handler URL must be known before it starts).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

/// Events on, webhooks on, the scheduled sync far away.
async fn start(env: &TestEnv, token: &str) -> (tokio::process::Child, String) {
    std::fs::write(
        env.dir.path().join("slow.toml"),
        "timezone = \"Europe/Kyiv\"\n[[job]]\nname = \"sync\"\ncron = \"0 0 0 1 1 *\"\n",
    )
    .unwrap();
    let addr = free_addr();
    env.write_config(
        "telephony",
        &format!(
            "[sync]\nstart = \"{}\"\n[schedule]\nfile = \"slow.toml\"\n[webhooks]\nunitalk_secret = \"{SECRET}\"\nbitrix24_events = true\nbitrix24_handler = \"http://{addr}/bitrix24/events\"\napplication_token = \"{token}\"\n",
            yesterday()
        ),
    );
    let (child, base) = start_daemon_on(env, &addr).await;
    assert!(
        eventually(|| async { env.sims.bitrix24.bound_events().len() == 3 }).await,
        "the daemon binds its events: {:?}",
        env.sims.bitrix24.bound_events()
    );
    (child, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_rings_the_operator_and_becomes_one_finished_call_with_its_recording() {
    let env = env(scenario()).await;
    let (mut child, base) = start(&env, SIM_APPLICATION_TOKEN).await;
    let out = env.ubsync(&["check"]).await;
    let t = crate::harness::text(&out);
    assert!(
        t.contains("online: Bitrix24 posts to http://127.0.0.1:") && t.contains("events bound"),
        "{t}"
    );
    let call_id = env
        .sims
        .bitrix24
        .click_to_call(10, "+380501112233", Some((CrmKind::Contact, 797)))
        .await;
    assert!(
        eventually(|| async { !env.sims.unitalk.direct_calls().is_empty() }).await,
        "Unitalk was asked to ring"
    );
    let (sip, number, meta) = env.sims.unitalk.direct_calls()[0].clone();
    assert_eq!(
        (sip.as_str(), number.as_str(), meta.as_str()),
        ("101", "380501112233", call_id.as_str())
    );
    // The call that came of it reaches ubsync by webhook.
    let hook = format!("{base}/unitalk/webhook/{SECRET}");
    env.sims
        .unitalk
        .deliver_webhooks(&hook, &WebhookOptions::default())
        .await;
    assert!(
        eventually(|| async {
            env.sims
                .bitrix24
                .calls()
                .iter()
                .any(|c| c.call_id == call_id && c.finished)
        })
        .await,
        "the clicked CALL_ID is finished: {:?}",
        env.sims.bitrix24.calls()
    );
    child.kill().await.unwrap();
    // The call Unitalk placed (ids from 900001) was never registered on its own.
    let own: Vec<_> = env
        .sims
        .bitrix24
        .calls()
        .into_iter()
        .filter(|c| {
            c.external_call_id
                .as_deref()
                .is_some_and(|e| e.starts_with("unitalk-9000"))
        })
        .collect();
    assert!(own.is_empty(), "no second registration: {own:?}");
    let stat = env
        .sims
        .bitrix24
        .stats()
        .into_iter()
        .find(|r| r.call_id == call_id)
        .expect("finished");
    assert_eq!(stat.duration, 30);
    assert!(
        stat.record_url
            .as_deref()
            .is_some_and(|u| u.contains("/rec/dc-")),
        "{stat:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_that_cannot_ring_is_finished_as_cancelled_and_the_user_told_why() {
    let env = env(scenario()).await;
    env.sims
        .unitalk
        .set_direct_call(DirectCallMode::Refuse("Line 101 is not registered".into()));
    let (mut child, _) = start(&env, SIM_APPLICATION_TOKEN).await;
    let call_id = env
        .sims
        .bitrix24
        .click_to_call(10, "+380671234567", None)
        .await;
    assert!(
        eventually(|| async {
            env.sims
                .bitrix24
                .stats()
                .iter()
                .any(|r| r.call_id == call_id && r.status_code == "603-S" && r.duration == 0)
        })
        .await,
        "finished as cancelled"
    );
    assert!(
        eventually(|| async {
            env.sims.bitrix24.notifications().iter().any(|n| {
                n["USER_ID"] == "10"
                    && n["MESSAGE"]
                        .as_str()
                        .is_some_and(|m| m.contains("not registered"))
            })
        })
        .await,
        "{:?}",
        env.sims.bitrix24.notifications()
    );
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_request_rings_the_crm_responsible_and_lands_once() {
    let env = env(scenario()).await;
    let (mut child, base) = start(&env, SIM_APPLICATION_TOKEN).await;
    // The contact's responsible is user 11, on line 102.
    let statuses = env
        .sims
        .bitrix24
        .callback_request(
            "+380501112233",
            Some((CrmKind::Contact, 797)),
            "Call me about the order",
        )
        .await;
    assert_eq!(statuses, vec![200]);
    assert!(eventually(|| async { !env.sims.unitalk.direct_calls().is_empty() }).await);
    assert_eq!(env.sims.unitalk.direct_calls()[0].0, "102");
    let registered: Vec<_> = env
        .sims
        .bitrix24
        .calls()
        .into_iter()
        .filter(|c| c.call_type == 4)
        .collect();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert_eq!(registered[0].user_id, 11);
    let hook = format!("{base}/unitalk/webhook/{SECRET}");
    env.sims
        .unitalk
        .deliver_webhooks(
            &hook,
            &WebhookOptions {
                duplicate: true,
                ..Default::default()
            },
        )
        .await;
    let cb = registered[0].call_id.clone();
    assert!(
        eventually(|| async {
            env.sims
                .bitrix24
                .calls()
                .iter()
                .any(|c| c.call_id == cb && c.finished)
        })
        .await
    );
    child.kill().await.unwrap();
    let calls = env.sims.bitrix24.calls();
    assert!(
        !calls.iter().any(|c| c
            .external_call_id
            .as_deref()
            .is_some_and(|e| e.starts_with("unitalk-9000"))),
        "one card for the callback: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_bitrix24_events_change_nothing() {
    let env = env(scenario()).await;
    // The daemon expects another token than the portal sends.
    let (mut child, _) = start(&env, "the-real-application-token-is-different").await;
    let statuses = env
        .sims
        .bitrix24
        .deliver_event(
            "ONEXTERNALCALLSTART",
            serde_json::json!({"CALL_ID": "externalCall.forged", "USER_ID": "10", "PHONE_NUMBER": "+380501112233"}),
            SIM_APPLICATION_TOKEN,
        )
        .await;
    assert_eq!(statuses, vec![403]);
    let statuses = env
        .sims
        .bitrix24
        .deliver_event("ONAPPUNINSTALL", serde_json::json!({}), "")
        .await;
    assert_eq!(statuses, vec![403]);
    child.kill().await.unwrap();
    assert!(env.sims.unitalk.direct_calls().is_empty());
    let store = ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
    assert_eq!(store.inbox_waiting().unwrap(), 0);
    assert!(store.clicks().unwrap().is_empty());
    assert!(store
        .fact(ubsync::sync::FACT_UNINSTALLED)
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_nobody_answers_is_finished_as_cancelled_after_the_ttl_and_a_repeat_click_is_one() {
    use chrono::Duration;
    let env = TestEnv::start(
        ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101"),
    )
    .await;
    env.sims.unitalk.set_direct_call(DirectCallMode::Silent);
    env.write_config(
        "telephony",
        &format!("[sync]\nstart = \"2026-11-22\"\n[webhooks]\nbitrix24_events = true\nbitrix24_handler = \"http://127.0.0.1:9/bitrix24/events\"\napplication_token = \"{SIM_APPLICATION_TOKEN}\"\n"),
    );
    let ctx = env.ctx().await;
    // Bitrix24 registered the click (as the portal does) and the event waits in the inbox.
    let (access, _) = env.sims.bitrix24.install_app(1);
    let (_, out) = env
        .app(
            &access,
            "telephony.externalcall.register",
            serde_json::json!({"USER_ID": 10, "PHONE_NUMBER": "+380671230000", "TYPE": 1}),
        )
        .await;
    let call_id = out["result"]["CALL_ID"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let body = |id: &str| {
        ubsync::phpquery::build(
            serde_json::json!({"event": "ONEXTERNALCALLSTART", "data": {"CALL_ID": id, "USER_ID": "10", "PHONE_NUMBER_INTERNATIONAL": "+380671230000"}, "auth": {"application_token": SIM_APPLICATION_TOKEN}})
                .as_object()
                .unwrap(),
        )
    };
    let now = env.clock.now();
    ctx.store
        .lock()
        .inbox_add("bitrix24", &body(&call_id), None, now)
        .unwrap();
    // The same user clicks again at once: a second card, closed, nothing rings twice.
    let again = format!("{call_id}-again");
    ctx.store
        .lock()
        .inbox_add("bitrix24", &body(&again), None, now)
        .unwrap();
    let first = crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(first.clicks, 2, "{first}");
    assert_eq!(env.sims.unitalk.direct_calls().len(), 1, "rung once");
    let stats = env.sims.bitrix24.stats();
    assert!(stats.iter().all(|r| r.call_id != call_id), "still dialing");
    env.clock.advance(Duration::minutes(11));
    let later = crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(later.clicks_cancelled, 1, "{later}");
    let stat = env
        .sims
        .bitrix24
        .stats()
        .into_iter()
        .find(|r| r.call_id == call_id)
        .expect("finished");
    assert_eq!((stat.status_code.as_str(), stat.duration), ("603-S", 0));
    crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(
        env.sims
            .bitrix24
            .stats()
            .iter()
            .filter(|r| r.call_id == call_id)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_route_needs_no_inbound_address_and_loses_no_click() {
    use chrono::Duration;
    for extended in [true, false] {
        let env = TestEnv::start(
            ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101"),
        )
        .await;
        env.sims.bitrix24.set_offline_extended(extended);
        env.write_config(
            "telephony",
            "[sync]\nstart = \"2026-11-22\"\n[webhooks]\nbitrix24_events = true\nbitrix24_route = \"offline\"\n",
        );
        let ctx = env.ctx().await;
        let added = ubsync::sync::bind_events(&ctx).await.unwrap();
        assert_eq!(added.len(), 3);
        assert!(
            env.sims
                .bitrix24
                .bound_events()
                .iter()
                .all(|(_, h)| h.is_empty()),
            "offline bindings"
        );
        assert!(
            ubsync::sync::bind_events(&ctx).await.unwrap().is_empty(),
            "binding again changes nothing"
        );
        let call_id = env
            .sims
            .bitrix24
            .click_to_call(10, "+380671239999", None)
            .await;
        assert_eq!(env.sims.bitrix24.offline_queue_len(), 1);
        let first = crate::harness::pass(&ctx).await.unwrap();
        assert_eq!(first.clicks, 1, "{first}");
        assert_eq!(env.sims.bitrix24.offline_queue_len(), 0, "read and cleared");
        assert_eq!(env.sims.unitalk.direct_calls().len(), 1);
        // The call Unitalk placed is pulled once it has settled, and finishes the click.
        env.clock.advance(Duration::minutes(5));
        let later = crate::harness::pass(&ctx).await.unwrap();
        assert_eq!(later.clicks_claimed, 1, "{later}");
        let stat = env
            .sims
            .bitrix24
            .stats()
            .into_iter()
            .find(|r| r.call_id == call_id)
            .expect("finished");
        assert_eq!(stat.duration, 30, "extended = {extended}");
        assert!(env
            .sims
            .bitrix24
            .calls()
            .iter()
            .all(|c| c.external_call_id.is_none()
                || !c
                    .external_call_id
                    .as_deref()
                    .unwrap()
                    .starts_with("unitalk-9000")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstall_event_stops_the_sync_with_what_to_do() {
    let env = env(scenario()).await;
    let (mut child, _) = start(&env, SIM_APPLICATION_TOKEN).await;
    let statuses = env
        .sims
        .bitrix24
        .deliver_event(
            "ONAPPUNINSTALL",
            serde_json::json!({"CLEAN": "0"}),
            SIM_APPLICATION_TOKEN,
        )
        .await;
    assert_eq!(statuses, vec![200]);
    let db = env.dir.path().join("state/ubsync.db");
    assert!(
        eventually(|| async {
            ubsync::store::Store::open(&db)
                .ok()
                .and_then(|s| s.fact(ubsync::sync::FACT_UNINSTALLED).ok().flatten())
                .is_some()
        })
        .await
    );
    child.kill().await.unwrap();
    let out = env.ubsync(&["sync"]).await;
    let t = crate::harness::text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("uninstalled") && t.contains("auth forget-install"),
        "{t}"
    );
    assert!(
        env.sims.bitrix24.calls().is_empty(),
        "nothing pushed after the uninstall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_meta_matches_a_click_exactly_even_when_the_line_does_not() {
    use chrono::Duration;
    let env = TestEnv::start(
        ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101"),
    )
    .await;
    env.sims.unitalk.set_echo_meta(true);
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22\"\n[webhooks]\nbitrix24_events = true\nbitrix24_route = \"offline\"\n",
    );
    let ctx = env.ctx().await;
    ubsync::sync::bind_events(&ctx).await.unwrap();
    let call_id = env
        .sims
        .bitrix24
        .click_to_call(10, "+380671238888", None)
        .await;
    crate::harness::pass(&ctx).await.unwrap();
    // The PBX reports the call from the operator's other device: only `meta` ties it to the click.
    env.sims
        .unitalk
        .update_call(900_001, |c| c.from = "5101".into());
    env.clock.advance(Duration::minutes(5));
    let later = crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(later.clicks_claimed, 1, "{later}");
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .any(|r| r.call_id == call_id && r.duration == 30));
    assert!(!env
        .sims
        .bitrix24
        .calls()
        .iter()
        .any(|c| c.external_call_id.as_deref() == Some("unitalk-900001")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserving_offline_get_whose_answer_was_lost_still_rings_the_click_and_a_lost_clear_is_sent_again(
) {
    use ubsync::sim::{Fault, FaultKind};
    let env = TestEnv::start(
        ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101"),
    )
    .await;
    env.sims.bitrix24.set_offline_extended(true);
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-22\"\n[webhooks]\nbitrix24_events = true\nbitrix24_route = \"offline\"\n",
    );
    let ctx = env.ctx().await;
    ubsync::sync::bind_events(&ctx).await.unwrap();
    env.sims
        .bitrix24
        .click_to_call(10, "+380671239999", None)
        .await;
    // The portal reserves the event, then the connection drops: the process is killed with
    // the answer in flight.
    env.sims.bitrix24.inject(Fault::once(
        Some("event.offline.get"),
        FaultKind::CommitThenDrop,
    ));
    assert!(ubsync::sync::poll_offline(&ctx).await.is_err());
    assert_eq!(
        env.sims.bitrix24.offline_queue_len(),
        1,
        "reserved in the portal, unknown here"
    );
    drop(ctx);
    // A new process: the same process_id takes the reserved event again.
    let ctx = env.ctx().await;
    // Its clear is refused before it runs (a 502): it is owed, and sent again next time.
    env.sims.bitrix24.inject(Fault::once(
        Some("event.offline.clear"),
        FaultKind::Html(502),
    ));
    let first = crate::harness::pass(&ctx).await;
    assert_eq!(
        env.sims.unitalk.direct_calls().len(),
        1,
        "{first:?}: the click rang"
    );
    assert_eq!(
        env.sims.bitrix24.offline_queue_len(),
        1,
        "the clear was lost"
    );
    let again = ubsync::sync::poll_offline(&ctx).await.unwrap();
    assert_eq!(again, 0, "nothing is stored twice");
    assert_eq!(
        env.sims.bitrix24.offline_queue_len(),
        0,
        "the owed clear went"
    );
    crate::harness::pass(&ctx).await.unwrap();
    assert_eq!(env.sims.unitalk.direct_calls().len(), 1, "it rang once");
}
